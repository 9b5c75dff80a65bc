"""Metric log lines and the regexes that read them back.

The training scripts print these lines; SageMaker (MetricDefinitions), the local
executor and the tests read them with the regexes below. This module is the one
place both sides come from, so a format change cannot drift from its regex.
The host imports this file; it imports nothing of the host.
"""
from __future__ import annotations

import math
import re

# A float as Python prints it, including exponents, nan and inf.
NUMBER = r"([-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|nan|inf))"

# One line per epoch carries every metric of that epoch.
EPOCH_FIELDS = ("train_loss", "train_acc", "valid_loss", "valid_acc", "lr")

# Summary lines. The first two (KEPT_FIELDS) are printed after every epoch and again at the
# end, always for the weights kept so far (best validation loss): SageMaker's automatic early
# stopping reads the objective after each epoch, and the last value, the final metric, is the
# kept weights' wherever the job ends. The test lines are printed once, at the end.
SUMMARY_FIELDS = {
    "average validation loss": "best validation loss so far (the weights kept)",
    "validation accuracy": "validation accuracy of the weights kept",
    "average test loss": "test loss, read once at the end",
    "test accuracy": "top-1 test accuracy",
    "test top5 accuracy": "top-5 test accuracy",
}


def format_epoch(epoch: int, epochs: int, seconds: float, **values: float) -> str:
    """`epoch 3/8 train_loss=0.432100 train_acc=0.812300 ... lr=0.00123 time=12.3s`"""
    missing = [f for f in EPOCH_FIELDS if f not in values]
    if missing:
        raise ValueError(f"epoch line needs {missing}")
    parts = [f"{name}={values[name]:.6g}" for name in EPOCH_FIELDS]
    return f"epoch {epoch}/{epochs} " + " ".join(parts) + f" time={seconds:.1f}s"


def format_summary(name: str, value: float) -> str:
    """`average validation loss: 0.512300`"""
    if name not in SUMMARY_FIELDS:
        raise ValueError(f"unknown summary metric {name!r}; known: {sorted(SUMMARY_FIELDS)}")
    return f"{name}: {value:.6g}"


KEPT_FIELDS = ("average validation loss", "validation accuracy")


def format_kept(valid_loss: float, valid_acc: float) -> list[str]:
    """The KEPT_FIELDS lines for the weights kept so far."""
    return [format_summary(name, value) for name, value in zip(KEPT_FIELDS, (valid_loss, valid_acc))]


def _metric_definitions() -> list[dict[str, str]]:
    defs = [
        {"Name": f"epoch:{field}", "Regex": rf"epoch \d+/\d+ .*\b{field}={NUMBER}"}
        for field in EPOCH_FIELDS
    ]
    defs += [{"Name": name, "Regex": rf"{name}: {NUMBER}"} for name in SUMMARY_FIELDS]
    return defs


# In the exact shape of SageMaker's AlgorithmSpecification.MetricDefinitions.
METRIC_DEFINITIONS: list[dict[str, str]] = _metric_definitions()

# Progress for the runners' bars: the epoch line's counter and the rest of the line.
EPOCH_PROGRESS = re.compile(r"^epoch (\d+)/(\d+)\s*(.*)")
# A summary line at the start of a log line: its name.
SUMMARY_LINE = re.compile(r"^(" + "|".join(re.escape(name) for name in SUMMARY_FIELDS) + r"): ")


def epoch_progress(line: str) -> tuple[int, int, str] | None:
    """`epoch 3/8 train_loss=...` -> (3, 8, "train_loss=..."), else None."""
    m = EPOCH_PROGRESS.match(line)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def summary_name(line: str) -> str | None:
    """`test accuracy: 0.81` -> "test accuracy", else None."""
    m = SUMMARY_LINE.match(line)
    return m.group(1) if m else None


def parse_metrics(log: str, definitions: list[dict[str, str]] | None = None) -> dict[str, list[float]]:
    """Every value each definition's regex finds in `log`, line by line, in order.

    SageMaker applies MetricDefinitions per log line and keeps the last value as
    the final metric; this does the same so local runs report what AWS would.
    """
    definitions = METRIC_DEFINITIONS if definitions is None else definitions
    compiled = [(d["Name"], re.compile(d["Regex"])) for d in definitions]
    found: dict[str, list[float]] = {}
    for line in log.splitlines():
        for name, regex in compiled:
            match = regex.search(line)
            if match:
                value = float(match.group(1))
                found.setdefault(name, []).append(value)
    return found


def final_metrics(log: str, definitions: list[dict[str, str]] | None = None) -> dict[str, float]:
    """The last finite value of each metric, as FinalMetricDataList reports it."""
    out = {}
    for name, values in parse_metrics(log, definitions).items():
        finite = [v for v in values if not math.isnan(v)]
        if finite:
            out[name] = finite[-1]
    return out
