"""Issue 12 on the local executor: a cacheable final training step (the checkpoint URI the
builder writes), a gate metric that was never emitted, and DeployEndpoint against an endpoint
that is Failed or still changing. Toy entry point (tests/_local_helpers.py): seconds per run."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from pipeline.local.executor import execute
from pipeline.local.jobs import write_json
from pipeline.local.store import LocalStore
from tests._local_helpers import BUCKET, put_toy_code_and_data, toy_definition

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "pipeline.definition.json"


@pytest.fixture
def store(tmp_path):
    s = LocalStore(tmp_path / "store")
    put_toy_code_and_data(s)
    return s


def _built_checkpoint_config() -> dict:
    """TrainModel's CheckpointConfig as pipeline.yaml builds it (spot on), pointed at the toy's tuning step."""
    definition = json.loads(GOLDEN.read_text())
    train = next(s for s in definition["Steps"] if s["Name"] == "TrainModel")["Arguments"]
    assert train["EnableManagedSpotTraining"] is True
    return json.loads(json.dumps(train["CheckpointConfig"]).replace("Steps.TuneHyperparameters.", "Steps.Tune."))


def _spot_toy(checkpoint: dict, extra_hps: dict | None = None) -> dict:
    d = toy_definition(max_jobs=1, parallel=1)
    train = d["Steps"][1]["Arguments"]
    train["OutputDataConfig"] = {"S3OutputPath": f"{BUCKET}/toy/jobs"}   # as the builder: no execution id
    train["EnableManagedSpotTraining"] = True
    train["StoppingCondition"] = {"MaxRuntimeInSeconds": 600, "MaxWaitTimeInSeconds": 1200}
    train["CheckpointConfig"] = copy.deepcopy(checkpoint)
    train["HyperParameters"].update(extra_hps or {})
    return d


@pytest.mark.slow
def test_second_execution_serves_the_spot_training_step_from_the_cache(store, tmp_path):
    d = _spot_toy(_built_checkpoint_config())
    first = execute(d, store=store, run_dir=tmp_path / "run", pipeline_name="toy", report=False)
    assert first["PipelineExecutionStatus"] == "Succeeded", first.get("FailureReason")
    uri = first["Steps"]["Train"]["Arguments"]["CheckpointConfig"]["S3Uri"]
    best = first["Steps"]["Tune"]["Properties"]["BestTrainingJob"]["TrainingJobName"]
    assert uri.endswith("/" + best)

    second = execute(d, store=store, run_dir=tmp_path / "run", pipeline_name="toy", report=False)
    assert second["PipelineExecutionStatus"] == "Succeeded"
    assert second["PipelineExecutionId"] != first["PipelineExecutionId"]
    for step in ("Tune", "Train"):
        assert second["Steps"][step]["CacheHitResult"]["SourcePipelineExecutionArn"] == first["PipelineExecutionArn"]
    assert second["Steps"]["Train"]["Properties"] == first["Steps"]["Train"]["Properties"]
    assert second["Steps"]["Train"]["Arguments"]["CheckpointConfig"]["S3Uri"] == uri   # the same inputs, the same URI
    assert not (tmp_path / "run" / "steps" / second["PipelineExecutionId"] / "Train").exists()   # nothing ran

    # what the definition had before: the execution id in the checkpoint URI, so never a hit
    old = _spot_toy({"S3Uri": {"Std:Join": {"On": "/", "Values": [f"{BUCKET}/toy/checkpoints",
                                                                  {"Get": "Execution.PipelineExecutionId"}]}}})
    runs = [execute(old, store=store, run_dir=tmp_path / "old", pipeline_name="toy", report=False) for _ in range(2)]
    assert "CacheHitResult" in runs[1]["Steps"]["Tune"] and "CacheHitResult" not in runs[1]["Steps"]["Train"]


def test_a_spot_retry_resumes_its_own_checkpoint(store, tmp_path):
    """The first attempt dies (as a spot interruption would) after writing its checkpoint; the retry
    gets the same CheckpointConfig URI, finds that checkpoint and finishes."""
    d = _spot_toy(_built_checkpoint_config(), {"die-once": "1"})
    d["Steps"][1]["RetryPolicies"] = [{"ExceptionType": ["SageMaker.JOB_INTERNAL_ERROR"], "MaxAttempts": 2,
                                       "IntervalSeconds": 1, "BackoffRate": 1.0}]
    rec = execute(d, store=store, run_dir=tmp_path / "run", pipeline_name="toy", report=False)
    assert rec["PipelineExecutionStatus"] == "Succeeded", rec.get("FailureReason")
    train = rec["Steps"]["Train"]
    assert train["AttemptCount"] == 2
    assert store.exists(train["Arguments"]["CheckpointConfig"]["S3Uri"].rstrip("/") + "/died")


def test_a_gate_metric_never_emitted_routes_to_the_fail_step_with_the_reason(store, tmp_path):
    d = toy_definition(max_jobs=1, parallel=1, cache=False)
    check = d["Steps"][3]["Arguments"]
    never = {"Get": "Steps.Train.FinalMetricDataList['test top5 accuracy'].Value"}   # the toy never prints it
    check["Conditions"] = [{"Type": "GreaterThanOrEqualTo", "LeftValue": never,
                            "RightValue": {"Get": "Parameters.AccuracyThreshold"}}]
    check["ElseSteps"][0]["Arguments"]["ErrorMessage"]["Std:Join"]["Values"][1] = never
    rec = execute(d, store=store, run_dir=tmp_path / "run", pipeline_name="toy", report=False)
    steps = rec["Steps"]
    assert steps["Check"]["StepStatus"] == "Succeeded"
    assert steps["Check"]["Properties"]["Outcome"] == "False"
    assert steps["Register-RegisterModel"]["StepStatus"] == "NotExecuted"
    assert steps["Fail"]["StepStatus"] == "Failed"
    assert rec["PipelineExecutionStatus"] == "Failed"
    assert "no element named 'test top5 accuracy'" in rec["FailStepMessage"]
    assert "never emitted this metric" in rec["FailStepMessage"]
    # any other unresolvable reference stays the step's error
    d["Steps"][3]["Arguments"]["Conditions"][0]["LeftValue"] = {"Get": "Steps.Train.NoSuchProperty"}
    rec = execute(d, store=store, run_dir=tmp_path / "other", pipeline_name="toy", report=False)
    assert rec["Steps"]["Check"]["StepStatus"] == "Failed" and "FailStepMessage" not in rec


def _deploy_definition(model_uri: str) -> dict:
    return {"Version": "2020-12-01", "Metadata": {}, "Parameters": [], "Steps": [
        {"Name": "Model", "Type": "Model", "Arguments": {
            "ExecutionRoleArn": "arn:aws:iam::111111111111:role/x",
            "PrimaryContainer": {"Image": "toy-inference:latest", "ModelDataUrl": model_uri}}},
        {"Name": "Config", "Type": "EndpointConfig", "Arguments": {
            "EndpointConfigName": {"Std:Join": {"On": "-",
                                                "Values": ["toy", {"Get": "Execution.PipelineExecutionId"}]}},
            "ProductionVariants": [{"ModelName": {"Get": "Steps.Model.ModelName"}, "VariantName": "AllTraffic",
                                    "InitialInstanceCount": 1, "InstanceType": "ml.m5.large"}]}},
        {"Name": "Deploy", "Type": "Endpoint", "Arguments": {
            "EndpointName": "toy-endpoint", "EndpointConfigName": {"Get": "Steps.Config.EndpointConfigName"}}}]}


@pytest.mark.parametrize("status, message", [
    ("Failed", "endpoint 'toy-endpoint' is Failed (image pull failed) and cannot be updated: delete it"),
    ("Updating", "Cannot update in-progress endpoint 'toy-endpoint' (EndpointStatus Updating)"),
    ("Creating", "Cannot update in-progress endpoint 'toy-endpoint' (EndpointStatus Creating)"),
])
def test_deploy_endpoint_refuses_a_failed_or_changing_endpoint_as_update_endpoint_does(store, tmp_path, status,
                                                                                       message):
    model_uri = f"{BUCKET}/toy/model.tar.gz"
    store.put_bytes(model_uri, b"not used: the step is refused before any server starts")
    record = store.root / ".sagemaker" / "endpoints" / "toy-endpoint.json"
    write_json(record, {"EndpointName": "toy-endpoint", "EndpointStatus": status, "FailureReason": "image pull failed"})
    rec = execute(_deploy_definition(model_uri), store=store, run_dir=tmp_path / "run", pipeline_name="toy",
                  report=False)
    assert rec["Steps"]["Model"]["StepStatus"] == "Succeeded"
    assert rec["Steps"]["Config"]["StepStatus"] == "Succeeded"
    assert rec["Steps"]["Deploy"]["StepStatus"] == "Failed"
    assert message in rec["Steps"]["Deploy"]["FailureReason"]
    if status == "Failed":
        assert str(record) in rec["Steps"]["Deploy"]["FailureReason"]   # says what to delete


def test_debugger_off_request_runs_locally_without_hook_rules_or_profiler(store, tmp_path):
    """What `debugger.enabled: false` builds (no hook, no rules, DisableProfiler) runs as a plain job."""
    d = toy_definition(max_jobs=1, parallel=1, cache=False)
    d["Steps"][1]["Arguments"]["ProfilerConfig"] = {"DisableProfiler": True}
    rec = execute(d, store=store, run_dir=tmp_path / "run", pipeline_name="toy", report=False)
    assert rec["PipelineExecutionStatus"] == "Succeeded", rec.get("FailureReason")
    train = rec["Steps"]["Train"]["Properties"]
    assert not train.get("DebugRuleEvaluationStatuses") and not train.get("ProfilerSummary")
    job_dir = Path(train["LocalJobDir"]) / "opt_ml" / "output"
    assert not (job_dir / "tensors").exists() or not any((job_dir / "tensors").iterdir())
    assert not (job_dir / "profiler").exists()
