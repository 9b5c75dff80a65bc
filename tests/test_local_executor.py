"""The interpreter on a hand-written definition (SDK shapes) with a toy entry point.

Real subprocesses, real files, real object store; no torch, so each run takes seconds.
The full DAG with the real scripts and the endpoint is in test_local_e2e.py.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import run_pipeline
from pipeline import local_run
from pipeline.config import load_config
from pipeline.local.executor import DefinitionError, execute
from pipeline.local.jobs import read_json
from pipeline.local.store import REPO_ROOT, LocalStore
from tests._local_helpers import put_toy_code_and_data, read_eval, toy_definition, trial_dirs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = LocalStore(tmp_path_factory.mktemp("store"))
    put_toy_code_and_data(s)
    return s


@pytest.fixture(scope="module")
def first(store, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    return run_dir, execute(toy_definition(), store=store, run_dir=run_dir, pipeline_name="toy", report=True)


def test_runs_tuning_training_model_condition_register(first, store):
    run_dir, rec = first
    assert rec["PipelineExecutionStatus"] == "Succeeded", rec.get("FailureReason")
    steps = rec["Steps"]
    tune, train = steps["Tune"]["Properties"], steps["Train"]["Properties"]
    assert tune["TrainingJobStatusCounters"]["Completed"] == 2 and len(trial_dirs(run_dir)) == 2
    best = tune["BestTrainingJob"]
    values = [s["FinalHyperParameterTuningJobObjectiveMetric"]["Value"] for s in tune["TrainingJobSummaries"]]
    assert best["FinalHyperParameterTuningJobObjectiveMetric"]["Value"] == max(values)
    assert best["TunedHyperParameters"]["batch-size"] in ('"32"', '"64"')  # JSON-quoted, as AWS
    # the best trial's values flowed into Train through Get, and reached the script as SageMaker passes them
    assert train["HyperParameters"]["lr"] == best["TunedHyperParameters"]["lr"]
    seen = read_eval(store, rec)["seen"]
    argv = seen["argv"]
    assert argv == ["--batch-size", json.loads(best["TunedHyperParameters"]["batch-size"]), "--epochs", "3",
                    "--lr", best["TunedHyperParameters"]["lr"]]
    assert seen["hps"]["epochs"] == 3 and seen["files"] == ["train"]
    assert seen["config"] == ["hyperparameters.json", "inputdataconfig.json", "resourceconfig.json"]
    assert seen["resource"]["current_host"] == "algo-1"
    env = seen["env"]  # sagemaker-training's environment contract
    assert json.loads(env["SM_USER_ARGS"]) == argv and env["SM_HP_LR"] == best["TunedHyperParameters"]["lr"]
    assert env["SM_CURRENT_HOST"] == "algo-1" and json.loads(env["SM_HOSTS"]) == ["algo-1"]
    assert json.loads(env["SM_CHANNELS"]) == ["train"] and env["SM_USER_ENTRY_POINT"] == "train.py"
    assert env["SM_MODEL_DIR"].endswith("opt_ml/model") and env["SM_OUTPUT_DATA_DIR"].endswith("opt_ml/output/data")
    # trials get the tuner's _tuning_objective_metric in hyperparameters.json, never on their (strict) CLI
    trial_hps = read_json(trial_dirs(run_dir)[0] / "opt_ml" / "input" / "config" / "hyperparameters.json")
    assert trial_hps["_tuning_objective_metric"] == '"test accuracy"'
    assert "_tuning_objective_metric" not in (trial_dirs(run_dir)[0] / "job.log").read_text().splitlines()[0]
    # DescribeTrainingJob shapes, artifacts where AWS puts them
    acc = {m["MetricName"]: m["Value"] for m in train["FinalMetricDataList"]}["test accuracy"]
    assert acc == pytest.approx(read_eval(store, rec)["metrics"]["accuracy"]["value"])
    model = train["ModelArtifacts"]["S3ModelArtifacts"]
    assert model == (f"s3://toy-bucket/toy/{rec['PipelineExecutionId']}/train/"
                     f"{train['TrainingJobName']}/output/model.tar.gz") and store.exists(model)
    assert steps["Check"]["Properties"]["Outcome"] == "True"
    assert steps["Register-RegisterModel"]["Properties"]["ModelPackageVersion"] >= 1
    assert steps["Fail"]["StepStatus"] == "NotExecuted"
    # the record on disk and the report
    assert read_json(run_dir / "execution.json")["PipelineExecutionStatus"] == "Succeeded"
    report = (run_dir / "report.md").read_text()
    assert "Tuning leaderboard" in report and best["TrainingJobName"] in report
    assert (run_dir / "report" / "loss_curves.png").stat().st_size > 0
    assert "test accuracy" in (Path(train["LocalJobDir"]) / "job.log").read_text()


def test_rerun_hits_the_cache(first, store):
    run_dir, rec = first
    again = execute(toy_definition(), store=store, run_dir=run_dir, pipeline_name="toy", report=False)
    assert again["PipelineExecutionStatus"] == "Succeeded"
    assert again["PipelineExecutionId"] != rec["PipelineExecutionId"]
    hit = again["Steps"]["Tune"]["CacheHitResult"]["SourcePipelineExecutionArn"]
    assert hit == rec["PipelineExecutionArn"]
    assert again["Steps"]["Tune"]["Properties"] == rec["Steps"]["Tune"]["Properties"]
    assert not (run_dir / "steps" / again["PipelineExecutionId"] / "Tune").exists()  # nothing ran
    # Train's output path joins in the execution id: its arguments differ, so, as on AWS, no hit
    assert "CacheHitResult" not in again["Steps"]["Train"]


def test_failing_branch_ends_failed_with_the_fail_step_message(first, store, monkeypatch, capsys, tmp_path):
    definition = tmp_path / "def.json"
    definition.write_text(json.dumps(toy_definition()))
    monkeypatch.setenv("DOGBREED_LOCAL_STORE", str(store.root))
    cfg = load_config(REPO_ROOT / "pipeline.yaml")  # no sample block: nothing is generated
    code = run_pipeline.guarded(local_run.execute, cfg, definition.read_text(), source=str(definition),
                                uploads=dict, params=["AccuracyThreshold=1.01"], run_dir=str(tmp_path / "run"))
    assert code == 1
    err = capsys.readouterr().err
    assert "FailStep: test accuracy 0." in err and "is below 1.01" in err
    rec = read_json(tmp_path / "run" / "execution.json")
    assert rec["PipelineExecutionStatus"] == "Failed"
    assert rec["Steps"]["Check"]["Properties"]["Outcome"] == "False"
    assert rec["Steps"]["Register-RegisterModel"]["StepStatus"] == "NotExecuted"
    assert rec["Steps"]["Fail"]["StepStatus"] == "Failed"
    with pytest.raises(DefinitionError, match="known: \\['AccuracyThreshold', 'TrainingData'\\]"):
        execute(toy_definition(), store=store, run_dir=tmp_path / "r2", params=["Threshold=1"])


def test_edited_definition_is_honoured(store, tmp_path):
    d = toy_definition()
    cfg = d["Steps"][0]["Arguments"]["HyperParameterTuningJobConfig"]
    cfg["ResourceLimits"] = {"MaxNumberOfTrainingJobs": 3, "MaxParallelTrainingJobs": 1}
    cfg["ParameterRanges"]["ContinuousParameterRanges"][0].update(MinValue="0.009", MaxValue="0.011")
    cfg["ParameterRanges"]["CategoricalParameterRanges"][0]["Values"] = ['"16"']
    d["Steps"][0]["Arguments"]["TrainingJobDefinition"]["StaticHyperParameters"]["epochs"] = "1"
    rec = execute(d, store=store, run_dir=tmp_path, pipeline_name="toy", report=False)
    assert rec["PipelineExecutionStatus"] == "Succeeded"
    trials = rec["Steps"]["Tune"]["Properties"]["TrainingJobSummaries"]
    assert len(trials) == 3
    for t in trials:
        assert 0.009 <= float(t["TunedHyperParameters"]["lr"]) <= 0.011
        assert t["TunedHyperParameters"]["batch-size"] == '"16"'
    logs = [(p / "job.log").read_text() for p in trial_dirs(tmp_path)]
    assert len(logs) == 3 and all("epoch 1/1 " in log and "epoch 2/" not in log for log in logs)


@pytest.mark.parametrize("sig, parallel, status", [(signal.SIGKILL, 1, "Executing"), (signal.SIGINT, 2, "Stopped")])
@pytest.mark.slow
def test_resume_after_kill_redoes_no_finished_trial(store, tmp_path, sig, parallel, status):
    d = toy_definition(max_jobs=3, parallel=parallel, sleep=0.4, cache=False)
    (tmp_path / "def.json").write_text(json.dumps(d))
    script = (f"import json, sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
              "from pipeline.local.executor import execute\nfrom pipeline.local.store import LocalStore\n"
              f"execute(json.load(open({str(tmp_path / 'def.json')!r})), store=LocalStore({str(store.root)!r}), "
              f"run_dir={str(tmp_path / 'run')!r}, pipeline_name='toy', report=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    trials_json = None
    while time.monotonic() < deadline:
        found = list((tmp_path / "run").glob("steps/*/Tune/trials.json"))
        if found and len(read_json(found[0]) or []) >= 1:
            trials_json = found[0]
            break
        time.sleep(0.1)
    assert trials_json is not None, "the first trial never finished"
    with pytest.raises(DefinitionError, match=f"in use by another execution \\(pid {proc.pid}\\)"):
        execute(d, store=store, run_dir=tmp_path / "run", report=False)
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)  # Ctrl-C stops the running trials too, it does not wait for them
    before = read_json(trials_json)
    first_log = Path(read_json(trials_json)[0]["describe"]["LocalJobDir"]) / "job.log"
    stamp = first_log.stat().st_mtime_ns
    rec = read_json(tmp_path / "run" / "execution.json")
    # SIGKILL: nobody could mark it; Ctrl-C: marked Stopped, and no interrupted trial was recorded
    assert rec["PipelineExecutionStatus"] == status
    assert all(t["status"] == "Completed" for t in before)

    lines = []
    again = execute(d, store=store, run_dir=tmp_path / "run", pipeline_name="toy", report=False,
                    progress=lines.append)
    assert again["PipelineExecutionStatus"] == "Succeeded"
    assert again["PipelineExecutionId"] == rec["PipelineExecutionId"]
    assert any("resuming: " in line for line in lines)
    after = read_json(trials_json)
    assert len(after) == 3 and all(t in after for t in before)  # finished trials kept as they were
    assert first_log.stat().st_mtime_ns == stamp  # the finished trial did not run again
    assert not list(store.root.rglob(".model.tar.gz.*"))  # no half-written artifact left behind


def _single_training(extra_hps: dict, stopping: int = 600, retry: list | None = None) -> dict:
    d = toy_definition(cache=False)
    train = d["Steps"][1]
    train.pop("DependsOn")
    train.pop("PropertyFiles")
    train["Arguments"]["HyperParameters"] = {**{k: v for k, v in train["Arguments"]["HyperParameters"].items()
                                                if k.startswith("sagemaker_")}, "lr": "0.01", **extra_hps}
    train["Arguments"]["StoppingCondition"] = {"MaxRuntimeInSeconds": stopping}
    if retry:
        train["RetryPolicies"] = retry
    d["Steps"] = [train]
    return d


def test_max_runtime_is_enforced(store, tmp_path):
    rec = execute(_single_training({"sleep": "3", "epochs": "3"}, stopping=1), store=store, run_dir=tmp_path,
                  report=False)
    step = rec["Steps"]["Train"]
    assert rec["PipelineExecutionStatus"] == "Failed"
    assert step["Properties"]["TrainingJobStatus"] == "Stopped"
    assert step["Properties"]["SecondaryStatus"] == "MaxRuntimeExceeded"
    assert "MaxRuntimeInSeconds" in step["FailureReason"]


def test_retry_policy_retries_a_killed_job(store, tmp_path):
    retry = [{"ExceptionType": ["SageMaker.JOB_INTERNAL_ERROR"], "MaxAttempts": 2, "IntervalSeconds": 1,
              "BackoffRate": 1.0}]
    rec = execute(_single_training({"die-once": "1"}, retry=retry), store=store, run_dir=tmp_path, report=False)
    assert rec["PipelineExecutionStatus"] == "Succeeded", rec.get("FailureReason")
    assert rec["Steps"]["Train"]["AttemptCount"] == 2
    # without a policy the same failure fails the step, saying what happened
    rec = execute(_single_training({"die-once": "1"}), store=store, run_dir=tmp_path / "b", report=False)
    assert rec["Steps"]["Train"]["AttemptCount"] == 1
    assert "killed by signal 9" in rec["Steps"]["Train"]["FailureReason"]
