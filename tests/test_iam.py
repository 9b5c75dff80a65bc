"""The execution role in infra/template.yaml can do everything the built definition's steps do.

For each step of the definition, STEP_ACTIONS (AWS's documentation is the source, cited per
entry) and the step's own arguments (images, S3 URIs, tags, rules, roles) give the IAM actions
and resources SageMaker Pipelines and the jobs need as the role. The template's policy is
resolved for a concrete account and region (its !Sub, !Ref, !GetAtt, !FindInMap, !If) and
evaluated like IAM does for Allow statements; every needed (action, resource) must be allowed.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import re
from pathlib import Path

import pytest

from pipeline.images import debugger_rule_accounts, dlc_accounts
from pipeline.local.dag import all_steps

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "infra" / "template.yaml"
GOLDEN = ROOT / "tests" / "golden" / "pipeline.definition.json"
ACCOUNT = "123456789012"
BUCKET = "dogbreed-pipeline-artifacts"
ROLE_NAME = "dogbreed-stack-SageMakerExecutionRole-ABC"

SERVICE_AUTH = "https://docs.aws.amazon.com/service-authorization/latest/reference/list_amazonsagemaker.html"
PIPELINE_ACCESS = "https://docs.aws.amazon.com/sagemaker/latest/dg/build-and-manage-access.html"
ROLES = "https://docs.aws.amazon.com/sagemaker/latest/dg/sagemaker-roles.html"
DEBUGGER_IMAGES = "https://docs.aws.amazon.com/sagemaker/latest/dg/debugger-reference.html#debugger-docker-images-rules"
EXPERIMENTS = "https://docs.aws.amazon.com/sagemaker/latest/dg/pipelines-experiments.html"

# Step type -> (action, resource type, source). "Pipeline Role Permissions": the pipeline's role needs
# Create and Describe (and Stop, to stop an execution) for each job type its steps run; the resource
# types are the Service Authorization Reference's.
STEP_ACTIONS = {
    "Tuning": [("sagemaker:CreateHyperParameterTuningJob", "hyper-parameter-tuning-job", PIPELINE_ACCESS),
               ("sagemaker:DescribeHyperParameterTuningJob", "hyper-parameter-tuning-job", PIPELINE_ACCESS),
               ("sagemaker:StopHyperParameterTuningJob", "hyper-parameter-tuning-job", PIPELINE_ACCESS),
               ("sagemaker:ListTrainingJobsForHyperParameterTuningJob", "hyper-parameter-tuning-job", SERVICE_AUTH),
               # the tuning job starts its trials as training jobs
               ("sagemaker:CreateTrainingJob", "training-job", SERVICE_AUTH),
               ("sagemaker:DescribeTrainingJob", "training-job", SERVICE_AUTH)],
    "Training": [("sagemaker:CreateTrainingJob", "training-job", PIPELINE_ACCESS),
                 ("sagemaker:DescribeTrainingJob", "training-job", PIPELINE_ACCESS),
                 ("sagemaker:StopTrainingJob", "training-job", PIPELINE_ACCESS)],
    "Model": [("sagemaker:CreateModel", "model", PIPELINE_ACCESS),
              ("sagemaker:DescribeModel", "model", PIPELINE_ACCESS)],
    "RegisterModel": [("sagemaker:CreateModelPackage", "model-package", PIPELINE_ACCESS),
                      ("sagemaker:DescribeModelPackage", "model-package", PIPELINE_ACCESS),
                      ("sagemaker:DescribeModelPackageGroup", "model-package-group", SERVICE_AUTH)],
    "EndpointConfig": [("sagemaker:CreateEndpointConfig", "endpoint-config", PIPELINE_ACCESS),
                       ("sagemaker:DescribeEndpointConfig", "endpoint-config", PIPELINE_ACCESS)],
    # EndpointStep creates the endpoint, or updates it when it exists
    "Endpoint": [("sagemaker:CreateEndpoint", "endpoint", PIPELINE_ACCESS),
                 ("sagemaker:UpdateEndpoint", "endpoint", PIPELINE_ACCESS),
                 ("sagemaker:DescribeEndpoint", "endpoint", PIPELINE_ACCESS),
                 ("sagemaker:DescribeEndpointConfig", "endpoint-config", SERVICE_AUTH)],
    "Condition": [],
    "Fail": [],
}
# What a job running as the role does (sagemaker-roles.html: CreateTrainingJob / CreateModel role
# permissions): pull its image, write its logs and metrics. Log group per job kind.
JOB_LOGS = {"Tuning": "TrainingJobs", "Training": "TrainingJobs", "Model": "Endpoints", "Endpoint": "Endpoints"}
ECR_PULL = ("ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer")
# PipelineExperimentConfig: Pipelines creates an experiment per pipeline and a trial per execution.
EXPERIMENT_ACTIONS = [("sagemaker:CreateExperiment", "experiment"), ("sagemaker:DescribeExperiment", "experiment"),
                      ("sagemaker:CreateTrial", "experiment-trial"), ("sagemaker:DescribeTrial", "experiment-trial"),
                      ("sagemaker:AssociateTrialComponent", "experiment-trial-component"),
                      ("sagemaker:CreateTrialComponent", "experiment-trial-component")]


# ---------------------------------------------------------------- the template, resolved

def _template() -> dict:
    from cfnlint.decode.cfn_yaml import loads
    return loads(TEMPLATE.read_text())


class Resolver:
    def __init__(self, template: dict, region: str, params: dict[str, str] | None = None):
        self.t, self.region = template, region
        self.partition = "aws-cn" if region.startswith("cn-") else "aws"
        self.params = {k: str(v.get("Default", "")) for k, v in template.get("Parameters", {}).items()}
        self.params.update(BucketName=BUCKET, GitHubRepository="me/dogbreed", **(params or {}))
        self.refs = {"AWS::Region": region, "AWS::AccountId": ACCOUNT, "AWS::Partition": self.partition,
                     "AWS::StackId": f"arn:{self.partition}:cloudformation:{region}:{ACCOUNT}:stack/s/1",
                     "ArtifactBucket": BUCKET, **self.params}
        self.atts = {"ArtifactBucket.Arn": f"arn:{self.partition}:s3:::{BUCKET}",
                     "SageMakerExecutionRole.Arn": f"arn:{self.partition}:iam::{ACCOUNT}:role/{ROLE_NAME}"}

    def condition(self, name: str) -> bool:
        return bool(self.value(self.t["Conditions"][name]))

    def value(self, node):
        if isinstance(node, list):
            out = [self.value(v) for v in node]
            return [v for v in out if v is not NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            (key, arg), = node.items()
            if key == "Ref":
                return NO_VALUE if arg == "AWS::NoValue" else self.refs[arg]
            if key == "Fn::GetAtt":
                return self.atts[".".join(arg) if isinstance(arg, list) else arg]
            if key == "Fn::Sub":
                text, extra = ((arg, {}) if isinstance(arg, str)
                               else (arg[0], {k: self.value(v) for k, v in arg[1].items()}))
                return re.sub(r"\$\{([^}]+)\}", lambda m: str(extra.get(m.group(1)) or (
                    self.atts[m.group(1)] if "." in m.group(1) and m.group(1) in self.atts
                    else self.refs[m.group(1)])), text)
            if key == "Fn::FindInMap":
                name, top, second = (self.value(a) for a in arg)
                return self.t["Mappings"][name][top][second]
            if key == "Fn::If":
                return self.value(arg[1] if self.condition(arg[0]) else arg[2])
            if key == "Fn::Equals":
                return self.value(arg[0]) == self.value(arg[1])
            if key == "Fn::Not":
                return not self.value(arg[0])
            if key == "Condition":
                return self.condition(arg)
        return {k: self.value(v) for k, v in node.items()}


NO_VALUE = object()


def execution_policy(region: str, template: dict | None = None, **params) -> list[dict]:
    t = template or _template()
    r = Resolver(t, region, params)
    return r.value(t["Resources"]["SageMakerExecutionPolicy"]["Properties"]["PolicyDocument"]["Statement"])


def _listify(v):
    return [v] if isinstance(v, str) else list(v)


def _condition_holds(condition: dict | None, context: dict) -> bool:
    for op, tests in (condition or {}).items():
        for key, want in tests.items():
            have = context.get(key)
            if have is None:
                if op.endswith("IfExists"):
                    continue
                return False
            wants = _listify(want)
            if op.startswith("StringLike"):
                if not any(fnmatch.fnmatchcase(have, w) for w in wants):
                    return False
            elif op.startswith("StringEquals") or op == "Bool":
                if str(have) not in [str(w) for w in wants]:
                    return False
            else:
                raise AssertionError(f"condition operator {op} not modelled here")
    return True


def allowed(statements: list[dict], action: str, resource: str, context: dict | None = None) -> bool:
    """IAM's Allow evaluation for one request (no Deny statements in this policy)."""
    for s in statements:
        if s.get("Effect") != "Allow":
            continue
        if not any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in _listify(s["Action"])):
            continue
        if not any(fnmatch.fnmatchcase(resource, r) for r in _listify(s["Resource"])):
            continue
        if _condition_holds(s.get("Condition"), context or {}):
            return True
    return False


