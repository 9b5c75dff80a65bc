"""The training scripts' own error types: what they print as one line and exit 1 with.

Imports nothing of the host (pipeline/, steps/): this folder ships on its own.
"""
from __future__ import annotations

import re


class InputError(ValueError):
    """Bad input from the user (flag, channel, data): printed without a traceback."""


class TrainingDiverged(InputError):
    """The loss became non-finite: the run is refused (exit 1) and writes no model."""


def one_line(err: InputError) -> str:
    """The message of an InputError, on one line. One raised in a DataLoader worker arrives
    re-raised with the worker's traceback in its text: keep only the original message."""
    text = str(err).strip()
    if "\nOriginal Traceback" in text:
        text = re.sub(r"^[\w.]*(InputError|TrainingDiverged): ", "", text.splitlines()[-1])
    return " ".join(text.split())
