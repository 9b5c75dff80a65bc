"""Issue 12, "AWS readiness": what valid API shapes cannot catch.

Debugger truly optional, data that follows the bucket and that the role can read, explicit
images, retry policies where AWS takes them, and the Debugger save plan's arithmetic.
IAM coverage of the pipeline's steps is in test_iam.py.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
import yaml
from botocore.stub import Stubber

import run_pipeline
from pipeline import aws, preflight
from pipeline.config import load_config, parse_config
from pipeline.debugger_plan import RunSize, needs, plan, plan_for_config, run_size, saved_points
from tests._aws_helpers import ACCOUNT, REGION, SAGEMAKER_TRUST, fake_aws_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch):
    for var in ("AWS_REGION", "SAGEMAKER_ROLE_ARN", "SAGEMAKER_BUCKET"):
        monkeypatch.delenv(var, raising=False)


def _doc():
    return yaml.safe_load((ROOT / "pipeline.yaml").read_text())


# ---------------------------------------------------------------- item 2: Debugger off, completely

def test_debugger_disabled_turns_off_hook_rules_and_profiler():
    from steps.train import debugger_args
    doc = _doc()
    doc["debugger"]["enabled"] = False            # the one line; profiler.enabled stays true
    assert doc["profiler"]["enabled"] is True
    args = debugger_args(parse_config(doc))
    assert args == {"rules": [], "debugger_hook_config": False, "disable_profiler": True}
    # the default stays as the user asked: rules, hook and the profiler's system monitor
    on = debugger_args(load_config(ROOT / "pipeline.yaml"))
    assert len(on["rules"]) == 5 and on["debugger_hook_config"] and "profiler_config" in on


def test_debugger_disabled_request_has_no_hook_rules_and_disables_the_profiler(configs, definitions):
    # "bare" (tests/conftest.py) is pipeline.yaml with debugger.enabled false, spot and cache off
    assert configs["bare"].debugger.enabled is False and configs["bare"].profiler.enabled is True
    definition = definitions["bare"]
    train = next(s for s in definition["Steps"] if s["Name"] == "TrainModel")["Arguments"]
    for key in ("DebugHookConfig", "DebugRuleConfigurations", "ProfilerRuleConfigurations"):
        assert key not in train
    assert train["ProfilerConfig"] == {"DisableProfiler": True}
    tune = next(s for s in definition["Steps"] if s["Name"] == "TuneHyperparameters")["Arguments"]
    assert "DebugHookConfig" not in json.dumps(tune) and "ProfilerRule" not in json.dumps(tune)


def test_the_one_line_the_hint_names_is_in_pipeline_yaml():
    text = (ROOT / "pipeline.yaml").read_text()
    assert "\ndebugger:\n  enabled: true" in text   # the line the hint tells a new account to change


EXEC_ARN = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:pipeline/dogbreed/execution/abc123def456"


@pytest.mark.parametrize("reason, hinted", [
    ("ClientError: Failed to invoke sagemaker:CreateTrainingJob. Error Details: DebugHookConfig is not "
     "supported for this account", True),
    ("ClientError: ProfilerConfig: SageMaker Debugger is not available to new customers", True),
    ("ClientError: AlgorithmError: CUDA out of memory", False),
])
def test_wait_tells_which_line_to_change_when_debugger_is_refused(stubbed_sm, reason, hinted):
    sm, stub = stubbed_sm
    arn = {"PipelineExecutionArn": EXEC_ARN}
    stub.add_response("describe_pipeline_execution",
                      {"PipelineExecutionArn": EXEC_ARN, "PipelineExecutionStatus": "Failed"}, arn)
    stub.add_response("list_pipeline_execution_steps", {"PipelineExecutionSteps": [
        {"StepName": "TrainModel", "StepStatus": "Failed", "FailureReason": reason}]},
        {**arn, "SortOrder": "Ascending"})
    desc, steps = aws.wait_execution(sm, EXEC_ARN, out=io.StringIO(), sleep=lambda s: None)
    out = io.StringIO()
    assert aws.report(desc, steps, out=out) == 1
    text = out.getvalue()
    assert ("set `enabled: false` under `debugger:` in your pipeline.yaml" in text) is hinted, text


# ---------------------------------------------------------------- item 8: data follows the bucket

def test_data_uri_follows_the_bucket_unless_set(monkeypatch):
    assert load_config(ROOT / "pipeline.yaml").data.uri == "s3://dogbreed-pipeline-artifacts/dogImages/"
    assert load_config(ROOT / "pipeline.yaml", bucket="ci-bucket").data.uri == "s3://ci-bucket/dogImages/"
    monkeypatch.setenv("SAGEMAKER_BUCKET", "env-bucket")
    cfg = load_config(ROOT / "pipeline.yaml")
    assert cfg.data.uri == "s3://env-bucket/dogImages/"
    from pipeline.definition import parameters
    assert parameters(cfg).data_uri.default_value == "s3://env-bucket/dogImages/"
    # an explicit data.uri is the user's choice and stays
    doc = _doc()
    doc["data"]["uri"] = "s3://shared-datasets/dogImages/"
    assert parse_config(doc, bucket="ci-bucket").data.uri == "s3://shared-datasets/dogImages/"


ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/dogbreed-sagemaker"
BUCKET = "dogbreed-artifacts"


def _cfg(data_uri):
    return SimpleNamespace(pipeline=SimpleNamespace(name="dogbreed", description="d"),
                           aws=SimpleNamespace(region=REGION, role=ROLE_ARN, bucket=BUCKET),
                           data=SimpleNamespace(uri=data_uri), tags={})


def _simulation(decisions):
    """An IAM client (botocore Stubber: moto has no SimulatePrincipalPolicy) answering each call."""
    iam = boto3.client("iam", region_name=REGION)
    stub = Stubber(iam)
    for action, resource, decision in decisions:
        stub.add_response("simulate_principal_policy", {"EvaluationResults": [
            {"EvalActionName": action, "EvalResourceName": resource, "EvalDecision": decision}]},
            {"PolicySourceArn": ROLE_ARN, "ActionNames": [action], "ResourceArns": [resource]})
    stub.activate()
    return iam, stub


def test_execute_refuses_when_the_role_cannot_read_the_data(aws_env, monkeypatch, capsys):
    boto3.client("iam").create_role(RoleName="dogbreed-sagemaker", AssumeRolePolicyDocument=SAGEMAKER_TRUST)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    boto3.client("s3").create_bucket(Bucket="someone-elses-data")
    boto3.client("s3").put_object(Bucket="someone-elses-data", Key="dogImages/train/a.jpg", Body=b"jpg")
    iam, stub = _simulation([
        ("s3:ListBucket", "arn:aws:s3:::someone-elses-data", "implicitDeny")])
    monkeypatch.setattr(aws, "simulation_client", lambda session: iam)
    out = io.StringIO()
    rc = run_pipeline.guarded(aws.execute, _cfg("s3://someone-elses-data/dogImages/"),
                              json.dumps({"Version": "2020-12-01", "Steps": []}),
                              params=[], wait=False, display_name="x", out=out, sleep=lambda s: None)
    err = capsys.readouterr().err
    assert rc == 1, out.getvalue()
    assert err.count("\n") == 1 and err.startswith("error: data URI s3://someone-elses-data/dogImages/: "
                                                   "the execution role dogbreed-sagemaker may not s3:ListBucket")
    assert boto3.client("sagemaker").list_pipelines()["PipelineSummaries"] == []   # nothing started
    stub.assert_no_pending_responses()


def test_role_check_passes_when_allowed_and_only_warns_when_it_cannot_ask(monkeypatch):
    fake_aws_env(monkeypatch, endpoint=None)
    uri = f"s3://{BUCKET}/dogImages/"
    iam, stub = _simulation([("s3:ListBucket", f"arn:aws:s3:::{BUCKET}", "allowed"),
                             ("s3:GetObject", f"arn:aws:s3:::{BUCKET}/dogImages/train/example.jpg", "allowed")])
    out = io.StringIO()
    preflight.check_role_reads(iam, ROLE_ARN, uri, out=out)
    assert out.getvalue() == ""
    stub.assert_no_pending_responses()
    denied = boto3.client("iam", region_name=REGION)
    with Stubber(denied) as s:
        s.add_client_error("simulate_principal_policy", "AccessDenied", http_status_code=403)
        preflight.check_role_reads(denied, ROLE_ARN, uri, out=out)
    assert "warning: cannot ask IAM whether the role may read" in out.getvalue()
    iam, _ = _simulation([("s3:ListBucket", f"arn:aws:s3:::{BUCKET}", "allowed"),
                          ("s3:GetObject", f"arn:aws:s3:::{BUCKET}/dogImages/train/example.jpg", "explicitDeny")])
    with pytest.raises(aws.AwsSetupError, match="may not s3:GetObject"):
        preflight.check_role_reads(iam, ROLE_ARN, uri)


def test_data_that_cannot_be_listed_is_refused_not_warned(monkeypatch):
    fake_aws_env(monkeypatch, endpoint=None)
    s3 = boto3.client("s3", region_name=REGION)
    with Stubber(s3) as stub:
        stub.add_client_error("list_objects_v2", "AccessDenied", http_status_code=403)
        with pytest.raises(aws.AwsSetupError, match="these credentials cannot list it"):
            preflight.check_data(s3, "s3://locked-bucket/dogImages/")


# ---------------------------------------------------------------- item 9: images

@pytest.mark.slow
def test_explicit_images_are_used_as_given_and_defaults_are_the_newest_the_sdk_knows():
    from pipeline.images import sdk_image_versions
    cfg = load_config(ROOT / "pipeline.yaml")
    assert cfg.framework.training_version == sdk_image_versions("training", "py312")[-1]
    assert cfg.framework.inference_version == sdk_image_versions("inference", "py312")[-1]
    doc = _doc()
    train_uri = ("763104351884.dkr.ecr.us-east-1.amazonaws.com/"
                 "pytorch-training:2.9.0-gpu-py312-cu130-ubuntu22.04-sagemaker")
    infer_uri = "123456789012.dkr.ecr.us-east-1.amazonaws.com/my-inference@sha256:" + "a" * 64
    doc["framework"].update(training_image=train_uri, inference_image=infer_uri, training_version="0.0.1")
    from pipeline.definition import build
    definition = json.loads(build(parse_config(doc)).definition)
    steps = {s["Name"]: s for s in definition["Steps"]}
    assert steps["TrainModel"]["Arguments"]["AlgorithmSpecification"]["TrainingImage"] == train_uri
    assert steps["TuneHyperparameters"]["Arguments"]["TrainingJobDefinition"]["AlgorithmSpecification"][
        "TrainingImage"] == train_uri
    assert steps["Model-CreateModel"]["Arguments"]["PrimaryContainer"]["Image"] == infer_uri


# ---------------------------------------------------------------- item 10: retry policies where AWS takes them

def test_retry_policies_only_on_step_types_that_accept_them():
    from pipeline.definition import RETRY_POLICY_STEP_TYPES
    from pipeline.local.dag import all_steps
    definition = json.loads((ROOT / "tests" / "golden" / "pipeline.definition.json").read_text())
    seen = set()
    for step in all_steps(definition):
        for policy in step.get("RetryPolicies", []):
            assert step["Type"] in RETRY_POLICY_STEP_TYPES, f"{step['Name']}: {step['Type']} takes no RetryPolicies"
            assert set(policy["ExceptionType"]) <= set(RETRY_POLICY_STEP_TYPES[step["Type"]]), step["Name"]
            seen.add(step["Type"])
    assert seen == {"Tuning", "Training", "Model", "RegisterModel"}


# ---------------------------------------------------------------- item 7: the Debugger save plan

def _counts_with_smdebug(hook_config: dict, mode: str, collection: str, steps: int) -> int:
    """Saved steps of `collection` in `mode` over `steps` mode steps, as smdebug's own parser and
    SaveConfig decide from the DebugHookConfig the definition carries."""
    from smdebug.core.json_config import parse_save_config_modes_dict
    from smdebug.core.modes import ModeKeys
    from smdebug.core.save_config import SaveConfigMode
    hook = {k: v for k, v in hook_config.get("HookParameters", {}).items()}
    base = parse_save_config_modes_dict(hook)
    coll = next((c for c in hook_config["CollectionConfigurations"] if c["CollectionName"] == collection), None)
    modes = parse_save_config_modes_dict(coll.get("CollectionParameters") or {}, base) if coll else base
    cfg = SaveConfigMode(**modes[ModeKeys[mode.upper()]])
    return sum(cfg.should_save_step(s) for s in range(steps))


@pytest.fixture(scope="module")
def golden_hook():
    definition = json.loads((ROOT / "tests" / "golden" / "pipeline.definition.json").read_text())
    return next(s for s in definition["Steps"] if s["Name"] == "TrainModel")["Arguments"]["DebugHookConfig"]


def test_every_rule_sees_enough_points_on_every_dogimages_run(golden_hook):
    cfg = load_config(ROOT / "pipeline.yaml")
    size = run_size(cfg)
    assert (size.train_images, size.valid_images) == (6680, 835)
    assert size.batch_sizes == (32, 64, 128, 256, 512) and size.epochs == (5, 6, 7, 8)
    p = plan_for_config(cfg)
    assert golden_hook["HookParameters"] == p.hook_parameters()
    # AWS's own 500 leaves the rules 1-4 points; the plan leaves every enabled rule enough on every run
    assert saved_points(size.train_steps(512, 5), 500) == 1 and saved_points(size.train_steps(32, 8), 500) == 4
    for batch in size.batch_sizes:
        for test_batch in size.test_batch_sizes:
            for epochs in size.epochs:
                n = {"train": size.train_steps(batch, epochs), "eval": size.valid_steps(test_batch, epochs)}
                for rule in cfg.debugger.rules:
                    for mode, collection, need in needs(rule, size):
                        got = _counts_with_smdebug(golden_hook, mode, collection, n[mode])
                        assert got >= need, (rule.name, batch, test_batch, epochs, mode, collection, got, need)
    # the smallest run is 13 x 5 training steps, the largest 208 x 8: bounded gradient saves
    assert size.train_steps(512, 5) == 65 and size.train_steps(32, 8) == 1664
    largest = _counts_with_smdebug(golden_hook, "train", "gradients", size.train_steps(32, 8))
    assert largest <= 300
    # relu_input (whole activations) only within poor_weight_initialization's first 10 steps, never in eval
    assert _counts_with_smdebug(golden_hook, "train", "relu_input", 1664) == 3
    assert _counts_with_smdebug(golden_hook, "eval", "relu_input", 100) == 0


def test_loss_not_decreasing_comparisons_and_infeasible_rules():
    from pipeline.debugger_plan import PlanError, comparisons
    rule = SimpleNamespace(name="loss_not_decreasing", parameters={"mode": "TRAIN"})
    size = RunSize(6680, 835, (32, 512), (32, 512), (5, 8))
    p = plan(size, [rule])
    assert comparisons(65, p.train_interval, 10) >= 3
    # checked by brute force over the saved steps
    saved = [s for s in range(65) if s % p.train_interval == 0]
    kept, last = 0, None
    for s in saved:
        if last is None or s - last >= 10:
            kept, last = kept + (last is not None), s
    assert kept == comparisons(65, p.train_interval, 10)
    with pytest.raises(PlanError, match="compares EVAL losses 10 steps apart"):
        plan(size, [SimpleNamespace(name="loss_not_decreasing", parameters={})])
    assert math.ceil(835 / 512) * 5 == 10   # why: 10 validation steps on the smallest run


# ---------------------------------------------------------------- item 10: an endpoint left Failed or changing

@pytest.mark.parametrize("status, refused", [("Failed", True), ("Updating", False), ("InService", False)])
def test_preflight_refuses_a_failed_endpoint_and_warns_about_one_in_progress(stubbed_sm, status, refused):
    sm, stub = stubbed_sm
    stub.add_response("describe_endpoint", {
        "EndpointName": "dogbreed-endpoint",
        "EndpointArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/dogbreed-endpoint",
        "EndpointStatus": status, "FailureReason": "CannotStartContainerError", "CreationTime": "2026-11-01T00:00:00Z",
        "LastModifiedTime": "2026-11-01T00:00:00Z"}, {"EndpointName": "dogbreed-endpoint"})
    out = io.StringIO()
    if refused:
        with pytest.raises(aws.AwsSetupError,
                           match="endpoint dogbreed-endpoint is Failed \\(CannotStartContainerError\\)"
                                                    ": SageMaker cannot update a failed endpoint.*delete it first"):
            preflight.check_endpoint(sm, "dogbreed-endpoint", out=out)
    else:
        preflight.check_endpoint(sm, "dogbreed-endpoint", out=out)
        assert ("DeployEndpoint fails if it still is" in out.getvalue()) is (status == "Updating")


def test_preflight_lets_a_new_endpoint_be_created(stubbed_sm):
    sm, stub = stubbed_sm
    stub.add_client_error("describe_endpoint", "ValidationException", "Could not find endpoint", http_status_code=400)
    out = io.StringIO()
    preflight.check_endpoint(sm, "dogbreed-endpoint", out=out)
    assert out.getvalue() == ""


def test_instance_overrides_are_checked_against_dlc_tags_and_left_to_the_user_for_their_own_images():
    from pipeline.params import ParameterError, check_overrides
    definition = {"Parameters": [{"Name": "TrainingInstanceType", "Type": "String", "DefaultValue": "ml.g4dn.xlarge"}],
                  "Steps": [{"Name": "TrainModel", "Type": "Training", "Arguments": {"AlgorithmSpecification": {
                      "TrainingImage": "123456789012.dkr.ecr.us-east-1.amazonaws.com/my-train:v3"}}}]}
    assert check_overrides(definition, ["TrainingInstanceType=ml.m5.xlarge"]) == \
        {"TrainingInstanceType": "ml.m5.xlarge"}
    definition["Steps"][0]["Arguments"]["AlgorithmSpecification"]["TrainingImage"] = \
        "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.8.0-gpu-py312"
    with pytest.raises(ParameterError, match="needs the CPU image"):
        check_overrides(definition, ["TrainingInstanceType=ml.m5.xlarge"])
