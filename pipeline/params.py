"""Pipeline parameters of a definition JSON: `--param NAME=VALUE` overrides, typed and checked.

One reading for both runners: AWS (pipeline/aws.py) and the local executor refuse the
same overrides with the same messages, judged from the definition alone.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pipeline.errors import DefinitionError
from pipeline.local.dag import all_steps


class ParameterError(DefinitionError):
    """A --param override (or a parameter value) the definition does not accept; a DefinitionError,
    so both runners refuse it the same way."""


# Which image each instance-type Parameter runs: (step type, path to the image in its Arguments).
_IMAGE_OF = {
    "TuningInstanceType": ("Tuning", ("TrainingJobDefinition", "AlgorithmSpecification", "TrainingImage")),
    "TrainingInstanceType": ("Training", ("AlgorithmSpecification", "TrainingImage")),
    "EndpointInstanceType": ("Model", ("PrimaryContainer", "Image")),
}


def gpu_instance(instance_type: str) -> bool:
    """ml.p*/ml.g* carry NVIDIA GPUs; everything else runs the CPU image."""
    return re.match(r"^ml\.[pg]\d", instance_type) is not None


def split_overrides(overrides: Iterable[str] | dict | None) -> dict[str, str]:
    if isinstance(overrides, dict):
        return dict(overrides)
    pairs = {}
    for item in overrides or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ParameterError(f"--param {item!r}: expected NAME=VALUE")
        pairs[name] = value
    return pairs


def _typed(name: str, kind: str, raw: Any) -> Any:
    try:
        if kind == "Integer":
            return int(raw)
        if kind == "Float":
            return float(raw)
        if kind == "Boolean":
            return raw if isinstance(raw, bool) else {"true": True, "false": False}[str(raw).lower()]
        return str(raw)
    except (ValueError, KeyError):
        raise ParameterError(f"--param {name}={raw!r}: expected {kind}") from None


def _check_image(definition: dict, name: str, instance_type: str) -> None:
    """The CPU/GPU image was chosen at build time from config: switching needs a rebuild."""
    step_type, path = _IMAGE_OF[name]
    for step in all_steps(definition):
        if step["Type"] != step_type:
            continue
        node = step["Arguments"]
        for key in path:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if not isinstance(node, str) or not re.search(r"-(cpu|gpu)-", node):
            continue  # an explicit image whose tag does not say: the user vouches for it
        built_gpu = "-gpu-" in node
        if gpu_instance(instance_type) != built_gpu:
            want, have = ("GPU", "CPU") if gpu_instance(instance_type) else ("CPU", "GPU")
            raise ParameterError(
                f"--param {name}={instance_type} needs the {want} image, but step {step['Name']} was built "
                f"with the {have} image {node}; set the instance type in the config and rebuild")


def check_overrides(definition: dict, overrides: Iterable[str] | dict | None) -> dict[str, Any]:
    """Only the given overrides, typed: unknown names, wrong types, values outside
    EnumValues and instance types that need the other image are refused."""
    declared = {p["Name"]: p for p in definition.get("Parameters", [])}
    out = {}
    for name, raw in split_overrides(overrides).items():
        if name not in declared:
            raise ParameterError(f"--param {name}: not a parameter of this pipeline; known: {sorted(declared)}")
        out[name] = _typed(name, declared[name].get("Type", "String"), raw)
        enum = declared[name].get("EnumValues")
        if enum and out[name] not in enum:
            raise ParameterError(f"--param {name}={raw!r}: not one of {enum}")
        if name in _IMAGE_OF:
            _check_image(definition, name, out[name])
    return out


def resolve_parameters(definition: dict, overrides: Iterable[str] | dict | None = None) -> dict[str, Any]:
    """Every declared parameter's value for an execution: its default, or the override."""
    given = check_overrides(definition, overrides)
    values = {}
    for p in definition.get("Parameters", []):
        name = p["Name"]
        if name in given:
            values[name] = given[name]
        elif p.get("DefaultValue") is None:
            raise ParameterError(f"parameter {name} has no DefaultValue: pass --param {name}=VALUE")
        else:
            values[name] = _typed(name, p.get("Type", "String"), p["DefaultValue"])
    return values
