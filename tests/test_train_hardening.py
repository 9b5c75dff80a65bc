"""The training scripts on a GPU and under bad input: the AMP choice by compute capability,
micro-batches (gradient accumulation, CUDA out-of-memory halving), divergence, hyperparameters
out of range, corrupt images and checkpoints. In-process where the unit is a function; a
subprocess with SageMaker's environment where the contract is the exit status and
/opt/ml/output/failure."""
from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch
from PIL import Image
from torch import nn

from pipeline.sample_data import generate_dataset
from tests._scripts_helpers import SCRIPTS, hyperparameter_args, run_script, sagemaker_env

HP = {"arch": "resnet18", "weights": "none", "image-size": 32, "epochs": 2, "freeze-epochs": 0, "patience": 0,
      "batch-size": 8, "test-batch-size": 16, "lr": 0.01, "num-workers": 0, "seed": 7, "max-steps-per-epoch": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("data") / "dogImages", num_classes=2, per_class=(8, 4, 4),
                            size=32)


def channels(root):
    return {split: root / split for split in ("train", "valid", "test")}


def one_error_line(proc) -> str:
    """The job's stderr+stdout must hold exactly one `error:` line and no traceback."""
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert "usage:" not in proc.stdout, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stdout[-3000:]
    return errors[0]


# ----------------------------------------------------------------------------- AMP

@pytest.mark.parametrize("capability, amp, expected", [
    ((7, 5), "auto", torch.float16),   # T4 (ml.g4dn): fp16 + GradScaler, not emulated bf16
    ((7, 0), "true", torch.float16),   # V100 (ml.p3)
    ((8, 0), "auto", torch.bfloat16),  # A100
    ((8, 6), "auto", torch.bfloat16),  # A10G (ml.g5)
    ((9, 0), "auto", torch.bfloat16),  # H100
    ((7, 5), "bf16", torch.bfloat16),  # asked for: given
    ((9, 0), "fp16", torch.float16),
    ((9, 0), "false", None),
])
def test_amp_is_bf16_only_where_the_gpu_does_it_natively(train_lib, monkeypatch, capability, amp, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # what the old choice read: True on a T4 too, and must not decide any more
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert train_lib.amp_dtype(amp, torch.device("cuda", 0)) == expected
    assert train_lib.amp_dtype(amp, torch.device("cpu")) is None  # CPU: full precision


# ----------------------------------------------------------------------------- micro-batches

def _ctx(train_lib, micro: int, world: int = 1):
    return train_lib.Context(device=torch.device("cpu"), dtype=None, channels_last=False,
                             d=train_lib.Dist(world=world), callbacks=[], micro_batch=micro)


def _one_step(train_lib, model, images, targets, micro, world=1):
    """One train_step of a copy of `model`; (updated model, loss, correct, ctx)."""
    model = copy.deepcopy(model)
    criterion = train_lib.SmoothedCrossEntropyLoss(label_smoothing=0.1)
    optimizer = train_lib.make_optimizer(model, lr=0.5, weight_decay=1e-4, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    ctx = _ctx(train_lib, micro, world)
    loss, correct = train_lib.train_step(model, images.clone(), targets, criterion, optimizer, scheduler, scaler, ctx)
    return model, float(loss), int(correct), ctx


def _batch(n=16, size=32, classes=4):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)  # the loader's uint8 NHWC
    return images, torch.randint(0, classes, (n,), generator=g)


def _resnet(classes=4):
    import torchvision
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=classes)


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


def test_a_quarter_micro_batch_gives_the_same_update_as_the_whole_batch(train_lib):
    """Gradient accumulation over 4 micro-batches, loss scaled by 1/4 each: the same SGD step as
    one pass over the batch, where BatchNorm is not involved (BN in eval mode uses running
    statistics; a model without BN is the other case)."""
    images, targets = _batch()
    before = _resnet().eval()  # BatchNorm on its running statistics
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    for model in (before, plain):
        whole, loss_whole, correct_whole, _ = _one_step(train_lib, model, images, targets, micro=0)
        quarter, loss_quarter, correct_quarter, _ = _one_step(train_lib, model, images, targets, micro=4)
        moved = _max_diff(whole, model)
        assert moved > 1e-3  # the step did change the weights
        assert _max_diff(whole, quarter) < 1e-5 * max(1.0, moved), type(model).__name__
        assert loss_quarter == pytest.approx(loss_whole, rel=1e-5)
        assert correct_quarter == correct_whole


def test_batchnorm_in_train_mode_sees_each_micro_batch_alone(train_lib):
    """What README says BatchNorm does differently: statistics per micro-batch, so the update differs."""
    images, targets = _batch()
    model = _resnet().train()
    whole = _one_step(train_lib, model, images, targets, micro=0)[0]
    quarter = _one_step(train_lib, model, images, targets, micro=4)[0]
    assert _max_diff(whole, quarter) > 1e-4


