"""SageMaker Debugger's built-in rules, evaluated here over a job's smdebug output.

pip's smdebug ships the Rule machinery but not the rules AWS runs in its rule
containers, so the ones our definitions use are small `smdebug.rules.Rule`
subclasses below, with AWS's parameter names and defaults
(docs: "List of Debugger built-in rules"). Parameters arrive as strings, as in
DebugRuleConfigurations[].RuleParameters.

`evaluate_rules(configs, tensors_dir)` returns DebugRuleEvaluationStatuses:
NoIssuesFound / IssuesFound / Error, each with StatusDetails.
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.local.jobs import arn, now_iso


def _quiet_smdebug() -> None:
    import os
    os.environ.setdefault("SMDEBUG_LOG_LEVEL", "error")
    logging.getLogger("smdebug").setLevel(logging.ERROR)


_quiet_smdebug()
with warnings.catch_warnings():  # smdebug's generated protobuf code trips protobuf's deprecations
    warnings.simplefilter("ignore", DeprecationWarning)
    from smdebug.core.modes import ModeKeys
    from smdebug.exceptions import (
        RuleEvaluationConditionMet, StepUnavailable, TensorUnavailable, TensorUnavailableForStep)
    from smdebug.rules.rule import Rule
    from smdebug.trials import create_trial


def _bool(text: Any) -> bool:
    return str(text).strip().lower() in ("1", "true", "yes")


class _Base(Rule):
    """Parameters typed from the class defaults; unknown ones are an error (typos)."""
    defaults: dict[str, Any] = {}

    def __init__(self, base_trial, **params):
        super().__init__(base_trial, action_str="")
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown RuleParameters {unknown}; "
                             f"known: {sorted(self.defaults)}")
        for key, default in self.defaults.items():
            raw = params.get(key, default)
            if raw is None or default is None:
                value = raw
            elif isinstance(default, bool):
                value = _bool(raw)
            else:
                try:
                    value = type(default)(raw)
                except ValueError:
                    raise ValueError(f"{type(self).__name__}: RuleParameters.{key}={raw!r} "
                                     f"is not a {type(default).__name__}") from None
            setattr(self, key, value)
        self.details = ""

    def _scalar(self, name: str, step: int) -> float:
        return float(np.mean(self.base_trial.tensor(name).value(step)))

    def _loss_names(self) -> list[str]:
        names = set()
        regex = getattr(self, "tensor_regex", None)
        if regex:
            names |= set(self.base_trial.tensor_names(regex=regex))
        if getattr(self, "use_losses_collection", True):
            try:
                names |= set(self.base_trial.tensor_names(collection="losses"))
            except Exception:  # noqa: BLE001 - no such collection in this run
                pass
        return sorted(names)

    def _issue(self, step: int, details: str) -> bool:
        self.details = details
        return True


class LossNotDecreasing(_Base):
    """Every `num_steps`, the loss must have dropped by at least `diff_percent` percent."""
    defaults = {"tensor_regex": None, "use_losses_collection": True, "num_steps": 10, "diff_percent": 0.1,
                "increase_threshold_percent": 5.0, "mode": None}

    def __init__(self, base_trial, **params):
        super().__init__(base_trial, **params)
        self.last: dict[str, tuple[int, float]] = {}

    def invoke_at_step(self, step):
        if self.mode and self.base_trial.mode(step).name != str(self.mode).upper():
            return False
        for name in self._loss_names():
            try:
                value = self._scalar(name, step)
            except (TensorUnavailableForStep, TensorUnavailable):
                continue
            if name not in self.last:
                self.last[name] = (step, value)
                continue
            prev_step, prev = self.last[name]
            if step - prev_step < self.num_steps:
                continue
            self.last[name] = (step, value)
            if value > prev * (1 + self.increase_threshold_percent / 100) or \
                    value > prev - abs(prev) * self.diff_percent / 100:
                return self._issue(step, f"{name} went from {prev:.4g} (step {prev_step}) to {value:.4g} "
                                         f"(step {step}): not decreasing by {self.diff_percent}%")
        return False


class _TrainEval(_Base):
    """Training and validation loss side by side: smdebug saves the same loss
    tensor in TRAIN and EVAL mode."""

    def _losses(self, step) -> tuple[str, float] | None:
        mode = self.base_trial.mode(step)
        values = []
        for name in self._loss_names():
            try:
                values.append(self._scalar(name, step))
            except (TensorUnavailableForStep, TensorUnavailable):
                pass
        return (mode, float(np.mean(values))) if values else None


class Overfit(_TrainEval):
    """Validation loss above training loss by more than `ratio_threshold` (relative)
    for `patience` evaluations after `start_step`."""
    defaults = {"tensor_regex": None, "use_losses_collection": True, "start_step": 0, "patience": 1,
                "ratio_threshold": 0.1}

    def __init__(self, base_trial, **params):
        super().__init__(base_trial, **params)
        self.train_loss: float | None = None
        self.strikes = 0

    def invoke_at_step(self, step):
        got = self._losses(step)
        if got is None or step < self.start_step:
            return False
        mode, loss = got
        if mode == ModeKeys.TRAIN:
            self.train_loss = loss
            return False
        if mode != ModeKeys.EVAL or self.train_loss is None:
            return False
        ratio = (loss - self.train_loss) / max(abs(self.train_loss), 1e-12)
        self.strikes = self.strikes + 1 if ratio > self.ratio_threshold else 0
        if self.strikes >= self.patience:
            return self._issue(step, f"validation loss {loss:.4g} exceeds training loss {self.train_loss:.4g} "
                                     f"by {ratio:.0%} (> {self.ratio_threshold:.0%}) for {self.strikes} evaluations")
        return False


class Overtraining(_TrainEval):
    """No improvement by more than `delta` for `patience_train` training steps or
    `patience_validation` validation steps."""
    defaults = {"tensor_regex": None, "use_losses_collection": True, "patience_train": 5,
                "patience_validation": 10, "delta": 0.01}

    def __init__(self, base_trial, **params):
        super().__init__(base_trial, **params)
        self.best = {ModeKeys.TRAIN: math.inf, ModeKeys.EVAL: math.inf}
        self.stale = {ModeKeys.TRAIN: 0, ModeKeys.EVAL: 0}

    def invoke_at_step(self, step):
        got = self._losses(step)
        if got is None or got[0] not in self.best:
            return False
        mode, loss = got
        if loss < self.best[mode] - self.delta:
            self.best[mode], self.stale[mode] = loss, 0
            return False
        self.stale[mode] += 1
        patience = self.patience_train if mode == ModeKeys.TRAIN else self.patience_validation
        if self.stale[mode] >= patience:
            which = "training" if mode == ModeKeys.TRAIN else "validation"
            return self._issue(step, f"{which} loss has not improved by {self.delta} for {self.stale[mode]} "
                                     f"steps (best {self.best[mode]:.4g})")
        return False


class VanishingGradient(_Base):
    """Mean absolute gradient below `threshold` at a step."""
    defaults = {"threshold": 0.0000001}

    def invoke_at_step(self, step):
        names = self.base_trial.tensor_names(collection="gradients")
        values = []
        for name in names:
            try:
                values.append(float(np.mean(np.abs(self.base_trial.tensor(name).value(step)))))
            except (TensorUnavailableForStep, TensorUnavailable):
                pass
        if values and float(np.mean(values)) < self.threshold:
            return self._issue(step, f"mean |gradient| {np.mean(values):.3g} < {self.threshold:g} at step {step}")
        return False


class ExplodingTensor(_Base):
    """NaN (or, unless only_nan, infinite) values in the watched tensors."""
    defaults = {"collection_names": "gradients", "tensor_regex": None, "only_nan": False}

    def invoke_at_step(self, step):
        names = set(self.base_trial.tensor_names(regex=self.tensor_regex)) if self.tensor_regex else set()
        for coll in filter(None, str(self.collection_names or "").split(",")):
            try:
                names |= set(self.base_trial.tensor_names(collection=coll.strip()))
            except Exception:  # noqa: BLE001
                pass
        for name in sorted(names):
            try:
                v = np.asarray(self.base_trial.tensor(name).value(step), dtype=float)
            except (TensorUnavailableForStep, TensorUnavailable):
                continue
            bad = np.isnan(v).any() if self.only_nan else not np.isfinite(v).all()
            if bad:
                return self._issue(step, f"{name} has {'NaN' if self.only_nan else 'NaN/inf'} values at step {step}")
        return False


RULES: dict[str, type[_Base]] = {c.__name__: c for c in
                                 (LossNotDecreasing, Overfit, Overtraining, VanishingGradient, ExplodingTensor)}


def evaluate_rule(rule_name: str, params: dict[str, Any], tensors_dir: str | Path) -> tuple[str, str]:
    """(status, details) of one rule over a finished job's tensors."""
    if rule_name not in RULES:
        return "Error", f"rule {rule_name!r} is not available locally; known: {sorted(RULES)}"
    path = Path(tensors_dir)
    if not path.exists() or not any(path.rglob("*.tfevents")):
        return "Error", f"no Debugger tensors at {path}: the job ran without an smdebug hook"
    try:
        trial = create_trial(str(path))
        trial._training_end_delay_refresh = 0  # the job has finished: nothing more will arrive
        rule = RULES[rule_name](trial, **params)
        steps = trial.steps()
        for step in steps:
            try:
                rule.invoke(step)
            except (TensorUnavailableForStep, StepUnavailable, TensorUnavailable):
                continue
    except RuleEvaluationConditionMet:
        return "IssuesFound", rule.details or f"{rule_name} found an issue"
    except Exception as e:  # noqa: BLE001 - a broken rule is the rule's Error status, not the pipeline's
        return "Error", f"{type(e).__name__}: {e}"
    return "NoIssuesFound", f"evaluated {len(steps)} steps"


def evaluate_rules(configs: list[dict], tensors_dir: str | Path, job_name: str) -> list[dict]:
    """DebugRuleConfigurations -> DebugRuleEvaluationStatuses (DescribeTrainingJob's shape)."""
    out = []
    for config in configs or []:
        name = config.get("RuleConfigurationName", "?")
        params = dict(config.get("RuleParameters") or {})
        rule = params.pop("rule_to_invoke", name)
        for key in [k for k in params if k.startswith(("other_trial", "base_trial"))]:
            params.pop(key)  # only one trial here: the job's own
        status, details = evaluate_rule(rule, params, tensors_dir)
        out.append({"RuleConfigurationName": name,
                    "RuleEvaluationJobArn": arn("processing-job", f"{job_name[:40]}-{name[:20]}"),
                    "RuleEvaluationStatus": status, "StatusDetails": details, "LastModifiedTime": now_iso()})
    return out
