"""How often the Debugger hook saves tensors, chosen from the run's size.

AWS's built-in rules ask for a save every 500 steps; a dogImages run has 13-208
training steps per epoch (6,680 images, batch 512..32, the last partial batch dropped)
and 2-27 validation steps, so at 500 a rule sees one or two points. The plan below
picks, per smdebug mode and collection, the largest interval at which every enabled
rule still sees enough points on the *smallest* run the tuning ranges allow (largest
batch, fewest epochs); larger runs save more, at most RUN_SIZE_RATIO times as many.

smdebug reads mode-specific keys ("train.save_interval", "eval.save_interval",
"train.end_step") from DebugHookConfig's HookParameters and CollectionParameters.
Pure arithmetic: no SDK, no smdebug import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.errors import UserError

DOG_IMAGES = (6680, 835)        # train, valid images of dogImages (the strict layout's counts)
MIN_TRAIN_POINTS = 10           # saved training steps a gradient or loss rule needs over the run
MIN_FIRST_STEP_POINTS = 3       # relu_input saves within poor_weight_initialization's first `steps`
MIN_COMPARISONS = 3             # loss_not_decreasing: comparisons num_steps apart


class PlanError(UserError, ValueError):
    """A rule that cannot see enough points at any interval on this run; `field` names the config key."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class RunSize:
    """The smallest and largest runs the config allows (batch sizes and epochs over the tuning ranges)."""
    train_images: int
    valid_images: int
    batch_sizes: tuple[int, ...]
    test_batch_sizes: tuple[int, ...]
    epochs: tuple[int, ...]
    max_steps_per_epoch: int = 0            # the scripts' --max-steps-per-epoch (0: whole epoch)

    def train_steps_per_epoch(self, batch: int) -> int:
        # scripts/train_lib.py drops the last partial training batch when there is more than one batch
        steps = self.train_images // batch if self.train_images > batch else 1
        return min(steps, self.max_steps_per_epoch) if self.max_steps_per_epoch else steps

    def valid_steps_per_epoch(self, batch: int) -> int:
        return math.ceil(self.valid_images / batch)

    def train_steps(self, batch: int, epochs: int) -> int:
        return self.train_steps_per_epoch(batch) * epochs

    def valid_steps(self, batch: int, epochs: int) -> int:
        return self.valid_steps_per_epoch(batch) * epochs

    @property
    def smallest(self) -> tuple[int, int, int]:
        """(batch, test batch, epochs) of the run with the fewest steps."""
        return max(self.batch_sizes), max(self.test_batch_sizes), min(self.epochs)

    @property
    def largest(self) -> tuple[int, int, int]:
        return min(self.batch_sizes), min(self.test_batch_sizes), max(self.epochs)


def saved_points(steps: int, interval: int, end_step: int | None = None) -> int:
    """Steps 0, k, 2k, ... below `steps` (and below end_step): smdebug's SaveConfigMode."""
    last = steps if end_step is None else min(steps, end_step)
    return math.ceil(last / interval) if last > 0 else 0


def comparisons(steps: int, interval: int, spacing: int) -> int:
    """loss_not_decreasing's comparisons: saved points at least `spacing` mode steps apart."""
    stride = math.ceil(spacing / interval) * interval
    return (steps - 1) // stride if steps > 0 else 0


@dataclass(frozen=True)
class Plan:
    train_interval: int      # gradients, training losses
    eval_interval: int       # validation losses (scalars: cheap)
    relu_interval: int       # relu_input (whole activations): only within the first `relu_end_step` steps
    relu_end_step: int | None
    fixed: bool = False      # a configured save_interval: one interval for every mode and collection

    def hook_parameters(self) -> dict[str, str]:
        if self.fixed:
            return {"save_interval": str(self.train_interval)}
        return {"train.save_interval": str(self.train_interval), "eval.save_interval": str(self.eval_interval)}

    def collection_parameters(self, name: str, base: dict[str, str]) -> dict[str, str]:
        """A rule's collection parameters with this plan's cadence (its own save_interval dropped)."""
        if self.fixed:
            return {**base, "save_interval": str(self.train_interval)} if "save_interval" in base else dict(base)
        if "save_interval" not in base:      # save_steps (the XGBoost report's): left as the rule has it
            return dict(base)
        params = {k: v for k, v in base.items() if k != "save_interval"}
        if name == "relu_input":
            return {**params, "train.save_interval": str(self.relu_interval),
                    "train.end_step": str(self.relu_end_step), "eval.end_step": "0"}
        if name == "gradients":
            return {**params, "train.save_interval": str(self.train_interval)}
        return {**params, **self.hook_parameters()}


def _param(rule, key: str, default):
    raw = dict(rule.parameters).get(key)
    return type(default)(float(raw)) if raw is not None else default