# ---------------------------------------------------------------- what the definition needs

def _s3_uris(node, params: dict, found: list, key: str = "", outputs: dict | None = None) -> None:
    """Every S3 URI in a step's arguments, with the path of keys to it: literals, JSON-quoted
    hyperparameters, Parameters' defaults, Std:Join's (other Gets become '*'), and another
    step's model artifacts (under that step's output path)."""
    outputs = outputs or {}
    if isinstance(node, dict):
        if "Get" in node and len(node) == 1:
            ref = node["Get"]
            value = params.get(ref[len("Parameters."):]) if ref.startswith("Parameters.") else None
            m = re.match(r"^Steps\.([^.]+)\.ModelArtifacts\.S3ModelArtifacts$", ref)
            if m and m.group(1) in outputs:
                value = outputs[m.group(1)].rstrip("/") + "/*/output/model.tar.gz"
            if isinstance(value, str) and value.startswith("s3://"):
                found.append((key, value))
            return
        if "Std:Join" in node:
            parts = []
            for v in node["Std:Join"]["Values"]:
                if isinstance(v, dict) and v.get("Get", "").startswith("Parameters."):
                    parts.append(str(params.get(v["Get"][len("Parameters."):], "*")))
                else:
                    parts.append(v if isinstance(v, str) else "*")
            text = node["Std:Join"]["On"].join(parts)
            if text.startswith("s3://"):
                found.append((key, text))
            return
        for k, v in node.items():
            _s3_uris(v, params, found, f"{key}.{k}", outputs)
    elif isinstance(node, list):
        for v in node:
            _s3_uris(v, params, found, key, outputs)
    elif isinstance(node, str):
        text = node.strip('"')
        if text.startswith("s3://"):
            found.append((key, text))


