"""The pipeline definition: built offline, valid against botocore's API shapes, wired as
the DAG says, byte-identical across builds, and drawn."""
from __future__ import annotations

import copy
import difflib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline.definition import TUNING_EXCLUDES, code_uri, source_tarball
from pipeline.graph import draw_dag
from pipeline.local.dag import Dag, all_steps
from pipeline.params import check_overrides

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "pipeline.definition.json"

# Step type -> (Create* operation its Arguments are, Describe*/List* outputs its properties come from)
OPERATIONS = {
    "Tuning": ("CreateHyperParameterTuningJob",
               ["DescribeHyperParameterTuningJob", "ListTrainingJobsForHyperParameterTuningJob"]),
    "Training": ("CreateTrainingJob", ["DescribeTrainingJob"]),
    "Model": ("CreateModel", ["DescribeModel"]),
    "RegisterModel": ("CreateModelPackage", ["DescribeModelPackage"]),
    "EndpointConfig": ("CreateEndpointConfig", ["DescribeEndpointConfig"]),
    "Endpoint": ("CreateEndpoint", ["DescribeEndpoint"]),
}
# Names SageMaker Pipelines gives each execution's resources; the SDK leaves them out.
SERVICE_NAMED = {"CreateHyperParameterTuningJob": "HyperParameterTuningJobName",
                 "CreateTrainingJob": "TrainingJobName", "CreateModel": "ModelName"}
EXECUTION_VARIABLES = {"PipelineExecutionId", "PipelineExecutionArn", "PipelineName", "PipelineArn",
                       "CurrentDateTime", "StartDateTime"}
