"""--execute / --wait / --cleanup against a moto server on 127.0.0.1 (real HTTP), and
botocore's Stubber for ListPipelineExecutionSteps, which moto does not implement."""
from __future__ import annotations

import datetime as dt
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest

import run_pipeline
from pipeline import aws
from tests._aws_helpers import ACCOUNT, REGION, SAGEMAKER_TRUST

ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/dogbreed-sagemaker"
BUCKET = "dogbreed-artifacts"
DEFINITION = json.dumps({
    "Version": "2020-12-01", "Metadata": {},
    "Parameters": [
        {"Name": "AccuracyThreshold", "Type": "Float", "DefaultValue": 0.7},
        {"Name": "DataUri", "Type": "String", "DefaultValue": f"s3://{BUCKET}/dogImages/"},
        {"Name": "MaxTrials", "Type": "Integer", "DefaultValue": 4},
        {"Name": "TrainingInstanceType", "Type": "String", "DefaultValue": "ml.g4dn.xlarge"},
    ],
    "Steps": [],
})


def make_cfg(name="dogbreed", region=REGION, role=ROLE_ARN, bucket=BUCKET, data_uri=f"s3://{BUCKET}/dogImages/"):
    """The fields of pipeline.config.Config that pipeline.aws reads."""
    return SimpleNamespace(pipeline=SimpleNamespace(name=name, description="tune, train, deploy"),
                           aws=SimpleNamespace(region=region, role=role, bucket=bucket),
                           data=SimpleNamespace(uri=data_uri), tags={"project": "dogbreed", "owner": "ml-team"})


@pytest.fixture
def account(aws_env):
    """A moto account with the role and the bucket the infra/ stack would create."""
    boto3.client("iam").create_role(RoleName="dogbreed-sagemaker", AssumeRolePolicyDocument=SAGEMAKER_TRUST)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    boto3.client("s3").put_object(Bucket=BUCKET, Key="dogImages/train/001.Affenpinscher/a.jpg", Body=b"jpg")
    return boto3.client("sagemaker")


def run_execute(cfg, definition=DEFINITION, params=(), wait=False, display_name=None, uploads=None):
    out = io.StringIO()
    rc = run_pipeline.guarded(aws.execute, cfg, definition, params=list(params), wait=wait,
                              display_name=display_name, uploads=uploads, out=out, sleep=lambda s: None)
    return rc, out.getvalue()


# ---------------------------------------------------------------- upsert / start / wait on moto

