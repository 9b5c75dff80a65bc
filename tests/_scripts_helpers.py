"""Run the container scripts as SageMaker's training toolkit does: a subprocess with
SM_* environment variables and hyperparameters as `--key value` arguments.

    env = sagemaker_env(tmp_path, {"train": d / "train", "valid": d / "valid", "test": d / "test"})
    proc = run_script("hpo.py", hyperparameter_args({"lr": 0.01, "epochs": 2}), env)
    metrics.parse_metrics(proc.stdout)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def sagemaker_env(tmp_path: Path, channels: dict[str, Path], hyperparameters: dict | None = None,
                  debug_config: dict | None = None, job_name: str = "test-job",
                  extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a SageMaker training container, rooted at tmp_path/opt_ml.

    channels: {"train": path, ...} -> SM_CHANNEL_TRAIN=path ... (or {"training": root}).
    debug_config: written as <input/config>/debughookconfig.json (what SageMaker
    writes when the job has Debugger rules). Torch threads are pinned to 1: the CI
    machine has 2 cores shared by everyone.
    """
    opt_ml = Path(tmp_path) / "opt_ml"
    dirs = {
        "SM_MODEL_DIR": opt_ml / "model",
        "SM_OUTPUT_DIR": opt_ml / "output",
        "SM_OUTPUT_DATA_DIR": opt_ml / "output" / "data",
        "SM_INPUT_DIR": opt_ml / "input",
        "SM_INPUT_CONFIG_DIR": opt_ml / "input" / "config",
        "SM_CHECKPOINT_DIR": opt_ml / "checkpoints",
    }
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SM_", "SMDEBUG_", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_"))}
    env.update({k: str(v) for k, v in dirs.items()})
    env.update({
        "TRAINING_JOB_NAME": job_name,
        "SM_CURRENT_HOST": "algo-1",
        "SM_HOSTS": json.dumps(["algo-1"]),
        "SM_NUM_GPUS": "0",
        "SM_NUM_CPUS": str(os.cpu_count() or 1),
        "SM_CHANNELS": json.dumps(sorted(channels)),
        "SM_HPS": json.dumps(hyperparameters or {}, default=str),
        "SM_MODULE_DIR": str(SCRIPTS),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    for name, path in channels.items():
        env[f"SM_CHANNEL_{name.upper()}"] = str(path)
    if debug_config is not None:
        (dirs["SM_INPUT_CONFIG_DIR"] / "debughookconfig.json").write_text(json.dumps(debug_config))
    env.update(extra or {})
    return env


def hyperparameter_args(hyperparameters: dict, quoted: bool = False) -> list[str]:
    """`--key value` pairs as SageMaker passes them; quoted=True JSON-encodes each
    value as values read through pipeline step properties arrive (`'"64"'`)."""
    args = []
    for key, value in hyperparameters.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        args += [f"--{key}", json.dumps(text) if quoted else text]
    return args


def run_script(name: str, args: list[str], env: dict[str, str], nproc: int = 1, timeout: float = 300,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run scripts/<name> (under torchrun when nproc > 1); stdout and stderr together in .stdout.

    Runs from the job's own opt_ml folder, so a stray relative write lands there.
    check=True raises with the log's tail when the exit status is not 0.
    """
    launcher = [sys.executable]
    if nproc > 1:
        # --standalone: a rendezvous on a free localhost port
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cwd = Path(env["SM_MODEL_DIR"]).parent
    proc = subprocess.run([*launcher, str(SCRIPTS / name), *args], env=env, cwd=cwd, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc

