"""What the tuning and the training steps share: `estimator()`, the PyTorch estimator both the
tuning trials and the final training run use (so the two jobs differ only where they must), and
the data channels both scripts read.
"""
from __future__ import annotations

from sagemaker.inputs import TrainingInput
from sagemaker.pytorch import PyTorch
from sagemaker.workflow.functions import Join

# Both scripts read their data from these channels (SM_CHANNEL_TRAIN, ...).
CHANNELS = ("train", "valid", "test")


class DeterministicPyTorch(PyTorch):
    """PyTorch estimator whose Debugger collections come out in a fixed order.

    The SDK de-duplicates rule and hook collections in a set, so their order in the
    request (and the definition's hash, hence step caching) followed PYTHONHASHSEED.
    """

    # The SDK writes the estimator's module into every tuning trial's static hyperparameters
    # (sagemaker_estimator_module, for HyperparameterTuner.attach). It was defined in steps/train.py,
    # which still exports it: keeping that name keeps the definition's bytes, and the step cache, as they were.
    __module__ = "steps.train"

    def _prepare_collection_configs(self):
        super()._prepare_collection_configs()
        self.collection_configs = sorted(self.collection_configs, key=lambda c: c.name)


def flag_value(value) -> str:
    """Hyperparameters travel as strings; booleans as the scripts parse them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def channel_inputs(data_uri, names=CHANNELS) -> dict[str, TrainingInput]:
    """`<data uri>train/` etc.; data_uri (a Parameter) ends with '/'."""
    return {name: TrainingInput(s3_data=Join(on="", values=[data_uri, f"{name}/"])) for name in names}


def estimator(cfg, session, *, entry_point: str, code_uri: str, image_uri: str, instance, instance_type,
              spot, hyperparameters: dict, metric_definitions: list, **kwargs) -> PyTorch:
    """The PyTorch estimator for one of the scripts in scripts/ (already uploaded at code_uri)."""
    return DeterministicPyTorch(
        entry_point=entry_point,
        source_dir=code_uri,                 # an S3 URI: the SDK neither re-uploads nor renames it
        image_uri=image_uri,                 # chosen from config, never from a Parameter's default
        role=cfg.aws.role,
        instance_count=instance.count,
        instance_type=instance_type,
        volume_size=instance.volume_gb,
        max_run=instance.max_run_s,
        use_spot_instances=spot.enabled,
        max_wait=spot.max_wait_s if spot.enabled else None,
        output_path=f"{cfg.s3_root}/jobs",
        hyperparameters={k: flag_value(v) for k, v in hyperparameters.items()},
        metric_definitions=metric_definitions,
        tags=cfg.resource_tags(),
        sagemaker_session=session,
        **kwargs,
    )
