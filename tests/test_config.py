"""pipeline.yaml -> Config: the shipped files load, and each bad file gets its one clear message."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "pipeline.yaml").read_text())


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch):
    for var in ("AWS_REGION", "SAGEMAKER_ROLE_ARN", "SAGEMAKER_BUCKET"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("name", ["pipeline.yaml", "pipeline.smoke.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / name)
    assert set(cfg.tuning.ranges) == {"lr", "batch-size", "test-batch-size", "epochs"}
    assert 0 < cfg.gate.threshold < 1


def test_real_defaults_are_the_original_project():
    cfg = load_config(ROOT / "pipeline.yaml")
    r = cfg.tuning.ranges
    assert (r["lr"].min, r["lr"].max, r["lr"].scaling) == (0.001, 0.1, "Logarithmic")
    assert r["batch-size"].values == [32, 64, 128, 256, 512] == r["test-batch-size"].values
    assert (r["epochs"].min, r["epochs"].max) == (5, 8)
    assert cfg.tuning.strategy == "Bayesian"
    assert cfg.tuning.objective.metric == "average validation loss"   # not test loss: no leak
    assert cfg.training.hyperparameters["arch"] == "resnet50"
    assert cfg.training.hyperparameters["image-size"] == 224
    assert cfg.data.sample is None


def test_smoke_profile_is_small():
    cfg = load_config(ROOT / "pipeline.smoke.yaml")
    hp = cfg.training.hyperparameters
    assert hp["arch"] in ("resnet18", "mobilenet_v3_small") and hp["weights"] == "none"
    assert hp["image-size"] <= 64
    assert cfg.data.sample is not None and cfg.data.sample.num_classes == 4
    assert cfg.tuning.max_jobs == 2 and cfg.tuning.max_parallel_jobs <= 2
    assert cfg.tuning.ranges["epochs"].max <= 4
    assert cfg.debugger.enabled and cfg.debugger.rules and cfg.profiler.enabled
    assert cfg.debugger.save_interval <= 5      # the rules see more than step 0 of ~24
    assert load_config(ROOT / "pipeline.yaml").debugger.save_interval == "auto"  # from the run's size
    assert cfg.gate.threshold <= 0.5


def test_overrides_cli_beats_env_beats_file(monkeypatch):
    monkeypatch.setenv("SAGEMAKER_BUCKET", "env-bucket")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    cfg = load_config(ROOT / "pipeline.yaml", bucket="cli-bucket")
    assert cfg.aws.bucket == "cli-bucket" and cfg.aws.region == "eu-west-1"
    monkeypatch.setenv("SAGEMAKER_ROLE_ARN", "arn:aws:iam::111122223333:role/Other")
    assert load_config(ROOT / "pipeline.yaml").aws.role == "arn:aws:iam::111122223333:role/Other"


def test_bad_override_is_named(monkeypatch):
    monkeypatch.setenv("SAGEMAKER_ROLE_ARN", "not-an-arn")
    with pytest.raises(ConfigError, match=r"aws\.role: an IAM role ARN"):
        load_config(ROOT / "pipeline.yaml")


def _set(doc, path, value):
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


class _Delete:
    def __repr__(self):
        return "<deleted>"


_DELETE = _Delete()

# (field path, bad value, the message this file must produce)
BAD = [
    ("pipeline.nmae", "x", "pipeline.nmae: unknown key"),
    ("tuning.ranges.lr.min", 0.5, "tuning.ranges.lr.min: must be less than max (0.1); got 0.5"),
    ("tuning.ranges.lr.min", "small", "tuning.ranges.lr.min: Input should be a valid number"),
    ("tuning.ranges.lr.min", -1.0, "tuning.ranges.lr.min: must be > 0 for Logarithmic scaling"),
    ("tuning.ranges.epochs.max", 5, "tuning.ranges.epochs.min: must be less than max (5); got 5"),
    ("tuning.ranges.epochs.max", 7.5, "tuning.ranges.epochs.max: Input should be a valid integer"),
    ("tuning.ranges.batch-size.values", [], "tuning.ranges.batch-size.values: a non-empty list"),
    ("tuning.ranges.batch-size.values", [32, 32], "tuning.ranges.batch-size.values: distinct values"),
    ("tuning.ranges.batch-size.type", "discrete",
     "tuning.ranges.batch-size.type: one of ['continuous', 'integer', 'categorical']"),
    ("tuning.ranges.momentum", {"type": "continuous", "min": 0.1, "max": 0.9},
     "tuning.ranges.momentum: tunable hyperparameters are"),
    ("tuning.ranges.epochs", _DELETE,
     "tuning.ranges: needs a range (or a static training.hyperparameters value) for ['epochs']"),
    ("tuning.strategy", "Genetic", "tuning.strategy: Input should be 'Bayesian', 'Random', 'Hyperband' or 'Grid'"),
    ("tuning.max_parallel_jobs", 20, "tuning.max_parallel_jobs: must be <= tuning.max_jobs (8); got 20"),
    ("tuning.objective.metric", "average test loss2", "tuning.objective.metric: one of ["),
    ("tuning.objective.type", "Minimise", "tuning.objective.type: Input should be 'Minimize' or 'Maximize'"),
    ("tuning.instance.type", "g4dn.xlarge", "tuning.instance.type: a SageMaker instance type like 'ml.g4dn.xlarge'"),
    ("tuning.instance.count", 0, "tuning.instance.count: Input should be greater than or equal to 1"),
    ("tuning.spot.max_wait_s", 600, "tuning.spot.max_wait_s: must be >= tuning.instance.max_run_s (7200); got 600"),
    ("training.hyperparameters.lr", 0.01, "training.hyperparameters.lr: 'lr' is tuned"),
    ("training.hyperparameters.--arch", "resnet50", "training.hyperparameters.--arch: a flag name without '--'"),
    ("gate.threshold", 80, "gate.threshold: a fraction in [0, 1]; got 80"),
    ("gate.threshold", _DELETE, "gate.threshold: required field is missing"),
    ("gate.metric", "accuracy", "gate.metric: one of ["),
    ("debugger.rules.0.name", "vanishing_gradients", "debugger.rules.0.name: a built-in Debugger rule, one of ["),
    ("debugger.save_interval", 0, "debugger.save_interval: Input should be greater than or equal to 1"),
    ("debugger.rules", [{"name": "loss_not_decreasing"}],
     "debugger.rules.0.parameters: loss_not_decreasing compares EVAL losses 10 steps apart, but the smallest run"),
    ("framework.training_image", "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.8.0-cpu-py312",
     "framework.training_image: a GPU image for tuning.instance.type ml.g4dn.xlarge; got the CPU image"),
    ("framework.inference_image", "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6.0-gpu-py312",
     "framework.inference_image: a CPU image for endpoint.instance_type ml.m5.large; got the GPU image"),
    ("framework.inference_image", "763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-inference:2.6.0-cpu-py312",
     "framework.inference_image: an image in the pipeline's region us-east-1"),
    ("framework.training_image", "pytorch-training:latest", "framework.training_image: an ECR image URI like"),
    ("framework.training_version", "2.9.0", "framework.training_version: a PyTorch training version the SDK has py312 "
                                            "images for, one of ['2.6.0', '2.7.1', '2.8.0']"),
    ("framework.inference_version", "2.8.0", "framework.inference_version: a PyTorch inference version"),
    ("profiler.interval_ms", 300, "profiler.interval_ms: Input should be 100, 200, 500, 1000, 5000 or 60000"),
    ("registry.approval_status", "Approve",
     "registry.approval_status: Input should be 'PendingManualApproval', 'Approved' or 'Rejected'"),
    ("registry.model_package_group", "dog_breed", "registry.model_package_group: letters, digits and single hyphens"),
    ("endpoint.name", "e" * 51, "endpoint.name: at most 50 chars"),
    ("data.uri", "dogImages/", "data.uri: an s3://bucket/prefix/ URI ending in '/'"),
    ("data.uri", "s3://bucket/dogImages", "data.uri: an s3://bucket/prefix/ URI ending in '/'"),
    ("data.sample", {"num_classes": 1}, "data.sample.num_classes: Input should be greater than or equal to 2"),
    ("data.sample", {"per_class": [1, 2]}, "data.sample.per_class: List should have at least 3 items"),
    ("aws.region", "useast1", "aws.region: an AWS region like 'us-east-1'"),
    ("aws.bucket", "My_Bucket", "aws.bucket: an S3 bucket name"),
    ("cache.expire_after", "30 days", "cache.expire_after: an ISO 8601 duration"),
    ("retry.max_attempts", 0, "retry.max_attempts: Input should be greater than or equal to 1"),
    ("tags", ["project"], "tags: Input should be a valid dictionary"),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[f"{p}={v!r}"[:60] for p, v, _ in BAD])
def test_bad_config_has_one_clear_message(path, value, message):
    doc = copy.deepcopy(BASE)
    _set(doc, path, value)
    with pytest.raises(ConfigError) as exc:
        parse_config(doc, source="bad.yaml")
    text = str(exc.value)
    assert text.startswith("bad.yaml: "), text
    assert message in text, text
    assert len(text.splitlines()) == 1, text


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tuning: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: expected a mapping of sections"):
        load_config(bad)


def test_debugger_save_interval_reaches_the_hook_and_every_rule_collection():
    from steps.train import debugger_args
    cfg = load_config(ROOT / "pipeline.yaml")
    cfg = cfg.model_copy(update={"debugger": cfg.debugger.model_copy(update={"save_interval": 3})})
    args = debugger_args(cfg)
    assert args["debugger_hook_config"].hook_parameters == {"save_interval": "3"}
    collections = {c.name: c.parameters for r in args["rules"] for c in r.collection_configs}
    # poor_weight_initialization brings relu_input with it, as rule_configs defines it
    assert collections == {"gradients": {"save_interval": "3"}, "losses": {"save_interval": "3"},
                           "relu_input": {"include_regex": ".*relu_input", "save_interval": "3"}}
