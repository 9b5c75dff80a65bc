"""The one training loop behind hpo.py and train_model.py.

Runs inside SageMaker's PyTorch training containers (torch 2.6+) and anywhere
else: every path has a CLI flag, with SageMaker's environment as the default.
Sections: arguments, model and optimiser, loop, main. The data pipeline lives in
data_pipeline.py, checkpoints and outputs in artifacts.py, the model dir in model_dir.py.
Imports nothing of the host (pipeline/, steps/): this folder ships on its own.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import artifacts
import metrics
import modeling
from artifacts import (
    CHECKPOINT_FILE,
    DEFAULT_CHECKPOINT_DIR,
    atomic_save,
    atomic_write_text,
    cpu_state,
    load_checkpoint,
    to_json,
    write_failure,
)

# The entry points, bench/ and tests/ also reach the data pipeline and the artifacts through
# this module (train_lib.load_image, ...), as before they had modules of their own.
from data_pipeline import (  # noqa: E402,F401
    SPLITS,
    EvalCrop,
    FeatureLoader,
    ImageList,
    TrainCrop,
    build_loaders,
    cache_features,
    cpus_per_process,
    data_dirs,
    decode_crop,
    default_num_workers,
    eval_dataset,
    extract_features,
    head_module,
    load_image,
    make_loader,
    resolve_num_workers,
    scan_dataset,
    scan_split,
    set_cpu_threads,
    train_dataset,
)
from ddp import Dist, all_reduce_sum, global_rank, log, setup_distributed
from model_dir import CODE_FILES, INFERENCE_REQUIREMENTS, model_meta, write_model_dir  # noqa: E402,F401
from train_errors import InputError, TrainingDiverged, one_line

# ----------------------------------------------------------------------------- arguments

def unquote(text: str) -> str:
    """`'"64"'` -> `'64'`: values read through pipeline step properties arrive JSON-encoded."""
    text = text.strip()
    while len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            decoded = json.loads(text)
        except ValueError:
            break
        text = str(decoded).strip()
    return text


def parse_bool(text: str) -> bool:
    value = unquote(str(text)).lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean (true/false)")


def _int(text: str) -> int:
    value = unquote(text)
    try:
        number = float(value)  # a tuner may send 64.0
    except ValueError:
        number = math.nan
    if not number.is_integer():
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer; valid: a whole number like 64")
    return int(number)


def _float(text: str) -> float:
    value = unquote(text)
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number; valid: e.g. 0.01 or 1e-3") from None


def _str(text: str) -> str:
    return unquote(text)


def _env(*names: str, default: str | None = None) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return default


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors raise InputError instead of printing usage and exiting 2: in a
    container a bad hyperparameter is a failed job (exit 1, one line, /opt/ml/output/failure)."""

    def error(self, message: str):
        # "argument --batch-size/--batch_size: 'x' is not ..." -> "--batch-size: 'x' is not ..."
        raise InputError(re.sub(r"^argument (--[\w-]+)(?:/--[\w-]+)*: ", r"\1: ", message))


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    # allow_abbrev=False: SageMaker appends its own --sagemaker_* flags, and a
    # prefix must never silently bind to one of ours.
    p = ArgumentParser(prog=prog, allow_abbrev=False, description=__doc__)

    def add(flag: str, **kw) -> None:
        names = [flag]
        if "-" in flag[2:]:  # accept --batch_size as well as --batch-size
            names.append("--" + flag[2:].replace("-", "_"))
        group.add_argument(*names, **kw)  # the group opened last, for --help

    group = p.add_argument_group("hyperparameters")
    add("--lr", type=_float, default=0.01, help="peak learning rate (SGD momentum 0.9)")
    add("--batch-size", type=_int, default=64,
        help="training batch size per process: the batch of one optimiser step, however it is split")
    add("--micro-batch-size", type=_int, default=0,
        help="images per forward/backward; gradients accumulate over batch-size/micro-batch-size of them. "
             "0 = the whole batch, halved on CUDA out-of-memory (single process)")
    add("--test-batch-size", type=_int, default=256, help="evaluation batch size per process")
    add("--epochs", type=_int, default=8)
    add("--arch", type=_str, default="resnet50", help="any torchvision classification model")
    add("--weights", type=_str, default="imagenet",
        help="imagenet | none | path to a state_dict (a relative path is also looked up in the channels)")
    add("--image-size", type=_int, default=224, help="crop size for training and evaluation")
    add("--resize-size", type=_int, default=None, help="eval resize (default: the weights' preset, scaled)")
    add("--freeze-epochs", type=_int, default=1, help="head-only warm-up epochs before unfreezing")
    add("--label-smoothing", type=_float, default=0.1)
    add("--lr-warmup-epochs", type=_float, default=1.0, help="linear warm-up after unfreezing")
    add("--min-lr-ratio", type=_float, default=0.01, help="cosine floor as a fraction of --lr")
    add("--weight-decay", type=_float, default=1e-4, help="on weights only, not on norms or biases")
    add("--momentum", type=_float, default=0.9)
    add("--patience", type=_int, default=3, help="early stopping on validation loss; 0 = off")
    add("--seed", type=_int, default=42)
    add("--num-workers", type=_int, default=None,
        help="DataLoader workers per process (default: from the CPU count; fewer when training on the CPU)")
    add("--threads", type=_int, default=None,
        help="CPU training: torch threads (default: the cores the workers leave, unless OMP_NUM_THREADS is set)")
    add("--prefetch-factor", type=_int, default=4, help="batches each worker prepares ahead")
    add("--compile", type=parse_bool, default=False, help="torch.compile the model (pays off on long GPU runs)")
    add("--cache-features", type=parse_bool, default=False,
        help="head-only epochs train the head on backbone features computed once, from un-augmented "
             "(eval-transformed) training images; single process only")
    add("--amp", type=_str, default="auto", choices=("auto", "true", "false", "bf16", "fp16"),
        help="mixed precision, CUDA only. auto/true: bf16 on compute capability >= 8.0 (A10G, A100, H100), "
             "else fp16 with a GradScaler (T4, V100)")
    add("--channels-last", type=_str, default="auto", choices=("auto", "true", "false"),
        help="channels_last memory format (auto: on CUDA and CPU)")
    add("--max-steps-per-epoch", type=_int, default=0, help="cap training steps per epoch; 0 = all")
    add("--log-interval", type=_float, default=60.0, help="seconds between progress lines within an epoch")
    add("--max-bad-images", type=_float, default=0.01,
        help="unreadable images skipped (with a warning naming them) per split, as a fraction of the split; "
             "more fail the job before training")

    group = p.add_argument_group("paths (default: SageMaker's environment)")
    add("--data-dir", type=_str, default=_env("SM_CHANNEL_TRAINING"), help="holds train/ valid/ test/")
    add("--train", type=_str, default=_env("SM_CHANNEL_TRAIN"))
    add("--valid", type=_str, default=_env("SM_CHANNEL_VALID", "SM_CHANNEL_VALIDATION"))
    add("--test", type=_str, default=_env("SM_CHANNEL_TEST"))
    add("--model-dir", type=_str, default=_env("SM_MODEL_DIR", default="model"))
    add("--output-data-dir", type=_str, default=_env("SM_OUTPUT_DATA_DIR", default="output"))
    add("--checkpoint-dir", type=_str, default=_env("SM_CHECKPOINT_DIR", default=DEFAULT_CHECKPOINT_DIR),
        help="per-epoch checkpoint; a restarted job resumes from it (spot)")
    return p


def parse_args(argv: list[str] | None = None, prog: str | None = None,
               extend=None) -> argparse.Namespace:
    """Known flags decoded; unknown ones (SageMaker's own sagemaker_* ...) logged and ignored.

    extend: a function adding an entry point's own flags to the parser.
    """
    parser = build_parser(prog)
    if extend:
        extend(parser)
    args, unknown = parser.parse_known_args(argv)
    names = [u.split("=", 1)[0] for u in unknown if u.startswith("--")]
    ours = [n for n in names if not n.startswith("--sagemaker_")]
    if names and global_rank() == 0:
        print(f"ignoring arguments this script does not use: {' '.join(names)}", flush=True)
        if ours:
            print(f"warning: {' '.join(ours)} not a known flag (typo?); see --help", file=sys.stderr, flush=True)
    check_hyperparameters(args)
    return args


def _positive(v) -> bool:
    return math.isfinite(v) and v > 0


def _non_negative(v) -> bool:
    return math.isfinite(v) and v >= 0


# (flag, test, what is valid): a value outside its range is refused before any work starts.
# NaN fails every test (all comparisons with NaN are False).
HYPERPARAMETER_RANGES = (
    ("lr", _positive, "a finite number > 0, e.g. 0.01"),
    ("epochs", lambda v: v >= 1, "an integer >= 1"),
    ("batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("test_batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("micro_batch_size", lambda v: v >= 0, "0 (the whole batch, halved on CUDA out-of-memory) or an integer >= 1"),
    ("image_size", lambda v: v >= 1, "an integer >= 1, e.g. 224"),
    ("resize_size", lambda v: v is None or v >= 1, "an integer >= 1, or unset"),
    ("freeze_epochs", lambda v: v >= 0, "an integer >= 0"),
    ("label_smoothing", lambda v: 0 <= v < 1, "a number in [0, 1), e.g. 0.1"),
    ("lr_warmup_epochs", _non_negative, "a finite number >= 0"),
    ("min_lr_ratio", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    ("weight_decay", _non_negative, "a finite number >= 0, e.g. 1e-4"),
    ("momentum", lambda v: 0 <= v < 1, "a number in [0, 1), e.g. 0.9"),
    ("patience", lambda v: v >= 0, "an integer >= 0 (0 = no early stopping)"),
    ("num_workers", lambda v: v is None or v >= 0, "an integer >= 0"),
    ("threads", lambda v: v is None or v >= 1, "an integer >= 1"),
    ("prefetch_factor", lambda v: v >= 1, "an integer >= 1"),
    ("max_steps_per_epoch", lambda v: v >= 0, "an integer >= 0 (0 = all)"),
    ("log_interval", _non_negative, "a finite number of seconds >= 0"),
    ("max_bad_images", lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    # train_model.py's own flags
    ("profile_skip_steps", lambda v: v >= 0, "an integer >= 0"),
    ("profile_steps", lambda v: v >= 1, "an integer >= 1"),
    ("debug_save_interval", lambda v: v >= 1, "an integer >= 1"),
)


def check_hyperparameters(args: argparse.Namespace) -> None:
    """One line naming the first hyperparameter out of range (InputError)."""
    for name, ok, valid in HYPERPARAMETER_RANGES:
        if hasattr(args, name) and not ok(getattr(args, name)):
            raise InputError(f"--{name.replace('_', '-')}: {getattr(args, name)!r} is out of range; valid: {valid}")


# ----------------------------------------------------------------------------- model, optimiser

def resolve_weights_path(weights: str, args: argparse.Namespace) -> str:
    """`imagenet`/`none` as given; a file path as is, or relative to any channel."""
    if weights in ("imagenet", "none"):
        return weights
    path = Path(weights)
    if path.is_file():
        return str(path)
    roots = [getattr(args, s) for s in ("data_dir", *SPLITS)]
    roots += [v for k, v in sorted(os.environ.items()) if k.startswith("SM_CHANNEL_")]
    tried = [str(path)]
    if not path.is_absolute():
        for root in dict.fromkeys(r for r in roots if r):
            candidate = Path(root) / path
            tried.append(str(candidate))
            if candidate.is_file():
                return str(candidate)
    raise InputError(f"--weights {weights!r}: not 'imagenet', 'none' or an existing file (looked at {tried})")


def build_model(arch: str, num_classes: int, weights: str) -> nn.Module:
    try:
        return modeling.build_model(arch, num_classes, weights)
    except (ValueError, FileNotFoundError) as err:
        raise InputError(str(err)) from err
    except OSError as err:  # URLError: no internet for the imagenet download
        raise InputError(f"--weights {weights!r} for --arch {arch!r}: could not fetch the weights ({err}); "
                         f"without internet pass --weights PATH to a state_dict in a channel") from err


def set_trainable(model: nn.Module, head_only: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(not head_only)
    for p in modeling.head_parameters(model):
        p.requires_grad_(True)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    # Decay only matrices/kernels: decaying norm scales and biases hurts fine-tuning.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)


def lr_factor(step: int, steps_per_epoch: int, epochs: int, freeze_epochs: int,
              warmup_epochs: float, min_ratio: float) -> float:
    """Constant during the head-only epochs (a fresh head takes the full rate), then
    linear warm-up from unfreezing and cosine decay to min_ratio at the last step."""
    head_steps = min(freeze_epochs, epochs) * steps_per_epoch
    if step < head_steps:
        return 1.0
    step -= head_steps
    total = max(1, (epochs - min(freeze_epochs, epochs)) * steps_per_epoch)
    warmup = int(warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))  # the last step at the floor
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class SmoothedCrossEntropyLoss(nn.CrossEntropyLoss):
    """Label smoothing while training only, so validation/test losses are plain
    cross-entropy. One module for both modes: the Debugger hook records its output
    as the same tensor in TRAIN and EVAL (smdebug's `losses` collection matches
    "Loss" in the class name, so keep it)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing if self.training else 0.0)


# bf16 tensor cores (and cuDNN's bf16 convolutions) arrived with Ampere, compute capability 8.0.
# Below it torch.cuda.is_bf16_supported() can still say True (emulated): a T4 (7.5) then runs
# its convolutions outside cuDNN's fast kernels, several times slower than fp16.
NATIVE_BF16_CAPABILITY = (8, 0)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """auto/true: bf16 where the GPU does it natively, else fp16 (with a GradScaler);
    bf16/fp16: as asked; None = full precision."""
    if device.type != "cuda":
        if amp not in ("auto", "false"):
            print(f"warning: --amp {amp} ignored: mixed precision only on CUDA", file=sys.stderr, flush=True)
        return None
    if amp == "false":
        return None
    if amp in ("bf16", "fp16"):
        return torch.bfloat16 if amp == "bf16" else torch.float16
    native_bf16 = tuple(torch.cuda.get_device_capability(device)) >= NATIVE_BF16_CAPABILITY
    return torch.bfloat16 if native_bf16 else torch.float16


def make_context(args: argparse.Namespace, device: torch.device, d: Dist, callbacks: list) -> Context:
    # auto: on for CUDA (tensor cores want NHWC) and CPU (oneDNN: 1.3x resnet18, 2x mobilenet_v3_small here)
    channels_last = args.channels_last == "true" or (args.channels_last == "auto" and device.type in ("cuda", "cpu"))
    dtype = amp_dtype(args.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop size: pick the fastest conv kernels once
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
        log(f"amp: {str(dtype).replace('torch.', '') if dtype else 'off'}"
            + (" with GradScaler" if dtype == torch.float16 else "")
            + f" (--amp {args.amp}, {torch.cuda.get_device_name(device)}, compute capability {capability})", d.rank)
    return Context(device=device, dtype=dtype, channels_last=channels_last, d=d, callbacks=callbacks,
                   micro_batch=args.micro_batch_size)


def compile_model(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """torch.compile when asked: the first steps pay for compilation (and again when
    the trainable set or train/eval mode changes), later steps run fused kernels."""
    return torch.compile(model) if args.compile else model


# ----------------------------------------------------------------------------- loop

class Callbacks:
    """What an entry point may hook into (train_model.py: Debugger, profiler). No-ops here."""

    def on_model(self, model: nn.Module, criterion: nn.Module) -> None: ...
    def on_mode(self, mode: str) -> None: ...   # "train" | "eval"
    def on_step(self) -> None: ...               # after each optimiser step
    def close(self) -> None: ...


@dataclass
class Context:
    """What one step needs besides the batch."""
    device: torch.device
    dtype: torch.dtype | None
    channels_last: bool
    d: Dist
    callbacks: list
    # images per forward/backward; 0 = the whole batch. Halved on CUDA out-of-memory (train_step).
    micro_batch: int = 0

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    mean: torch.Tensor = field(init=False)
    std: torch.Tensor = field(init=False)

    def __post_init__(self):
        # of uint8 pixel values: (x - 255 mean) / (255 std) == Normalize(ToTensor(x))
        self.mean = torch.tensor(modeling.IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(modeling.IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255

    def to_device(self, images: torch.Tensor, targets: torch.Tensor):
        """uint8 NHWC batch -> normalised float NCHW on the device: a quarter of the bytes to
        copy, one batched op instead of a Normalize per image, and NHWC is channels_last already."""
        targets = targets.to(self.device, non_blocking=True)
        if images.dtype != torch.uint8:  # already normalised: float NCHW images, or cached features
            images = images.to(self.device, non_blocking=True)
            if images.ndim == 4 and self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            return images, targets
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = x.sub_(self.mean).div_(self.std)
        return (x if self.channels_last else x.contiguous()), targets


def train_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, criterion: nn.Module,
               optimizer: torch.optim.Optimizer, scheduler, scaler, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on a batch from the loader; (loss, correct) stay on the device.

    The batch is the step's batch however it is computed: with ctx.micro_batch set, gradients
    accumulate over micro-batches (see accumulate_gradients). A CUDA out-of-memory error halves
    the micro-batch and redoes the step, in a single process; with DDP the ranks cannot agree
    on a retry mid-step, so it fails and names --micro-batch-size."""
    images, targets = ctx.to_device(images, targets)
    while True:
        micro = min(ctx.micro_batch or len(targets), len(targets))
        try:
            loss, correct = accumulate_gradients(model, images, targets, criterion, optimizer, scaler, ctx, micro)
            break
        except torch.cuda.OutOfMemoryError:
            pass  # handled below, outside the except block: its traceback holds the step's tensors
        except ValueError as err:
            if "Expected more than 1 value per channel" not in str(err):
                raise
            smallest = len(targets) // micro_chunks(len(targets), micro)
            raise InputError(f"--batch-size: BatchNorm cannot train on a forward of {smallest} image(s) at this "
                             f"--image-size (one value per channel); valid: --batch-size and --micro-batch-size "
                             f"of 2 or more, or a larger --image-size") from None
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        shrink_micro_batch(ctx, micro, len(targets))
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss, correct


def accumulate_gradients(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, criterion: nn.Module,
                         optimizer: torch.optim.Optimizer, scaler, ctx: Context, micro: int):
    """Forward/backward over micro-batches of `micro` images: each loss scaled by its share of
    the batch, so the summed gradient is the batch mean's, the same update as one pass over the
    whole batch (up to rounding), and the learning rate means what it means without them.
    BatchNorm is the exception: it normalises with each micro-batch's own statistics.
    DDP: gradients are all-reduced once, on the last micro-batch (no_sync on the others)."""
    n = len(targets)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    no_sync = getattr(model, "no_sync", None)  # DDP (also under torch.compile)
    chunks = micro_chunks(n, micro)
    for i, (x, y) in enumerate(zip(images.tensor_split(chunks), targets.tensor_split(chunks))):
        last = i == chunks - 1
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            with ctx.autocast():
                logits = model(x)
                loss = criterion(logits, y) * (len(y) / n)
            scaler.scale(loss).backward()
        loss_sum += loss.detach().float()
        correct += (logits.argmax(1) == y).sum()
    return loss_sum, correct


def micro_chunks(n: int, micro: int) -> int:
    """How many micro-batches of at most `micro` images a batch of n takes. They are split
    evenly (9 by 4: 3+3+3, not 4+4+1): no tiny remainder for BatchNorm's statistics."""
    return math.ceil(n / micro)


def shrink_micro_batch(ctx: Context, micro: int, batch: int) -> None:
    """After a CUDA out-of-memory error at `micro` images per forward: halve, or say why not."""
    if ctx.d.enabled:
        raise InputError(f"--micro-batch-size: CUDA out of memory at {micro} images per forward/backward "
                         f"(--batch-size {batch} per process); with several processes set it explicitly, "
                         f"e.g. --micro-batch-size {max(1, micro // 2)}")
    if micro <= 1:
        raise InputError("--image-size: CUDA out of memory with a micro-batch of 1 image; the model does not "
                         "fit this GPU: use a smaller --image-size or --arch, or a GPU with more memory")
    ctx.micro_batch = micro // 2
    log(f"CUDA out of memory at {micro} images per forward/backward: accumulating gradients over micro-batches "
        f"of {ctx.micro_batch} (the batch stays {batch}; pass --micro-batch-size {ctx.micro_batch} to start there)",
        ctx.d.rank)


# Steps between checks that the loss is still finite: one device sync each, and a diverged run
# is stopped within this many steps instead of training on NaN to the end of the epoch.
DIVERGENCE_CHECK_STEPS = 20


def diverged(what: str, lr: float) -> TrainingDiverged:
    return TrainingDiverged(f"training diverged: {what} (learning rate {lr:.3g}); no model written; "
                            f"valid: a lower --lr (or tuning range), or check the data")


def train_one_epoch(model: nn.Module, loader: DataLoader, criterion: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, scaler, ctx: Context,
                    max_steps: int, epoch: int, log_interval: float) -> dict:
    """Sums stay on the device (no .item() per step); one sync at the end."""
    sums = torch.zeros(2, device=ctx.device, dtype=torch.float64)  # loss*n, correct
    seen = 0  # a host int: building a tensor from it each step would sync CUDA
    steps = len(loader) if not max_steps else min(max_steps, len(loader))
    data_wait, lr = 0.0, optimizer.param_groups[0]["lr"]
    start = last_log = time.perf_counter()
    batches = iter(loader)
    for step in range(steps):
        t0 = time.perf_counter()
        images, targets = next(batches)
        data_wait += time.perf_counter() - t0
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses, for the epoch line
        loss, correct = train_step(model, images, targets, criterion, optimizer, scheduler, scaler, ctx)
        n = targets.size(0)
        seen += n
        sums += torch.stack([loss.double() * n, correct.double()])
        for cb in ctx.callbacks:
            cb.on_step()
        if (step + 1) % DIVERGENCE_CHECK_STEPS == 0 and not torch.isfinite(sums[0]):
            raise diverged(f"the training loss became {sums[0].item()} by step {step + 1}/{steps} of epoch {epoch}",
                           lr)
        now = time.perf_counter()
        if now - last_log >= log_interval:
            last_log = now
            log(f"epoch {epoch}: step {step + 1}/{steps} {(step + 1) / (now - start):.2f} steps/s", ctx.d.rank)
    seconds = time.perf_counter() - start
    totals = torch.cat([sums, torch.tensor([float(seen)], dtype=torch.float64).to(ctx.device)])
    loss_sum, correct, seen = all_reduce_sum(totals, ctx.d).tolist()
    if not math.isfinite(loss_sum):
        raise diverged(f"the training loss of epoch {epoch} is {loss_sum}", lr)
    seen = max(seen, 1.0)
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen, "steps": steps, "lr": lr,
            "images_per_s": seen / max(seconds, 1e-9), "data_wait_s": data_wait}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, criterion: nn.Module, num_classes: int,
             ctx: Context) -> dict:
    """Plain cross-entropy, top-1/top-5 accuracy and per-class accuracy over the
    whole split (every rank a shard, summed)."""
    k = min(5, num_classes)
    sums = torch.zeros(3, device=ctx.device, dtype=torch.float64)  # loss*n, top1, topk
    seen = 0
    per_class = torch.zeros(2, num_classes, device=ctx.device, dtype=torch.float64)  # correct, total
    for images, targets in loader:
        images, targets = ctx.to_device(images, targets)
        with ctx.autocast():
            logits = model(images)
            loss = criterion(logits, targets)
        top = logits.float().topk(k, dim=1).indices
        hit1 = top[:, 0] == targets
        hitk = (top == targets[:, None]).any(dim=1)
        n = targets.size(0)
        seen += n
        sums += torch.stack([loss.double() * n, hit1.sum().double(), hitk.sum().double()])
        # index_add_, not boolean indexing: no device sync per batch
        per_class[0].index_add_(0, targets, hit1.double())
        per_class[1].index_add_(0, targets, torch.ones_like(targets, dtype=torch.float64))
    totals = torch.cat([sums, torch.tensor([float(seen)], dtype=torch.float64).to(ctx.device)])
    all_reduce_sum(totals, ctx.d)
    all_reduce_sum(per_class, ctx.d)
    loss_sum, top1, topk, seen = totals.tolist()
    correct, total = per_class.tolist()
    seen = max(seen, 1.0)
    return {"loss": loss_sum / seen, "accuracy": top1 / seen, "top5_accuracy": topk / seen, "count": int(seen),
            "per_class": [c / t if t else None for c, t in zip(correct, total)]}


# ----------------------------------------------------------------------------- main

def run(args: argparse.Namespace, callbacks: list[Callbacks] = (), require_test: bool = True) -> dict:
    """Train, keep the best-by-validation weights, evaluate once on test, write outputs.
    Returns evaluation.json's content."""
    callbacks = list(callbacks)
    d, device = setup_distributed()
    try:
        return _run(args, callbacks, d, device, require_test)
    finally:
        for cb in callbacks:
            cb.close()
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _run(args, callbacks, d: Dist, device: torch.device, require_test: bool) -> dict:
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    classes, samples = scan_data(args, require_test, d, device)
    weights = resolve_weights_path(args.weights, args)
    model = build_model_once_per_host(args.arch, len(classes), weights, d)
    resize, crop = modeling.eval_geometry(args.arch, weights, args.image_size, args.resize_size)
    ctx = make_context(args, device, d, callbacks)
    model = model.to(device, memory_format=torch.channels_last if ctx.channels_last else torch.contiguous_format)
    loaders = build_loaders(samples, crop, resize, args, device, d)
    opt = make_optimisation(model, args, len(loaders["train"]), ctx)
    for cb in callbacks:
        cb.on_model(model, opt.criterion)
    identity = {"arch": args.arch, "classes": classes, "image_size": crop}
    ckpt_path = Path(args.checkpoint_dir) / CHECKPOINT_FILE
    state = resume(ckpt_path, identity, model, opt, device, d)

    phase, wrapped = None, model
    features = None  # {"train", "valid"}: FeatureLoaders for the head-only epochs (--cache-features)
    if args.cache_features and d.enabled:
        log("--cache-features: not with several processes; head-only epochs run the full model", d.rank)
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        if state["stopped"]:
            break
        if epoch_phase(epoch, args) != phase:
            phase = epoch_phase(epoch, args)
            wrapped = wrap_for_phase(model, phase, args, d, device)
        start = time.perf_counter()
        # head-only: frozen BatchNorm statistics too (train mode would still update them)
        wrapped.train(phase == "full")
        net, eval_net, train_batches, valid_batches = wrapped, model, loaders["train"], loaders["valid"]
        if phase == "head" and args.cache_features and not d.enabled:
            if features is None:
                features = cache_features(model, samples, crop, resize, args, ctx, loaders["valid"], d)
            net = eval_net = head_module(model)
            train_batches, valid_batches = features["train"], features["valid"]
        train_batches.sampler.set_epoch(epoch)
        set_mode("train", opt.criterion, callbacks)
        train = train_one_epoch(net, train_batches, opt.criterion, opt.optimizer, opt.scheduler, opt.scaler, ctx,
                                args.max_steps_per_epoch, epoch, args.log_interval)
        # evaluate the bare module: DDP's forward would sync buffers across ranks
        # whose shards may differ by a batch
        model.eval()
        set_mode("eval", opt.criterion, callbacks)
        valid = evaluate(eval_net, valid_batches, opt.criterion, len(classes), ctx)
        seconds = time.perf_counter() - start
        if not math.isfinite(valid["loss"]):  # before the checkpoint: a restart resumes the last finite epoch
            raise diverged(f"the validation loss of epoch {epoch} is {valid['loss']}", train["lr"])
        improved = record_epoch(state, epoch, phase, train, valid, seconds, model, args.patience)
        if d.rank == 0:
            atomic_save(checkpoint(state, identity, model, opt, device), ckpt_path)
        log_epoch(state, args, improved, d)

    evaluation = evaluate_kept(model, state, loaders, opt.criterion, callbacks, classes, args.arch, ctx, d)
    if d.rank == 0:
        write_outputs(args, cpu_state(model), model_meta(args.arch, classes, crop, resize), evaluation,
                      state, d)
    return evaluation


# The steps of _run, in its order.

def scan_data(args, require_test: bool, d: Dist, device: torch.device):
    """Classes and samples of every split given, every image header checked (data_pipeline.scan_dataset)."""
    scan_start = time.perf_counter()
    classes, samples = scan_dataset(data_dirs(args, require_test), args.max_bad_images)
    log(f"data: {len(classes)} classes, " + ", ".join(f"{s}={len(v)}" for s, v in samples.items())
        + f" (headers checked in {time.perf_counter() - scan_start:.1f}s); device={device} world={d.world}", d.rank)
    return classes, samples


def build_model_once_per_host(arch: str, num_classes: int, weights: str, d: Dist) -> nn.Module:
    """Local rank 0 first, so one process per host downloads pretrained weights into its cache."""
    if d.enabled and d.local_rank != 0:
        dist.barrier()
    model = build_model(arch, num_classes, weights)
    if d.enabled and d.local_rank == 0:
        dist.barrier()
    return model


@dataclass
class Optimisation:
    """What updates the weights: loss, optimiser, learning-rate schedule, fp16 loss scaler."""
    criterion: SmoothedCrossEntropyLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler


def make_optimisation(model: nn.Module, args, train_batches: int, ctx: Context) -> Optimisation:
    steps_per_epoch = min(train_batches, args.max_steps_per_epoch) if args.max_steps_per_epoch else train_batches
    optimizer = make_optimizer(model, args.lr, args.weight_decay, args.momentum)
    return Optimisation(
        criterion=SmoothedCrossEntropyLoss(label_smoothing=args.label_smoothing),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
            step, steps_per_epoch, args.epochs, args.freeze_epochs, args.lr_warmup_epochs, args.min_lr_ratio)),
        scaler=torch.amp.GradScaler("cuda", enabled=ctx.dtype == torch.float16))