def _images(node, found: list) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("TrainingImage", "Image", "RuleEvaluatorImage") and isinstance(v, str):
                found.append(v)
            else:
                _images(v, found)
    elif isinstance(node, list):
        for v in node:
            _images(v, found)


# Where jobs write (everything else they only read): job output, checkpoints, hook and profiler output.
WRITES = (".OutputDataConfig.S3OutputPath", ".CheckpointConfig.S3Uri", ".DebugHookConfig.S3OutputPath",
          ".ProfilerConfig.S3OutputPath")


def needed(definition: dict, region: str) -> list[tuple[str, str, dict, str]]:
    """(action, resource ARN, request context, why) for every step of the definition."""
    part = "aws-cn" if region.startswith("cn-") else "aws"
    arn = f"arn:{part}:sagemaker:{region}:{ACCOUNT}"
    role = f"arn:{part}:iam::{ACCOUNT}:role/{ROLE_NAME}"
    params = {p["Name"]: p.get("DefaultValue") for p in definition.get("Parameters", [])}
    outputs = {s["Name"]: s["Arguments"]["OutputDataConfig"]["S3OutputPath"] for s in all_steps(definition)
               if isinstance(s.get("Arguments", {}).get("OutputDataConfig", {}).get("S3OutputPath"), str)}
    out = []
    if definition.get("PipelineExperimentConfig"):
        out += [(a, f"{arn}:{kind}/x", {}, f"PipelineExperimentConfig ({EXPERIMENTS})")
                for a, kind in EXPERIMENT_ACTIONS]
    for step in all_steps(definition):
        kind, args, name = step["Type"], step.get("Arguments", {}), step["Name"]
        assert kind in STEP_ACTIONS, f"step {name}: type {kind} has no row in STEP_ACTIONS: add one (with its source)"
        why = f"step {name} ({kind})"
        group = args.get("ModelPackageGroupName", "x")
        for action, rtype, _ in STEP_ACTIONS[kind]:
            res = {"model-package": f"model-package/{group}/1", "model-package-group": f"model-package-group/{group}",
                   "endpoint": f"endpoint/{str(args.get('EndpointName', 'x')).lower()}"}.get(rtype, f"{rtype}/x")
            out.append((action, f"{arn}:{res}", {}, why))
        job = args.get("TrainingJobDefinition", args)
        if job.get("Tags") or args.get("Tags"):
            rtype = {"Tuning": "hyper-parameter-tuning-job", "Training": "training-job", "Model": "model",
                     "EndpointConfig": "endpoint-config", "Endpoint": "endpoint"}[kind]
            out.append(("sagemaker:AddTags", f"{arn}:{rtype}/x", {}, f"{why}: Tags"))
        for key in ("RoleArn", "ExecutionRoleArn"):
            if isinstance(job.get(key), str) or isinstance(args.get(key), str):
                out.append(("iam:PassRole", role, {"iam:PassedToService": "sagemaker.amazonaws.com"}, f"{why}: {key}"))
        if args.get("DebugRuleConfigurations") or args.get("ProfilerRuleConfigurations"):
            for a in ("sagemaker:CreateProcessingJob", "sagemaker:DescribeProcessingJob",
                      "sagemaker:StopProcessingJob"):
                out.append((a, f"{arn}:processing-job/x", {}, f"{why}: rule evaluation jobs ({DEBUGGER_IMAGES})"))
        images = []
        _images(args, images)
        for image in images:
            m = re.match(r"^(\d{12})\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/([^:@]+)", image)
            assert m, f"{why}: {image} is not an ECR image"
            for a in ECR_PULL:
                out.append((a, f"arn:{part}:ecr:{m.group(2)}:{m.group(1)}:repository/{m.group(3)}", {},
                            f"{why}: {image}"))
            out.append(("ecr:GetAuthorizationToken", "*", {}, f"{why}: {image}"))
        uris = []
        _s3_uris(args, params, uris, outputs=outputs)
        assert uris or kind in ("Condition", "Fail", "EndpointConfig", "Endpoint"), f"{why}: no S3 URI found"
        for key, uri in uris:
            bucket, _, prefix = uri[len("s3://"):].partition("/")
            is_file = re.search(r"\.[a-z]{2,4}(\.gz)?$", prefix) is not None      # sourcedir.tar.gz, model.tar.gz
            obj = (f"arn:{part}:s3:::{bucket}/{prefix}" if is_file
                   else f"arn:{part}:s3:::{bucket}/{prefix.rstrip('/')}/x")
            out.append(("s3:GetObject", obj, {}, f"{why}: {key} {uri}"))
            out.append(("s3:ListBucket", f"arn:{part}:s3:::{bucket}", {}, f"{why}: {key} {uri}"))
            if key.endswith(WRITES):
                out.append(("s3:PutObject", obj, {}, f"{why}: writes {uri}"))
        if kind in JOB_LOGS:
            group_arn = f"arn:{part}:logs:{region}:{ACCOUNT}:log-group:/aws/sagemaker/{JOB_LOGS[kind]}"
            for a in ("logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"):
                out.append((a, f"{group_arn}:log-stream:x", {}, f"{why}: logs ({ROLES})"))
            out.append(("cloudwatch:PutMetricData", "*", {"cloudwatch:namespace": f"/aws/sagemaker/{JOB_LOGS[kind]}"},
                        f"{why}: metrics ({ROLES})"))
    return out


