"""The definition JSON's expression language: Get, Std:Join, Std:JsonGet, conditions.

A value in the definition is either a literal or one of
  {"Get": "Parameters.X" | "Execution.PipelineExecutionId" | "Steps.S.Some.Path['k'][0]"}
  {"Std:Join": {"On": ",", "Values": [...]}}
  {"Std:JsonGet": {"PropertyFile": {"Get": "Steps.S.PropertyFiles.F"} | "F", "Path": "a.b[0]"}}
and a condition is {"Type": "GreaterThanOrEqualTo", "LeftValue": ..., "RightValue": ...} etc.
`resolve` walks any JSON value and replaces the expressions; `Context` says where
parameters, execution variables, step properties and property files come from.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.local.dag import step_of_ref


class ExpressionError(UserError, ValueError):
    """A reference that cannot be resolved (unknown parameter, step, property, path)."""


@dataclass
class Context:
    parameters: dict[str, Any] = field(default_factory=dict)
    execution: dict[str, Any] = field(default_factory=dict)
    # step name -> its properties, in the shape of the Describe* response
    properties: dict[str, dict] = field(default_factory=dict)
    # (step name, property file name) -> parsed JSON; filled lazily by the executor's loader
    property_file_loader: Callable[[str, str], Any] | None = None
    # s3 URI -> parsed JSON, for Std:JsonGet's S3Uri form
    s3_json_loader: Callable[[str], Any] | None = None


# ---------------------------------------------------------------- paths

_TOKEN = re.compile(r"""\.?([A-Za-z_][A-Za-z0-9_:-]*)"""         # .Name
                    r"""|\[\s*(-?\d+)\s*\]"""                    # [0]
                    r"""|\[\s*'((?:[^'\\]|\\.)*)'\s*\]"""         # ['key']
                    r"""|\[\s*"((?:[^"\\]|\\.)*)"\s*\]""")        # ["key"]


def split_path(path: str) -> list[str | int]:
    """`A.B['x y'][0].C` -> ['A', 'B', 'x y', 0, 'C']. Raises on anything else."""
    out: list[str | int] = []
    pos = 0
    while pos < len(path):
        m = _TOKEN.match(path, pos)
        if not m or m.end() == pos:
            raise ExpressionError(f"cannot parse property path {path!r} at {path[pos:]!r}")
        name, index, sq, dq = m.groups()
        if name is not None:
            out.append(name)
        elif index is not None:
            out.append(int(index))
        else:
            out.append(sq if sq is not None else dq)
        pos = m.end()
    return out


def _select(items: list, key: str, where: str) -> Any:
    """A list indexed by a string picks the element named so, as AWS does for
    FinalMetricDataList['test accuracy'] (MetricName) and friends (…Name)."""
    for item in items:
        if isinstance(item, dict) and any(
            k.endswith("Name") and v == key for k, v in item.items()
        ):
            return item
    names = [next((v for k, v in i.items() if k.endswith("Name")), None) for i in items if isinstance(i, dict)]
    raise ExpressionError(f"{where}: no element named {key!r} (have {names})")


def walk(value: Any, parts: list[str | int], where: str) -> Any:
    for i, part in enumerate(parts):
        here = f"{where}{_render(parts[:i + 1])}"
        if isinstance(value, dict):
            if part not in value:
                raise ExpressionError(f"{here}: no such property (have {sorted(value)})")
            value = value[part]
        elif isinstance(value, list):
            if isinstance(part, int):
                if not -len(value) <= part < len(value):
                    raise ExpressionError(f"{here}: index out of range (length {len(value)})")
                value = value[part]
            else:
                value = _select(value, part, here)
        else:
            raise ExpressionError(f"{here}: cannot index into {type(value).__name__} {value!r}")
    return value


def _render(parts: list[str | int]) -> str:
    s = ""
    for p in parts:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if re.fullmatch(r"[A-Za-z_][\w-]*", p) else f"['{p}']")
    return s


# ---------------------------------------------------------------- Get

def get(ref: str, ctx: Context) -> Any:
    if not isinstance(ref, str):
        raise ExpressionError(f"Get expects a string, got {ref!r}")
    root, _, rest = ref.partition(".")
    if root == "Parameters":
        if rest not in ctx.parameters:
            raise ExpressionError(f"Get {ref!r}: unknown parameter {rest!r} (have {sorted(ctx.parameters)})")
        return ctx.parameters[rest]
    if root == "Execution":
        if rest not in ctx.execution:
            raise ExpressionError(f"Get {ref!r}: unknown execution variable (have {sorted(ctx.execution)})")
        return ctx.execution[rest]
    if root == "Steps":
        # step names may contain '-' and '.', so match the longest known name
        name = step_of_ref(rest, ctx.properties)
        if name is None:
            raise ExpressionError(f"Get {ref!r}: step not run or unknown (have {sorted(ctx.properties)})")
        path = rest[len(name):].lstrip(".")
        parts = split_path(path) if path else []
        if len(parts) == 2 and parts[0] == "PropertyFiles":
            if ctx.property_file_loader is None:
                raise ExpressionError(f"Get {ref!r}: no property files here")
            return ctx.property_file_loader(name, str(parts[1]))
        return walk(ctx.properties[name], parts, f"Steps.{name}")
    raise ExpressionError(f"Get {ref!r}: must start with Parameters., Execution. or Steps.")


