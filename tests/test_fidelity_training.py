"""The training side under the SageMaker training toolkit itself (sagemaker-training +
sagemaker-pytorch-training, the PyTorch training image's entry point, from the toolkit venv):

* every sandbox pipeline/local/jobs.py makes gets, from the toolkit's own Environment /
  to_env_vars / to_cmd_args / hyperparameter decoding, the SM_* variables and argv the
  local job was given;
* hpo.py and train_model.py run end to end under the real toolkit from sourcedir.tar.gz,
  hyperparameters.json encoded as the SDK and the tuner write it; what train_model.py's
  requirements.txt installs leaves the toolkit working for the next job; a trial installs
  nothing; a bad hyperparameter ends in a FailureReason that names it.
"""
from __future__ import annotations

import io
import json
import subprocess
import tarfile

import pytest

from pipeline.definition import TUNING_EXCLUDES, source_tarball
from pipeline.local.executor import execute
from pipeline.local.store import LocalStore
from pipeline.runtime import training
from pipeline.sample_data import generate_dataset
from scripts import metrics
from steps.train import TRAINING_ENVIRONMENT
from tests._local_helpers import CODE_URI, TOY_TRAIN, put_toy_code_and_data, toy_definition
from tests._runtime_helpers import require_toolkits

pytestmark = pytest.mark.slow  # see pyproject's markers

# ---------------------------------------------------------------- the contract, job by job

# Prepended to the toy entry point: what the job was given, next to its sandbox.
RECORD_CONTRACT = r'''
import json as _json, os as _os, sys as _sys
with open(_os.path.join(_os.path.dirname(_os.environ["SM_MODEL_DIR"]), "contract.json"), "w") as _f:
    _json.dump({"argv": _sys.argv[1:], "job_name": _os.environ["TRAINING_JOB_NAME"],
                "env": {k: v for k, v in _os.environ.items() if k.startswith("SM_")}}, _f)
'''

TOOLKIT_VIEW = r'''
import json
from sagemaker_training import environment
env = environment.Environment()
print(json.dumps({"argv": env.to_cmd_args(), "env": {k: v for k, v in env.to_env_vars().items()}}))
'''


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The toy pipeline (a tuning job with 2 trials, then a training job) through the local executor."""
    store = LocalStore(tmp_path_factory.mktemp("store"))
    put_toy_code_and_data(store)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        body = (RECORD_CONTRACT + TOY_TRAIN).encode()
        info = tarfile.TarInfo("train.py")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    store.put_bytes(CODE_URI, buf.getvalue())
    run_dir = tmp_path_factory.mktemp("run")
    record = execute(toy_definition(cache=False), store=store, run_dir=run_dir, pipeline_name="toy", report=False)
    assert record["PipelineExecutionStatus"] == "Succeeded", record.get("FailureReason")
    return run_dir


def test_every_local_job_gets_what_the_training_toolkit_would_give_it(toy_run):
    python = require_toolkits()
    sandboxes = sorted(p.parent for p in toy_run.rglob("opt_ml/contract.json"))
    assert len(sandboxes) == 3  # two tuning trials and the training job
    for sandbox in sandboxes:
        local = json.loads((sandbox / "contract.json").read_text())
        done = subprocess.run([python, "-c", TOOLKIT_VIEW], capture_output=True, text=True, timeout=120,
                              env={"SAGEMAKER_BASE_DIR": str(sandbox), "TRAINING_JOB_NAME": local["job_name"],
                                   "SAGEMAKER_TRAINING_MODULE": training.TRAINING_MODULE, "PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr[-3000:]
        toolkit = json.loads(done.stdout.splitlines()[-1])
        assert local["argv"] == toolkit["argv"], sandbox
        assert "--batch-size" in local["argv"] and "--lr" in local["argv"]  # categorical and continuous alike
        # SM_CHECKPOINT_DIR is the one variable of our own: the sandbox is not /opt/ml, where the
        # scripts would find /opt/ml/checkpoints (what CheckpointConfig syncs) without it.
        ours = {k: v for k, v in local["env"].items() if k != "SM_CHECKPOINT_DIR"}
        for key in sorted(set(ours) | set(toolkit["env"])):
            assert ours.get(key) == toolkit["env"].get(key), f"{sandbox}: {key}"
        assert local["env"]["SM_CHECKPOINT_DIR"] == str(sandbox / "checkpoints")


# ---------------------------------------------------------------- the scripts under the toolkit

STATIC = {"arch": "resnet18", "weights": "none", "image-size": "32", "epochs": "1", "freeze-epochs": "0",
          "num-workers": "0", "test-batch-size": "4", "patience": "0", "seed": "0"}


def trial_hyperparameters(**tuned) -> dict[str, str]:
    """As a tuning job writes a trial's hyperparameters.json: the estimator's static values
    JSON-encoded by the SDK, continuous/integer picks as plain numbers, categorical picks
    quoted (the SDK JSON-encodes categorical values), plus the tuner's objective."""
    picks = {"lr": "0.01", "batch-size": json.dumps("4")}
    picks.update(tuned)
    return {**training.sdk_hyperparameters(STATIC), **picks,
            "_tuning_objective_metric": json.dumps("average validation loss")}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Source archives as the definition uploads them, a tiny dataset, and one interpreter for
    every job (a venv layered on the toolkit venv: what requirements.txt installs lands there)."""
    require_toolkits()
    root = tmp_path_factory.mktemp("toolkit-jobs")
    (root / "train.tar.gz").write_bytes(source_tarball())
    (root / "tune.tar.gz").write_bytes(source_tarball(exclude=TUNING_EXCLUDES))
    data = generate_dataset(root / "data", num_classes=2, per_class=(4, 2, 2), size=32)
    return {"root": root, "data": data, "python": training.job_venv(root / "venv")}


def _run(jobs, name, entry_point, source, hyperparameters, channels=("train", "valid"), env=None,
         before=None):
    base = training.write_sandbox(jobs["root"] / name, source=jobs["root"] / source, entry_point=entry_point,
                                  hyperparameters=hyperparameters, job_name=name,
                                  channels={c: jobs["data"] / c for c in channels})
    if before:
        before(base)
    done = training.run(base, python=jobs["python"], env={"OMP_NUM_THREADS": "1", **(env or {})}, timeout=900)
    return base, done


def _protobuf(jobs) -> str:
    return subprocess.run([str(jobs["python"]), "-c", "import google.protobuf as p; print(p.__version__)"],
                          capture_output=True, text=True, check=True).stdout.strip()


def _pip_check(jobs) -> list[str]:
    """`pip check` in the jobs' interpreter: one line per unmet requirement of an installed package."""
    done = subprocess.run([str(jobs["python"]), "-m", "pip", "check"], capture_output=True, text=True)
    return done.stdout.splitlines()


