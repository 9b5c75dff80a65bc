"""The one training loop behind hpo.py and train_model.py.

Runs inside SageMaker's PyTorch training containers (torch 2.6+) and anywhere
else: every path has a CLI flag, with SageMaker's environment as the default.
Sections: arguments, data, model and optimiser, loop, checkpoints, outputs, main.
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
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageFile
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms

import metrics
import modeling

SCRIPTS_DIR = Path(__file__).resolve().parent
SPLITS = ("train", "valid", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CHECKPOINT_FILE = "checkpoint.pt"
# SageMaker syncs /opt/ml/checkpoints with checkpoint_s3_uri; outside a container, ./checkpoints
DEFAULT_CHECKPOINT_DIR = "/opt/ml/checkpoints" if Path("/opt/ml").is_dir() else "checkpoints"
# Files that make the model dir a deployable model.tar.gz (SAGEMAKER_PROGRAM=inference.py).
CODE_FILES = ("inference.py", "modeling.py")
INFERENCE_REQUIREMENTS = "requirements-inference.txt"


class InputError(ValueError):
    """Bad input from the user (flag, channel, data): printed without a traceback."""


class TrainingDiverged(InputError):
    """The loss became non-finite: the run is refused (exit 1) and writes no model."""


def log(message: str, rank: int = 0) -> None:
    if rank == 0:
        print(message, flush=True)


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
    if names and _rank() == 0:
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


# ----------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def setup_distributed() -> tuple[Dist, torch.device]:
    """torchrun / SageMaker torch_distributed set WORLD_SIZE, RANK, LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=_rank(), local_rank=local_rank, world=world), device