def test_execute_creates_then_updates_and_starts_with_params(account, monkeypatch, tmp_path):
    sm = account
    rc, out = run_execute(make_cfg(), params=["AccuracyThreshold=0.8", "MaxTrials=2"], display_name="first-run")
    assert rc == 0, out
    assert "created pipeline arn:aws:sagemaker" in out
    exec1 = next(line.split()[1] for line in out.splitlines() if line.startswith("execution "))
    assert f"#/pipelines/dogbreed/executions/{exec1.rsplit('/', 1)[1]}" in out  # console link

    pipeline = sm.describe_pipeline(PipelineName="dogbreed")
    assert pipeline["RoleArn"] == ROLE_ARN
    assert json.loads(pipeline["PipelineDefinition"]) == json.loads(DEFINITION)
    tags = {t["Key"]: t["Value"] for t in sm.list_tags(ResourceArn=pipeline["PipelineArn"])["Tags"]}
    assert tags == {"project": "dogbreed", "owner": "ml-team", aws.PIPELINE_TAG: "dogbreed"}
    params = sm.list_pipeline_parameters_for_execution(PipelineExecutionArn=exec1)["PipelineParameters"]
    assert params == [{"Name": "AccuracyThreshold", "Value": "0.8"}, {"Name": "MaxTrials", "Value": "2"}]
    desc = sm.describe_pipeline_execution(PipelineExecutionArn=exec1)
    assert desc["PipelineExecutionDisplayName"] == "first-run"

    # Second run: same name, new definition -> update, not a second pipeline; CI names it by commit.
    monkeypatch.setenv("GITHUB_SHA", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("GITHUB_REPOSITORY", "me/dogbreed")
    monkeypatch.setenv("GITHUB_RUN_ID", "42")
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    edited = json.loads(DEFINITION)
    edited["Parameters"][0]["DefaultValue"] = 0.9
    rc, out = run_execute(make_cfg(), definition=json.dumps(edited))
    assert rc == 0, out
    assert "updated pipeline" in out
    assert json.loads(sm.describe_pipeline(PipelineName="dogbreed")["PipelineDefinition"]) == edited
    assert [p["PipelineName"] for p in sm.list_pipelines()["PipelineSummaries"]] == ["dogbreed"]
    runs = sm.list_pipeline_executions(PipelineName="dogbreed")["PipelineExecutionSummaries"]
    assert len(runs) == 2
    latest = next(r for r in runs if r["PipelineExecutionArn"] != exec1)
    assert latest["PipelineExecutionDisplayName"] == "commit-0123456789ab"
    assert "0123456789abcdef0123456789abcdef01234567" in latest["PipelineExecutionDescription"]
    assert "me/dogbreed/actions/runs/42" in latest["PipelineExecutionDescription"]
    assert "SageMaker execution" in summary.read_text()


def test_execute_wait_on_moto_execution(account, capsys):
    # moto ends executions as Succeeded at once and has no ListPipelineExecutionSteps:
    # the wait loop must still finish, say the step table is unavailable, and exit 0.
    rc, out = run_execute(make_cfg(), wait=True)
    assert rc == 0, out
    assert "execution Succeeded" in out
    assert "step statuses unavailable" in out


def test_large_definition_goes_through_s3(account):
    big = json.loads(DEFINITION)
    big["Metadata"] = {"padding": "x" * (aws.INLINE_DEFINITION_LIMIT + 10)}
    rc, out = run_execute(make_cfg(), definition=json.dumps(big))
    assert rc == 0, out
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="dogbreed/")["Contents"]]
    assert len(keys) == 1 and keys[0].startswith("dogbreed/definitions/")
    body = boto3.client("s3").get_object(Bucket=BUCKET, Key=keys[0])["Body"].read()
    assert json.loads(body) == big
    # moto loaded the definition from that object (it echoes it back as a Python repr, hence no json here)
    assert "'padding'" in account.describe_pipeline(PipelineName="dogbreed")["PipelineDefinition"]


# ---------------------------------------------------------------- pre-flight checks, one message each

def _no_pipeline_created(sm) -> bool:
    return sm.list_pipelines()["PipelineSummaries"] == []