def resume(ckpt_path: Path, identity: dict, model: nn.Module, opt: Optimisation, device: torch.device,
           d: Dist) -> dict:
    """The run's state: fresh, or restored (with the model and optimiser) from this job's checkpoint."""
    state = {"epoch": 0, "best_loss": math.inf, "best_epoch": None, "bad_epochs": 0, "stopped": False,
             "history": [], "best_state": None}
    ckpt = load_checkpoint(ckpt_path, identity, device, move_aside=d.local_rank == 0)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.optimizer.load_state_dict(ckpt["optimizer"])
        opt.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:  # empty when saved without fp16
            opt.scaler.load_state_dict(ckpt["scaler"])
        artifacts.set_rng_state(ckpt["rng"], device)
        state.update({k: ckpt[k] for k in state})
        log(f"resuming from {ckpt_path} after epoch {state['epoch']} "
            f"(best validation loss {state['best_loss']:.4g} at epoch {state['best_epoch']})", d.rank)
    if d.enabled:  # every rank must resume from the same epoch, or DDP would hang
        epochs_seen = torch.tensor([state["epoch"]], device=device)
        dist.broadcast(epochs_seen, src=0)
        if int(epochs_seen) != state["epoch"]:
            raise RuntimeError(f"rank {d.rank} found checkpoint epoch {state['epoch']}, rank 0 {int(epochs_seen)}: "
                               f"all ranks need the same --checkpoint-dir content")
    return state


