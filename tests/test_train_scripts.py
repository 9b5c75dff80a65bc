"""hpo.py and train_model.py as SageMaker runs them: real subprocesses, SM_* environment,
hyperparameters as CLI arguments (JSON-quoted too), a tiny learnable dataset,
logs read back with the very regexes the pipeline gives SageMaker."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from pipeline.sample_data import generate_dataset
from scripts import metrics, modeling
from tests._scripts_helpers import SCRIPTS, hyperparameter_args, run_script, sagemaker_env

pytestmark = pytest.mark.slow  # see pyproject's markers

NUM_CLASSES = 4
# Small and fast, yet it learns the sample data well past chance in 5 epochs.
# Random init: no head-only warm-up, and no early stopping on the noisy first epochs.
HP = {"arch": "resnet18", "weights": "none", "image-size": 32, "epochs": 5, "freeze-epochs": 0, "patience": 0,
      "batch-size": 16, "test-batch-size": 32, "lr": 0.01, "num-workers": 1, "seed": 7}
# What SageMaker's framework estimators add to the hyperparameters.
SAGEMAKER_HPS = {"sagemaker_program": "train_model.py", "sagemaker_submit_directory": "s3://b/source.tar.gz",
                 "sagemaker_region": "us-east-1", "sagemaker_container_log_level": 20,
                 "sagemaker_job_name": "test-job"}
EPOCH_NAMES = [f"epoch:{f}" for f in metrics.EPOCH_FIELDS]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("data") / "dogImages", num_classes=NUM_CLASSES, size=48)


def split_channels(root):
    return {split: root / split for split in ("train", "valid", "test")}


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """One train_model.py job with Debugger rules configured and profiling on, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("train_model")
    tensors = tmp / "tensors"
    debug_config = {  # the shape SageMaker writes for a job with Debugger rules
        "S3OutputPath": "s3://bucket/debug-output", "LocalPath": str(tensors),
        "HookParameters": {"save_interval": "2"},
        "CollectionConfigurations": [{"CollectionName": "losses", "CollectionParameters": {"save_interval": "1"}},
                                     {"CollectionName": "gradients"}, {"CollectionName": "weights"}]}
    hps = {**HP, "profile": "true", "profile-skip-steps": 2, "profile-steps": 3}
    env = sagemaker_env(tmp, split_channels(dataset), {**hps, **SAGEMAKER_HPS}, debug_config=debug_config)
    proc = run_script("train_model.py", hyperparameter_args({**hps, **SAGEMAKER_HPS}), env)
    return {"env": env, "log": proc.stdout, "tensors": tensors, "model_dir": env["SM_MODEL_DIR"],
            "output_dir": env["SM_OUTPUT_DATA_DIR"]}


def epochs_printed(log: str) -> list[int]:
    return [int(line.split()[1].split("/")[0]) for line in log.splitlines() if line.startswith("epoch ")
            and "train_loss=" in line]


# ----------------------------------------------------------------------------- train_model.py

def test_every_metric_regex_matches_what_the_script_prints(trained):
    found = metrics.parse_metrics(trained["log"])
    for definition in metrics.METRIC_DEFINITIONS:
        assert definition["Name"] in found, f"{definition['Name']} regex matched nothing:\n{trained['log'][-3000:]}"
    for name in EPOCH_NAMES:
        assert len(found[name]) == HP["epochs"], name
    for name in metrics.SUMMARY_FIELDS:  # the kept weights' lines after every epoch and at the end
        assert len(found[name]) == (HP["epochs"] + 1 if name in metrics.KEPT_FIELDS else 1), name
    assert epochs_printed(trained["log"]) == list(range(1, HP["epochs"] + 1))
    assert "ignoring arguments this script does not use: --sagemaker_program" in trained["log"]