def test_micro_batches_split_evenly_and_a_batch_of_one_is_one_line(train_lib):
    assert [train_lib.micro_chunks(n, m) for n, m in ((16, 4), (9, 4), (8, 8), (5, 2))] == [4, 3, 1, 3]
    images, targets = _batch(n=9)
    sizes = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32 * 3, 4))
    model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    _one_step(train_lib, model, images, targets, micro=4)
    assert sizes == [3, 3, 3]  # not 4 + 4 + 1
    images, targets = _batch(n=1, size=32)  # resnet18 at 32 px: 1x1 feature maps, BatchNorm sees 1 value
    with pytest.raises(train_lib.InputError, match="--batch-size: BatchNorm cannot train on a forward of 1 image"):
        _one_step(train_lib, _resnet().train(), images, targets, micro=0)


class OutOfMemoryAbove(nn.Module):
    """A stand-in for a GPU's memory limit (CUDA is not on this machine): raises the CUDA
    allocator's own error when a forward gets more than `limit` images."""

    def __init__(self, model: nn.Module, limit: int):
        super().__init__()
        self.model, self.limit, self.sizes = model, limit, []

    def forward(self, x):
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x) * 47} MiB")
        return self.model(x)


@pytest.mark.slow
def test_cuda_out_of_memory_halves_the_micro_batch_and_redoes_the_step(train_lib, capsys):
    images, targets = _batch()
    inner = _resnet().eval()
    reference = _one_step(train_lib, inner, images, targets, micro=0)[0]
    limited, loss, correct, ctx = _one_step(train_lib, OutOfMemoryAbove(inner, limit=5), images, targets, micro=0)
    assert ctx.micro_batch == 4  # 16 -> 8 -> 4: the first size that fits, kept for later steps
    assert limited.sizes == [16, 8, 4, 4, 4, 4]
    assert _max_diff(reference, limited.model) < 1e-5  # the step was redone from scratch, not applied twice
    lines = capsys.readouterr().out.splitlines()  # one line per halving
    assert [line.split(":")[0] for line in lines] == ["CUDA out of memory at 16 images per forward/backward",
                                                      "CUDA out of memory at 8 images per forward/backward"]
    assert lines[-1].endswith("micro-batches of 4 (the batch stays 16; pass --micro-batch-size 4 to start there)")


@pytest.mark.parametrize("world, limit, words", [
    (2, 5, "--micro-batch-size: CUDA out of memory at 16 images per forward/backward (--batch-size 16 per process); "
           "with several processes set it explicitly, e.g. --micro-batch-size 8"),
    (1, 0, "--image-size: CUDA out of memory with a micro-batch of 1 image"),
])
def test_out_of_memory_it_cannot_fix_is_one_clear_error(train_lib, world, limit, words):
    images, targets = _batch()
    with pytest.raises(train_lib.InputError) as err:
        _one_step(train_lib, OutOfMemoryAbove(_resnet().eval(), limit=limit), images, targets, micro=0, world=world)
    assert words in str(err.value)


# ----------------------------------------------------------------------------- hyperparameters

@pytest.mark.parametrize("flag, value, words", [
    ("--lr", "inf", "--lr: inf is out of range; valid: a finite number > 0"),
    ("--lr", "nan", "--lr: nan is out of range"),
    ("--lr", "0", "--lr: 0.0 is out of range"),
    ("--lr", "-0.1", "--lr: -0.1 is out of range"),
    ("--epochs", "0", "--epochs: 0 is out of range; valid: an integer >= 1"),
    ("--batch-size", "-8", "--batch-size: -8 is out of range"),
    ("--test-batch-size", "0", "--test-batch-size: 0 is out of range"),
    ("--micro-batch-size", "-1", "--micro-batch-size: -1 is out of range"),
    ("--momentum", "1.5", "--momentum: 1.5 is out of range"),
    ("--weight-decay", "inf", "--weight-decay: inf is out of range"),
    ("--label-smoothing", "1", "--label-smoothing: 1.0 is out of range"),
    ("--batch-size", "1e400", "--batch-size: '1e400' is not an integer; valid: a whole number"),
    ("--batch-size", "64.5", "--batch-size: '64.5' is not an integer"),
    ("--lr", "fast", "--lr: 'fast' is not a number"),
    ("--amp", "maybe", "--amp: invalid choice: 'maybe'"),
    ("--epochs", None, "--epochs: expected one argument"),
])
def test_a_hyperparameter_out_of_range_is_one_line_naming_it(train_lib, flag, value, words):
    argv = [flag] if value is None else [flag, value]
    with pytest.raises(train_lib.InputError) as err:
        train_lib.parse_args(argv)
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def test_train_model_flags_are_checked_too(train_lib):
    sys.path.insert(0, str(SCRIPTS))
    try:
        import train_model
    finally:
        sys.path.remove(str(SCRIPTS))
    with pytest.raises(train_lib.InputError, match="--profile-steps: 0 is out of range"):
        train_lib.parse_args(["--profile-steps", "0"], extend=train_model.add_flags)


