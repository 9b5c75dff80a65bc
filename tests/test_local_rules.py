"""Debugger rules on real smdebug output: a tiny torch run with an smdebug hook."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.local.rules import RULES, ModeKeys, create_trial, evaluate_rule, evaluate_rules

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "pipeline.definition.json"

TINY_RUN = textwrap.dedent('''
    import collections, sys, torch
    import smdebug.pytorch as smd
    from smdebug.core.modes import ModeKeys
    torch.manual_seed(0)
    m = torch.nn.Sequential(collections.OrderedDict(
        fc1=torch.nn.Linear(4, 8), fc1_relu=torch.nn.ReLU(), fc2=torch.nn.Linear(8, 8), fc2_relu=torch.nn.ReLU(),
        out=torch.nn.Linear(8, 2)))
    if sys.argv[2] == "poor-init":  # one layer 30x too large: ReLU input variances 900x apart
        with torch.no_grad():
            m.fc2.weight.mul_(30)
    hook = smd.Hook(out_dir=sys.argv[1], save_config=smd.SaveConfig(save_interval=1),
                    include_collections=["losses", "gradients", "relu_input"])
    hook.get_collection("relu_input").include(".*relu_input")  # what rule_configs asks for
    hook.register_module(m)
    lossf = torch.nn.CrossEntropyLoss()
    hook.register_loss(lossf)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = torch.randn(64, 4); y = (x[:, 0] > 0).long()
    for epoch in range(3):
        hook.set_mode(ModeKeys.TRAIN)
        for i in range(5):
            opt.zero_grad(); loss = lossf(m(x), y); loss.backward(); opt.step()
        hook.set_mode(ModeKeys.EVAL)
        with torch.no_grad():
            lossf(m(x + 3 * torch.randn_like(x)), y)  # noisy validation: overfits by construction
    hook.close()
''')


def _tiny_run(out, init):
    subprocess.run([sys.executable, "-c", TINY_RUN, str(out), init], check=True, capture_output=True, timeout=120,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


@pytest.fixture(scope="module")
def tensors(tmp_path_factory):
    return _tiny_run(tmp_path_factory.mktemp("smdebug") / "tensors", "default")


@pytest.fixture(scope="module")
def poor_init_tensors(tmp_path_factory):
    return _tiny_run(tmp_path_factory.mktemp("smdebug") / "tensors", "poor-init")


# Every rule of pipeline.yaml, each with a RuleParameters edit that flips its verdict.
@pytest.mark.parametrize("run, rule, params, status", [
    ("tensors", "LossNotDecreasing", {"num_steps": "2", "mode": "TRAIN"}, "NoIssuesFound"),
    ("tensors", "LossNotDecreasing", {"num_steps": "2", "mode": "TRAIN", "diff_percent": "90"}, "IssuesFound"),
    ("tensors", "LossNotDecreasing", {"num_steps": "2"}, "IssuesFound"),  # EVAL first: the noisy validation
    ("tensors", "LossNotDecreasing", {}, "NoIssuesFound"),                # 3 validation steps < num_steps 10
    ("poor_init_tensors", "LossNotDecreasing", {"num_steps": "2", "mode": "TRAIN"}, "IssuesFound"),
    ("tensors", "Overfit", {}, "IssuesFound"),
    ("tensors", "Overfit", {"ratio_threshold": "100"}, "NoIssuesFound"),
    ("tensors", "Overfit", {"patience": "3"}, "NoIssuesFound"),
    ("poor_init_tensors", "Overfit", {"start_step": "100"}, "NoIssuesFound"),
    ("tensors", "Overtraining", {}, "NoIssuesFound"),
    ("tensors", "Overtraining", {"patience_train": "1", "delta": "5"}, "IssuesFound"),
    ("poor_init_tensors", "Overtraining", {}, "IssuesFound"),
    ("poor_init_tensors", "Overtraining", {"patience_train": "20"}, "NoIssuesFound"),
    ("tensors", "VanishingGradient", {}, "NoIssuesFound"),
    ("tensors", "VanishingGradient", {"threshold": "10"}, "IssuesFound"),
    ("tensors", "ExplodingTensor", {}, "NoIssuesFound"),
    ("tensors", "PoorWeightInitialization", {}, "NoIssuesFound"),
    ("tensors", "PoorWeightInitialization", {"threshold": "1.01"}, "IssuesFound"),
    ("tensors", "PoorWeightInitialization", {"distribution_range": "1"}, "IssuesFound"),
    ("poor_init_tensors", "PoorWeightInitialization", {}, "IssuesFound"),
    ("poor_init_tensors", "PoorWeightInitialization", {"threshold": "1000"}, "IssuesFound"),  # loss stalls
    ("poor_init_tensors", "PoorWeightInitialization", {"threshold": "1000", "steps": "5.0"}, "NoIssuesFound"),
])
@pytest.mark.slow
def test_rule_statuses_follow_the_data_and_rule_parameters(request, run, rule, params, status):
    got, details = evaluate_rule(rule, params, request.getfixturevalue(run))
    assert got == status, details


@pytest.mark.slow
def test_details_say_which_check_fired(tensors, poor_init_tensors):
    status, details = evaluate_rule("PoorWeightInitialization", {}, poor_init_tensors)
    assert status == "IssuesFound" and "fc1_relu_input_0" in details and "fc2_relu_input_0" in details
    assert "variances differ" in details
    _, details = evaluate_rule("PoorWeightInitialization", {"threshold": "1000"}, poor_init_tensors)
    assert "loss has not decreased for 5 steps" in details
    status, details = evaluate_rule("LossNotDecreasing", {"mode": "validation"}, tensors)
    assert status == "Error" and "mode='validation': one of ['EVAL', 'TRAIN', 'GLOBAL']" in details
    _, details = evaluate_rule("PoorWeightInitialization", {"distribution_range": "1"}, tensors)
    assert "5th-95th percentile range" in details
    # nothing to look at is not a pass: the hook did not save what the rule reads
    status, details = evaluate_rule("PoorWeightInitialization", {"activation_inputs_regex": ".*tanh_input"}, tensors)
    assert status == "Error" and "activation_inputs_regex '.*tanh_input'" in details


@pytest.mark.slow
def test_statuses_in_describe_training_job_shape(tensors, tmp_path):
    configs = [{"RuleConfigurationName": "LossNotDecreasing",
                "RuleParameters": {"rule_to_invoke": "LossNotDecreasing", "num_steps": "2", "mode": "TRAIN"}},
               {"RuleConfigurationName": "Mine", "RuleParameters": {"rule_to_invoke": "DeadRelu"}},
               {"RuleConfigurationName": "Typo", "RuleParameters": {"rule_to_invoke": "Overfit", "patiense": "2"}}]
    out = evaluate_rules(configs, tensors, "job-1")
    assert [s["RuleEvaluationStatus"] for s in out] == ["NoIssuesFound", "Error", "Error"]
    assert "not available locally" in out[1]["StatusDetails"]
    assert "unknown RuleParameters ['patiense']" in out[2]["StatusDetails"]
    assert all(s["RuleEvaluationJobArn"].startswith("arn:aws:sagemaker:") for s in out)
    # a job without a hook has nothing to evaluate: Error, saying why
    status, details = evaluate_rule("Overfit", {}, tmp_path / "none")
    assert status == "Error" and "without an smdebug hook" in details


# --- the real pipeline.yaml rules on a real train_model.py job ----------------------------

def test_every_rule_pipeline_yaml_enables_runs_locally():
    from smdebug_rulesconfig.debugger_rules import builtin_rules

    from pipeline.config import load_config
    for path in ("pipeline.yaml", "pipeline.smoke.yaml"):
        cfg = load_config(ROOT / path)
        for rule in cfg.debugger.rules:
            invoked = getattr(builtin_rules, rule.name)()["DebugRuleConfiguration"]["RuleParameters"]["rule_to_invoke"]
            assert invoked in RULES, f"{path}: {rule.name} ({invoked}) has no local implementation"
            assert set(rule.parameters) <= set(RULES[invoked].defaults), f"{path}: {rule.name} parameters"


@pytest.mark.slow
def test_golden_definition_hook_and_rules_on_a_real_training_job(tmp_path):
    """pipeline.yaml's DebugHookConfig (train.save_interval 2, as the debugger plan writes it)
    as SageMaker hands it to scripts/train_model.py, then every one of its rules: a status
    from real tensors (the hook saved what each rule reads), never Error."""
    from pipeline.sample_data import generate_dataset
    from tests._scripts_helpers import hyperparameter_args, run_script, sagemaker_env

    train = next(s for s in json.loads(GOLDEN.read_text())["Steps"] if s["Name"] == "TrainModel")["Arguments"]
    # the plan's training cadence (for 13+ steps per epoch) scaled to this 12-step run: every 2nd step
    hook = json.loads(re.sub(r'"train.save_interval": "\d+"', '"train.save_interval": "2"',
                             json.dumps(train["DebugHookConfig"])))
    assert hook["HookParameters"]["train.save_interval"] == "2"
    assert {c["CollectionName"] for c in hook["CollectionConfigurations"]} >= {"gradients", "losses", "relu_input"}
    data = generate_dataset(tmp_path / "data", num_classes=3, per_class=(8, 4, 4), size=32)
    tensors = tmp_path / "tensors"
    env = sagemaker_env(tmp_path / "job", {s: data / s for s in ("train", "valid", "test")},
                        debug_config={**hook, "LocalPath": str(tensors)})
    run_script("train_model.py", hyperparameter_args(
        {"arch": "resnet18", "weights": "none", "image-size": 32, "epochs": 2, "freeze-epochs": 0,
         "batch-size": 4, "test-batch-size": 8, "lr": 0.01, "num-workers": 0}), env)
    statuses = evaluate_rules(train["DebugRuleConfigurations"], tensors, "job-1")
    assert [s["RuleConfigurationName"] for s in statuses] == \
        ["VanishingGradient", "Overfit", "Overtraining", "PoorWeightInitialization", "LossNotDecreasing"]
    for s in statuses:
        assert s["RuleEvaluationStatus"] in ("NoIssuesFound", "IssuesFound"), s
    # relu_input holds ReLU inputs (negative values too), not the in-place ReLU's outputs
    trial = create_trial(str(tensors))
    name = trial.tensor_names(regex=".*relu_input")[0]
    assert float(np.min(trial.tensor(name).value(0))) < 0
    assert len([s for s in trial.steps(mode=ModeKeys.TRAIN)]) >= 3  # every 2nd of 6 steps, not only step 0