def plan(size: RunSize, rules) -> Plan:
    """The cadence for `rules` (config Rule objects: .name, .parameters) on runs of `size`."""
    batch, test_batch, epochs = size.smallest
    n_train, n_valid = size.train_steps(batch, epochs), size.valid_steps(test_batch, epochs)
    train = max(1, n_train // MIN_TRAIN_POINTS)
    relu_steps = 10
    for i, rule in enumerate(rules):
        field = f"debugger.rules.{i}.parameters"
        if rule.name == "poor_weight_initialization":
            relu_steps = _param(rule, "steps", 10)
        if rule.name == "loss_not_decreasing":
            spacing = _param(rule, "num_steps", 10)
            mode = str(dict(rule.parameters).get("mode", "EVAL")).upper()   # AWS: EVAL first when saved
            steps, interval = (n_valid, 1) if mode == "EVAL" else (n_train, train)
            while mode != "EVAL" and interval > 1 and comparisons(steps, interval, spacing) < MIN_COMPARISONS:
                interval -= 1
            if comparisons(steps, interval, spacing) < MIN_COMPARISONS:
                raise PlanError(field, f"loss_not_decreasing compares {mode} losses {spacing} steps apart, but the "
                                       f"smallest run (batch {batch}, test batch {test_batch}, {epochs} epochs) has "
                                       f"{steps} {mode} steps: fewer than {MIN_COMPARISONS} comparisons; set "
                                       f"{{mode: TRAIN}} or a smaller num_steps")
            if mode != "EVAL":
                train = interval
    relu = max(1, (relu_steps - 1) // (MIN_FIRST_STEP_POINTS - 1))
    if saved_points(n_train, relu, relu_steps) < MIN_FIRST_STEP_POINTS and any(
            r.name == "poor_weight_initialization" for r in rules):
        raise PlanError("debugger.rules", f"poor_weight_initialization looks at the first {relu_steps} training steps; "
                                          f"the smallest run has only {n_train}")
    return Plan(train_interval=train, eval_interval=1, relu_interval=relu, relu_end_step=relu_steps)


# Per rule: (mode, collection, points it needs on the smallest run); the test checks the plan against it.
def needs(rule, size: RunSize) -> list[tuple[str, str, int]]:
    epochs = size.smallest[2]
    per_epoch = ("eval", "losses", epochs)           # at least one validation loss per epoch
    train_losses = ("train", "losses", MIN_TRAIN_POINTS)
    loss_mode = str(dict(rule.parameters).get("mode", "EVAL")).upper()
    return {
        "vanishing_gradient": [("train", "gradients", MIN_TRAIN_POINTS)],
        "exploding_tensor": [("train", "gradients", MIN_TRAIN_POINTS)],
        "overfit": [train_losses, per_epoch],
        "overtraining": [train_losses, per_epoch],
        "poor_weight_initialization": [("train", "relu_input", MIN_FIRST_STEP_POINTS)],
        "loss_not_decreasing": [train_losses if loss_mode == "TRAIN" else per_epoch],
    }.get(rule.name, [train_losses])


def _values(rng_or_value) -> tuple[int, ...]:
    r = rng_or_value
    if isinstance(r, (int, float, str)):
        return (int(r),)
    if r.type == "categorical":
        return tuple(int(v) for v in r.values)
    return tuple(range(int(r.min), int(r.max) + 1))


def run_size(cfg) -> RunSize:
    """The RunSize a config allows: its dataset's sizes and the tuning ranges (or static values)."""
    if cfg.debugger.dataset_images:
        train, valid = cfg.debugger.dataset_images
    elif cfg.data.sample is not None:
        per = cfg.data.sample.per_class
        train, valid = per[0] * cfg.data.sample.num_classes, per[1] * cfg.data.sample.num_classes
    else:
        train, valid = DOG_IMAGES
    static = dict(cfg.training.hyperparameters)

    def values(name):
        return _values(cfg.tuning.ranges[name]) if name in cfg.tuning.ranges else _values(static[name])
    return RunSize(train_images=train, valid_images=valid, batch_sizes=values("batch-size"),
                   test_batch_sizes=values("test-batch-size"), epochs=values("epochs"),
                   max_steps_per_epoch=int(static.get("max-steps-per-epoch", 0) or 0))


def plan_for_config(cfg) -> Plan:
    """The config's plan: "auto" from its run size, or its fixed save_interval for every mode."""
    if cfg.debugger.save_interval != "auto":
        k = int(cfg.debugger.save_interval)
        return Plan(train_interval=k, eval_interval=k, relu_interval=k, relu_end_step=None, fixed=True)
    return plan(run_size(cfg), cfg.debugger.rules)
