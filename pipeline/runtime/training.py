"""The PyTorch training image's own entry point, run here on an /opt/ml-shaped sandbox.

    sandbox = write_sandbox(dir, source="sourcedir.tar.gz", entry_point="hpo.py",
                            hyperparameters=sdk_hyperparameters({"epochs": 1}) | {"lr": "0.01"},
                            channels={"train": path, ...})
    done = run(sandbox)          # `from sagemaker_training.cli.train import main; main()`

What runs is what the image runs: sagemaker-training's trainer with
SAGEMAKER_TRAINING_MODULE=sagemaker_pytorch_container.training:main (as the image's
Dockerfile sets it), which reads <base>/input/config/*.json, extracts the source archive
into <base>/code, pip-installs its requirements.txt into *its own interpreter*, and runs
the entry point with the SM_* environment and `--key value` arguments.

Two settings make it run outside a container, both read by the toolkits themselves:
SAGEMAKER_BASE_DIR (instead of /opt/ml) and SM_STUDIO_LOCAL_MODE=true, the toolkits'
own switch to skip waiting until the cluster's host names (algo-1) resolve (without it
they retry the DNS lookup for 15 minutes). The pip install goes into a throwaway venv
layered on the toolkit venv (job_venv), never into the project's or the toolkit venv.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.runtime import toolkits

TRAINING_MODULE = "sagemaker_pytorch_container.training:main"
ENTRY = "from sagemaker_training.cli.train import main; main()"
HOST = "algo-1"


def sdk_hyperparameters(hyperparameters: dict) -> dict[str, str]:
    """Static hyperparameters as the SageMaker Python SDK writes them: each value JSON-encoded
    (the pipeline's estimators pass strings, so they arrive quoted: "\\"224\\"")."""
    return {k: json.dumps(v) for k, v in hyperparameters.items()}


def write_sandbox(base_dir: str | os.PathLike, *, source: str | os.PathLike, entry_point: str,
                  hyperparameters: dict[str, str], channels: dict[str, str | os.PathLike],
                  job_name: str = "local-job", instance_type: str = "ml.m5.large",
                  region: str = "us-east-1") -> Path:
    """/opt/ml as SageMaker lays it out for CreateTrainingJob: hyperparameters (already
    encoded, e.g. by sdk_hyperparameters and as a tuner writes its picks) plus the framework
    parameters the SDK adds, inputdataconfig, resourceconfig, and the channels under input/data."""
    base = Path(base_dir)
    config, data = base / "input" / "config", base / "input" / "data"
    # The platform makes these before the toolkit starts; the toolkit's failure report needs
    # output/ (when it cannot write output/failure it exits 0, however the script ended).
    for path in (config, data, base / "model", base / "output" / "data"):
        path.mkdir(parents=True, exist_ok=True)
    framework = sdk_hyperparameters({"sagemaker_program": entry_point,
                                     "sagemaker_submit_directory": str(Path(source).resolve()),
                                     "sagemaker_region": region, "sagemaker_job_name": job_name})
    framework["sagemaker_container_log_level"] = "20"
    (config / "hyperparameters.json").write_text(json.dumps({**hyperparameters, **framework}))
    (config / "inputdataconfig.json").write_text(json.dumps({
        name: {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"}
        for name in channels}))
    group = {"instance_group_name": "homogeneousCluster", "instance_type": instance_type, "hosts": [HOST]}
    (config / "resourceconfig.json").write_text(json.dumps({
        "current_host": HOST, "current_instance_type": instance_type, "current_group_name": "homogeneousCluster",
        "hosts": [HOST], "instance_groups": [group], "network_interface_name": "eth0"}))
    for name, path in channels.items():
        link = data / name
        if not link.exists():
            link.symlink_to(Path(path).resolve(), target_is_directory=True)
    return base


def job_venv(path: str | os.PathLike, toolkit_python: str | os.PathLike | None = None) -> Path:
    """A venv without packages of its own whose sys.path continues with the toolkit venv's
    and the project's site-packages: what a job pip-installs lands here and nowhere else.
    Returns its python. Cheap (no pip inside: `python -m pip` comes from the toolkit venv)."""
    path = Path(path)
    toolkit_python = Path(toolkit_python or toolkits.venv_python())
    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    query = "import sys; print(*sys.path[1:], sep='\\n')"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    below = subprocess.run([str(toolkit_python), "-c", query], check=True, capture_output=True,
                           text=True).stdout.split()
    # the toolkit venv's own site-packages, then everything its .pth added (the project's)
    paths = [p for p in below if p.endswith("site-packages")]
    Path(site, "_toolkit_site_packages.pth").write_text("\n".join(dict.fromkeys(paths)) + "\n")
    return python


def run(base_dir: str | os.PathLike, *, python: str | os.PathLike | None = None, env: dict | None = None,
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """The image's entry point on this sandbox, to completion; stdout and stderr together.
    Exit status 0 with <base>/output/success, else 1 with <base>/output/failure (FailureReason)."""
    python = str(python or toolkits.venv_python())
    run_env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SM_", "SAGEMAKER_", "SMDEBUG_", "PYTHONPATH"))}
    job_name = json.loads(json.loads((Path(base_dir) / "input" / "config" / "hyperparameters.json").read_text())
                          .get("sagemaker_job_name", '"local-job"'))
    run_env.update({"SAGEMAKER_BASE_DIR": str(Path(base_dir).resolve()), "SAGEMAKER_TRAINING_MODULE": TRAINING_MODULE,
                    "SM_STUDIO_LOCAL_MODE": "true", "TRAINING_JOB_NAME": job_name, "PYTHONUNBUFFERED": "1"})
    run_env.update(env or {})
    return subprocess.run([python, "-c", ENTRY], cwd=base_dir, env=run_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