def epoch_phase(epoch: int, args) -> str:
    return "head" if epoch <= args.freeze_epochs else "full"


def wrap_for_phase(model: nn.Module, phase: str, args, d: Dist, device: torch.device) -> nn.Module:
    """(Un)freeze the backbone for the phase and wrap the model to train it: DDP tracks the
    parameters that require grad when wrapped, so it is re-wrapped on (un)freezing."""
    set_trainable(model, head_only=phase == "head")
    wrapped = model
    if d.enabled:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return compile_model(wrapped, args)


def set_mode(mode: str, criterion: nn.Module, callbacks: list[Callbacks]) -> None:
    """The loss (label smoothing on or off) and the hooks follow train/eval."""
    criterion.train(mode == "train")
    for cb in callbacks:
        cb.on_mode(mode)


def record_epoch(state: dict, epoch: int, phase: str, train: dict, valid: dict, seconds: float,
                 model: nn.Module, patience: int) -> bool:
    """The epoch's row in the history, the best weights so far, early stopping; True if it improved."""
    improved = valid["loss"] < state["best_loss"]  # NaN never improves
    if improved:
        state.update(best_loss=valid["loss"], best_epoch=epoch, bad_epochs=0, best_state=cpu_state(model))
    else:
        state["bad_epochs"] += 1
    state["stopped"] = bool(patience) and state["bad_epochs"] >= patience
    state["history"].append({
        "epoch": epoch, "phase": phase, "train_loss": train["train_loss"], "train_acc": train["train_acc"],
        "valid_loss": valid["loss"], "valid_acc": valid["accuracy"], "valid_top5_acc": valid["top5_accuracy"],
        "lr": train["lr"], "seconds": seconds, "images_per_s": train["images_per_s"],
        "data_wait_s": train["data_wait_s"]})
    state["epoch"] = epoch
    return improved


