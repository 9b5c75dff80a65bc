"""The config reference in README.md, generated from the typed config so it never drifts.

    python -m pipeline.config_reference          # print the Markdown table
    python -m pipeline.config_reference --write  # refresh README.md between its markers

Each row comes from pipeline/config.py: the field path, its type and valid values
(pydantic constraints, Literal choices), its default (or "required") and the
comment written beside the field.
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pipeline.config import REPO_ROOT, Config
from pipeline.files import atomic_write

README = REPO_ROOT / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
_COMMENTED_FIELD = re.compile(r"^\s+(\w+):[^#]*#\s*(.+)$")


def _comments(model: type[BaseModel]) -> dict[str, str]:
    notes = {}
    for line in inspect.getsource(model).splitlines():
        m = _COMMENTED_FIELD.match(line)
        if m:
            notes[m.group(1)] = m.group(2).strip()
    return notes


def _models_in(annotation) -> list[type[BaseModel]]:
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in args).replace("'", "")
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _constraints(info: FieldInfo) -> str:
    out = []
    for item in info.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "len ≥"),
                           ("max_length", "len ≤"), ("pattern", "matches")):
            value = getattr(item, attr, None)
            if value is not None:
                out.append(f"{sign} {value}")
    return ", ".join(out)


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "**required**"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section defaults)"
    return f"`{value!r}`" if value not in (None, "", [], {}) else f"`{value!r}`"


def rows(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    out = []
    notes = _comments(model)
    for name, info in model.model_fields.items():
        if model is Config and name == "source":
            continue  # set by load_config, not by the file
        path = f"{prefix}{name}"
        nested = _models_in(info.annotation)
        origin = typing.get_origin(info.annotation)
        if nested and origin is dict:
            path += ".<name>"
        elif nested and origin is list:
            path += "[]"
        kinds = _type_name(info.annotation)
        if len(nested) > 1:   # a discriminated union of sections (tuning ranges)
            for sub in nested:
                tag = typing.get_args(sub.model_fields["type"].annotation)[0]
                out += rows(sub, f"{path} ({tag}).")
            continue
        if nested:
            doc = inspect.getdoc(nested[0]) if nested[0].__doc__ else ""
            kind = "list of sections" if origin is list else "section"
            out.append((path, kind + (" or null" if "null" in kinds else ""),
                        _default(info), notes.get(name) or (doc or "").split("\n")[0]))
            out += rows(nested[0], f"{path}.")
            continue
        constraint = _constraints(info)
        out.append((path, kinds + (f" ({constraint})" if constraint else ""), _default(info), notes.get(name, "")))
    return out


def markdown() -> str:
    lines = ["| key | type / valid values | default | note |", "|---|---|---|---|"]
    lines += [f"| `{p}` | {t} | {d} | {n.replace('|', '/')} |" for p, t, d, n in rows()]
    return "\n".join(lines) + "\n"


def readme_with_reference(text: str) -> str:
    if START not in text or END not in text:
        raise ValueError(f"README.md lacks the markers {START} ... {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{markdown()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="refresh README.md between its markers")
    args = parser.parse_args(argv)
    if args.write:
        atomic_write(README, readme_with_reference(README.read_text()))
        print(f"refreshed the config reference in {README}")
    else:
        sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
