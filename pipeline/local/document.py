"""A pipeline definition JSON as a document: parsed, with the outer shape every reader relies on.

Light on purpose (json only): run_pipeline.py checks a --definition-file with it before handing
the text to either runner, and the interpreter loads what it runs with it.
"""
from __future__ import annotations

import json

from pipeline.errors import DefinitionError


def load_definition(text: str | dict, source: str = "definition") -> dict:
    try:
        d = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as e:
        raise DefinitionError(f"{source}: not JSON ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("Steps"), list):
        raise DefinitionError(f"{source}: a pipeline definition needs a Steps list")
    return d
