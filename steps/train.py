"""Training step: scripts/train_model.py with the tuning step's best hyperparameters.

Its estimator is the tuning trials' own (steps/common.py), so the two jobs differ only where they must.
"""
from __future__ import annotations

import hashlib
import json

from sagemaker.debugger import CollectionConfig, DebuggerHookConfig, ProfilerConfig, Rule, rule_configs
from sagemaker.workflow.functions import Join
from sagemaker.workflow.steps import TrainingStep

from steps.common import DeterministicPyTorch, channel_inputs, estimator  # noqa: F401  (its module name: steps/common.py)


def debugger_rule(rule, plan) -> Rule:
    """A built-in rule with the tensor collections it needs (e.g. relu_input for
    poor_weight_initialization), saved at the plan's cadence (pipeline.debugger_plan)
    instead of the rule's own every-500-steps."""
    if isinstance(plan, int):  # a fixed interval for every mode and collection
        from pipeline.debugger_plan import Plan
        plan = Plan(train_interval=plan, eval_interval=plan, relu_interval=plan, relu_end_step=None, fixed=True)
    base = getattr(rule_configs, rule.name)()
    collections = [
        CollectionConfig(c["CollectionName"],
                         plan.collection_parameters(c["CollectionName"], dict(c.get("CollectionParameters") or {})))
        for c in base.get("CollectionConfigurations", [])]
    return Rule.sagemaker(base, rule_parameters=dict(rule.parameters) or None, collections_to_save=collections or None)


def debugger_args(cfg) -> dict:
    """Rules, hook and profiler of the training job. `debugger.enabled: false` turns all three
    off, the profiler's system monitor included: AWS counts it as Debugger ("to completely
    turn off Debugger": disable_profiler=True, debugger_hook_config=False)."""
    if not cfg.debugger.enabled:
        return {"rules": [], "debugger_hook_config": False, "disable_profiler": True}
    args = {}
    if cfg.debugger.rules:
        from pipeline.debugger_plan import plan_for_config
        plan = plan_for_config(cfg)
        args["rules"] = [debugger_rule(r, plan) for r in cfg.debugger.rules]
        # HookParameters: the cadence of collections no rule names (the losses Overfit reads)
        args["debugger_hook_config"] = DebuggerHookConfig(
            s3_output_path=f"{cfg.s3_root}/debug", hook_parameters=plan.hook_parameters())
    else:
        args["rules"] = []
        args["debugger_hook_config"] = False
    if cfg.profiler.enabled:
        # System monitor only: framework profiling is deprecated for PyTorch >= 2.0.
        args["profiler_config"] = ProfilerConfig(system_monitor_interval_millis=cfg.profiler.interval_ms,
                                                 s3_output_path=f"{cfg.s3_root}/profiler")
    else:
        args["disable_profiler"] = True
    return args


def inputs_key(image_uri: str, static: dict) -> str:
    """What the final training adds to its tuning trial's inputs: its image and static flags."""
    blob = json.dumps({"image": image_uri, "hyperparameters": static}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def checkpoint_uri(cfg, step_tune, image_uri: str, static: dict) -> Join:
    """<checkpoint prefix>/<inputs key>/<best tuning trial's job name>.

    Not the execution id: CheckpointConfig is part of the training step's cache key, so an id
    in it would keep the step from ever being served from the cache. The best trial's job name
    is new whenever tuning really runs again (its cache key holds the data URI, the code's
    hash, the ranges and static flags), the inputs key whenever the training's own image or
    flags change; a spot retry within an execution gets the same URI and resumes its checkpoint.
    """
    return Join(on="/", values=[cfg.checkpoint_prefix, inputs_key(image_uri, static),
                                step_tune.properties.BestTrainingJob.TrainingJobName])


# The training job's environment, for the toolkit's `pip install -r requirements.txt` and the
# script. PyTorch 2.6 images ship protobuf >= 5.28 for sagemaker-training and no smdebug, while
# smdebug 1.0.34 pins protobuf <= 3.20.3: resolving that pin would downgrade protobuf under the
# toolkit. So pip installs exactly the lines of requirements.txt (PIP_NO_DEPS) and smdebug's
# generated protobuf code runs on the image's protobuf through the pure-Python implementation.
TRAINING_ENVIRONMENT = {"PIP_NO_DEPS": "true", "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}


def training_step(cfg, session, *, step_tune, code_uri: str, image_uri: str, params, metric_definitions,
                  cache_config, retry_policies) -> TrainingStep:
    tuned = {name: step_tune.properties.BestTrainingJob.TunedHyperParameters[name] for name in cfg.tuning.ranges}
    static = dict(cfg.training.hyperparameters)
    static.update(profile=cfg.profiler.enabled)
    checkpoint = {}
    if cfg.training.spot.enabled:
        checkpoint["checkpoint_s3_uri"] = checkpoint_uri(cfg, step_tune, image_uri, static)
    est = estimator(cfg, session, entry_point="train_model.py", code_uri=code_uri, image_uri=image_uri,
                    instance=cfg.training.instance, instance_type=params.training_instance_type,
                    spot=cfg.training.spot, hyperparameters=static, metric_definitions=metric_definitions,
                    environment=dict(TRAINING_ENVIRONMENT), **checkpoint, **debugger_args(cfg))
    # Tuned values are property references, resolved when the tuning step is done (never copied).
    est.set_hyperparameters(**tuned)
    return TrainingStep(
        name="TrainModel",
        display_name="Train model",
        description="Train scripts/train_model.py with the best tuned hyperparameters; "
                    "Debugger rules and system profiler; final evaluation on the test channel.",
        step_args=est.fit(inputs=channel_inputs(params.data_uri), wait=False),
        cache_config=cache_config,
        retry_policies=retry_policies,
    )