def checkpoint(state: dict, identity: dict, model: nn.Module, opt: Optimisation, device: torch.device) -> dict:
    """Everything a restarted job needs to go on after this epoch (artifacts.CHECKPOINT_KEYS)."""
    return {**state, "identity": identity, "model": model.state_dict(), "optimizer": opt.optimizer.state_dict(),
            "scheduler": opt.scheduler.state_dict(), "scaler": opt.scaler.state_dict(),
            "rng": artifacts.rng_state(device)}


def kept_row(state: dict) -> dict:
    """The history row of the weights kept (best by validation loss), else the last one."""
    return next((h for h in state["history"] if h["epoch"] == state["best_epoch"]), state["history"][-1])


def log_epoch(state: dict, args, improved: bool, d: Dist) -> None:
    row = state["history"][-1]
    log(metrics.format_epoch(row["epoch"], args.epochs, row["seconds"], train_loss=row["train_loss"],
                             train_acc=row["train_acc"], valid_loss=row["valid_loss"],
                             valid_acc=row["valid_acc"], lr=row["lr"]), d.rank)
    # the objective after every epoch (SageMaker's early stopping reads it per epoch): the
    # kept weights' values, so whenever the job ends the last line printed is theirs
    kept = kept_row(state)
    for line in metrics.format_kept(kept["valid_loss"], kept["valid_acc"]):
        log(line, d.rank)
    log(f"epoch {row['epoch']}: phase={row['phase']} {row['images_per_s']:.1f} img/s, "
        f"data wait {row['data_wait_s']:.1f}s of {row['seconds']:.1f}s"
        + (" *best*" if improved else "")
        + (f"; early stop: no improvement in {args.patience} epochs" if state["stopped"] else ""), d.rank)