@pytest.mark.parametrize("script", ["hpo.py", "train_model.py"])
@pytest.mark.slow
def test_a_bad_hyperparameter_exits_1_with_the_failure_file_not_argparse_2(script, dataset, tmp_path):
    args = {**HP, "lr": "1e400"}  # what a tuner or a typo can send: inf
    env = sagemaker_env(tmp_path, channels(dataset), args)
    proc = run_script(script, hyperparameter_args(args, quoted=True), env, check=False)
    assert proc.returncode == 1, proc.stdout[-3000:]
    line = one_error_line(proc)
    assert line == "error: --lr: inf is out of range; valid: a finite number > 0, e.g. 0.01"
    assert open(os.path.join(env["SM_OUTPUT_DIR"], "failure")).read() == line[len("error: "):]


# ----------------------------------------------------------------------------- divergence

@pytest.mark.slow
def test_a_diverging_run_fails_with_the_reason_and_writes_no_model(dataset, tmp_path):
    args = {**HP, "lr": 1e30, "epochs": 3}
    env = sagemaker_env(tmp_path, channels(dataset), args)
    proc = run_script("train_model.py", hyperparameter_args(args), env, check=False)
    assert proc.returncode == 1, proc.stdout[-3000:]
    line = one_error_line(proc)
    assert line.startswith("error: training diverged: the training loss of epoch 1 is nan"), line
    assert "no model written" in line and "--lr" in line
    failure = open(os.path.join(env["SM_OUTPUT_DIR"], "failure")).read()
    assert failure.startswith("training diverged:")
    assert not os.listdir(env["SM_MODEL_DIR"])  # no model.pth full of NaN
    assert "average validation loss" not in proc.stdout and "test accuracy" not in proc.stdout


def test_divergence_is_caught_within_a_few_steps_not_at_the_end_of_the_epoch(train_lib):
    torch.manual_seed(0)
    # two layers: the product of two updated weights overflows (one Linear's loss stays finite, only huge)
    model = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32 * 3, 16), nn.ReLU(), nn.Linear(16, 4))
    images, targets = _batch(n=8 * 60)
    batches = [(images[i:i + 8], targets[i:i + 8]) for i in range(0, len(targets), 8)]
    criterion = train_lib.SmoothedCrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e30)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    steps = []
    ctx = _ctx(train_lib, 0)
    ctx.callbacks = [type("Count", (train_lib.Callbacks,), {"on_step": lambda self: steps.append(1)})()]
    with pytest.raises(train_lib.TrainingDiverged, match="by step 20/60 of epoch 1"):
        train_lib.train_one_epoch(model, batches, criterion, optimizer, scheduler,
                                  torch.amp.GradScaler("cuda", enabled=False), ctx, 0, 1, 1e9)
    assert len(steps) == train_lib.DIVERGENCE_CHECK_STEPS


# ----------------------------------------------------------------------------- corrupt images

def test_unreadable_images_are_found_at_scan_time_skipped_within_the_bound(train_lib, tmp_path, capsys):
    root = generate_dataset(tmp_path / "d", num_classes=2, per_class=(10, 2, 2), size=16)
    bad_train = next((root / "train").glob("*/*.jpg"))
    bad_train.write_bytes(b"")  # zero bytes: a failed copy
    garbage = sorted((root / "test").glob("*/*.jpg"))[0]
    garbage.write_bytes(b"<html>403 Forbidden</html>")
    dirs = {s: root / s for s in ("train", "valid", "test")}
    with pytest.raises(train_lib.InputError) as err:
        train_lib.scan_dataset(dirs, max_bad_images=0.1)  # train: 1 of 20 is fine, test: 1 of 4 is not
    message = str(err.value)
    assert message.startswith(f"--test {root / 'test'}: 1 of 4 images cannot be read: "
                              f"{garbage.relative_to(root / 'test')} (UnidentifiedImageError")
    assert "--max-bad-images" in message and "\n" not in message
    garbage.unlink()
    classes, samples = train_lib.scan_dataset(dirs, max_bad_images=0.1)
    assert bad_train not in [p for p, _ in samples["train"]] and len(samples["train"]) == 19
    warning = capsys.readouterr().err
    assert f"skipping 1 of 20 images that cannot be read: {bad_train.relative_to(root / 'train')}" in warning
    with pytest.raises(train_lib.InputError, match="1 of 20 images cannot be read"):
        train_lib.scan_dataset(dirs)  # the default bound is 0: none of the scripts' callers skip silently


