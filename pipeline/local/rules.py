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
        RuleEvaluationConditionMet,
        StepUnavailable,
        TensorUnavailable,
        TensorUnavailableForStep,
    )
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
                    # AWS documents some counts as floats ("steps": "10.0")
                    value = int(float(raw)) if type(default) is int and float(raw).is_integer() \
                        else type(default)(raw)
                except ValueError:
                    raise ValueError(f"{type(self).__name__}: RuleParameters.{key}={raw!r} "
                                     f"is not a {type(default).__name__}") from None
            setattr(self, key, value)
        self.details = ""
        self.checks = 0  # comparisons made: a pass over nothing should say so

    def _collection(self, name: str) -> list[str]:
        try:
            return self.base_trial.tensor_names(collection=name)
        except Exception:  # noqa: BLE001 - no such collection in this run
            return []

    def _scalar(self, name: str, step: int) -> float:
        return float(np.mean(self.base_trial.tensor(name).value(step)))

    def _loss_names(self) -> list[str]:
        names = set()
        regex = getattr(self, "tensor_regex", None)
        if regex:
            names |= set(self.base_trial.tensor_names(regex=regex))
        for coll in filter(None, str(getattr(self, "collection_names", None) or "").split(",")):
            names |= set(self._collection(coll.strip()))
        if getattr(self, "use_losses_collection", True):
            names |= set(self._collection("losses"))
        return sorted(names)

    def _issue(self, step: int, details: str) -> bool:
        self.details = details
        return True

    def unmet(self) -> str | None:
        """After the last step: why the rule had nothing to check (its Error), if so."""
        return None

    def summary(self, steps: int) -> str:
        """NoIssuesFound's details: what was checked."""
        return f"{self.checks} checks over {steps} saved steps"


class LossNotDecreasing(_Base):
    """Every `num_steps` steps, the loss must have dropped by at least `diff_percent`
    percent. One mode: `mode`, else EVAL, else TRAIN, else GLOBAL (as AWS picks), so a
    training loss is never compared with a validation loss."""
    defaults = {"collection_names": None, "tensor_regex": None, "use_losses_collection": True, "num_steps": 10,
                "diff_percent": 0.1, "increase_threshold_percent": 5.0, "mode": None}
    order = (ModeKeys.EVAL, ModeKeys.TRAIN, ModeKeys.GLOBAL)

    def __init__(self, base_trial, **params):
        super().__init__(base_trial, **params)
        self.last: dict[str, tuple[int, float]] = {}
        if self.mode:
            names = [m.name for m in self.order]
            if str(self.mode).upper() not in names:
                raise ValueError(f"LossNotDecreasing: RuleParameters.mode={self.mode!r}: one of {names}")
            self.check_mode = ModeKeys[str(self.mode).upper()]
        else:
            saved = set(base_trial.modes())
            self.check_mode = next((m for m in self.order if m in saved), ModeKeys.GLOBAL)

    def invoke_at_step(self, step):
        if self.base_trial.mode(step) != self.check_mode:
            return False
        mode_step = self.base_trial.mode_step(step)
        for name in self._loss_names():
            try:
                value = self._scalar(name, step)
            except (TensorUnavailableForStep, TensorUnavailable):
                continue
            if name not in self.last:
                self.last[name] = (mode_step, value)
                continue
            prev_step, prev = self.last[name]
            if mode_step - prev_step < self.num_steps:
                continue
            self.last[name] = (mode_step, value)
            self.checks += 1
            if value > prev * (1 + self.increase_threshold_percent / 100) or \
                    value > prev - abs(prev) * self.diff_percent / 100:
                return self._issue(step, f"{self.check_mode.name} {name} went from {prev:.4g} (step {prev_step}) "
                                         f"to {value:.4g} (step {mode_step}): not decreasing by {self.diff_percent}%")
        return False

    def summary(self, steps: int) -> str:
        return f"{self.checks} comparisons of the {self.check_mode.name} loss {self.num_steps} steps apart"


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
        self.checks += 1
        self.strikes = self.strikes + 1 if ratio > self.ratio_threshold else 0
        if self.strikes >= self.patience:
            return self._issue(step, f"validation loss {loss:.4g} exceeds training loss {self.train_loss:.4g} "
                                     f"by {ratio:.0%} (> {self.ratio_threshold:.0%}) for {self.strikes} evaluations")
        return False

    def summary(self, steps: int) -> str:
        return f"{self.checks} validation losses compared with the training loss"