def missing(definition: dict, statements: list[dict], region: str) -> list[str]:
    return sorted({f"{a} on {r} ({why})" for a, r, ctx, why in needed(definition, region)
                   if not allowed(statements, a, r, ctx)})


# ---------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_every_step_of_the_definition_is_covered_by_the_execution_role(golden):
    statements = execution_policy("us-east-1")
    gaps = missing(golden, statements, "us-east-1")
    assert gaps == [], "infra/template.yaml's execution role lacks:\n" + "\n".join(gaps)
    kinds = {s["Type"] for s in all_steps(golden)}
    assert kinds == {"Tuning", "Training", "Model", "RegisterModel", "Condition", "Fail", "EndpointConfig", "Endpoint"}


@pytest.mark.parametrize("region", ["eu-west-1", "af-south-1", "ap-southeast-2"])
def test_other_regions_pull_from_their_own_image_accounts(golden, region):
    """The same definition built for another region names that region's DLC and Debugger accounts."""
    from pipeline.images import debugger_rule_accounts, dlc_accounts
    text = json.dumps(golden).replace("us-east-1", region)
    text = text.replace("763104351884", dlc_accounts("training", "2.8.0")[region])
    text = text.replace("503895931360", debugger_rule_accounts()[region])
    assert missing(json.loads(text), execution_policy(region), region) == []