# ---------------------------------------------------------------- JsonGet

def json_path(document: Any, path: str, where: str = "JsonGet") -> Any:
    """JsonGet's path: dotted names and [index]/['key'] parts, e.g. `metrics.accuracy.value`."""
    return walk(document, split_path(path), where)


def to_text(value: Any) -> str:
    """How a value renders inside Std:Join (and anywhere a string is needed)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def resolve(value: Any, ctx: Context) -> Any:
    """Replace every expression inside `value` (any JSON) by what it means now."""
    if isinstance(value, list):
        return [resolve(v, ctx) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (key, arg), = value.items()
        if key == "Get":
            return get(arg, ctx)
        if key == "Std:Join":
            if not isinstance(arg, dict) or "Values" not in arg:
                raise ExpressionError(f"Std:Join needs On and Values, got {arg!r}")
            return str(arg.get("On", "")).join(to_text(resolve(v, ctx)) for v in arg["Values"])
        if key == "Std:JsonGet":
            return _json_get(arg, ctx)
    return {k: resolve(v, ctx) for k, v in value.items()}


def _json_get(arg: dict, ctx: Context) -> Any:
    if not isinstance(arg, dict) or "Path" not in arg:
        raise ExpressionError(f"Std:JsonGet needs PropertyFile (or S3Uri) and Path, got {arg!r}")
    if "S3Uri" in arg:
        if ctx.s3_json_loader is None:
            raise ExpressionError("Std:JsonGet with S3Uri: no object store here")
        doc = ctx.s3_json_loader(to_text(resolve(arg["S3Uri"], ctx)))
        return json_path(doc, arg["Path"], f"JsonGet({arg['S3Uri']})")
    pf = arg.get("PropertyFile")
    if isinstance(pf, str):
        # the bare-name form names a property file of the step that declared it; the
        # executor registers name -> step when it reads PropertyFiles
        pf = {"Get": f"Steps.{_owner_of(pf, ctx)}.PropertyFiles.{pf}"}
    doc = resolve(pf, ctx)
    return json_path(doc, arg["Path"], f"JsonGet({pf.get('Get') if isinstance(pf, dict) else pf})")


def _owner_of(property_file: str, ctx: Context) -> str:
    owners = ctx.execution.get("_property_file_owners", {})
    if property_file not in owners:
        raise ExpressionError(f"Std:JsonGet: no step declares property file {property_file!r}")
    return owners[property_file]


# ---------------------------------------------------------------- conditions

_COMPARE = {
    "Equals": lambda a, b: a == b,
    "GreaterThan": lambda a, b: a > b,
    "GreaterThanOrEqualTo": lambda a, b: a >= b,
    "LessThan": lambda a, b: a < b,
    "LessThanOrEqualTo": lambda a, b: a <= b,
}
CONDITION_TYPES = sorted([*_COMPARE, "In", "Not", "Or"])


def _coerce_pair(a: Any, b: Any) -> tuple[Any, Any]:
    """Numbers compare as numbers even when one side arrived as text (a metric
    value vs a --param override), as on AWS; otherwise compare as given."""
    def num(x):
        if isinstance(x, bool):
            return None
        if isinstance(x, (int, float)):
            return float(x)
        if isinstance(x, str):
            try:
                v = float(x)
                return v if math.isfinite(v) or x.strip().lower() in ("inf", "-inf", "nan") else None
            except ValueError:
                return None
        return None
    na, nb = num(a), num(b)
    if na is not None and nb is not None and (not isinstance(a, str) or not isinstance(b, str)):
        return na, nb
    return a, b


def evaluate_condition(cond: dict, ctx: Context) -> bool:
    if not isinstance(cond, dict) or "Type" not in cond:
        raise ExpressionError(f"a condition needs a Type (one of {CONDITION_TYPES}), got {cond!r}")
    kind = cond["Type"]
    if kind in _COMPARE:
        a, b = _coerce_pair(resolve(cond["LeftValue"], ctx), resolve(cond["RightValue"], ctx))
        try:
            return bool(_COMPARE[kind](a, b))
        except TypeError as e:
            raise ExpressionError(f"{kind}: cannot compare {a!r} with {b!r}") from e
    if kind == "In":
        q = resolve(cond["QueryValue"], ctx)
        return any(_coerce_pair(q, v)[0] == _coerce_pair(q, v)[1] for v in resolve(cond["Values"], ctx))
    if kind == "Not":
        return not evaluate_condition(cond["Condition"], ctx)
    if kind == "Or":
        return any(evaluate_condition(c, ctx) for c in cond["Conditions"])
    raise ExpressionError(f"unknown condition Type {kind!r}; known: {CONDITION_TYPES}")


def read_json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ExpressionError(f"{what}: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ExpressionError(f"{what}: {path} is not JSON ({e})") from None