def test_an_image_that_fails_in_the_loader_is_one_line_naming_it(train_lib, tmp_path):
    """What the scan cannot see (a file replaced after it; pixel data PIL refuses even with
    truncated images tolerated) fails in a loader worker: one line naming the file."""
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing of a PNG")
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32)).save(good)
    data = train_lib.ImageList([(good, 0), (bad, 1)], train_lib.EvalCrop(32, 32))
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=1)  # raised in a worker process
    with pytest.raises(train_lib.InputError) as err:
        next(iter(loader))
    assert "Original Traceback" in str(err.value)  # how the DataLoader re-raises it
    line = train_lib.one_line(err.value)
    assert line.startswith(f"{bad}: image cannot be decoded (") and line.endswith("replace or delete it")
    assert "Traceback" not in line


@pytest.mark.slow
def test_a_corrupt_test_image_stops_the_job_before_training(dataset, tmp_path):
    root = tmp_path / "copy"
    import shutil
    shutil.copytree(dataset, root)
    bad = sorted((root / "test").glob("*/*.jpg"))[-1]
    bad.write_bytes(bad.read_bytes()[:100])  # cut inside the JPEG header
    env = sagemaker_env(tmp_path, channels(root), HP)
    proc = run_script("train_model.py", hyperparameter_args(HP), env, check=False)
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert line.startswith(f"error: --test {root / 'test'}: 1 of 8 images cannot be read: "
                           f"{bad.relative_to(root / 'test')}"), line
    assert "epoch 1/" not in proc.stdout  # found before training, not after it
    assert open(os.path.join(env["SM_OUTPUT_DIR"], "failure")).read() == line[len("error: "):]


# ----------------------------------------------------------------------------- checkpoints

IDENTITY = {"arch": "resnet18", "classes": ["a", "b"], "image_size": 32}


@pytest.mark.parametrize("content, reason", [
    (b"", "EOFError: an empty or truncated file (0 bytes)"),
    (b"PK\x03\x04 not really a zip", "RuntimeError"),
    ("tensor", "ValueError: holds a Tensor, not a checkpoint dict"),
    ("incomplete", "incomplete, no ["),
])
def test_an_unreadable_checkpoint_is_moved_aside_and_the_job_starts_fresh(train_lib, tmp_path, capsys,
                                                                         content, reason):
    path = tmp_path / "checkpoint.pt"
    if content == "tensor":
        torch.save(torch.zeros(2), path)
    elif content == "incomplete":
        torch.save({"identity": IDENTITY, "epoch": 3}, path)
    else:
        path.write_bytes(content)
    before = path.read_bytes()
    assert train_lib.load_checkpoint(path, IDENTITY, torch.device("cpu")) is None
    assert not path.exists() and (tmp_path / "checkpoint.pt.corrupt").read_bytes() == before
    warning = capsys.readouterr().err.strip()
    assert warning.startswith(f"warning: --checkpoint-dir {tmp_path}: checkpoint.pt cannot be loaded ({reason}")
    assert warning.endswith("moved to checkpoint.pt.corrupt, starting from epoch 1") and "\n" not in warning


def test_a_checkpoint_of_another_job_is_still_refused(train_lib, tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"identity": {**IDENTITY, "arch": "resnet50"}}, path)
    with pytest.raises(train_lib.InputError, match="belongs to another job"):
        train_lib.load_checkpoint(path, IDENTITY, torch.device("cpu"))
    assert path.exists()  # not ours to move


@pytest.mark.slow
def test_an_empty_checkpoint_on_restart_warns_and_trains_from_epoch_1(dataset, tmp_path):
    env = sagemaker_env(tmp_path, channels(dataset), HP)
    ckpt = os.path.join(env["SM_CHECKPOINT_DIR"], "checkpoint.pt")
    open(ckpt, "wb").close()  # a spot kill mid-upload
    proc = run_script("hpo.py", hyperparameter_args(HP), env)
    # one warning line naming the file, why and where it went; no traceback
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    warnings = [line for line in proc.stdout.splitlines() if "checkpoint.pt cannot be loaded" in line]
    assert len(warnings) == 1 and "checkpoint.pt.corrupt" in warnings[0], proc.stdout[-3000:]
    assert "checkpoint.pt cannot be loaded (EOFError: an empty or truncated file (0 bytes))" in proc.stdout
    assert "epoch 1/2 " in proc.stdout and "resuming" not in proc.stdout
    assert os.path.getsize(ckpt + ".corrupt") == 0
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    assert json.load(open(os.path.join(env["SM_OUTPUT_DATA_DIR"], "history.json")))[-1]["epoch"] == 2