EXPRESSIONS = ("Get", "Std:Join", "Std:JsonGet")


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch):
    for var in ("AWS_REGION", "SAGEMAKER_ROLE_ARN", "SAGEMAKER_BUCKET"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def sagemaker_model():
    import botocore.session
    return botocore.session.get_session().get_service_model("sagemaker")


def _steps(definition) -> dict[str, dict]:
    return {s["Name"]: s for s in all_steps(definition)}


# --- botocore shapes --------------------------------------------------------------

def _is_expression(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in EXPRESSIONS


def _placeholder(shape, where):
    """A value of the type the API expects where the definition has an expression."""
    t = shape.type_name
    if t == "string":
        return shape.enum[0] if shape.enum else "x" * max(1, int(shape.metadata.get("min", 1)))
    if t in ("integer", "long"):
        return max(1, int(shape.metadata.get("min", 1)))
    if t in ("float", "double"):
        return float(max(0, shape.metadata.get("min", 0)))
    if t == "boolean":
        return True
    raise AssertionError(f"{where}: an expression where the API expects a {t} ({shape.name})")


def _substitute(value, shape, where="Arguments"):
    if _is_expression(value):
        return _placeholder(shape, where)
    if shape.type_name == "structure" and isinstance(value, dict):
        return {k: _substitute(v, shape.members[k], f"{where}.{k}") if k in shape.members else v
                for k, v in value.items()}
    if shape.type_name == "list" and isinstance(value, list):
        return [_substitute(v, shape.member, f"{where}[{i}]") for i, v in enumerate(value)]
    if shape.type_name == "map" and isinstance(value, dict):
        return {k: _substitute(v, shape.value, f"{where}[{k!r}]") for k, v in value.items()}
    return value


@pytest.mark.parametrize("variant", ["real", "smoke", "bare"])
def test_arguments_validate_against_botocore_input_shapes(definitions, sagemaker_model, variant):
    from botocore.validate import ParamValidator
    seen = set()
    for step in all_steps(definitions[variant]):
        if step["Type"] not in OPERATIONS:
            assert step["Type"] in ("Condition", "Fail"), step["Type"]
            continue
        op_name = OPERATIONS[step["Type"]][0]
        seen.add(op_name)
        op = sagemaker_model.operation_model(op_name)
        args = _substitute(copy.deepcopy(step["Arguments"]), op.input_shape)
        if op_name in SERVICE_NAMED:
            assert SERVICE_NAMED[op_name] not in args, "the service names each execution's job"
            args[SERVICE_NAMED[op_name]] = "placeholder"
        report = ParamValidator().validate(args, op.input_shape)
        assert not report.has_errors(), f"{step['Name']} ({op_name}):\n{report.generate_report()}"
    assert seen == {op for op, _ in OPERATIONS.values()}


_TOKEN = re.compile(r"\.([A-Za-z0-9_]+)|\[(\d+)\]|\['([^']*)'\]")


def _walk_path(shapes, path: str, where: str):
    """Follow `.Member`, `[0]` and `['key']` through botocore output shapes; return the leaf shape."""
    for shape in shapes:
        node, pos, keys = shape, 0, []
        ok = True
        while pos < len(path):
            m = _TOKEN.match(path, pos)
            assert m, f"{where}: cannot parse property path at {path[pos:]!r}"
            member, index, key = m.groups()
            pos = m.end()
            if member is not None:
                if node.type_name != "structure" or member not in node.members:
                    ok = False
                    break
                node = node.members[member]
            elif node.type_name == "list":          # [0], or ['name'] for lists keyed by name
                node = node.member
                if key is not None:
                    keys.append(key)
            elif node.type_name == "map" and key is not None:
                node = node.value
                keys.append(key)
            else:
                ok = False
                break
        if ok:
            return node, keys
    raise AssertionError(f"{where}: {path!r} is not in {[s.name for s in shapes]}")


@pytest.mark.parametrize("variant", ["real", "smoke", "bare"])
def test_every_reference_resolves(definitions, sagemaker_model, configs, variant):
    definition = definitions[variant]
    steps = _steps(definition)
    params = {p["Name"] for p in definition["Parameters"]}
    used_params = set()

    def refs(value):
        if isinstance(value, dict):
            if isinstance(value.get("Get"), str):
                yield value["Get"]
            for v in value.values():
                yield from refs(v)
        elif isinstance(value, list):
            for v in value:
                yield from refs(v)

    gets = list(refs(definition["Steps"]))
    assert gets
    for get in gets:
        root, _, rest = get.partition(".")
        if root == "Parameters":
            assert rest in params, f"{get}: undeclared parameter; declared: {sorted(params)}"
            used_params.add(rest)
        elif root == "Execution":
            assert rest in EXECUTION_VARIABLES, get
        elif root == "Steps":
            name = re.match(r"[^.\[]+", rest).group(0)
            assert name in steps, f"{get}: no step named {name!r}; steps: {sorted(steps)}"
            step = steps[name]
            outputs = [sagemaker_model.operation_model(op).output_shape for op in OPERATIONS[step["Type"]][1]]
            leaf, keys = _walk_path(outputs, rest[len(name):], get)
            assert leaf.type_name in ("string", "integer", "long", "float", "double", "boolean", "timestamp"), \
                f"{get}: ends on a {leaf.type_name}, not a value"
            if "TunedHyperParameters" in get:
                assert keys[0] in step["Arguments"]["HyperParameterTuningJobConfig"]["ParameterRanges"].__str__(), get
                assert keys[0] in configs[variant].tuning.ranges, get
            if "FinalMetricDataList" in get:
                names = {d["Name"] for d in step["Arguments"]["AlgorithmSpecification"]["MetricDefinitions"]}
                assert keys[0] in names, f"{get}: the training job reports only {sorted(names)}"
        else:
            raise AssertionError(f"unexpected reference {get}")
    assert used_params == params, f"declared but unused: {sorted(params - used_params)}"


@pytest.mark.parametrize("variant", ["real", "smoke"])
def test_metrics_objective_and_regexes(definitions, configs, variant):
    from pipeline.config import scripts_module
    metrics = scripts_module("metrics")
    steps = _steps(definitions[variant])
    tune, train = steps["TuneHyperparameters"]["Arguments"], steps["TrainModel"]["Arguments"]
    tune_defs = tune["TrainingJobDefinition"]["AlgorithmSpecification"]["MetricDefinitions"]
    assert tune_defs == train["AlgorithmSpecification"]["MetricDefinitions"] == metrics.METRIC_DEFINITIONS
    objective = tune["HyperParameterTuningJobConfig"]["HyperParameterTuningJobObjective"]
    assert objective == {"MetricName": configs[variant].tuning.objective.metric, "Type": "Minimize"}
    assert objective["MetricName"] in {d["Name"] for d in tune_defs}
    for d in tune_defs:
        re.compile(d["Regex"])
    # The regexes read what the scripts print (scripts/metrics.py formats them).
    line = metrics.format_summary("average validation loss", 0.25)
    assert metrics.final_metrics(line, tune_defs)["average validation loss"] == 0.25


def test_dag_shape_and_edges(definitions):
    edges = set(Dag(definitions["real"]).edges)
    assert edges == {
        ("TuneHyperparameters", "TrainModel", "data"),
        ("TrainModel", "Model-CreateModel", "data"),
        ("TrainModel", "Package-RegisterModel", "data"),
        ("TrainModel", "CheckAccuracy", "data"),
        ("TrainModel", "AccuracyTooLow", "data"),
        ("CheckAccuracy", "CreateEndpointConfig", "if"),
        ("CheckAccuracy", "DeployEndpoint", "if"),
        ("CheckAccuracy", "AccuracyTooLow", "else"),
        ("Model-CreateModel", "CreateEndpointConfig", "data"),
        ("CreateEndpointConfig", "DeployEndpoint", "data"),
    }
    for step in all_steps(definitions["real"]):
        assert step.get("DisplayName") and step.get("Description"), step["Name"]


def test_training_reads_tuned_values_and_debugger(definitions, configs):
    steps = _steps(definitions["real"])
    train = steps["TrainModel"]["Arguments"]
    for name in configs["real"].tuning.ranges:
        assert train["HyperParameters"][name] == {"Std:Join": {"On": "", "Values": [
            {"Get": f"Steps.TuneHyperparameters.BestTrainingJob.TunedHyperParameters['{name}']"}]}}
    rules = [r["RuleConfigurationName"] for r in train["DebugRuleConfigurations"]]
    assert rules == ["VanishingGradient", "Overfit", "Overtraining", "PoorWeightInitialization", "LossNotDecreasing"]
    collections = [c["CollectionName"] for c in train["DebugHookConfig"]["CollectionConfigurations"]]
    assert collections == sorted(collections)
    assert train["ProfilerConfig"]["DisableProfiler"] is False
    assert "ProfilingParameters" not in train["ProfilerConfig"]      # no framework profiling
    assert train["HyperParameters"]["profile"] == '"true"'
    # No execution id in the checkpoint URI (it is part of the cache key): the best trial's name
    checkpoint = train["CheckpointConfig"]["S3Uri"]["Std:Join"]["Values"]
    assert checkpoint[-1] == {"Get": "Steps.TuneHyperparameters.BestTrainingJob.TrainingJobName"}
    assert "Execution." not in json.dumps(train)
    # No timestamps anywhere (sagemaker-python-sdk#3651).
    tune = steps["TuneHyperparameters"]["Arguments"]["TrainingJobDefinition"]["StaticHyperParameters"]
    assert tune["sagemaker_job_name"] == '"dogbreed-hpo"'
    assert "sagemaker_job_name" not in train["HyperParameters"]
    assert not re.search(r"\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-\d{2}", json.dumps(definitions["real"]))


def test_images_follow_config_instance_types(definitions):
    steps = _steps(definitions["real"])
    assert "-gpu-" in steps["TrainModel"]["Arguments"]["AlgorithmSpecification"]["TrainingImage"]
    assert "pytorch-training:2.8.0-gpu-py312" in steps["TuneHyperparameters"]["Arguments"][
        "TrainingJobDefinition"]["AlgorithmSpecification"]["TrainingImage"]
    assert "pytorch-inference:2.6.0-cpu-py312" in steps["Model-CreateModel"]["Arguments"]["PrimaryContainer"]["Image"]
    bare = _steps(definitions["bare"])
    assert "-cpu-" in bare["TrainModel"]["Arguments"]["AlgorithmSpecification"]["TrainingImage"]


def test_bare_variant_has_no_spot_and_no_cache(definitions):
    # its Debugger and profiler: tests/test_aws_readiness.py::test_debugger_disabled_request_has_no_hook_rules_...
    train = _steps(definitions["bare"])["TrainModel"]["Arguments"]
    assert "EnableManagedSpotTraining" not in train and "CheckpointConfig" not in train
    assert _steps(definitions["bare"])["TrainModel"]["CacheConfig"]["Enabled"] is False


def test_model_uses_code_inside_model_tar_no_repack(definitions):
    steps = _steps(definitions["real"])
    assert not any("repack" in name.lower() for name in steps)
    container = steps["Model-CreateModel"]["Arguments"]["PrimaryContainer"]
    assert container["ModelDataUrl"] == {"Get": "Steps.TrainModel.ModelArtifacts.S3ModelArtifacts"}
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    assert container["Environment"]["SAGEMAKER_SUBMIT_DIRECTORY"] == "/opt/ml/model/code"
    register = steps["Package-RegisterModel"]["Arguments"]
    assert register["ModelApprovalStatus"] == {"Get": "Parameters.ModelApprovalStatus"}
    assert register["ModelPackageGroupName"] == "dogbreed-classifier"
    assert not list((ROOT / "scripts").glob("_repack*")), "the SDK wrote repack files into scripts/"


def test_gate_endpoint_and_fail(definitions):
    gate = _steps(definitions["real"])["CheckAccuracy"]["Arguments"]
    metric = {"Get": "Steps.TrainModel.FinalMetricDataList['test accuracy'].Value"}
    assert gate["Conditions"] == [{"Type": "GreaterThanOrEqualTo", "LeftValue": metric,
                                   "RightValue": {"Get": "Parameters.AccuracyThreshold"}}]
    config, endpoint = gate["IfSteps"]
    assert config["Arguments"]["EndpointConfigName"] == {"Std:Join": {"On": "-", "Values": [
        "dogbreed-endpoint", {"Get": "Execution.PipelineExecutionId"}]}}
    assert endpoint["Arguments"]["EndpointName"] == "dogbreed-endpoint"
    message = gate["ElseSteps"][0]["Arguments"]["ErrorMessage"]["Std:Join"]["Values"]
    assert metric in message and {"Get": "Parameters.AccuracyThreshold"} in message


def test_object_store_gets_the_code_where_the_definition_says(built, configs, smoke_store):
    """Training gets scripts/; tuning trials the same files without requirements.txt (they install nothing)."""
    steps = _steps(json.loads(built["smoke"].definition))
    tune = steps["TuneHyperparameters"]["Arguments"]["TrainingJobDefinition"]["StaticHyperParameters"]
    train = steps["TrainModel"]["Arguments"]["HyperParameters"]
    expected = sorted(p.relative_to(ROOT / "scripts").as_posix() for p in (ROOT / "scripts").rglob("*")
                      if p.is_file() and p.suffix != ".pyc"
                      and not any(part.startswith(".") or part == "__pycache__" for part in p.parts))
    assert "requirements.txt" in expected
    for hyperparameters, tarball, names in (
            (tune, source_tarball(exclude=TUNING_EXCLUDES), [n for n in expected if n != "requirements.txt"]),
            (train, source_tarball(), expected)):
        uri = hyperparameters["sagemaker_submit_directory"].strip('"')
        assert uri == code_uri(configs["smoke"], tarball)
        with tarfile.open(fileobj=io.BytesIO(smoke_store.path(uri).read_bytes())) as tar:
            assert sorted(tar.getnames()) == names
            assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())


def test_parameter_overrides_are_typed_and_keep_the_built_image(built):
    definition = json.loads(built["real"].definition)
    assert check_overrides(definition, ["TrainingInstanceType=ml.g5.2xlarge", "AccuracyThreshold=0.9",
                               "EndpointInstanceCount=2"]) == {
        "TrainingInstanceType": "ml.g5.2xlarge", "AccuracyThreshold": 0.9, "EndpointInstanceCount": 2}
    with pytest.raises(ValueError, match="needs the CPU image, but step TrainModel was built with the GPU image"):
        check_overrides(definition, ["TrainingInstanceType=ml.m5.xlarge"])
    with pytest.raises(ValueError, match="needs the GPU image, but step Model-CreateModel"):
        check_overrides(definition, ["EndpointInstanceType=ml.g4dn.xlarge"])
    with pytest.raises(ValueError, match="not a parameter of this pipeline"):
        check_overrides(definition, ["Threshold=0.9"])
    with pytest.raises(ValueError, match="expected Float"):
        check_overrides(definition, ["AccuracyThreshold=high"])
    with pytest.raises(ValueError, match="expected NAME=VALUE"):
        check_overrides(definition, ["AccuracyThreshold"])


# --- golden file ----------------------------------------------------------------

def _normalise_code_uri(text: str, cfg) -> str:
    # The code URI carries the hash of scripts/, which changes with every script edit;
    # the golden file pins the wiring, the determinism test pins the hash.
    text = text.replace(code_uri(cfg, source_tarball()), f"{cfg.s3_root}/code/<sha256 of scripts/>/sourcedir.tar.gz")
    return text.replace(code_uri(cfg, source_tarball(exclude=TUNING_EXCLUDES)),
                        f"{cfg.s3_root}/code/<sha256 of scripts/ without requirements.txt>/sourcedir.tar.gz")


def test_golden_definition(built, configs):
    """Regenerate after an intended change: UPDATE_GOLDEN=1 python -m pytest tests/test_definition.py -k golden"""
    text = _normalise_code_uri(built["real"].definition, configs["real"])
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
    expected = GOLDEN.read_text()
    if text != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True),
                                            str(GOLDEN.relative_to(ROOT)), "built from pipeline.yaml", n=2))
        pytest.fail(f"definition differs from the golden file (if intended: UPDATE_GOLDEN=1 "
                    f"python -m pytest tests/test_definition.py -k golden):\n{diff[:6000]}")


