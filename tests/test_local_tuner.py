"""Tuning: the definition's ParameterRanges as Optuna sees them, and early stopping."""
import json

import optuna
import pytest

from pipeline.local.executor import execute
from pipeline.local.store import LocalStore
from pipeline.local.tuner import TuningError, distributions, to_hyperparameter
from tests._local_helpers import put_toy_code_and_data, toy_definition


def test_ranges_become_distributions():
    d = distributions({
        "ContinuousParameterRanges": [{"Name": "lr", "MinValue": "0.001", "MaxValue": "0.1",
                                       "ScalingType": "Logarithmic"},
                                      {"Name": "m", "MinValue": "0.9", "MaxValue": "0.999",
                                       "ScalingType": "ReverseLogarithmic"},
                                      {"Name": "wd", "MinValue": "0", "MaxValue": "0.1", "ScalingType": "Auto"}],
        "IntegerParameterRanges": [{"Name": "epochs", "MinValue": "5", "MaxValue": "8", "ScalingType": "Auto"}],
        "CategoricalParameterRanges": [{"Name": "batch-size", "Values": ['"32"', '"64"']}]})
    assert d["lr"] == optuna.distributions.FloatDistribution(0.001, 0.1, log=True)
    assert d["epochs"] == optuna.distributions.IntDistribution(5, 8)
    assert d["batch-size"].choices == ('"32"', '"64"')  # passed on JSON-quoted, as AWS does
    assert d["m"].low == pytest.approx(0.001) and d["m"].high == pytest.approx(0.1) and d["m"].log
    assert to_hyperparameter("m", 0.01, {"m"}) == "0.99"
    assert to_hyperparameter("epochs", 6, set()) == "6"


@pytest.mark.parametrize("ranges, words", [
    ({"ContinuousParameterRanges": [{"Name": "lr", "MinValue": "0.1", "MaxValue": "0.01"}]}, "MinValue 0.1 > MaxValue"),
    ({"ContinuousParameterRanges": [{"Name": "lr", "MinValue": "0", "MaxValue": "1",
                                     "ScalingType": "Logarithmic"}]}, "needs MinValue > 0"),
    ({"ContinuousParameterRanges": [{"Name": "lr", "MinValue": "x", "MaxValue": "1"}]}, "'x' is not a number"),
    ({"CategoricalParameterRanges": [{"Name": "b", "Values": []}]}, "Values is empty"),
    ({"FloatRanges": []}, "unknown keys \\['FloatRanges'\\]"),
])
def test_bad_ranges_say_what_is_wrong(ranges, words):
    with pytest.raises(TuningError, match=words):
        distributions(ranges)


@pytest.mark.slow
def test_early_stopping_stops_trials_behind_the_median(tmp_path):
    store = LocalStore(tmp_path / "store")
    put_toy_code_and_data(store)
    d = toy_definition(max_jobs=4, parallel=1, sleep=0.3, cache=False)
    tune = d["Steps"][0]["Arguments"]
    cfg = tune["HyperParameterTuningJobConfig"]
    cfg["TrainingJobEarlyStoppingType"] = "Auto"
    cfg["RandomSeed"] = 6  # seeded TPE: good, good, then a worse trial that the median rule stops
    cfg["HyperParameterTuningJobObjective"] = {"Type": "Minimize", "MetricName": "epoch:valid_loss"}
    cfg["ParameterRanges"] = {"CategoricalParameterRanges": [{"Name": "lr", "Values": ["0.01", "0.0001"]}]}
    tune["TrainingJobDefinition"]["StaticHyperParameters"]["epochs"] = "6"
    d["Steps"] = d["Steps"][:1]
    rec = execute(d, store=store, run_dir=tmp_path / "run", report=False, progress=lambda s: None)
    props = rec["Steps"]["Tune"]["Properties"]
    summaries = props["TrainingJobSummaries"]
    stopped = [s for s in summaries if s["TrainingJobStatus"] == "Stopped"]
    assert stopped, json.dumps(summaries, indent=1)
    assert all(s["TunedHyperParameters"]["lr"] == "0.0001" for s in stopped)  # the worse setting
    assert props["TrainingJobStatusCounters"]["Stopped"] == len(stopped)
    assert props["BestTrainingJob"]["TunedHyperParameters"]["lr"] == "0.01"


def test_a_trial_that_cannot_start_stops_the_tuning_job_with_its_reason(tmp_path):
    store = LocalStore(tmp_path / "store")
    put_toy_code_and_data(store)
    d = toy_definition(max_jobs=4, parallel=1, cache=False)
    d["Steps"] = d["Steps"][:1]
    rec = execute(d, store=store, run_dir=tmp_path / "run", report=False, progress=lambda s: None,
                  params=["TrainingData=s3://toy-bucket/nothing-here"])
    tune = rec["Steps"]["Tune"]
    assert rec["PipelineExecutionStatus"] == "Failed" and tune["StepStatus"] == "Failed"
    assert "could not start: channel 'train': s3://toy-bucket/nothing-here is not in the local store" \
        in tune["FailureReason"]
    assert "no further trials were launched" in tune["FailureReason"]
    assert len(list((tmp_path / "run").rglob("trials/*/"))) <= 1