def evaluate_kept(model: nn.Module, state: dict, loaders: dict, criterion: nn.Module, callbacks: list,
                  classes: list[str], arch: str, ctx: Context, d: Dist) -> dict:
    """Load the kept weights (the last ones if none was finite), evaluate them once on test,
    print the summary metric lines; evaluation.json's content."""
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    best = kept_row(state)
    model.eval()
    set_mode("eval", criterion, callbacks)
    if "test" in loaders:
        test = evaluate(model, loaders["test"], criterion, len(classes), ctx)
    else:
        test = {"loss": None, "accuracy": None, "top5_accuracy": None, "count": 0, "per_class": []}
        log("no test split given: test metrics not reported (tuning trials never see the test channel)", d.rank)

    labels = [modeling.breed_label(c) for c in classes]
    evaluation = {
        "test_loss": test["loss"], "test_accuracy": test["accuracy"], "test_top5_accuracy": test["top5_accuracy"],
        "valid_loss": best["valid_loss"], "valid_accuracy": best["valid_acc"],
        "per_class_accuracy": dict(zip(labels, test["per_class"])),
        "num_test_images": test["count"], "classes": classes,
        "best_epoch": state["best_epoch"], "epochs_run": state["epoch"], "arch": arch,
    }
    for line in metrics.format_kept(best["valid_loss"], best["valid_acc"]):
        log(line, d.rank)
    for name, value in (("average test loss", test["loss"]),
                        ("test accuracy", test["accuracy"]),
                        ("test top5 accuracy", test["top5_accuracy"])):
        if value is not None:
            log(metrics.format_summary(name, value), d.rank)
    return evaluation