# --- separate processes: determinism, no network, the CLI ------------------------

# Run run_pipeline.py with every socket connection refused: the build must need none.
_NO_NETWORK = """
import runpy, socket, sys
def refuse(self, *a, **k):
    raise OSError("network access during an offline build: %r" % (a,))
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
sys.argv = ["run_pipeline.py"] + sys.argv[1:]
runpy.run_path("run_pipeline.py", run_name="__main__")
"""


@pytest.mark.slow
def test_two_processes_build_identical_bytes_offline(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SAGEMAKER_"))}
    env.update(HOME=str(tmp_path), OMP_NUM_THREADS="1", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    procs = []
    # The second shell points AWS elsewhere: the offline build must not follow it.
    for seed, extra in (("1", {}), ("4242", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_PROFILE": "nope",
                                             "AWS_REGION": "eu-west-1"})):
        out = tmp_path / seed
        out.mkdir()
        cmd = [sys.executable, "-c", _NO_NETWORK, "--definition", str(out / "out.json"),
               "--graph", str(out / "dag.png"), "--region", "us-east-1"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**env, **extra, "PYTHONHASHSEED": seed},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log
        assert "wrote" in log and "Traceback" not in log, log
    a, b = (tmp_path / "1" / "out.json").read_bytes(), (tmp_path / "4242" / "out.json").read_bytes()
    assert a == b
    assert json.loads(a)["Steps"][0]["Name"] == "TuneHyperparameters"
    png = (tmp_path / "1" / "dag.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_draw_dag_with_statuses(tmp_path, built):
    out = draw_dag(built["smoke"].definition, tmp_path / "sub" / "dag.png",
                   statuses={"TuneHyperparameters": "Succeeded", "TrainModel": "Failed", "CheckAccuracy": "Executing"})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["dag.png"]      # no temp files left


def test_the_checks_catch_bad_definitions(sagemaker_model):
    """The shape checks above can fail: a typo'd key, an expression where a structure goes, a bad path."""
    from botocore.validate import ParamValidator
    op = sagemaker_model.operation_model("CreateEndpoint")
    args = _substitute({"EndpointName": "e", "EndpointConfigName": {"Get": "Steps.C.EndpointConfigName"},
                        "Tagz": []}, op.input_shape)
    assert ParamValidator().validate(args, op.input_shape).has_errors()
    with pytest.raises(AssertionError, match="an expression where the API expects a structure"):
        _substitute({"StoppingCondition": {"Get": "Parameters.X"}},
                    sagemaker_model.operation_model("CreateTrainingJob").input_shape)
    outputs = [sagemaker_model.operation_model("DescribeTrainingJob").output_shape]
    assert _walk_path(outputs, ".FinalMetricDataList['test accuracy'].Value", "ok")[0].type_name == "float"
    with pytest.raises(AssertionError, match="is not in"):
        _walk_path(outputs, ".ModelArtifacts.S3ModelArtifact", "typo")


def test_model_environment_is_the_measured_serving_configuration(definitions):
    """Two TorchServe workers, each using every vCPU of the endpoint instance, passive waits
    (bench/endpoint.py --knobs), in the CreateModel and in the registered package alike."""
    from steps.model import instance_vcpus

    steps = _steps(definitions["real"])
    env = steps["Model-CreateModel"]["Arguments"]["PrimaryContainer"]["Environment"]
    assert env["SAGEMAKER_MODEL_SERVER_WORKERS"] == "2" and env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env["OMP_NUM_THREADS"] == "2"  # pipeline.yaml's endpoint: ml.m5.large, 2 vCPUs
    assert "SAGEMAKER_TS_BATCH_SIZE" not in env  # the toolkit's Transformer would run a batch one by one
    package = steps["Package-RegisterModel"]["Arguments"]["InferenceSpecification"]["Containers"][0]
    assert package["Environment"] == env
    assert [instance_vcpus(t) for t in ("ml.m5.large", "ml.c5.xlarge", "ml.m5.4xlarge", "ml.t2.medium")] == \
        [2, 4, 16, None]