class Overtraining(_TrainEval):
    """No improvement by more than `delta` for `patience_train` training steps or
    `patience_validation` validation steps."""
    defaults = {"tensor_regex": None, "use_losses_collection": True, "patience_train": 5,
                "patience_validation": 10, "delta": 0.01}

    def __init__(self, base_trial, **params):
        super().__init__(base_trial, **params)
        self.best: dict = {ModeKeys.TRAIN: (math.inf, 0), ModeKeys.EVAL: (math.inf, 0)}  # (loss, mode step)

    def invoke_at_step(self, step):
        got = self._losses(step)
        if got is None or got[0] not in self.best:
            return False
        mode, loss = got
        mode_step = self.base_trial.mode_step(step)
        self.checks += 1
        if loss < self.best[mode][0] - self.delta:
            self.best[mode] = (loss, mode_step)
            return False
        # patience in steps, not saved steps: the same verdict at any save_interval
        stale = mode_step - self.best[mode][1]
        patience = self.patience_train if mode == ModeKeys.TRAIN else self.patience_validation
        if stale >= patience:
            which = "training" if mode == ModeKeys.TRAIN else "validation"
            return self._issue(step, f"{which} loss has not improved by {self.delta} for {stale} steps "
                                     f"(best {self.best[mode][0]:.4g} at step {self.best[mode][1]})")
        return False

    def summary(self, steps: int) -> str:
        return f"{self.checks} training and validation losses followed"


class VanishingGradient(_Base):
    """Mean absolute gradient below `threshold` at a step."""
    defaults = {"threshold": 0.0000001}

    def invoke_at_step(self, step):
        values = []
        for name in self._collection("gradients"):
            try:
                values.append(float(np.mean(np.abs(self.base_trial.tensor(name).value(step)))))
            except (TensorUnavailableForStep, TensorUnavailable):
                pass
        self.checks += bool(values)
        if values and float(np.mean(values)) < self.threshold:
            return self._issue(step, f"mean |gradient| {np.mean(values):.3g} < {self.threshold:g} at step {step}")
        return False

    def unmet(self) -> str | None:
        return None if self.checks else "no gradients saved: the hook must save the gradients collection"

    def summary(self, steps: int) -> str:
        return f"gradients of {self.checks} steps"


