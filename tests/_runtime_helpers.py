"""Finding the SageMaker toolkits venv (pipeline/runtime/toolkits.py) and Java for the fidelity tests."""
from __future__ import annotations

import os

import pytest

from pipeline.runtime import serving, toolkits


def require_toolkits(java: bool = False) -> str:
    """The toolkit venv's python; under CI=true a missing venv (or Java) fails the test,
    elsewhere it skips with the command that creates it."""
    reason = toolkits.missing_reason() or (serving.java_missing() if java else None)
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " (.ci/run installs it)")
        pytest.skip(reason)
    return str(toolkits.venv_python())
