"""The pipeline, wired from typed config: Tune -> Train -> Model -> gate -> Endpoint | Fail.

                    TuneHyperparameters         Tuning: scripts/hpo.py trials, Bayesian search
                            |                   on the validation metric (steps/tune.py)
                            | best trial's hyperparameters
                            v
                        TrainModel              Training: scripts/train_model.py, Debugger
                            |                   rules and profiler (steps/train.py)
        +-------------------+------------------+----------------------------+
        | model.tar.gz      | model.tar.gz     | test accuracy              :
        v                   v                  v                            :
  Model-CreateModel  Package-RegisterModel  CheckAccuracy                   :
   (steps/model.py)    (model package        test accuracy >=               :
        :               group, with the      AccuracyThreshold?             :
        :               test accuracy)       (steps/deploy.py)              :
        :                                      |                 |          :
        :                                      | if              | else     :
        :                                      v                 v          :
        :.........................> CreateEndpointConfig    AccuracyTooLow <:
          the model's name                     |            Fail step with
                                               v            the accuracy
                                         DeployEndpoint
                                   (Create/UpdateEndpoint)

  Each arrow: the lower step runs after the upper one, because it reads a property of it
  (labelled where it helps) or sits in the condition's if / else branch; the JSON needs no
  DependsOn. Dotted arrows are the same kind, dotted only where they cross the others.
  pipeline/local/dag.py is the one model of these edges; `python run_pipeline.py --graph
  docs/dag.png` draws them from the definition itself.

`build_definition(cfg)` returns the definition JSON that AWS runs and the local
executor interprets, built offline (moto) and byte-identical for the same commit.
`sagemaker_pipeline` only wires the steps; each step is built in its steps/ module.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import offline  # noqa: F401  (sets SDK environment before any sagemaker import)
from pipeline.config import REPO_ROOT, Config, scripts_module

SCRIPTS_DIR = REPO_ROOT / "scripts"


# --- code artifact ------------------------------------------------------------

# The training image's toolkit pip-installs code/requirements.txt before the entry point runs.
# Tuning trials (hpo.py) need nothing beyond the image, so their archive leaves it out: a trial
# installs nothing (requirements.txt is train_model.py's smdebug for the Debugger hook).
TUNING_EXCLUDES = ("requirements.txt",)


def source_tarball(directory: Path = SCRIPTS_DIR, exclude: tuple[str, ...] = ()) -> bytes:
    """scripts/ as sourcedir.tar.gz, the same bytes for the same files (minus `exclude`).

    Sorted entries, zero mtimes/owners, no gzip timestamp: its hash names its S3 key,
    so unchanged code keeps the same URI (and SageMaker's step cache keeps hitting).
    """
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for path in sorted(directory.rglob("*")):
            rel = path.relative_to(directory)
            if any(p.startswith(".") or p == "__pycache__" for p in rel.parts) or path.suffix == ".pyc":
                continue
            if not path.is_file() or rel.as_posix() in exclude:
                continue
            info = tarfile.TarInfo(rel.as_posix())
            data = path.read_bytes()
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def code_uri(cfg: Config, tarball: bytes) -> str:
    return f"{cfg.s3_root}/code/{hashlib.sha256(tarball).hexdigest()[:16]}/sourcedir.tar.gz"


# --- images -------------------------------------------------------------------

def image(cfg: Config, scope: str, instance_type: str) -> str:
    """The config's image URI, or the PyTorch DLC for a config instance type (pipeline.images)."""
    from pipeline.images import image_uri
    return image_uri(cfg, scope, instance_type)


# --- the DAG ------------------------------------------------------------------

# Step types that accept RetryPolicies, and the exception types each may name (AWS: "Retry Policy
# for Pipeline Steps"); tuning jobs retry JOB_INTERNAL_ERROR internally, Pipelines never does.
_JOB_EXCEPTIONS = ("SageMaker.JOB_INTERNAL_ERROR", "SageMaker.CAPACITY_ERROR", "SageMaker.RESOURCE_LIMIT")
_STEP_EXCEPTIONS = ("Step.SERVICE_FAULT", "Step.THROTTLING")
RETRY_POLICY_STEP_TYPES = {
    "Processing": _STEP_EXCEPTIONS + _JOB_EXCEPTIONS,
    "Training": _STEP_EXCEPTIONS + _JOB_EXCEPTIONS,
    "Tuning": _STEP_EXCEPTIONS + ("SageMaker.CAPACITY_ERROR", "SageMaker.RESOURCE_LIMIT"),
    "AutoML": _STEP_EXCEPTIONS + _JOB_EXCEPTIONS,
    "Model": _STEP_EXCEPTIONS,
    "RegisterModel": _STEP_EXCEPTIONS,
    "Transform": _STEP_EXCEPTIONS + _JOB_EXCEPTIONS,
    "NotebookJob": _STEP_EXCEPTIONS + _JOB_EXCEPTIONS,
}

@dataclass(frozen=True)
class Params:
    """Pipeline Parameters: what a user may change per execution without a rebuild."""
    data_uri: object
    tuning_instance_type: object
    training_instance_type: object
    endpoint_instance_type: object
    endpoint_instance_count: object
    threshold: object
    approval_status: object

    def all(self) -> list:
        return list(vars(self).values())


def parameters(cfg: Config) -> Params:
    from sagemaker.workflow.parameters import ParameterFloat, ParameterInteger, ParameterString
    return Params(
        data_uri=ParameterString("DataUri", default_value=cfg.data.uri),
        # Instance types may change per execution only within CPU or GPU (pipeline.params):
        # the image was picked for the config's type.
        tuning_instance_type=ParameterString("TuningInstanceType", default_value=cfg.tuning.instance.type),
        training_instance_type=ParameterString("TrainingInstanceType", default_value=cfg.training.instance.type),
        endpoint_instance_type=ParameterString("EndpointInstanceType", default_value=cfg.endpoint.instance_type),
        endpoint_instance_count=ParameterInteger("EndpointInstanceCount", default_value=cfg.endpoint.instance_count),
        threshold=ParameterFloat("AccuracyThreshold", default_value=cfg.gate.threshold),
        approval_status=ParameterString("ModelApprovalStatus", default_value=cfg.registry.approval_status),
    )


def retry_policies(cfg: Config) -> dict[str, list]:
    """The config's retry knobs as the RetryPolicies each kind of step takes: "service" (Model,
    RegisterModel), "job" (Training), "tuning" (Tuning) - only what AWS accepts for each
    (RETRY_POLICY_STEP_TYPES)."""
    from sagemaker.workflow.retry import (
        SageMakerJobExceptionTypeEnum,
        SageMakerJobStepRetryPolicy,
        StepExceptionTypeEnum,
        StepRetryPolicy,
    )
    r = cfg.retry
    retry = dict(max_attempts=r.max_attempts, interval_seconds=r.interval_s, backoff_rate=r.backoff_rate)
    service_retry = [StepRetryPolicy(exception_types=[StepExceptionTypeEnum.SERVICE_FAULT,
                                                      StepExceptionTypeEnum.THROTTLING], **retry)]
    job_retry = service_retry + [SageMakerJobStepRetryPolicy(
        exception_types=[SageMakerJobExceptionTypeEnum.CAPACITY_ERROR,
                         SageMakerJobExceptionTypeEnum.INTERNAL_ERROR,
                         SageMakerJobExceptionTypeEnum.RESOURCE_LIMIT], **retry)]
    # A tuning job retries its trials' internal errors itself and Pipelines does not retry them
    tuning_retry = service_retry + [SageMakerJobStepRetryPolicy(
        exception_types=[SageMakerJobExceptionTypeEnum.CAPACITY_ERROR,
                         SageMakerJobExceptionTypeEnum.RESOURCE_LIMIT], **retry)]
    return {"service": service_retry, "job": job_retry, "tuning": tuning_retry}


def sagemaker_pipeline(cfg: Config, session, code_s3_uri: str, tuning_code_s3_uri: str | None = None):
    """The sagemaker Pipeline object; the code tarballs must already be at code_s3_uri (training)
    and tuning_code_s3_uri (tuning trials; default: the training one)."""
    from sagemaker.workflow.pipeline import Pipeline
    from sagemaker.workflow.pipeline_definition_config import PipelineDefinitionConfig
    from sagemaker.workflow.steps import CacheConfig

    from steps.deploy import gate_step
    from steps.model import model_steps
    from steps.train import training_step
    from steps.tune import tuning_step

    params = parameters(cfg)
    retry = retry_policies(cfg)
    cache = CacheConfig(enable_caching=cfg.cache.enabled, expire_after=cfg.cache.expire_after)
    metric_definitions = scripts_module("metrics").METRIC_DEFINITIONS

    step_tune = tuning_step(cfg, session, code_uri=tuning_code_s3_uri or code_s3_uri, params=params,
                            metric_definitions=metric_definitions,
                            image_uri=image(cfg, "training", cfg.tuning.instance.type),
                            cache_config=cache, retry_policies=retry["tuning"])
    step_train = training_step(cfg, session, step_tune=step_tune, code_uri=code_s3_uri, params=params,
                               metric_definitions=metric_definitions,
                               image_uri=image(cfg, "training", cfg.training.instance.type),
                               cache_config=cache, retry_policies=retry["job"])
    step_model, step_register = model_steps(cfg, session, step_train=step_train, params=params,
                                            image_uri=image(cfg, "inference", cfg.endpoint.instance_type),
                                            retry_policies=retry["service"])
    step_gate = gate_step(cfg, session, step_train=step_train, step_model=step_model, params=params)
    return Pipeline(
        name=cfg.pipeline.name,
        parameters=params.all(),
        steps=[step_tune, step_train, step_model, step_register, step_gate],
        sagemaker_session=session,
        # Job names stay out of the definition: SageMaker names each execution's jobs.
        pipeline_definition_config=PipelineDefinitionConfig(use_custom_job_prefix=False),
        # No Experiments integration: SageMaker Experiments (classic) would need the role to create
        # experiments, trials and trial components for nothing the project reads (README: AWS readiness).
        pipeline_experiment_config=None,
    )


@dataclass
class Build:
    definition: str                              # the pipeline definition JSON
    uploads: dict[str, bytes] = field(default_factory=dict)   # s3 URI -> bytes the SDK put there


@contextlib.contextmanager
def _quiet_sdk():
    """The SDK narrates every expected step of a pipeline build (popped job names, no-wait
    sessions, telemetry notice) at INFO/WARNING; keep real errors only."""
    loggers = [logging.getLogger(n) for n in ("sagemaker", "botocore", "boto3")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Running within a PipelineSession")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"sagemaker\.")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def build(cfg: Config) -> Build:
    """Build the definition offline; also return what it expects in S3 (the code tarball)."""
    tarball, tuning_tarball = source_tarball(), source_tarball(exclude=TUNING_EXCLUDES)
    uri, tuning_uri = code_uri(cfg, tarball), code_uri(cfg, tuning_tarball)
    with _quiet_sdk(), offline.offline_session(cfg.aws.region, cfg.aws.bucket) as session:
        for target, body in ((uri, tarball), (tuning_uri, tuning_tarball)):
            bucket, _, key = target[len("s3://"):].partition("/")
            session.boto_session.client("s3").put_object(Bucket=bucket, Key=key, Body=body)
        definition = sagemaker_pipeline(cfg, session, uri, tuning_uri).definition()
        uploads = offline.s3_objects(session.boto_session)
    doc = json.loads(definition)
    if doc.get("PipelineExperimentConfig") is None:
        doc.pop("PipelineExperimentConfig", None)   # built without it: no Experiments integration
    # Pretty and stable: reviewable diffs, same bytes every build.
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    return Build(definition=text, uploads=uploads)


def build_definition(cfg: Config, object_store=None) -> str:
    """The definition JSON; with a LocalStore, also put the uploaded objects where it says."""
    result = build(cfg)
    if object_store is not None:
        for uri, data in result.uploads.items():
            object_store.put_bytes(uri, data)
    return result.definition