class PoorWeightInitialization(_Base):
    """Signs of a poor initialisation in the first `steps` training steps (AWS's three
    checks): the variances of the activation inputs (`activation_inputs_regex`: the
    ReLU inputs, collection relu_input) differ across layers by more than `threshold`
    times; a gradient's 5th-95th percentile range is below `distribution_range`
    (too narrow to learn); or the loss has not decreased for `patience` steps."""
    defaults = {"activation_inputs_regex": ".*relu_input", "threshold": 10.0, "distribution_range": 0.001,
                "patience": 5, "steps": 10}

    def __init__(self, base_trial, **params):
        super().__init__(base_trial, **params)
        self.best_loss: tuple[float, int] | None = None      # (loss, training step)
        self.seen = {"activations": 0, "gradients": 0, "losses": 0}

    def _values(self, names, step) -> dict[str, np.ndarray]:
        out = {}
        for name in names:
            try:
                out[name] = np.asarray(self.base_trial.tensor(name).value(step), dtype=np.float64).ravel()
            except (TensorUnavailableForStep, TensorUnavailable):
                pass
        return out

    def invoke_at_step(self, step):
        trial = self.base_trial
        if trial.mode(step) != ModeKeys.TRAIN or trial.mode_step(step) >= self.steps:
            return False
        train_step = trial.mode_step(step)
        activations = self._values(trial.tensor_names(regex=self.activation_inputs_regex), step)
        if len(activations) >= 2:
            self.seen["activations"] += 1
            variances = {name: float(np.var(v)) for name, v in activations.items() if v.size}
            low, high = min(variances, key=variances.get), max(variances, key=variances.get)
            ratio = variances[high] / max(variances[low], 1e-30)
            if ratio > self.threshold:
                return self._issue(step, f"activation input variances differ {ratio:.3g}x across layers "
                                         f"(> {self.threshold:g}) at step {train_step}: {low} {variances[low]:.3g}, "
                                         f"{high} {variances[high]:.3g}")
        gradients = self._values(self._collection("gradients"), step)
        if gradients:
            self.seen["gradients"] += 1
            spread = {name: float(np.percentile(v, 95) - np.percentile(v, 5))
                      for name, v in gradients.items() if v.size}
            narrowest = min(spread, key=spread.get)
            if spread[narrowest] < self.distribution_range:
                return self._issue(step, f"{narrowest}: 5th-95th percentile range {spread[narrowest]:.3g} "
                                         f"< {self.distribution_range:g} at step {train_step}")
        losses = [float(np.mean(v)) for v in self._values(self._loss_names(), step).values()]
        if losses:
            self.seen["losses"] += 1
            loss = float(np.mean(losses))
            if self.best_loss is None or loss < self.best_loss[0]:
                self.best_loss = (loss, train_step)
            elif train_step - self.best_loss[1] >= self.patience:
                return self._issue(step, f"loss has not decreased for {train_step - self.best_loss[1]} steps "
                                         f"(best {self.best_loss[0]:.4g} at step {self.best_loss[1]})")
        return False

    def unmet(self) -> str | None:
        if not self.seen["activations"]:
            return (f"no two tensors match activation_inputs_regex {self.activation_inputs_regex!r} in the first "
                    f"{self.steps} training steps: the hook must save them (collection relu_input, whose "
                    f"include_regex must match the model's ReLU module names)")
        return None

    def summary(self, steps: int) -> str:
        return (f"first {self.steps} training steps: activation variances at {self.seen['activations']}, "
                f"gradient ranges at {self.seen['gradients']}, losses at {self.seen['losses']} of them")


class ExplodingTensor(_Base):
    """NaN (or, unless only_nan, infinite) values in the watched tensors."""
    defaults = {"collection_names": "gradients", "tensor_regex": None, "only_nan": False}

    def invoke_at_step(self, step):
        names = set(self.base_trial.tensor_names(regex=self.tensor_regex)) if self.tensor_regex else set()
        for coll in filter(None, str(self.collection_names or "").split(",")):
            names |= set(self._collection(coll.strip()))
        for name in sorted(names):
            try:
                v = np.asarray(self.base_trial.tensor(name).value(step), dtype=float)
            except (TensorUnavailableForStep, TensorUnavailable):
                continue
            self.checks += 1
            bad = np.isnan(v).any() if self.only_nan else not np.isfinite(v).all()
            if bad:
                return self._issue(step, f"{name} has {'NaN' if self.only_nan else 'NaN/inf'} values at step {step}")
        return False


RULES: dict[str, type[_Base]] = {c.__name__: c for c in
                                 (LossNotDecreasing, Overfit, Overtraining, VanishingGradient,
                                  PoorWeightInitialization, ExplodingTensor)}


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
        unmet = rule.unmet()
    except RuleEvaluationConditionMet:
        return "IssuesFound", rule.details or f"{rule_name} found an issue"
    except Exception as e:  # noqa: BLE001 - a broken rule is the rule's Error status, not the pipeline's
        return "Error", f"{type(e).__name__}: {e}"
    if unmet:
        return "Error", unmet
    return "NoIssuesFound", rule.summary(len(steps))


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
