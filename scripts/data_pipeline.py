"""Training data: the channels' folders, image checks, crops, datasets, loaders, feature cache.

Splits live in train/ valid/ test/ with one folder per class; every image's header is
checked before training (scan_dataset). Loaders yield uint8 HWC batches that
train_lib.Context.to_device normalises on the device.
Imports nothing of the host (pipeline/, steps/): this folder ships on its own.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageFile
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms

import modeling
from ddp import Dist, global_rank, log
from train_errors import InputError

if TYPE_CHECKING:
    from train_lib import Context

SPLITS = ("train", "valid", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# ----------------------------------------------------------------------------- folders and images

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
    if global_rank() == 0:
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
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
            raise InputError(f"{path}: image cannot be decoded ({reason}); "
                             f"replace or delete it") from None


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


# ----------------------------------------------------------------------------- feature cache

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
