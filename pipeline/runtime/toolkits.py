"""The SageMaker containers' own software, in a virtualenv of its own layered on the project's.

    python -m pipeline.runtime.toolkits            # create or update it (idempotent)
    python -m pipeline.runtime.toolkits --check    # exit 1 with the command to run if it is missing

The training toolkit (sagemaker-training) needs protobuf >= 5.28 while the project
pins protobuf 3.20.3 (smdebug), and it pip-installs a job's requirements.txt into its
own interpreter. So the toolkits get their own venv; a .pth file in it appends the
project venv's site-packages, so torch, torchvision and Pillow are shared (not
installed twice) while the toolkit venv's own packages (protobuf, ...) come first.

Location: $SAGEMAKER_TOOLKITS_VENV, else .venv-toolkits/ in the checkout (ignored by git).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV_VAR = "SAGEMAKER_TOOLKITS_VENV"
# What the SageMaker PyTorch training and inference images run (versions on PyPI).
PACKAGES = (
    "sagemaker-training==5.1.4",
    "sagemaker-pytorch-training==3.0.0",   # SAGEMAKER_TRAINING_MODULE of the PyTorch training images
    "sagemaker-pytorch-inference==2.0.25",
    "sagemaker-inference==1.10.1",
    "torchserve==0.12.0",
    "torch-model-archiver==0.12.0",
    # as the images resolve it: sagemaker-training wants >= 5.28.1, the images' sagemaker<3 SDK < 7
    "protobuf>=5.28.1,<7",
)
STAMP = ".toolkits-installed"
CREATE_COMMAND = f"{Path(sys.executable).name} -m pipeline.runtime.toolkits"


def venv_dir() -> Path:
    return Path(os.environ.get(ENV_VAR) or ROOT / ".venv-toolkits").absolute()


def venv_python(path: Path | None = None) -> Path:
    return (path or venv_dir()) / "bin" / "python"


def _wanted(base_site: str) -> str:
    """What the venv must match: the packages and the project site-packages it layers on."""
    return hashlib.sha256("\n".join(PACKAGES + (base_site,)).encode()).hexdigest()


def _project_site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


def missing_reason(path: Path | None = None) -> str | None:
    """None when the toolkit venv is ready; else why not, with the command that makes it."""
    path = path or venv_dir()
    stamp = path / STAMP
    if not venv_python(path).exists() or not stamp.is_file():
        return f"the SageMaker toolkits venv {path} is missing: create it with `{CREATE_COMMAND}`"
    if stamp.read_text().strip() != _wanted(_project_site_packages()):
        return f"the SageMaker toolkits venv {path} is out of date: update it with `{CREATE_COMMAND}`"
    return None


def ensure(path: Path | None = None, quiet: bool = False) -> Path:
    """Create (or bring up to date) the toolkit venv; returns its python. A no-op when current."""
    path = path or venv_dir()
    if missing_reason(path) is None:
        return venv_python(path)
    base_site = _project_site_packages()
    if not venv_python(path).exists():
        # the base interpreter, not this venv's python: a venv made from a venv points at the base anyway
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    site = subprocess.run([str(venv_python(path)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # Appended after the venv's own site-packages: its protobuf wins, torch comes from the project.
    Path(site, "_project_site_packages.pth").write_text(base_site + "\n")
    # --no-warn-conflicts: pip would report the project's protobuf==3.20.3 pin, which this venv
    # overrides on purpose (the toolkit's protobuf comes first on its sys.path)
    cmd = [str(venv_python(path)), "-m", "pip", "install", "--disable-pip-version-check", "--no-warn-conflicts"]
    subprocess.run(cmd + (["-q"] if quiet else []) + list(PACKAGES), check=True)
    (path / STAMP).write_text(_wanted(base_site) + "\n")
    return venv_python(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only say whether the venv is ready")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.check:
        reason = missing_reason()
        print(f"error: {reason}" if reason else venv_python(), file=sys.stderr if reason else sys.stdout)
        return 1 if reason else 0
    try:
        print(ensure(quiet=args.quiet))
    except subprocess.CalledProcessError as err:
        print(f"error: {venv_dir()}: `{' '.join(map(str, err.cmd))[:200]}` failed with exit {err.returncode} "
              f"(pip's message is above); rerun `{CREATE_COMMAND}` once PyPI is reachable", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
