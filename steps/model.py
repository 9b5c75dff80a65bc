"""Model steps: a SageMaker Model from the trained model.tar.gz, and its registration.

model.tar.gz already carries code/inference.py (the training script puts it there), so
the Model names it through the environment and has no entry_point: no repack job,
no _repack_* files written into scripts/.
"""
from __future__ import annotations

import re

from sagemaker.model import Model
from sagemaker.workflow.functions import Join
from sagemaker.workflow.model_step import ModelStep

INFERENCE_ENV = {
    "SAGEMAKER_PROGRAM": "inference.py",
    "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
    "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
}


def instance_vcpus(instance_type: str) -> int | None:
    """vCPUs of an ml.<family>.<size> instance by EC2's size naming: large 2, xlarge 4,
    Nxlarge 4N (ml.m5.large: 2). None for sizes that do not follow it (medium, metal)."""
    match = re.fullmatch(r"ml\.[a-z0-9-]+\.(\d*)(x?)large", instance_type)
    if not match:
        return None
    count, x = match.groups()
    return 2 if not x else 4 * int(count or 1)


def serving_env(instance_type: str) -> dict[str, str]:
    """The Model's Environment for the PyTorch serving stack (TorchServe) on instance_type.

    Two TorchServe workers, each free to use every vCPU, idle threads sleeping: measured on
    2 cores (bench/endpoint.py --knobs, README "Endpoint speed"), as fast as one worker for a
    lone client (its request gets all cores) and the best throughput with 8 clients, where
    inference.py's CoreShare gives each worker's forward pass its share of the cores. Spinning
    threads (OpenMP's and ONNX Runtime's default) would steal the cores from the other worker.
    No TorchServe batching (SAGEMAKER_TS_BATCH_SIZE): sagemaker-inference's Transformer
    runs a batch's requests one by one, with request 0's headers for all; it measured no
    more throughput and adds its delay to a lone request."""
    env = {**INFERENCE_ENV, "SAGEMAKER_MODEL_SERVER_WORKERS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    vcpus = instance_vcpus(instance_type)
    if vcpus:
        env["OMP_NUM_THREADS"] = str(vcpus)
    return env


def model_steps(cfg, session, *, step_train, image_uri: str, params, retry_policies) -> tuple[ModelStep, ModelStep]:
    """(create, register): CreateModel for the endpoint, CreateModelPackage for the registry."""
    model = Model(
        image_uri=image_uri,
        model_data=step_train.properties.ModelArtifacts.S3ModelArtifacts,
        role=cfg.aws.role,
        env={**serving_env(cfg.endpoint.instance_type), "SAGEMAKER_REGION": cfg.aws.region},
        sagemaker_session=session,
    )
    create = ModelStep(
        name="Model",
        display_name="Create model",
        description="SageMaker Model of the trained model.tar.gz (code/inference.py inside).",
        step_args=model.create(instance_type=cfg.endpoint.instance_type, tags=cfg.resource_tags()),
        retry_policies=retry_policies,
    )
    metric = step_train.properties.FinalMetricDataList[cfg.gate.metric].Value
    register = ModelStep(
        name="Package",
        display_name="Register model",
        description=f"Register the model in '{cfg.registry.model_package_group}' with its {cfg.gate.metric}.",
        step_args=model.register(
            content_types=list(cfg.registry.content_types),
            response_types=list(cfg.registry.response_types),
            inference_instances=[cfg.endpoint.instance_type],
            transform_instances=[cfg.endpoint.instance_type],
            model_package_group_name=cfg.registry.model_package_group,
            approval_status=params.approval_status,
            description=cfg.pipeline.description,
            # Metadata values are strings: Join turns the float into one.
            customer_metadata_properties={
                cfg.gate.metric.replace(" ", "_"): Join(on="", values=[metric]),
                "training_job": step_train.properties.TrainingJobName,
            },
        ),
        retry_policies=retry_policies,
    )
    return create, register