def test_train_model_then_a_trial_under_the_real_toolkit(jobs):
    protobuf_before = _protobuf(jobs)
    assert int(protobuf_before.split(".")[0]) >= 5  # what sagemaker-training 5.x needs (>= 5.28.1)

    def with_debugger_rules(base):  # what SageMaker writes for a job with Debugger rules
        (base / "input" / "config" / "debughookconfig.json").write_text(json.dumps({
            "LocalPath": str(base / "output" / "tensors"), "S3OutputPath": "s3://bucket/debug",
            "HookParameters": {"save_interval": "1"}, "CollectionConfigurations": [{"CollectionName": "losses"}]}))

    hyperparameters = {**training.sdk_hyperparameters(STATIC), "lr": "0.01", "batch-size": json.dumps("4")}
    base, done = _run(jobs, "train-job", "train_model.py", "train.tar.gz", hyperparameters,
                      channels=("train", "valid", "test"), env=TRAINING_ENVIRONMENT, before=with_debugger_rules)
    assert done.returncode == 0, done.stdout[-5000:]
    assert (base / "output" / "success").is_file() and (base / "model" / "model.pth").is_file()
    assert "Installing dependencies from requirements.txt" in done.stdout
    assert "Collecting protobuf" not in done.stdout
    assert any((base / "output" / "tensors").rglob("*.tfevents"))  # smdebug ran on the toolkit's protobuf
    assert metrics.parse_metrics(done.stdout)["test accuracy"]
    assert _protobuf(jobs) == protobuf_before  # the toolkit's own dependencies are intact ...
    broken = [line for line in _pip_check(jobs) if line.startswith(("sagemaker-training", "sagemaker-pytorch"))]
    assert broken == []

    base, done = _run(jobs, "trial-1", "hpo.py", "tune.tar.gz", trial_hyperparameters())
    assert done.returncode == 0, done.stdout[-5000:]  # ... and it runs the next job
    assert "requirements.txt" not in done.stdout  # a trial installs nothing
    assert "--batch-size 4" in done.stdout and "--lr 0.01" in done.stdout  # the quoted pick arrives unquoted
    assert metrics.parse_metrics(done.stdout)["average validation loss"]
    assert (base / "output" / "success").is_file() and (base / "model" / "model.pth").is_file()


def test_a_bad_hyperparameter_fails_the_job_with_a_reason_that_names_it(jobs):
    base, done = _run(jobs, "trial-bad", "hpo.py", "tune.tar.gz", trial_hyperparameters(lr=json.dumps("fast")))
    assert done.returncode == 1, done.stdout[-3000:]
    assert not (base / "output" / "success").exists()
    reason = (base / "output" / "failure").read_text().strip()  # SageMaker's FailureReason
    assert "Reporting training FAILURE" in done.stdout
    assert len(reason.splitlines()) == 1 and "--lr" in reason and "fast" in reason, reason
    assert "ExecuteUserScriptError" not in reason and "Traceback" not in reason