def test_template_image_accounts_match_the_sdk():
    mapping = _template()["Mappings"]["ImageAccounts"]
    from pipeline.config import load_config
    f = load_config(ROOT / "pipeline.yaml").framework
    for scope, version in (("training", f.training_version), ("inference", f.inference_version)):
        for region, account in dlc_accounts(scope, version).items():
            assert mapping[region]["Dlc"] == account, (scope, region)
    for region, account in debugger_rule_accounts().items():
        assert mapping[region]["DebuggerRules"] == account, region


def test_the_check_fails_when_the_policy_lacks_an_action(golden):
    t = _template()
    statements = t["Resources"]["SageMakerExecutionPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    registry = next(s for s in statements if s["Sid"] == "ModelRegistry")
    registry["Action"] = [a for a in registry["Action"] if a != "sagemaker:CreateModelPackage"]
    gaps = missing(golden, execution_policy("us-east-1", template=t), "us-east-1")
    assert gaps == ["sagemaker:CreateModelPackage on arn:aws:sagemaker:us-east-1:123456789012:model-package/"
                    "dogbreed-classifier/1 (step Package-RegisterModel (RegisterModel))"]
    # the Debugger rule image: not the DLC account
    t = _template()
    for region in t["Mappings"]["ImageAccounts"].values():
        region["DebuggerRules"] = region["Dlc"]
    gaps = missing(golden, execution_policy("us-east-1", template=t), "us-east-1")
    assert any("503895931360:repository/sagemaker-debugger-rules" in g for g in gaps)
    # data outside the bucket: the role could not read it
    moved = copy.deepcopy(golden)
    next(p for p in moved["Parameters"] if p["Name"] == "DataUri")["DefaultValue"] = "s3://elsewhere/dogImages/"
    gaps = missing(moved, execution_policy("us-east-1"), "us-east-1")
    assert any("s3:GetObject on arn:aws:s3:::elsewhere/dogImages/train/x" in g for g in gaps)
    # an Experiments integration would need grants the role does not have
    with_experiments = {**golden, "PipelineExperimentConfig": {"ExperimentName": {"Get": "Execution.PipelineName"}}}
    assert any("sagemaker:CreateExperiment" in g for g in missing(with_experiments, execution_policy("us-east-1"),
                                                                   "us-east-1"))


def test_no_experiments_integration_and_nothing_granted_for_it(golden):
    assert "PipelineExperimentConfig" not in golden
    for s in execution_policy("us-east-1"):
        assert not any(re.search(r"Experiment|Trial", a) for a in _listify(s["Action"])), s


def test_model_package_group_is_created_by_the_stack_with_the_configs_name():
    from pipeline.config import load_config
    t = _template()
    group = t["Resources"]["ModelPackageGroup"]
    assert group["Type"] == "AWS::SageMaker::ModelPackageGroup"
    assert t["Parameters"]["ModelPackageGroupName"]["Default"] == \
        load_config(ROOT / "pipeline.yaml").registry.model_package_group


def test_custom_image_repository_is_granted_only_when_given(golden):
    repo = f"arn:aws:ecr:us-east-1:{ACCOUNT}:repository/my-inference"
    assert not allowed(execution_policy("us-east-1"), "ecr:BatchGetImage", repo)
    assert allowed(execution_policy("us-east-1", CustomImageRepositoryArn=repo), "ecr:BatchGetImage", repo)
