"""The whole DAG, locally, through the CLI: the definition built from a config with the
real scripts, tuning (2 trials) -> training (Debugger rules, profiler) -> model ->
condition -> endpoint invoked over HTTP; then the failing branch from the cache.

One shared module-scoped run on tiny data (32 px, 1-2 epochs, resnet18 without weights).
"""
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.local.jobs import read_json

pytestmark = pytest.mark.slow  # see pyproject's markers

REPO = Path(__file__).resolve().parents[1]


def _tiny_config(tmp: Path) -> Path:
    cfg = yaml.safe_load((REPO / "pipeline.smoke.yaml").read_text())
    cfg["data"]["sample"].update(num_classes=3, per_class=[8, 4, 4], image_size=32)
    cfg["tuning"].update(max_jobs=2, max_parallel_jobs=2)
    cfg["tuning"]["ranges"]["epochs"] = {"type": "integer", "min": 1, "max": 2}
    cfg["training"]["hyperparameters"]["image-size"] = 32
    cfg["cache"] = {"enabled": True}
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args, env):
    return subprocess.run([sys.executable, str(REPO / "run_pipeline.py"), "--local", "--execute", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    env = {**os.environ, "DOGBREED_LOCAL_STORE": str(tmp / "store"), "OMP_NUM_THREADS": "1"}
    config = _tiny_config(tmp)
    done = _cli("--config", str(config), "--run-dir", str(tmp / "run"), "--param", "AccuracyThreshold=0.0",
                "--keep-endpoint", env=env)
    record = read_json(tmp / "run" / "execution.json")
    endpoint = (record or {}).get("Steps", {}).get("DeployEndpoint", {}).get("Properties", {})
    yield {"tmp": tmp, "env": env, "config": config, "done": done, "record": record, "endpoint": endpoint}
    if endpoint.get("LocalPid"):
        try:
            os.kill(endpoint["LocalPid"], signal.SIGTERM)
        except ProcessLookupError:
            pass


def test_whole_dag_runs_and_the_endpoint_answers_over_http(run):
    done, record = run["done"], run["record"]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = record["Steps"]
    assert [steps[n]["StepStatus"] for n in ("TuneHyperparameters", "TrainModel", "Model-CreateModel",
                                            "CheckAccuracy", "CreateEndpointConfig", "DeployEndpoint")] == \
        ["Succeeded"] * 6
    tune = steps["TuneHyperparameters"]["Properties"]
    assert tune["TrainingJobStatusCounters"]["Completed"] == 2
    # hpo.py prints the objective after every epoch (for the tuner's early stopping) as the kept
    # weights' value, so the tuner's final value is the last one, the best
    trials = read_json(next((run["tmp"] / "run").rglob("trials.json")))
    for trial in trials:
        values = trial["intermediate"]
        assert len(values) >= 2 and trial["objective"] == values[-1] == min(values), trial
    train = steps["TrainModel"]["Properties"]
    best = tune["BestTrainingJob"]["TunedHyperParameters"]
    assert {k: train["HyperParameters"][k] for k in best} == best  # Get of the tuning step's properties
    rules = {r["RuleConfigurationName"]: r["RuleEvaluationStatus"] for r in train["DebugRuleEvaluationStatuses"]}
    smoke_rules = yaml.safe_load((REPO / "pipeline.smoke.yaml").read_text())["debugger"]["rules"]
    assert set(rules) == {r["name"].title().replace("_", "") for r in smoke_rules}  # every rule the config enables
    assert set(rules.values()) <= {"NoIssuesFound", "IssuesFound"}  # evaluated on real tensors, not Error
    assert train["ProfilerSummary"]["samples"] > 0
    assert "test accuracy" in {m["MetricName"] for m in train["FinalMetricDataList"]}
    assert "epoch 1/" in done.stdout and "trial 2/2" in done.stdout  # live progress
    # a real request over loopback HTTP: one of the sample test images
    image = next((run["tmp"] / "store").rglob("test/*/*.jpg"))
    req = urllib.request.Request(run["endpoint"]["LocalUrl"] + "/invocations", data=image.read_bytes(),
                                 headers={"Content-Type": "image/jpeg", "Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as reply:
        assert reply.status == 200
        answer = json.loads(reply.read())
    probabilities = answer["probabilities"]  # one per class of the tiny config (3), summing to 1
    assert len(probabilities) == 3 and abs(sum(probabilities) - 1) < 1e-4, answer
    assert answer["top"][0]["probability"] == max(probabilities) and answer["top"][0]["label"], answer
    # the training job's validated model.onnx is what the local endpoint serves (the fast path)
    endpoint_logs = [p.read_text(errors="replace") for p in (run["tmp"] / "run").rglob("endpoint.log")]
    assert any("model.onnx with ONNX Runtime" in text for text in endpoint_logs), endpoint_logs
    report = (run["tmp"] / "run" / "report.md").read_text()
    for section in ("## DAG", "Tuning leaderboard", "## Loss curves", "Debugger rules", "## Profiler", "## Endpoint"):
        assert section in report


def test_failing_branch_from_the_cache(run):
    done = _cli("--config", str(run["config"]), "--run-dir", str(run["tmp"] / "run2"),
                "--param", "AccuracyThreshold=1.01", env=run["env"])
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FailStep: test accuracy" in done.stderr and "1.01" in done.stderr
    record = read_json(run["tmp"] / "run2" / "execution.json")
    assert record["PipelineExecutionStatus"] == "Failed"
    assert record["Steps"]["AccuracyTooLow"]["StepStatus"] == "Failed"
    assert record["Steps"]["DeployEndpoint"]["StepStatus"] == "NotExecuted"
    # same resolved arguments as the first run: tuning and training came from the cache
    for name in ("TuneHyperparameters", "TrainModel"):
        assert record["Steps"][name]["CacheHitResult"]["SourcePipelineExecutionArn"] == \
            run["record"]["PipelineExecutionArn"]


def test_an_edited_definition_file_runs_as_edited(run):
    out = run["tmp"] / "def.json"
    built = subprocess.run([sys.executable, str(REPO / "run_pipeline.py"), "--config", str(run["config"]),
                            "--definition", str(out)], cwd=REPO, env=run["env"], capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    definition = json.loads(out.read_text())
    check = next(s for s in definition["Steps"] if s["Type"] == "Condition")
    check["Arguments"]["Conditions"][0]["RightValue"] = 1.5  # an edit no config could make
    out.write_text(json.dumps(definition))
    done = _cli("--config", str(run["config"]), "--definition-file", str(out), "--run-dir", str(run["tmp"] / "run3"),
                env=run["env"])
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    record = read_json(run["tmp"] / "run3" / "execution.json")
    assert record["Steps"]["CheckAccuracy"]["Arguments"]["Conditions"][0]["RightValue"] == 1.5
    assert record["Steps"]["CheckAccuracy"]["Properties"]["Outcome"] == "False"
    assert "is below the threshold" in done.stderr


def test_the_endpoint_step_under_the_real_serving_stack(run):
    """--runtime sagemaker: the same DAG (tuning and training from the cache) deploys the model
    under sagemaker-pytorch-inference + TorchServe, smoke-tests it, and stops all of it after."""
    from tests._runtime_helpers import require_toolkits
    require_toolkits(java=True)
    done = _cli("--config", str(run["config"]), "--run-dir", str(run["tmp"] / "run4"), "--param",
                "AccuracyThreshold=0.0", "--runtime", "sagemaker", env=run["env"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = read_json(run["tmp"] / "run4" / "execution.json")
    endpoint = record["Steps"]["DeployEndpoint"]["Properties"]
    assert endpoint["EndpointStatus"] == "InService" and endpoint["LocalSmokeTest"].startswith("HTTP 200")
    (log,) = (run["tmp"] / "run4").rglob("DeployEndpoint/endpoint.log")
    assert "org.pytorch.serve.ModelServer" in log.read_text(errors="replace")  # TorchServe answered
    with pytest.raises(ProcessLookupError):  # the whole process group is gone
        os.killpg(endpoint["LocalPid"], 0)
