"""Accuracy gate: endpoint config + endpoint when the model is good enough, else fail."""
from __future__ import annotations

from sagemaker.workflow.condition_step import ConditionStep
from sagemaker.workflow.conditions import ConditionGreaterThanOrEqualTo
from sagemaker.workflow.endpoint_step import EndpointConfigStep, EndpointStep
from sagemaker.workflow.execution_variables import ExecutionVariables
from sagemaker.workflow.fail_step import FailStep
from sagemaker.workflow.functions import Join


def gate_step(cfg, session, *, step_train, step_model, params) -> ConditionStep:
    metric = step_train.properties.FinalMetricDataList[cfg.gate.metric].Value
    tags = cfg.resource_tags()
    config = EndpointConfigStep(
        name="CreateEndpointConfig",
        display_name="Create endpoint config",
        description="Endpoint config for this execution's model (a new name per execution, so updates work).",
        step_args=session.create_endpoint_config(
            name=Join(on="-", values=[cfg.endpoint.name, ExecutionVariables.PIPELINE_EXECUTION_ID]),
            model_name=step_model.properties.ModelName,
            initial_instance_count=params.endpoint_instance_count,
            instance_type=params.endpoint_instance_type,
            tags=tags,
        ),
        # No retry_policies: AWS accepts them on job, model and register steps only.
    )
    endpoint = EndpointStep(
        name="DeployEndpoint",
        display_name="Deploy endpoint",
        description=f"Create endpoint '{cfg.endpoint.name}', or update it to the new config.",
        step_args=session.create_endpoint(endpoint_name=cfg.endpoint.name,
                                          config_name=config.properties.EndpointConfigName,
                                          tags=tags, wait=False),
    )
    fail = FailStep(
        name="AccuracyTooLow",
        display_name="Accuracy too low",
        description="Stop without deploying: the model missed the accuracy threshold.",
        error_message=Join(on=" ", values=[f"{cfg.gate.metric}", metric, "is below the threshold",
                                           params.threshold, "- not deployed."]),
    )
    return ConditionStep(
        name="CheckAccuracy",
        display_name="Check accuracy",
        description=f"Deploy only if {cfg.gate.metric} >= the AccuracyThreshold parameter.",
        conditions=[ConditionGreaterThanOrEqualTo(left=metric, right=params.threshold)],
        if_steps=[config, endpoint],
        else_steps=[fail],
    )