def test_model_dir_is_a_deployable_model(trained, dataset):
    model_dir = trained["model_dir"]
    model, meta = modeling.load_model(model_dir)  # weights_only=True inside
    classes = sorted(p.name for p in (dataset / "train").iterdir())
    assert meta["classes"] == classes
    assert meta["labels"] == [modeling.breed_label(c) for c in classes] and meta["labels"][1] == "Afghan hound"
    assert meta["arch"] == "resnet18" and meta["image_size"] == 32
    assert meta["resize_size"] == modeling.eval_geometry("resnet18", "none", 32)[0]
    assert meta["mean"] == list(modeling.IMAGENET_MEAN) and meta["std"] == list(modeling.IMAGENET_STD)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, NUM_CLASSES)
    code = os.path.join(model_dir, "code")
    assert open(os.path.join(code, "modeling.py")).read() == (SCRIPTS / "modeling.py").read_text()
    assert os.path.isfile(os.path.join(code, "requirements.txt"))
    if (SCRIPTS / "inference.py").is_file():
        assert open(os.path.join(code, "inference.py")).read() == (SCRIPTS / "inference.py").read_text()
    assert json.load(open(os.path.join(model_dir, "evaluation.json"))) == \
        json.load(open(os.path.join(trained["output_dir"], "evaluation.json")))