@pytest.mark.parametrize("setup, cfg_over, message", [
    ("no-credentials", {}, "no AWS credentials found"),
    ("", {"region": "us-eats-1"}, "region 'us-eats-1' is not a SageMaker region"),
    ("", {"region": None}, "no AWS region"),
    ("", {"role": "dogbreed-sagemaker"}, "is not an IAM role ARN"),
    ("", {"role": f"arn:aws:iam::{ACCOUNT}:role/missing"}, "IAM role 'missing' does not exist"),
    ("untrusting-role", {"role": f"arn:aws:iam::{ACCOUNT}:role/lambda-only"},
     "does not trust sagemaker.amazonaws.com"),
    ("", {"bucket": "no-such-bucket"}, "S3 bucket 'no-such-bucket' does not exist"),
    ("", {"bucket": None}, "no S3 bucket"),
    ("", {"data_uri": f"s3://{BUCKET}/elsewhere/"}, f"no data at s3://{BUCKET}/elsewhere/: run"),
    ("eu-bucket", {"bucket": "bucket-in-europe"}, "is in eu-west-1, but the pipeline runs in us-east-1"),
])
def test_preflight_errors_create_nothing(account, monkeypatch, capsys, setup, cfg_over, message):
    if setup == "untrusting-role":
        boto3.client("iam").create_role(RoleName="lambda-only", AssumeRolePolicyDocument=SAGEMAKER_TRUST.replace(
            "sagemaker.amazonaws.com", "lambda.amazonaws.com"))
    if setup == "eu-bucket":
        boto3.client("s3", region_name="eu-west-1").create_bucket(
            Bucket="bucket-in-europe", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    sm = account
    if setup == "no-credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    rc, out = run_execute(make_cfg(**cfg_over))
    err = capsys.readouterr().err
    assert rc == 1
    assert message in err, err
    assert err.count("error:") == 1
    assert _no_pipeline_created(sm)


@pytest.mark.parametrize("params, message", [
    (["Threshold=0.5"], "--param Threshold: not a parameter of this pipeline; known: ['AccuracyThreshold', "
                        "'DataUri', 'MaxTrials', 'TrainingInstanceType']"),
    (["MaxTrials=two"], "--param MaxTrials='two': expected Integer"),
    (["AccuracyThreshold"], "--param 'AccuracyThreshold': expected NAME=VALUE"),
])
def test_bad_params_are_refused_before_any_call(account, capsys, params, message):
    rc, _ = run_execute(make_cfg(), params=params)
    assert rc == 1
    assert message in capsys.readouterr().err
    assert _no_pipeline_created(account)


def test_code_is_uploaded_once_and_data_uri_param_is_checked(account):
    code = {f"s3://{BUCKET}/dogbreed/code/0123/sourcedir.tar.gz": b"tarball bytes"}
    cfg = make_cfg(data_uri=f"s3://{BUCKET}/not-prepared/")
    # The config's data URI is empty, but the execution reads DataUri from --param.
    rc, out = run_execute(cfg, params=[f"DataUri=s3://{BUCKET}/dogImages/"], uploads=code)
    assert rc == 0, out
    assert f"uploaded s3://{BUCKET}/dogbreed/code/0123/sourcedir.tar.gz" in out
    body = boto3.client("s3").get_object(Bucket=BUCKET, Key="dogbreed/code/0123/sourcedir.tar.gz")["Body"].read()
    assert body == b"tarball bytes"
    rc, out = run_execute(cfg, params=[f"DataUri=s3://{BUCKET}/dogImages/"], uploads=code)
    assert rc == 0 and "uploaded" not in out  # unchanged: not sent again


def test_a_definition_naming_code_that_is_not_in_s3_is_refused(account, capsys):
    """A definition file built from other code: refused before the pipeline exists, not at its first job."""
    uri = f"s3://{BUCKET}/dogbreed/code/ffff/sourcedir.tar.gz"
    doc = json.loads(DEFINITION)
    doc["Steps"] = [{"Name": "Train", "Type": "Training", "Arguments": {
        "HyperParameters": {"sagemaker_submit_directory": json.dumps(uri)}}}]
    rc, _ = run_execute(make_cfg(), definition=json.dumps(doc), params=[f"DataUri=s3://{BUCKET}/dogImages/"])
    err = capsys.readouterr().err
    assert rc == 1 and f"the definition's code {uri} is not in S3" in err and err.count("\n") == 1, err
    assert _no_pipeline_created(account)
    rc, out = run_execute(make_cfg(), definition=json.dumps(doc), uploads={uri: b"code"})
    assert rc == 0, out


def test_bad_display_name(account, capsys):
    rc, _ = run_execute(make_cfg(), display_name="my run!")
    assert rc == 1 and "display name 'my run!' is invalid" in capsys.readouterr().err


# ---------------------------------------------------------------- wait + failure report, with Stubber

EXEC_ARN = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:pipeline/dogbreed/execution/abc123def456"
T0 = dt.datetime(2026, 11, 25, 10, 0, tzinfo=dt.timezone.utc)


def _desc(status, reason=None):
    d = {"PipelineExecutionArn": EXEC_ARN, "PipelineExecutionStatus": status}
    if reason:
        d["FailureReason"] = reason
    return d


def _step(name, status, minutes, **extra):
    s = {"StepName": name, "StepStatus": status, "StartTime": T0 + dt.timedelta(minutes=minutes)}
    if status in ("Succeeded", "Failed"):
        s["EndTime"] = T0 + dt.timedelta(minutes=minutes + 1)
    return {**s, **extra}


def _poll(stub, status, steps, reason=None):
    arn = {"PipelineExecutionArn": EXEC_ARN}
    stub.add_response("describe_pipeline_execution", _desc(status, reason), arn)
    stub.add_response("list_pipeline_execution_steps", {"PipelineExecutionSteps": steps},
                      {**arn, "SortOrder": "Ascending"})


def test_wait_shows_step_table_backs_off_and_reports_failure(stubbed_sm):
    sm, stub = stubbed_sm
    tuning = [_step("TuneHyperparameters", "Executing", 0)]
    _poll(stub, "Executing", tuning)
    _poll(stub, "Executing", tuning)
    _poll(stub, "Executing", tuning)
    failed = [
        _step("TuneHyperparameters", "Succeeded", 0, Metadata={"TuningJob": {"Arn": "arn:aws:sagemaker:x"}}),
        _step("TrainBestModel", "Succeeded", 2),
        _step("CheckAccuracy", "Succeeded", 4),
        _step("AccuracyTooLow", "Failed", 5, FailureReason="Fail step AccuracyTooLow was reached",
              Metadata={"Fail": {"ErrorMessage": "test accuracy 0.41 is below the threshold 0.7"}}),
    ]
    _poll(stub, "Failed", failed, reason="Step failure: One or multiple steps failed.")
    delays, out = [], io.StringIO()
    desc, steps = aws.wait_execution(sm, EXEC_ARN, poll_s=10, max_poll_s=20, out=out, sleep=delays.append)
    assert delays == [10, 15, 20]  # back-off while nothing changes, capped
    text = out.getvalue()
    assert text.count("execution Executing") == 1  # unchanged polls print nothing
    assert "TuneHyperparameters  Executing" in text
    assert "AccuracyTooLow" in text and "10:05:00" in text

    out = io.StringIO()
    assert aws.report(desc, steps, out=out) == 1
    report = out.getvalue()
    assert "execution Failed:" in report
    assert "execution: Step failure: One or multiple steps failed." in report
    assert "step AccuracyTooLow: Fail step AccuracyTooLow was reached" in report
    assert "step AccuracyTooLow (FailStep) says: test accuracy 0.41 is below the threshold 0.7" in report
    assert "TrainBestModel:" not in report  # succeeded steps are not reported


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_wait_redraws_the_table_in_place_on_a_terminal(stubbed_sm):
    sm, stub = stubbed_sm
    _poll(stub, "Executing", [_step("TuneHyperparameters", "Executing", 0)])
    _poll(stub, "Succeeded", [_step("TuneHyperparameters", "Succeeded", 0), _step("TrainBestModel", "Succeeded", 2)])
    out = Terminal()
    aws.wait_execution(sm, EXEC_ARN, out=out, sleep=lambda s: None)
    first, second = out.getvalue().split("\x1b[3F\x1b[J")  # 3 lines: status, header, one step
    assert "TuneHyperparameters  Executing" in first and "TrainBestModel" in second


def test_wait_reports_failed_training_step(stubbed_sm):
    sm, stub = stubbed_sm
    _poll(stub, "Failed", [_step("TrainBestModel", "Failed", 0,
                                 FailureReason="ClientError: AlgorithmError: CUDA out of memory")])
    desc, steps = aws.wait_execution(sm, EXEC_ARN, out=io.StringIO(), sleep=lambda s: None)
    out = io.StringIO()
    assert aws.report(desc, steps, out=out) == 1
    assert "step TrainBestModel: ClientError: AlgorithmError: CUDA out of memory" in out.getvalue()


def test_wait_succeeded_paginates_steps(stubbed_sm):
    sm, stub = stubbed_sm
    arn = {"PipelineExecutionArn": EXEC_ARN}
    stub.add_response("describe_pipeline_execution", _desc("Succeeded"), arn)
    stub.add_response("list_pipeline_execution_steps",
                      {"PipelineExecutionSteps": [_step("A", "Succeeded", 0)], "NextToken": "t"},
                      {**arn, "SortOrder": "Ascending"})
    stub.add_response("list_pipeline_execution_steps",
                      {"PipelineExecutionSteps": [_step("B", "Succeeded", 1, CacheHitResult={})]},
                      {**arn, "SortOrder": "Ascending", "NextToken": "t"})
    desc, steps = aws.wait_execution(sm, EXEC_ARN, out=io.StringIO(), sleep=lambda s: None)
    assert [s["StepName"] for s in steps] == ["A", "B"]
    assert aws.report(desc, steps, out=io.StringIO()) == 0


# ---------------------------------------------------------------- cleanup by tag

def _deployed(sm, suffix, tags):
    sm.create_model(ModelName=f"model-{suffix}", ExecutionRoleArn=ROLE_ARN, PrimaryContainer={"Image": "img"},
                    Tags=tags)
    sm.create_endpoint_config(EndpointConfigName=f"config-{suffix}", Tags=tags, ProductionVariants=[
        {"VariantName": "v", "ModelName": f"model-{suffix}", "InstanceType": "ml.m5.large",
         "InitialInstanceCount": 1}])
    sm.create_endpoint(EndpointName=f"endpoint-{suffix}", EndpointConfigName=f"config-{suffix}", Tags=tags)


def _names(sm):
    return (sorted(m["ModelName"] for m in sm.list_models()["Models"])
            + sorted(c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"])
            + sorted(e["EndpointName"] for e in sm.list_endpoints()["Endpoints"]))


def test_cleanup_deletes_only_our_tagged_resources(account):
    sm = account
    _deployed(sm, "ours", [{"Key": aws.PIPELINE_TAG, "Value": "dogbreed"}, {"Key": "project", "Value": "x"}])
    _deployed(sm, "by-execution", [{"Key": aws.EXECUTION_ARN_TAG, "Value": EXEC_ARN.replace("dogbreed", "DogBreed")}])
    _deployed(sm, "other-pipeline", [{"Key": aws.PIPELINE_TAG, "Value": "dogbreed-staging"}])
    _deployed(sm, "untagged", [])
    cfg = make_cfg()

    # Declined, or no terminal to ask: nothing goes.
    before = _names(sm)
    out = io.StringIO()
    assert aws.cleanup(cfg, assume_yes=False, out=out, ask=lambda q: "n") == 1
    assert "nothing deleted" in out.getvalue() and "endpoint         endpoint-ours" in out.getvalue()

    def no_tty(q):
        raise EOFError
    assert aws.cleanup(cfg, assume_yes=False, out=io.StringIO(), ask=no_tty) == 1
    assert _names(sm) == before

    out = io.StringIO()
    assert aws.cleanup(cfg, assume_yes=False, out=out, ask=lambda q: "y") == 0
    assert "deleted endpoint endpoint-ours" in out.getvalue()
    left = _names(sm)
    assert not [n for n in left if n.endswith(("-ours", "-by-execution"))]
    assert left == [f"{kind}-{s}" for kind in ("model", "config", "endpoint") for s in ("other-pipeline", "untagged")]

    out = io.StringIO()
    assert aws.cleanup(cfg, assume_yes=True, out=out) == 0
    assert "nothing to delete" in out.getvalue()


def test_cleanup_without_credentials(aws_env, monkeypatch, capsys):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert run_pipeline.guarded(aws.cleanup, make_cfg(), assume_yes=True, out=io.StringIO()) == 1
    assert "no AWS credentials found" in capsys.readouterr().err


# ---------------------------------------------------------------- the real CLI, config and definition

ROOT = Path(__file__).resolve().parents[1]


def _deploy_steps(definition: dict) -> list[dict]:
    from pipeline.local.dag import all_steps
    return [step for step in all_steps(definition) if step["Type"] in ("Model", "EndpointConfig", "Endpoint")]


@pytest.mark.slow
def test_cli_execute_wait_with_the_real_definition(account, tmp_path):
    out_json = tmp_path / "definition.json"
    rc = run_pipeline.main(["--config", str(ROOT / "pipeline.yaml"), "--region", REGION, "--role", ROLE_ARN,
                            "--bucket", BUCKET, "--definition", str(out_json), "--execute", "--wait",
                            "--param", f"DataUri=s3://{BUCKET}/dogImages/", "--param", "AccuracyThreshold=0.9",
                            "--display-name", "cli-test"])
    assert rc == 0
    definition = json.loads(out_json.read_text())
    name = definition.get("PipelineName") or next(
        p["PipelineName"] for p in account.list_pipelines()["PipelineSummaries"])
    pipeline = account.describe_pipeline(PipelineName=name)
    assert pipeline["RoleArn"] == ROLE_ARN
    # The code the definition points at is in the (moto) bucket, not only in the offline build.
    code = [k for k in re.findall(rf"s3://{BUCKET}/[^\"' ]+sourcedir\.tar\.gz", out_json.read_text())]
    assert code, "the definition references no code tarball in the bucket"
    for uri in set(code):
        boto3.client("s3").head_object(Bucket=BUCKET, Key=uri[len(f"s3://{BUCKET}/"):])


@pytest.mark.slow
def test_cli_execute_runs_a_definition_file_as_it_is(account, tmp_path):
    """--definition-file goes to AWS as it is (an edited default included), with the code it names."""
    common = ["--config", str(ROOT / "pipeline.yaml"), "--region", REGION, "--role", ROLE_ARN, "--bucket", BUCKET]
    built = tmp_path / "built.json"
    assert run_pipeline.main([*common, "--definition", str(built)]) == 0
    doc = json.loads(built.read_text())
    threshold = next(p for p in doc["Parameters"] if p["Name"] == "AccuracyThreshold")
    threshold["DefaultValue"] = 0.4242
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(doc))
    rc = run_pipeline.main([*common, "--execute", "--definition-file", str(edited),
                            "--param", f"DataUri=s3://{BUCKET}/dogImages/", "--display-name", "from-file"])
    assert rc == 0
    name = doc.get("PipelineName") or account.list_pipelines()["PipelineSummaries"][0]["PipelineName"]
    assert json.loads(account.describe_pipeline(PipelineName=name)["PipelineDefinition"]) == doc
    code = set(re.findall(rf"s3://{BUCKET}/[^\"' ]+sourcedir\.tar\.gz", edited.read_text()))
    assert code, "the definition references no code tarball in the bucket"
    for uri in code:
        boto3.client("s3").head_object(Bucket=BUCKET, Key=uri[len(f"s3://{BUCKET}/"):])


def test_cli_execute_refuses_a_definition_file_that_is_not_json(account, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    rc = run_pipeline.main(["--config", str(ROOT / "pipeline.yaml"), "--region", REGION, "--role", ROLE_ARN,
                            "--bucket", BUCKET, "--execute", "--definition-file", str(bad)])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith(f"error: {bad}: not JSON") and err.count("\n") == 1, err
    assert _no_pipeline_created(account)


def test_definition_tags_what_cleanup_deletes(configs, definitions):
    """The contract with pipeline/definition.py: Model, EndpointConfig and Endpoint steps carry
    aws.PIPELINE_TAG = the pipeline name, which --cleanup looks for."""
    name = configs["real"].pipeline.name
    deploy = _deploy_steps(definitions["real"])
    assert {s["Type"] for s in deploy} == {"Model", "EndpointConfig", "Endpoint"}
    for step in deploy:
        tags = {t["Key"]: t["Value"] for t in step["Arguments"].get("Tags", [])}
        assert tags.get(aws.PIPELINE_TAG) == name, (step["Name"], tags)