def all_reduce_sum(tensor: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# ----------------------------------------------------------------------------- data

def _split_dir(root: Path, split: str) -> Path | None:
    """root/split, or root/<one folder>/split (a zip extracted with its top folder)."""
    if (root / split).is_dir():
        return root / split
    nested = sorted(root.glob(f"*/{split}"))
    return nested[0] if len(nested) == 1 and nested[0].is_dir() else None


def data_dirs(args: argparse.Namespace, require_test: bool = True) -> dict[str, Path]:
    """Where each split lives: its own channel, else inside --data-dir / SM_CHANNEL_TRAINING.

    require_test=False (tuning trials): no test split given is fine; the pipeline keeps
    the test channel from the tuner so the search never sees it."""
    dirs = {}
    for split in SPLITS:
        optional = split == "test" and not require_test
        explicit = getattr(args, split)
        env = f"SM_CHANNEL_{split.upper()}"
        if explicit:
            path = Path(explicit)
            if not path.is_dir():
                raise InputError(f"--{split} {path}: no such directory (channel {split!r}, env {env})")
            # a channel holding the whole dataset is accepted too
            path = _split_dir(path, split) or path
        elif args.data_dir:
            root = Path(args.data_dir)
            if not root.is_dir():
                raise InputError(f"--data-dir {root}: no such directory (channel 'training', env SM_CHANNEL_TRAINING)")
            path = _split_dir(root, split)
            if path is None and optional:
                continue
            if path is None:
                raise InputError(f"--data-dir {root}: has no {split}/ folder; expected train/ valid/ test/ "
                                 f"with one folder per class")
        elif optional:
            continue
        else:
            raise InputError(f"--{split}: no data given; pass --{split} DIR or --data-dir DIR, "
                             f"or set {env} (or SM_CHANNEL_TRAINING holding train/ valid/ test/)")
        dirs[split] = path
    return dirs


def scan_split(split_dir: Path, split: str) -> dict[str, list[Path]]:
    """{class folder: image files}, classes sorted (dogImages numbering keeps index order)."""
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"--{split} {split_dir}: no class folders; expected one folder per class "
                         f"(e.g. 001.Affenpinscher/*.jpg)")
    found = {}
    for name in classes:
        files = sorted(f for f in (split_dir / name).iterdir()
                       if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise InputError(f"--{split} {split_dir / name}: class folder has no images "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        found[name] = files
    return found


def image_problem(path: Path) -> str | None:
    """Why an image file cannot be used, read from its header (no pixel decode), or None.
    Catches empty, garbage, non-image and header-truncated files, decode bombs, and PNGs with
    bad chunk checksums (verify); a JPEG cut short in its body still loads (open_image)."""
    try:
        with open_image(path) as img:
            img.verify()
        return None
    except Exception as err:  # UnidentifiedImageError, OSError, SyntaxError, DecompressionBombError ...
        return " ".join(f"{type(err).__name__}: {err}".split())[:200]


def drop_unreadable(found: dict[str, list[Path]], split: str, split_dir: Path,
                    max_fraction: float) -> dict[str, list[Path]]:
    """The split without the images image_problem refuses, before any training: skipped with a
    warning naming them while they are at most max_fraction of the split, else InputError."""
    total = sum(len(files) for files in found.values())
    bad = {path: why for files in found.values() for path in files if (why := image_problem(path))}
    if not bad:
        return found
    named = "; ".join(f"{path.relative_to(split_dir)} ({why})" for path, why in list(bad.items())[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    if len(bad) > max_fraction * total:
        raise InputError(f"--{split} {split_dir}: {len(bad)} of {total} images cannot be read: {named}{more}; "
                         f"valid: at most {max_fraction:g} of a split (--max-bad-images) is skipped; "
                         f"replace or delete them")
    if _rank() == 0:
        print(f"warning: --{split} {split_dir}: skipping {len(bad)} of {total} images that cannot be read: "
              f"{named}{more}", file=sys.stderr, flush=True)
    kept = {name: [f for f in files if f not in bad] for name, files in found.items()}
    empty = [name for name, files in kept.items() if not files]
    if empty:
        raise InputError(f"--{split} {split_dir / empty[0]}: no readable images left in this class folder")
    return kept


def scan_dataset(dirs: dict[str, Path],
                 max_bad_images: float = 0.0) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Class names (from train/) and (path, class index) samples per split; every image's
    header checked up front (drop_unreadable), so a corrupt test/ image stops the job before
    training, not after it."""
    scans = {split: drop_unreadable(scan_split(path, split), split, path, max_bad_images)
             for split, path in dirs.items()}
    classes = list(scans["train"])
    if len(classes) < 2:
        raise InputError(f"--train {dirs['train']}: needs at least 2 class folders, found {classes}")
    index = {name: i for i, name in enumerate(classes)}
    samples = {}
    for split, found in scans.items():
        unknown = sorted(set(found) - set(index))
        if unknown:
            raise InputError(f"--{split} {dirs[split]}: class folders not in train/: {unknown[:5]}")
        samples[split] = [(path, index[name]) for name, files in found.items() for path in files]
    return classes, samples


def open_image(path: Path) -> Image.Image:
    """Open a training image, tolerating truncated JPEGs (dogImages holds one:
    train/098.Leonberger/Leonberger_06571.jpg). PIL's switch is process-wide, so it is
    set here, where training data is read (also in spawned loader workers), and not at
    import: a process that imports this module to serve must keep refusing truncated uploads."""
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    return Image.open(path)


def load_image(path: Path, min_size: int | None = None) -> Image.Image:
    """RGB image; a JPEG is decoded at a reduced scale (DCT scaling, much faster)
    when both sides stay >= min_size, so the resize that follows loses nothing."""
    with open_image(path) as img:
        return modeling.reduced_decode(img, min_size).convert("RGB")


def decode_crop(img: Image.Image, box: tuple[int, int, int, int], size: int) -> Image.Image:
    """The region box = (top, left, height, width) of a just-opened (not yet decoded) image,
    resized to size x size.

    A JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) at which the region still
    spans >= size pixels both ways: the resize after it only ever shrinks, so the result
    matches a full decode + crop + resize, for a fraction of the work on large photos.
    """
    width, height = img.size
    top, left, h, w = box
    scale = 1.0
    drafted = img.draft("RGB", (math.ceil(width * size / w), math.ceil(height * size / h)))
    if drafted:  # JPEG: (mode, box of the whole image in decoded pixels)
        scale = drafted[1][2] / width
    rgb = img.convert("RGB")
    return rgb.resize((size, size), Image.BILINEAR,
                      box=(left * scale, top * scale, (left + w) * scale, (top + h) * scale))


def to_uint8_hwc(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8))


class TrainCrop:
    """RandomResizedCrop + horizontal flip, read from the file: torchvision's own crop sampler
    runs on the header's size, then only what the crop needs is decoded (decode_crop).
    Returns uint8 HWC; Context.to_device normalises whole batches on the device."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: float = 0.5):
        self.size, self.scale, self.ratio, self.flip = size, scale, ratio, flip

    def __call__(self, path: Path) -> torch.Tensor:
        with open_image(path) as img:
            box = transforms.RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
            out = decode_crop(img, box, self.size)
        if torch.rand(1).item() < self.flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_uint8_hwc(out)


class EvalCrop:
    """Resize (shorter side) + CenterCrop of load_image's reduced decode; uint8 HWC."""

    def __init__(self, resize: int, crop: int):
        self.resize = resize
        self.pil = modeling.eval_pixels(resize, crop)

    def __call__(self, path: Path) -> torch.Tensor:
        return to_uint8_hwc(self.pil(load_image(path, self.resize)))


class ImageList(Dataset):
    """(path, class) samples -> (transform(path), class)."""

    def __init__(self, samples: list[tuple[Path, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        try:
            return self.transform(path), target
        except Exception as err:  # its header passed the scan, its pixels do not decode
            why = " ".join(f"{type(err).__name__}: {err}".split())[:200]
            raise InputError(f"{path}: image cannot be decoded ({why}); replace or delete it") from None


def cpus_per_process() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def default_num_workers(device_type: str = "cuda") -> int:
    cpus = cpus_per_process()
    if device_type == "cpu":
        # the step is the CPU's main work: a worker decodes ~300 images/s (crop-aware
        # draft), so one per four cores keeps up and leaves the rest to the step
        return max(1, cpus // 4)
    # GPU: every core but the main process's decodes; 16 keeps memory in check on big hosts
    return max(0, min(16, cpus - 1))


def set_cpu_threads(args: argparse.Namespace, device: torch.device, workers: int) -> None:
    """CPU training: give the step the cores the loader workers do not use. Oversubscribed
    OpenMP threads spin-wait on each other: a 2-core host ran the step 10x slower with
    2 threads and a busy worker than with 1. An explicit OMP_NUM_THREADS is respected."""
    if device.type != "cpu":
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, cpus_per_process() - workers))


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device,
                d: Dist, train: bool, seed: int = 0, persistent: bool = True, prefetch_factor: int = 2) -> DataLoader:
    """Training: a DistributedSampler (also for one process: same shuffling code,
    epoch-seeded order). Evaluation: each rank a disjoint shard, summed after."""
    if train:
        sampler = DistributedSampler(dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed)
        per_rank = len(sampler)
        loader_kw = dict(sampler=sampler, drop_last=per_rank > batch_size)  # BN dislikes a batch of 1
    else:
        dataset = Subset(dataset, range(d.rank, len(dataset), d.world))
        loader_kw = dict(shuffle=False)
    if num_workers > 0:
        loader_kw.update(persistent_workers=persistent, prefetch_factor=prefetch_factor)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                      pin_memory=device.type == "cuda", **loader_kw)


def resolve_num_workers(args: argparse.Namespace, device: torch.device) -> int:
    if args.num_workers is not None:
        return args.num_workers
    return default_num_workers(device.type)


def train_dataset(samples: list[tuple[Path, int]], crop: int, resize: int, args: argparse.Namespace) -> Dataset:
    return ImageList(samples, TrainCrop(crop))


def eval_dataset(samples: list[tuple[Path, int]], crop: int, resize: int) -> Dataset:
    return ImageList(samples, EvalCrop(resize, crop))


def build_loaders(samples, crop: int, resize: int, args, device, d: Dist) -> dict[str, DataLoader]:
    workers = resolve_num_workers(args, device)
    set_cpu_threads(args, device, workers)
    kw = dict(num_workers=workers, device=device, d=d, prefetch_factor=args.prefetch_factor)
    loaders = {
        "train": make_loader(train_dataset(samples["train"], crop, resize, args), args.batch_size, train=True,
                             seed=args.seed, **kw),
        "valid": make_loader(eval_dataset(samples["valid"], crop, resize), args.test_batch_size, train=False, **kw),
    }
    if "test" in samples:  # read once, at the end: no persistent workers
        loaders["test"] = make_loader(eval_dataset(samples["test"], crop, resize), args.test_batch_size,
                                      train=False, **{**kw, "persistent": False})
    return loaders


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


def head_module(model: nn.Module) -> nn.Linear:
    """The classifier's last Linear layer (modeling.replace_head's)."""
    weight = modeling.head_parameters(model)[0]
    return next(m for m in model.modules() if isinstance(m, nn.Linear) and m.weight is weight)


@torch.no_grad()
def extract_features(model: nn.Module, loader, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's inputs (and targets) for a whole split, on the device. In eval mode, with
    the backbone frozen, they do not change between head-only epochs: compute them once."""
    captured, targets = [], []
    hook = head_module(model).register_forward_hook(lambda mod, inputs, out: captured.append(inputs[0].float()))
    try:
        for images, target in loader:
            images, target = ctx.to_device(images, target)
            with ctx.autocast():
                model(images)
            targets.append(target)
    finally:
        hook.remove()
    return torch.cat(captured), torch.cat(targets)


class EpochSampler:
    """set_epoch() like DistributedSampler's, for a FeatureLoader."""

    def __init__(self, seed: int):
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class FeatureLoader:
    """Batches of cached (features, targets): what the head sees in place of a DataLoader,
    with the same batch count, so the learning-rate schedule is unchanged."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0):
        self.features, self.targets, self.batch_size, self.shuffle = features, targets, batch_size, shuffle
        self.drop_last = shuffle and len(targets) > batch_size  # as make_loader's training loader
        self.sampler = EpochSampler(seed)

    def __len__(self) -> int:
        n = len(self.targets)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        order = torch.arange(len(self.targets))
        if self.shuffle:
            order = torch.randperm(len(self.targets),
                                   generator=torch.Generator().manual_seed(self.sampler.seed + self.sampler.epoch))
        order = order.to(self.features.device)
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.features[index], self.targets[index]


def cache_features(model: nn.Module, samples, crop: int, resize: int, args, ctx: Context,
                   valid_loader: DataLoader, d: Dist) -> dict[str, FeatureLoader]:
    """--cache-features: one pass over train (eval transform: no augmentation) and valid."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    train_images = make_loader(eval_dataset(samples["train"], crop, resize), args.test_batch_size,
                               resolve_num_workers(args, ctx.device), ctx.device, d, train=False, persistent=False,
                               prefetch_factor=args.prefetch_factor)
    train = extract_features(model, train_images, ctx)
    valid = extract_features(model, valid_loader, ctx)
    model.train(was_training)
    log(f"cached backbone features: train {tuple(train[0].shape)}, valid {tuple(valid[0].shape)} "
        f"in {time.perf_counter() - start:.1f}s", d.rank)
    return {"train": FeatureLoader(*train, args.batch_size, shuffle=True, seed=args.seed),
            "valid": FeatureLoader(*valid, args.test_batch_size, shuffle=False)}


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


# ----------------------------------------------------------------------------- checkpoints

def atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def to_json(obj) -> str:
    """Strict JSON: a diverged run's NaN/inf become null (json.dumps would write NaN)."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(obj), indent=2, allow_nan=False)


def cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "best_loss", "best_epoch",
                   "bad_epochs", "stopped", "history", "best_state")


def load_checkpoint(path: Path, identity: dict, device: torch.device, move_aside: bool = True) -> dict | None:
    """The checkpoint of an interrupted run of this same job, or None.

    One of another job (arch, classes, image size) is refused. An unreadable one (empty or
    truncated by a kill mid-upload, not a checkpoint) is moved aside to <name>.corrupt, with
    a warning, and the job starts from epoch 1: a spot restart goes on rather than failing on
    a file that can never load. move_aside: this process renames it (one per host)."""
    if not path.is_file():
        return None
    size = path.stat().st_size
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(ckpt, dict):
            raise ValueError(f"holds a {type(ckpt).__name__}, not a checkpoint dict")
    except Exception as err:  # EOFError (empty), RuntimeError (bad zip), UnpicklingError ...
        reason = f"{type(err).__name__}: {err}" if str(err).strip() else \
            f"{type(err).__name__}: an empty or truncated file ({size} bytes)"
        return _unreadable_checkpoint(path, reason, move_aside)
    theirs = ckpt.get("identity", {})
    diff = {k: (theirs.get(k), v) for k, v in identity.items() if theirs.get(k) != v}
    if diff:
        raise InputError(f"--checkpoint-dir {path.parent}: {path.name} belongs to another job "
                         f"(differs in {sorted(diff)}); give this job its own checkpoint dir or delete it")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        return _unreadable_checkpoint(path, f"incomplete, no {missing}", move_aside)
    return ckpt


def _unreadable_checkpoint(path: Path, reason: str, move_aside: bool) -> None:
    aside = path.with_name(path.name + ".corrupt")
    if not move_aside:  # the process that moves it says so, once per host
        return None
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, aside)
    reason = " ".join(reason.split())[:300] or "unreadable"
    print(f"warning: --checkpoint-dir {path.parent}: {path.name} cannot be loaded ({reason}); moved to "
          f"{aside.name}, starting from epoch 1", file=sys.stderr, flush=True)
    return None


# ----------------------------------------------------------------------------- outputs

def write_model_dir(model_dir: Path, state: dict, meta: dict, evaluation: dict) -> None:
    """model.pth + model.json + evaluation.json + code/: a deployable model.tar.gz."""
    model_dir.mkdir(parents=True, exist_ok=True)
    atomic_save(state, model_dir / modeling.MODEL_WEIGHTS_FILE)
    modeling.write_model_meta(model_dir, meta)
    atomic_write_text(model_dir / "evaluation.json", to_json(evaluation))
    code = model_dir / "code"
    code.mkdir(exist_ok=True)
    for name in CODE_FILES:
        if (SCRIPTS_DIR / name).is_file():
            shutil.copyfile(SCRIPTS_DIR / name, code / name)
        else:
            print(f"warning: {SCRIPTS_DIR / name} not found; model dir has no code/{name}", file=sys.stderr)
    requirements = SCRIPTS_DIR / INFERENCE_REQUIREMENTS
    if requirements.is_file():
        shutil.copyfile(requirements, code / "requirements.txt")


def plot_history(history: list[dict], path: Path, best_epoch: int | None) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib not installed; no loss curve", file=sys.stderr)
        return
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train (label-smoothed)")
    ax.plot(epochs, [h["valid_loss"] for h in history], "o-", label="validation")
    if best_epoch:
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"kept: epoch {best_epoch}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def one_line(err: InputError) -> str:
    """The message of an InputError, on one line. One raised in a DataLoader worker arrives
    re-raised with the worker's traceback in its text: keep only the original message."""
    text = str(err).strip()
    if "\nOriginal Traceback" in text:
        text = re.sub(r"^[\w.]*(InputError|TrainingDiverged): ", "", text.splitlines()[-1])
    return " ".join(text.split())


def write_failure(message: str) -> None:
    """SageMaker shows /opt/ml/output/failure as the job's FailureReason."""
    out = os.environ.get("SM_OUTPUT_DIR")
    if out and Path(out).is_dir():
        with contextlib.suppress(OSError):
            (Path(out) / "failure").write_text(message[:1000])


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
    scan_start = time.perf_counter()
    classes, samples = scan_dataset(data_dirs(args, require_test), args.max_bad_images)
    weights = resolve_weights_path(args.weights, args)
    log(f"data: {len(classes)} classes, " + ", ".join(f"{s}={len(v)}" for s, v in samples.items())
        + f" (headers checked in {time.perf_counter() - scan_start:.1f}s); device={device} world={d.world}", d.rank)

    # local rank 0 first, so one process per host downloads pretrained weights into its cache
    if d.enabled and d.local_rank != 0:
        dist.barrier()
    model = build_model(args.arch, len(classes), weights)
    if d.enabled and d.local_rank == 0:
        dist.barrier()
    resize, crop = modeling.eval_geometry(args.arch, weights, args.image_size, args.resize_size)
    ctx = make_context(args, device, d, callbacks)
    model = model.to(device, memory_format=torch.channels_last if ctx.channels_last else torch.contiguous_format)

    loaders = build_loaders(samples, crop, resize, args, device, d)
    steps_per_epoch = len(loaders["train"])
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    criterion = SmoothedCrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, args.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, steps_per_epoch, args.epochs, args.freeze_epochs, args.lr_warmup_epochs, args.min_lr_ratio))
    scaler = torch.amp.GradScaler("cuda", enabled=ctx.dtype == torch.float16)
    for cb in callbacks:
        cb.on_model(model, criterion)

    identity = {"arch": args.arch, "classes": classes, "image_size": crop}
    ckpt_path = Path(args.checkpoint_dir) / CHECKPOINT_FILE
    state = {"epoch": 0, "best_loss": math.inf, "best_epoch": None, "bad_epochs": 0, "stopped": False,
             "history": [], "best_state": None}
    ckpt = load_checkpoint(ckpt_path, identity, device, move_aside=d.local_rank == 0)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:  # empty when saved without fp16
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], device)
        state.update({k: ckpt[k] for k in state})
        log(f"resuming from {ckpt_path} after epoch {state['epoch']} "
            f"(best validation loss {state['best_loss']:.4g} at epoch {state['best_epoch']})", d.rank)
    if d.enabled:  # every rank must resume from the same epoch, or DDP would hang
        epochs_seen = torch.tensor([state["epoch"]], device=device)
        dist.broadcast(epochs_seen, src=0)
        if int(epochs_seen) != state["epoch"]:
            raise RuntimeError(f"rank {d.rank} found checkpoint epoch {state['epoch']}, rank 0 {int(epochs_seen)}: "
                               f"all ranks need the same --checkpoint-dir content")

    phase = None
    wrapped = model
    features = None  # {"train", "valid"}: FeatureLoaders for the head-only epochs (--cache-features)
    if args.cache_features and d.enabled:
        log("--cache-features: not with several processes; head-only epochs run the full model", d.rank)
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        if state["stopped"]:
            break
        epoch_phase = "head" if epoch <= args.freeze_epochs else "full"
        if epoch_phase != phase:
            phase = epoch_phase
            set_trainable(model, head_only=phase == "head")
            # DDP tracks the parameters that require grad when wrapped: re-wrap on (un)freezing
            wrapped = model
            if d.enabled:
                wrapped = nn.parallel.DistributedDataParallel(
                    model, device_ids=[device.index] if device.type == "cuda" else None)
            wrapped = compile_model(wrapped, args)
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
        criterion.train()
        for cb in callbacks:
            cb.on_mode("train")
        train = train_one_epoch(net, train_batches, criterion, optimizer, scheduler, scaler, ctx,
                                args.max_steps_per_epoch, epoch, args.log_interval)
        # evaluate the bare module: DDP's forward would sync buffers across ranks
        # whose shards may differ by a batch
        model.eval()
        criterion.eval()
        for cb in callbacks:
            cb.on_mode("eval")
        valid = evaluate(eval_net, valid_batches, criterion, len(classes), ctx)
        seconds = time.perf_counter() - start
        if not math.isfinite(valid["loss"]):  # before the checkpoint: a restart resumes the last finite epoch
            raise diverged(f"the validation loss of epoch {epoch} is {valid['loss']}", train["lr"])

        improved = valid["loss"] < state["best_loss"]  # NaN never improves
        if improved:
            state.update(best_loss=valid["loss"], best_epoch=epoch, bad_epochs=0, best_state=cpu_state(model))
        else:
            state["bad_epochs"] += 1
        state["stopped"] = bool(args.patience) and state["bad_epochs"] >= args.patience
        row = {"epoch": epoch, "phase": phase, "train_loss": train["train_loss"], "train_acc": train["train_acc"],
               "valid_loss": valid["loss"], "valid_acc": valid["accuracy"],
               "valid_top5_acc": valid["top5_accuracy"], "lr": train["lr"],
               "seconds": seconds, "images_per_s": train["images_per_s"], "data_wait_s": train["data_wait_s"]}
        state["history"].append(row)
        state["epoch"] = epoch
        if d.rank == 0:
            atomic_save({**state, "identity": identity, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict(), "rng": rng_state(device)}, ckpt_path)
        log(metrics.format_epoch(epoch, args.epochs, seconds, train_loss=row["train_loss"],
                                 train_acc=row["train_acc"], valid_loss=row["valid_loss"],
                                 valid_acc=row["valid_acc"], lr=row["lr"]), d.rank)
        # the objective after every epoch (SageMaker's early stopping reads it per epoch): the
        # kept weights' values, so whenever the job ends the last line printed is theirs
        kept = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]), row)
        for line in metrics.format_kept(kept["valid_loss"], kept["valid_acc"]):
            log(line, d.rank)
        log(f"epoch {epoch}: phase={phase} {train['images_per_s']:.1f} img/s, "
            f"data wait {train['data_wait_s']:.1f}s of {seconds:.1f}s"
            + (" *best*" if improved else "")
            + (f"; early stop: no improvement in {args.patience} epochs" if state["stopped"] else ""), d.rank)

    # the kept weights: best by validation loss (the last ones if none was finite)
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    best = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]), state["history"][-1])
    model.eval()
    criterion.eval()
    for cb in callbacks:
        cb.on_mode("eval")
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
        "best_epoch": state["best_epoch"], "epochs_run": state["epoch"], "arch": args.arch,
    }
    for line in metrics.format_kept(best["valid_loss"], best["valid_acc"]):
        log(line, d.rank)
    for name, value in (("average test loss", test["loss"]),
                        ("test accuracy", test["accuracy"]),
                        ("test top5 accuracy", test["top5_accuracy"])):
        if value is not None:
            log(metrics.format_summary(name, value), d.rank)

    if d.rank == 0:
        meta = {"arch": args.arch, "classes": classes, "labels": labels, "image_size": crop,
                "resize_size": resize, "mean": list(modeling.IMAGENET_MEAN), "std": list(modeling.IMAGENET_STD)}
        write_model_dir(Path(args.model_dir), cpu_state(model), meta, evaluation)
        out = Path(args.output_data_dir)
        atomic_write_text(out / "evaluation.json", to_json(evaluation))
        atomic_write_text(out / "history.json", to_json(state["history"]))
        plot_history(state["history"], out / "loss_curve.png", state["best_epoch"])
        log(f"wrote model to {args.model_dir}, evaluation/history/loss curve to {out}", d.rank)
    return evaluation


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