def test_packaged_inference_code_serves_the_trained_model(trained, dataset):
    """code/inference.py from the model dir, as the inference container loads it:
    its answers on the test split agree with training's own test accuracy."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("packaged_inference",
                                                  os.path.join(trained["model_dir"], "code", "inference.py"))
    inference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(inference)
    model = inference.model_fn(trained["model_dir"])
    classes = sorted(p.name for p in (dataset / "test").iterdir())
    correct = total = 0
    for name in classes:
        for image in sorted((dataset / "test" / name).iterdir()):
            body, content_type = inference.output_fn(
                inference.predict_fn(inference.input_fn(image.read_bytes(), "image/jpeg"), model), "application/json")
            answer = json.loads(body)
            assert len(answer["probabilities"]) == NUM_CLASSES
            correct += answer["top"][0]["label"] == modeling.breed_label(name)
            total += 1
    evaluation = json.load(open(os.path.join(trained["model_dir"], "evaluation.json")))
    assert abs(correct - evaluation["test_accuracy"] * total) <= 1, (correct, total, evaluation["test_accuracy"])


def test_model_dir_holds_the_onnx_export_validated_on_the_test_split(trained, dataset):
    """model.onnx is part of the model dir contract: model.json names it with its sha256 and
    the validation it passed, and the packaged inference.py serves it (fast path)."""
    import hashlib
    import importlib.util

    model_dir = trained["model_dir"]
    meta = json.load(open(os.path.join(model_dir, "model.json")))
    entry = meta["onnx"]
    data = open(os.path.join(model_dir, entry["file"]), "rb").read()
    assert entry["file"] == "model.onnx" and entry["sha256"] == hashlib.sha256(data).hexdigest()
    test_images = sum(1 for _ in (dataset / "test").glob("*/*"))
    assert entry["validated"]["images"] == entry["validated"]["top1_agree"] == test_images
    assert entry["validated"]["max_prob_diff"] <= 1e-4
    assert f"validated on {test_images} test images" in trained["log"]
    spec = importlib.util.spec_from_file_location("packaged_inference_onnx",
                                                  os.path.join(model_dir, "code", "inference.py"))
    inference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(inference)
    assert inference.model_fn(model_dir)["runtime"] == "onnxruntime"
    requirements = open(os.path.join(model_dir, "code", "requirements.txt")).read()
    assert "onnxruntime==" in requirements


def test_without_onnxruntime_the_job_trains_and_says_why_the_export_is_left_out(dataset, tmp_path):
    shim = tmp_path / "shim" / "onnxruntime"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('onnxruntime hidden by the test', name='onnxruntime')\n")
    hps = {**HP, "epochs": 1, "max-steps-per-epoch": 2}
    env = sagemaker_env(tmp_path, split_channels(dataset), hps, extra={"PYTHONPATH": str(shim.parent)})
    proc = run_script("train_model.py", hyperparameter_args(hps), env)
    assert "onnx export left out: onnxruntime is not installed" in proc.stdout, proc.stdout
    model_dir = env["SM_MODEL_DIR"]
    assert os.path.isfile(os.path.join(model_dir, "model.pth"))
    assert not os.path.exists(os.path.join(model_dir, "model.onnx"))
    assert "onnx" not in json.load(open(os.path.join(model_dir, "model.json")))


def test_evaluation_matches_the_summary_lines_and_beats_chance(trained):
    evaluation = json.load(open(os.path.join(trained["output_dir"], "evaluation.json")))
    final = metrics.final_metrics(trained["log"])
    assert evaluation["test_loss"] == pytest.approx(final["average test loss"], rel=1e-5)
    assert evaluation["test_accuracy"] == pytest.approx(final["test accuracy"], rel=1e-5)
    assert evaluation["test_top5_accuracy"] == pytest.approx(final["test top5 accuracy"], rel=1e-5)
    assert evaluation["valid_loss"] == pytest.approx(final["average validation loss"], rel=1e-5)
    # the kept weights are the best by validation loss, not the last; the objective printed after
    # each epoch (what SageMaker's early stopping reads) is the best so far, and its last value,
    # the final metric the tuner ranks by (also locally: jobs.py keeps the last), is the kept one
    found = metrics.parse_metrics(trained["log"])
    per_epoch = found["epoch:valid_loss"]
    assert found["average validation loss"] == pytest.approx(
        [min(per_epoch[:k + 1]) for k in range(len(per_epoch))] + [min(per_epoch)], rel=1e-5)
    assert final["average validation loss"] == pytest.approx(min(per_epoch), rel=1e-5)
    best = per_epoch.index(min(per_epoch))
    assert final["validation accuracy"] == pytest.approx(found["epoch:valid_acc"][best], rel=1e-5)
    assert evaluation["num_test_images"] == NUM_CLASSES * 6
    assert set(evaluation["per_class_accuracy"]) == {modeling.breed_label(c) for c in evaluation["classes"]}
    assert evaluation["test_accuracy"] >= 2 / NUM_CLASSES, trained["log"][-3000:]

    history = json.load(open(os.path.join(trained["output_dir"], "history.json")))
    assert [h["epoch"] for h in history] == list(range(1, HP["epochs"] + 1))
    assert {h["phase"] for h in history} == {"full"}
    assert open(os.path.join(trained["output_dir"], "loss_curve.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_profiler_writes_trace_and_summary(trained):
    out = os.path.join(trained["output_dir"], "profiler")
    trace = json.load(open(os.path.join(out, "trace.json")))
    assert trace["traceEvents"]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["steps"] == 3 and summary["dataloader_wait_seconds"] >= 0
    assert any("conv" in op["name"] for op in summary["top_ops"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # smdebug's generated protobuf code
def test_debugger_hook_saves_losses_in_both_modes_and_gradients(trained):
    from smdebug import modes
    from smdebug.trials import create_trial

    trial = create_trial(str(trained["tensors"]))
    losses = trial.tensor_names(collection="losses")
    assert losses, "no loss tensors saved"
    loss = trial.tensor(losses[0])
    assert len(loss.steps(mode=modes.TRAIN)) >= 5 and loss.steps(mode=modes.EVAL)
    assert trial.tensor_names(collection="gradients") and trial.tensor_names(collection="weights")


# ----------------------------------------------------------------------------- hpo.py

def test_hpo_json_quoted_args_one_channel_same_seed_same_metrics(trained, dataset, tmp_path):
    """Values read through pipeline properties arrive JSON-quoted, data in one
    `training` channel; the same seed gives the very same numbers as train_model.py."""
    env = sagemaker_env(tmp_path, {"training": dataset}, HP)
    proc = run_script("hpo.py", hyperparameter_args({**HP, **SAGEMAKER_HPS}, quoted=True), env)
    ours, theirs = metrics.parse_metrics(proc.stdout), metrics.parse_metrics(trained["log"])
    for name in EPOCH_NAMES + list(metrics.SUMMARY_FIELDS):
        assert ours[name] == theirs[name], name
    model, meta = modeling.load_model(env["SM_MODEL_DIR"])
    assert meta["classes"] == json.load(open(os.path.join(env["SM_OUTPUT_DATA_DIR"], "evaluation.json")))["classes"]


def test_resume_after_a_killed_job_continues_from_the_checkpoint(dataset, tmp_path):
    hps = {**HP, "epochs": 4, "max-steps-per-epoch": 3}
    env = sagemaker_env(tmp_path, split_channels(dataset), hps)
    args = hyperparameter_args(hps)
    first = subprocess.Popen([sys.executable, str(SCRIPTS / "hpo.py"), *args], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = []
    for line in first.stdout:  # spot interruption right after epoch 2's line
        seen.append(line)
        if line.startswith("epoch 2/4 "):
            first.send_signal(signal.SIGKILL)
            break
    first.wait(timeout=60)
    first.stdout.close()
    done = epochs_printed("".join(seen))
    assert done == [1, 2], "".join(seen)

    second = run_script("hpo.py", args, env)
    assert f"resuming from {env['SM_CHECKPOINT_DIR']}/checkpoint.pt after epoch 2" in second.stdout
    assert epochs_printed(second.stdout) == [3, 4]
    history = json.load(open(os.path.join(env["SM_OUTPUT_DATA_DIR"], "history.json")))
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert os.path.isfile(os.path.join(env["SM_MODEL_DIR"], "model.pth"))


def test_two_process_ddp_with_weights_from_a_channel(dataset, tmp_path):
    """torchrun, gloo on CPU, only rank 0 prints metric lines and writes; the
    backbone weights come from a relative path looked up in a channel."""
    weights = tmp_path / "weights"
    weights.mkdir()
    import torchvision
    torch.save(torchvision.models.resnet18().state_dict(), weights / "resnet18-backbone.pth")
    hps = {**HP, "epochs": 2, "freeze-epochs": 1, "batch-size": 8, "micro-batch-size": 4, "num-workers": 0,
           "weights": "resnet18-backbone.pth"}  # micro-batches: DDP's no_sync on the first of each step
    env = sagemaker_env(tmp_path, {**split_channels(dataset), "weights": weights}, hps)
    proc = run_script("hpo.py", hyperparameter_args(hps), env, nproc=2)
    assert "world=2" in proc.stdout
    assert epochs_printed(proc.stdout) == [1, 2]  # once each: rank 0 only
    found = metrics.parse_metrics(proc.stdout)
    assert all(len(found[name]) == 1 for name in metrics.SUMMARY_FIELDS if name not in metrics.KEPT_FIELDS)
    evaluation = json.load(open(os.path.join(env["SM_OUTPUT_DATA_DIR"], "evaluation.json")))
    assert evaluation["num_test_images"] == NUM_CLASSES * 6  # shards summed, nothing counted twice
    modeling.load_model(env["SM_MODEL_DIR"])
    history = json.load(open(os.path.join(env["SM_OUTPUT_DATA_DIR"], "history.json")))
    assert [h["phase"] for h in history] == ["head", "full"]  # DDP re-wrapped on unfreezing


def test_a_trial_without_test_channel_stops_early_and_reports_the_kept_weights(dataset, tmp_path):
    """Tuning trials get train/ and valid/ only (the search never sees test/). A learning rate
    too small to move the head (BatchNorm frozen in head-only epochs) gives the same
    validation loss every epoch: no improvement, early stop after --patience epochs."""
    hps = {**HP, "lr": 1e-30, "epochs": 6, "freeze-epochs": 6, "patience": 2, "max-steps-per-epoch": 2}
    channels = split_channels(dataset)
    del channels["test"]
    env = sagemaker_env(tmp_path, channels, hps)
    proc = run_script("hpo.py", hyperparameter_args(hps), env)
    assert "early stop: no improvement in 2 epochs" in proc.stdout
    assert epochs_printed(proc.stdout) == [1, 2, 3], proc.stdout
    found = metrics.parse_metrics(proc.stdout)
    assert "average test loss" not in found
    assert len(found["average validation loss"]) == 3 + 1  # after every epoch, and at the end
    evaluation = json.load(open(os.path.join(env["SM_OUTPUT_DATA_DIR"], "evaluation.json")))
    assert evaluation["test_accuracy"] is None and evaluation["best_epoch"] == 1
    assert metrics.final_metrics(proc.stdout)["average validation loss"] == \
        pytest.approx(evaluation["valid_loss"], rel=1e-5)
    for name in ("evaluation.json", "history.json"):
        text = open(os.path.join(env["SM_OUTPUT_DATA_DIR"], name)).read()
        json.loads(text, parse_constant=lambda c, name=name: pytest.fail(f"{name} holds {c}"))


# ----------------------------------------------------------------------------- without smdebug, bad input

def test_without_smdebug_it_warns_once_and_trains(dataset, tmp_path):
    shim = tmp_path / "shim" / "smdebug"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('smdebug hidden by the test')\n")
    debug_out = tmp_path / "debug"
    hps = {**HP, "epochs": 1, "max-steps-per-epoch": 2, "debug-out": debug_out}
    env = sagemaker_env(tmp_path, split_channels(dataset), hps, extra={"PYTHONPATH": str(shim.parent)})
    proc = run_script("train_model.py", hyperparameter_args(hps), env)
    assert proc.stdout.count("smdebug not importable") == 1, proc.stdout
    assert not debug_out.exists()
    assert os.path.isfile(os.path.join(env["SM_MODEL_DIR"], "model.pth"))


@pytest.mark.parametrize("case", ["missing channel", "no test for train_model", "empty class folder", "bad arch",
                                  "bad number"])
def test_bad_input_fails_with_a_message_naming_the_field(case, tmp_path):
    small_dataset = generate_dataset(tmp_path / "data", num_classes=2, per_class=(2, 1, 1), size=16)
    channels = split_channels(small_dataset)
    args = {**HP, "epochs": 1}
    script = "hpo.py"
    if case == "no test for train_model":
        del channels["test"]
        script = "train_model.py"
        expected = ["--test: no data given", "SM_CHANNEL_TEST"]
    elif case == "missing channel":
        channels["valid"] = tmp_path / "no-such-dir"
        expected = [f"--valid {tmp_path / 'no-such-dir'}: no such directory"]
    elif case == "empty class folder":
        (small_dataset / "train" / "003.Airedale_terrier").mkdir()
        expected = ["003.Airedale_terrier: class folder has no images"]
    elif case == "bad arch":
        args["arch"] = "no_such_net"
        expected = ["--arch 'no_such_net': not a torchvision classification model", "resnet50"]
    else:
        args["batch-size"] = "sixty"
        expected = ["--batch-size: 'sixty' is not an integer"]
    env = sagemaker_env(tmp_path, channels, args)
    proc = run_script(script, hyperparameter_args(args, quoted=True), env, check=False)
    assert proc.returncode == 1  # a failed job, argparse's usage errors included (never exit 2)
    assert "Traceback" not in proc.stdout and "usage:" not in proc.stdout, proc.stdout
    for text in expected:
        assert text in proc.stdout, proc.stdout
    failure = open(os.path.join(env["SM_OUTPUT_DIR"], "failure")).read()
    assert expected[0] in failure


# ----------------------------------------------------------------------------- pure helpers

def test_values_decode_plain_and_json_quoted(train_lib, capsys):
    args = train_lib.parse_args(["--lr", '"0.006"', "--batch-size", '"64"', "--epochs", "8", "--amp", '"false"',
                                 "--arch", '"resnet18"', "--test_batch_size", "512", "--sagemaker_region", "x"])
    assert (args.lr, args.batch_size, args.epochs, args.amp, args.arch, args.test_batch_size) == \
        (0.006, 64, 8, "false", "resnet18", 512)
    assert [train_lib.parse_bool(v) for v in ("true", "True", '"true"', "false", "False", '"False"')] == \
        [True, True, True, False, False, False]
    # no prefix matching (SageMaker adds flags of its own): an unknown flag is reported, never bound
    assert train_lib.parse_args(["--epoch", "3"]).epochs == train_lib.build_parser().get_default("epochs")
    assert "--epoch not a known flag" in capsys.readouterr().err


def test_lr_schedule_head_constant_then_warmup_then_cosine(train_lib):
    f = [train_lib.lr_factor(s, steps_per_epoch=10, epochs=5, freeze_epochs=1, warmup_epochs=1, min_ratio=0.01)
         for s in range(50)]
    assert f[:10] == [1.0] * 10
    assert f[10] == pytest.approx(0.1) and f[19] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[20:], f[21:])) and f[49] == pytest.approx(0.01, abs=2e-3)


def test_jpegs_decode_reduced_but_never_below_the_resize_and_truncated_ones_load(train_lib, tmp_path):
    from PIL import Image

    big = tmp_path / "big.jpg"
    Image.new("RGB", (1000, 800), (200, 30, 30)).save(big, quality=90)
    image = train_lib.load_image(big, min_size=232)
    assert image.mode == "RGB" and min(image.size) >= 232 and image.size[0] < 1000  # DCT-scaled: 500x400
    assert train_lib.load_image(big).size == (1000, 800)
    truncated = tmp_path / "truncated.jpg"  # like dogImages' Leonberger_06571.jpg
    truncated.write_bytes(big.read_bytes()[:-2000])
    assert train_lib.load_image(truncated, min_size=64).mode == "RGB"
