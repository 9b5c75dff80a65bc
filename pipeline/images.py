"""Which container images the pipeline's jobs and endpoint run.

Explicit URIs from the config (framework.training_image / inference_image) win;
otherwise the PyTorch DLC of framework.training_version / inference_version that the
pinned SDK knows for the instance type (CPU or GPU image). The SDK's own table
(sagemaker/image_uri_config/pytorch.json) is read here without importing the SDK, so
config validation stays fast.
"""
from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path


@cache
def _sdk_config(name: str) -> dict:
    spec = importlib.util.find_spec("sagemaker")
    root = Path(next(iter(spec.submodule_search_locations)))
    return json.loads((root / "image_uri_config" / f"{name}.json").read_text())


def sdk_image_versions(scope: str, py_version: str) -> list[str]:
    """PyTorch versions the pinned SDK has `scope` ('training'/'inference') images of for py_version."""
    versions = _sdk_config("pytorch")[scope]["versions"]
    return [v for v, spec in versions.items() if py_version in spec.get("py_versions", [])]


def debugger_rule_accounts() -> dict[str, str]:
    """Region -> the AWS account whose ECR holds the Debugger rule images (sagemaker-debugger-rules)."""
    return dict(_sdk_config("debugger")["versions"]["latest"]["registries"])


def dlc_accounts(scope: str, version: str) -> dict[str, str]:
    """Region -> the AWS account of the PyTorch DLC repositories for one version."""
    return dict(_sdk_config("pytorch")[scope]["versions"][version]["registries"])


def image_uri(cfg, scope: str, instance_type: str) -> str:
    """The image for `scope` ('training'/'inference') on a config instance type (not a Parameter:
    the SDK would read its default)."""
    f = cfg.framework
    explicit = f.training_image if scope == "training" else f.inference_image
    if explicit:
        return explicit
    from sagemaker import image_uris
    version = f.training_version if scope == "training" else f.inference_version
    return image_uris.retrieve("pytorch", region=cfg.aws.region, version=version, py_version=f.py_version,
                               instance_type=instance_type, image_scope=scope)
