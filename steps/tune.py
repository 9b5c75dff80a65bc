"""Tuning step: Bayesian search over scripts/hpo.py on the validation metric."""
from __future__ import annotations

from sagemaker.parameter import CategoricalParameter, ContinuousParameter, IntegerParameter
from sagemaker.tuner import HyperparameterTuner
from sagemaker.workflow.steps import TuningStep

from steps.common import channel_inputs, estimator

# Fixed so the trials' sagemaker_job_name hyperparameter is not a timestamp
# (sagemaker-python-sdk#3651); the service names the real jobs itself.
JOB_NAME = "dogbreed-hpo"


def sdk_ranges(ranges) -> dict:
    out = {}
    for name, r in ranges.items():
        if r.type == "categorical":
            out[name] = CategoricalParameter([str(v) for v in r.values])
        elif r.type == "continuous":
            out[name] = ContinuousParameter(r.min, r.max, scaling_type=r.scaling)
        else:
            out[name] = IntegerParameter(r.min, r.max, scaling_type=r.scaling)
    return out


def tuning_step(cfg, session, *, code_uri: str, image_uri: str, params, metric_definitions,
                cache_config, retry_policies) -> TuningStep:
    t = cfg.tuning
    est = estimator(cfg, session, entry_point="hpo.py", code_uri=code_uri, image_uri=image_uri,
                    instance=t.instance, instance_type=params.tuning_instance_type, spot=t.spot,
                    hyperparameters=cfg.training.hyperparameters, metric_definitions=metric_definitions,
                    # Trials are many and short: no Debugger hooks, rules or profiler there.
                    debugger_hook_config=False, disable_profiler=True, rules=[])
    tuner = HyperparameterTuner(
        est,
        objective_metric_name=t.objective.metric,
        objective_type=t.objective.type,
        hyperparameter_ranges=sdk_ranges(t.ranges),
        metric_definitions=metric_definitions,
        strategy=t.strategy,
        max_jobs=t.max_jobs,
        max_parallel_jobs=t.max_parallel_jobs,
        early_stopping_type=t.early_stopping,
        random_seed=t.random_seed,
        tags=cfg.resource_tags(),
    )
    return TuningStep(
        name="TuneHyperparameters",
        display_name="Tune hyperparameters",
        description=f"{t.strategy} search over {sorted(t.ranges)} with scripts/hpo.py, "
                    f"{t.objective.type.lower()} '{t.objective.metric}' ({t.max_jobs} trials).",
        step_args=tuner.fit(inputs=channel_inputs(params.data_uri, ("train", "valid")), job_name=JOB_NAME,
                            include_cls_metadata=False),
        cache_config=cache_config,
        retry_policies=retry_policies,
    )