def write_outputs(args, weights: dict, meta: dict, evaluation: dict, state: dict, d: Dist) -> None:
    """The model dir, and evaluation/history/loss curve in the output data dir."""
    write_model_dir(Path(args.model_dir), weights, meta, evaluation)
    out = Path(args.output_data_dir)
    atomic_write_text(out / "evaluation.json", to_json(evaluation))
    atomic_write_text(out / "history.json", to_json(state["history"]))
    artifacts.plot_history(state["history"], out / "loss_curve.png", state["best_epoch"])
    log(f"wrote model to {args.model_dir}, evaluation/history/loss curve to {out}", d.rank)


def main(argv: list[str] | None = None, prog: str | None = None, extend=None, make_callbacks=None,
         require_test: bool = True) -> int:
    """Entry point body: parse, run, turn bad input into one clear line and exit 1.

    extend(parser) adds flags; make_callbacks(args) -> list of Callbacks."""
    try:
        args = parse_args(argv, prog, extend)
        callbacks = make_callbacks(args) if make_callbacks else []
        run(args, callbacks, require_test)
    except InputError as err:
        message = one_line(err)
        print(f"error: {message}", file=sys.stderr, flush=True)
        write_failure(message)
        return 1
    except BaseException as err:
        write_failure(f"{type(err).__name__}: {err}")
        raise
    return 0
