"""Debugger rules on real smdebug output: a tiny torch run with an smdebug hook."""
import subprocess
import sys
import textwrap

import pytest

from pipeline.local.rules import evaluate_rule, evaluate_rules

TINY_RUN = textwrap.dedent('''
    import sys, torch
    import smdebug.pytorch as smd
    from smdebug.core.modes import ModeKeys
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 2)
    hook = smd.Hook(out_dir=sys.argv[1], save_config=smd.SaveConfig(save_interval=1),
                    include_collections=["losses", "gradients"])
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
            lossf(m(x + 2 * torch.randn_like(x)), y)  # noisy validation: overfits by construction
    hook.close()
''')


@pytest.fixture(scope="module")
def tensors(tmp_path_factory):
    out = tmp_path_factory.mktemp("smdebug") / "tensors"
    subprocess.run([sys.executable, "-c", TINY_RUN, str(out)], check=True, capture_output=True, timeout=120)
    return out


@pytest.mark.parametrize("rule, params, status", [
    ("LossNotDecreasing", {"num_steps": "2"}, "NoIssuesFound"),
    ("LossNotDecreasing", {"num_steps": "2", "diff_percent": "90"}, "IssuesFound"),
    ("Overfit", {}, "IssuesFound"),
    ("Overfit", {"ratio_threshold": "100"}, "NoIssuesFound"),
    ("Overtraining", {}, "NoIssuesFound"),
    ("Overtraining", {"patience_train": "1", "delta": "5"}, "IssuesFound"),
    ("VanishingGradient", {}, "NoIssuesFound"),
    ("VanishingGradient", {"threshold": "10"}, "IssuesFound"),
    ("ExplodingTensor", {}, "NoIssuesFound"),
])
def test_rule_statuses_follow_the_data_and_rule_parameters(tensors, rule, params, status):
    got, details = evaluate_rule(rule, params, tensors)
    assert got == status, details


def test_statuses_in_describe_training_job_shape(tensors, tmp_path):
    configs = [{"RuleConfigurationName": "LossNotDecreasing",
                "RuleParameters": {"rule_to_invoke": "LossNotDecreasing", "num_steps": "2"}},
               {"RuleConfigurationName": "Mine", "RuleParameters": {"rule_to_invoke": "PoorWeightInitialization"}},
               {"RuleConfigurationName": "Typo", "RuleParameters": {"rule_to_invoke": "Overfit", "patiense": "2"}}]
    out = evaluate_rules(configs, tensors, "job-1")
    assert [s["RuleEvaluationStatus"] for s in out] == ["NoIssuesFound", "Error", "Error"]
    assert "not available locally" in out[1]["StatusDetails"]
    assert "unknown RuleParameters ['patiense']" in out[2]["StatusDetails"]
    assert all(s["RuleEvaluationJobArn"].startswith("arn:aws:sagemaker:") for s in out)
    # a job without a hook has nothing to evaluate: Error, saying why
    status, details = evaluate_rule("Overfit", {}, tmp_path / "none")
    assert status == "Error" and "without an smdebug hook" in details
