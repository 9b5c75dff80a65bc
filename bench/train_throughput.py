#!/usr/bin/env python3
"""Training throughput: our loop (scripts/train_lib.py) vs a loop in the original Udacity project's style.

    python bench/train_throughput.py                      # CPU, mobilenet_v3_small, batch 32
    python bench/train_throughput.py --device cuda        # GPU: resnet50, AMP, batch 256

Same run, same machine, same generated JPEGs (dogImages-like sizes, 500x375 .. 2560x1920),
same model and batch size, 224 px training crops, warm-up batches excluded. Three figures per
loop, in images/s:

  data   the DataLoader alone (decode + augment + collate)
  step   the training step alone, on one pre-made batch already on the device
  e2e    data + step, as training runs; `data_wait` is the share of it spent waiting for a batch

Writes bench/results/train.json and train.md (train_gpu.*, train_frozen.* for --device cuda,
--freeze-backbone; --out for another folder). The images are generated
once into a cache directory (--cache-dir), never into the repository.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import datasets, transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # train_lib imports its siblings (modeling, metrics) as top-level modules

from pipeline.files import atomic_dir, atomic_write  # noqa: E402
from pipeline.sample_data import DOG_BREEDS, DOG_CLASS_DIRS  # noqa: E402
from scripts.modeling import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

# (width, height), relative frequency. dogImages is web photos, mostly 400-800 px on the long side,
# with a tail of camera originals; this mix averages ~140 KiB a file, like dogImages.zip
# (1.1 GB / 8,351 images). Decoding the large tail is what dominates the CPU time.
SIZE_MIX = [((500, 375), 10), ((640, 480), 6), ((800, 600), 4), ((1024, 768), 2), ((1600, 1200), 1), ((2560, 1920), 1)]
JPEG_QUALITY = 90
CROP = 224

# Published ResNet50 training throughput, NVIDIA DeepLearningExamples (PyTorch, AMP, batch 256, 1 GPU).
NVIDIA_RN50_AMP_IMG_S = {"A100": 2470, "V100": 1200}


# ---------------------------------------------------------------------------- images

def _photo(rng: np.random.Generator, width: int, height: int, tint: np.ndarray) -> Image.Image:
    """Smooth colour fields plus fine texture: compresses (and decodes) like a photo,
    unlike flat colour (too cheap) or white noise (far too expensive)."""
    coarse = rng.uniform(0, 255, (height // 64 + 2, width // 64 + 2, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    fine = rng.uniform(0, 255, (height // 4 + 1, width // 4 + 1, 3)).astype(np.uint8)
    fine = np.asarray(Image.fromarray(fine).resize((width, height), Image.BILINEAR), dtype=np.float32)
    img = 0.6 * img + 0.2 * fine + 0.2 * tint + rng.normal(0, 4, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _write_photo(job: tuple[Path, int, int, int]) -> None:
    path, class_index, serial, seed = job
    tint = np.random.default_rng([seed, class_index]).uniform(0, 255, 3).astype(np.float32)
    rng = np.random.default_rng([seed, class_index, serial])  # per image: same files in any process order
    sizes = [size for size, weight in SIZE_MIX for _ in range(weight)]
    w, h = sizes[rng.integers(len(sizes))]
    if rng.random() < 0.25:  # some portraits
        w, h = h, w
    _photo(rng, w, h, tint).save(path, quality=JPEG_QUALITY)


def make_images(cache_dir: Path, num_classes: int, per_class: int, seed: int = 0) -> Path:
    """`<cache>/images-.../train/NNN.Breed/*.jpg`, generated once (deterministic) and reused."""
    name = f"images-v2-c{num_classes}-n{per_class}-q{JPEG_QUALITY}-s{seed}"
    root = cache_dir / name
    if (root / "train").is_dir():
        return root
    print(f"generating {num_classes * per_class} JPEGs into {root} (once) ...", flush=True)
    with atomic_dir(root) as tmp:
        jobs = []
        for c in range(num_classes):
            class_dir = tmp / "train" / DOG_CLASS_DIRS[c]
            class_dir.mkdir(parents=True)
            jobs += [(class_dir / f"{DOG_BREEDS[c]}_{i:05d}.jpg", c, i, seed) for i in range(per_class)]
        with multiprocessing.get_context("spawn").Pool(os.cpu_count()) as pool:
            pool.map(_write_photo, jobs, chunksize=8)
    return root


def describe_images(root: Path) -> dict:
    files = sorted((root / "train").rglob("*.jpg"))
    pixels = [math.prod(Image.open(f).size) for f in files]
    return {"count": len(files), "classes": len(list((root / "train").iterdir())),
            "mean_megapixels": round(float(np.mean(pixels)) / 1e6, 3),
            "max_size": max((Image.open(f).size for f in files), key=math.prod),
            "mean_kib": round(float(np.mean([f.stat().st_size for f in files])) / 1024, 1),
            "jpeg_quality": JPEG_QUALITY, "size_mix": [[list(s), w] for s, w in SIZE_MIX]}


# ---------------------------------------------------------------------------- the baseline

class BaselineLoop:
    """The original Udacity project's train(): ImageFolder, PIL full decode, per-image float
    transforms, num_workers=0, fp32, default memory format, loss.item() every step."""

    name = "baseline"

    def __init__(self, model: nn.Module, params, device: torch.device, lr: float):
        self.device = device
        self.model = model.to(device).train()
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.Adam(params, lr=lr)
        self.running_loss = 0.0
        self.settings = {"num_workers": 0, "amp": None, "channels_last": False, "optimizer": "Adam"}

    def loader(self, root: Path, batch_size: int) -> torch.utils.data.DataLoader:
        tf = transforms.Compose([
            transforms.RandomResizedCrop(CROP),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])
        data = datasets.ImageFolder(str(root / "train"), transform=tf)
        return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True)

    def step(self, batch) -> None:
        inputs, labels = batch
        inputs, labels = inputs.to(self.device), labels.to(self.device)
        self.optimizer.zero_grad()
        outputs = self.model(inputs)
        loss = self.criterion(outputs, labels)
        loss.backward()
        self.optimizer.step()
        self.running_loss += loss.item() * inputs.size(0)  # a host-device sync per step

    def finish(self) -> None:
        pass


# ---------------------------------------------------------------------------- ours

class OursLoop:
    """scripts/train_lib.py's data pipeline and training step, set up as its run() sets them up."""

    name = "ours"

    def __init__(self, model: nn.Module, params, device: torch.device, lr: float, args: argparse.Namespace):
        import train_lib  # scripts/ is on sys.path, as in the container
        self.tl = train_lib
        flags = ["--arch", args.arch, "--weights", "none", "--batch-size", str(args.batch_size),
                 "--lr", str(lr), "--image-size", str(CROP), "--data-dir", "unused", *args.ours_flags]
        if args.workers is not None:
            flags += ["--num-workers", str(args.workers)]
        self.args = train_lib.parse_args(flags)
        self.device = device
        self.d = train_lib.Dist()
        self.ctx = train_lib.make_context(self.args, device, self.d, callbacks=[])
        train_lib.set_cpu_threads(self.args, device, self.num_workers)
        self.model = model.to(device, memory_format=torch.channels_last if self.ctx.channels_last
                              else torch.contiguous_format)
        head_only = args.freeze_backbone
        train_lib.set_trainable(self.model, head_only=head_only)
        self.model.train(not head_only)  # train_lib's head-only phase keeps BatchNorm frozen
        self.forward = train_lib.compile_model(self.model, self.args)
        self.criterion = train_lib.SmoothedCrossEntropyLoss(label_smoothing=self.args.label_smoothing)
        self.optimizer = train_lib.make_optimizer(self.model, self.args.lr, self.args.weight_decay, self.args.momentum)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.ctx.dtype == torch.float16)
        self.sums = torch.zeros(2, device=device, dtype=torch.float64)
        amp = str(self.ctx.dtype).replace("torch.", "") if self.ctx.dtype else None
        self.settings = {"num_workers": self.num_workers, "amp": amp, "channels_last": self.ctx.channels_last,
                         "flags": flags}

    @property
    def num_workers(self) -> int:
        return self.tl.resolve_num_workers(self.args, self.device)

    def loader(self, root: Path, batch_size: int):
        samples = [(path, i) for i, (_, files) in enumerate(self.tl.scan_split(root / "train", "train").items())
                   for path in files]
        resize, crop = self.tl.modeling.eval_geometry(self.args.arch, "none", self.args.image_size,
                                                      self.args.resize_size)
        dataset = self.tl.train_dataset(samples, crop, resize, self.args)
        return self.tl.make_loader(dataset, batch_size, self.num_workers, self.device, self.d, train=True,
                                   seed=self.args.seed, prefetch_factor=self.args.prefetch_factor)

    def step(self, batch) -> None:
        images, targets = batch
        loss, correct = self.tl.train_step(self.forward, images, targets, self.criterion, self.optimizer,
                                           self.scheduler, self.scaler, self.ctx)
        self.sums += torch.stack([loss.double() * targets.size(0), correct.double()])  # as train_one_epoch

    def finish(self) -> None:
        self.sums.tolist()  # the one sync, as at the end of train_lib's epoch


# ---------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(loader):
    """Endless batches, epoch after epoch (persistent workers carry over)."""
    while True:
        yield from loader


def _batch_size(batch) -> int:
    return len(batch[1])


def time_data(loader, warmup: int, seconds: float, min_batches: int) -> dict:
    # The workers fill their prefetch queues during warm-up: drain them too, or the
    # first timed batches come for free and flatter a loader with many workers.
    if loader.num_workers:
        warmup += loader.num_workers * loader.prefetch_factor
    it = _batches(loader)
    for _ in range(warmup):
        next(it)
    images = batches = 0
    start = time.perf_counter()
    while batches < min_batches or time.perf_counter() - start < seconds:
        images += _batch_size(next(it))
        batches += 1
    elapsed = time.perf_counter() - start
    return {"images_per_s": images / elapsed, "images": images, "seconds": elapsed}


def _time_batches(loop, batches, device: torch.device, warmup: int, seconds: float, min_batches: int) -> dict:
    """Steps over `batches` (an iterator) after `warmup` untimed ones; images/s and the
    share of wall time spent waiting in next()."""
    for _ in range(warmup):
        loop.step(next(batches))
    loop.finish()
    _sync(device)
    images = count = 0
    wait = 0.0
    start = time.perf_counter()
    while count < min_batches or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        loop.step(batch)
        images += _batch_size(batch)
        count += 1
    loop.finish()
    _sync(device)
    elapsed = time.perf_counter() - start
    # On CUDA the step is asynchronous, so time blocked in next() is the loader's true cost:
    # the share of wall time the GPU could have been fed but was not.
    return {"images_per_s": images / elapsed, "images": images, "seconds": elapsed,
            "data_wait_share": wait / elapsed}


def time_step(loop, batch, device: torch.device, warmup: int, seconds: float, min_batches: int) -> dict:
    """The step alone: one pre-made batch, over and over."""
    result = _time_batches(loop, itertools.repeat(batch), device, warmup, seconds, min_batches)
    del result["data_wait_share"]
    return result


def time_e2e(loop, loader, device: torch.device, warmup: int, seconds: float, min_batches: int) -> dict:
    """Data + step: batches from the loader, as training sees them."""
    return _time_batches(loop, _batches(loader), device, warmup, seconds, min_batches)


# ---------------------------------------------------------------------------- run

def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu, "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "pillow": Image.__version__, "numpy": np.__version__,
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def build(arch: str, num_classes: int, freeze_backbone: bool, device: torch.device, seed: int):
    from scripts.modeling import build_model, head_parameters
    torch.manual_seed(seed)
    model = build_model(arch, num_classes, weights="none")
    if freeze_backbone:
        for p in model.parameters():
            p.requires_grad_(False)
        params = head_parameters(model)
        for p in params:
            p.requires_grad_(True)
    else:
        params = list(model.parameters())
    return model, params


def make_loop(kind: str, args, device: torch.device, num_classes: int):
    torch.set_num_threads(args.default_threads)  # the baseline runs with torch's defaults
    torch.backends.cudnn.benchmark = False
    model, params = build(args.arch, num_classes, args.freeze_backbone, device, args.seed)
    if kind == "baseline":
        loop = BaselineLoop(model, params, device, args.lr)
    else:
        loop = OursLoop(model, params, device, args.lr, args)
    # what the loop's setup chose (ours: fewer CPU threads, cudnn.benchmark), restored before each measurement
    loop.threads, loop.cudnn_benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    loop.settings = {**getattr(loop, "settings", {}), "torch_threads": loop.threads,
                     "cudnn_benchmark": loop.cudnn_benchmark}
    return loop


def measure_round(kinds: list[str], args, root: Path, device: torch.device, num_classes: int) -> dict:
    """data, step and e2e of each loop, interleaved (a burst of load elsewhere hits both
    alike), each on its own: no loader's workers run behind another measurement."""
    loops = {kind: make_loop(kind, args, device, num_classes) for kind in kinds}
    out = {kind: {"settings": loop.settings} for kind, loop in loops.items()}

    def activate(loop):
        torch.set_num_threads(loop.threads)
        torch.backends.cudnn.benchmark = loop.cudnn_benchmark

    batches = {}
    for kind, loop in loops.items():
        activate(loop)
        loader = loop.loader(root, args.batch_size)
        out[kind]["data"] = time_data(loader, args.warmup, args.seconds, args.min_batches)
        batches[kind] = next(iter(loader))
        del loader  # stops persistent workers
    for kind, loop in loops.items():
        activate(loop)
        out[kind]["step"] = time_step(loop, batches.pop(kind), device, args.warmup, args.seconds, args.min_batches)
    for kind, loop in loops.items():
        activate(loop)
        loader = loop.loader(root, args.batch_size)
        out[kind]["e2e"] = time_e2e(loop, loader, device, args.warmup, args.seconds, args.min_batches)
        del loader
    for kind in kinds:
        figures = ", ".join(f"{part} {out[kind][part]['images_per_s']:.1f}" for part in ("data", "step", "e2e"))
        print(f"[{kind}] {figures} images/s", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
    return out


def best_of(rounds: list[dict]) -> dict:
    """Per figure, the best round: other processes on a shared machine only ever slow a run
    down, so the fastest round is the least disturbed one (timeit's reasoning)."""
    best = {"settings": rounds[0]["settings"], "rounds": rounds}
    for part in ("data", "step", "e2e"):
        best[part] = max((r[part] for r in rounds), key=lambda m: m["images_per_s"])
    return best


def gpu_reference(gpu_name: str) -> dict:
    """The comparable NVIDIA figure and our target for this GPU, if there is one."""
    name = gpu_name.upper()
    for key, figure in NVIDIA_RN50_AMP_IMG_S.items():
        if key in name:
            return {"reference": f"NVIDIA DLE ResNet50 AMP b256 {key}", "reference_images_per_s": figure,
                    "target_images_per_s": round(0.9 * figure)}
    if "H100" in name or "H200" in name:
        return {"reference": "NVIDIA DLE ResNet50 AMP b256 A100 80GB", "reference_images_per_s": 2470,
                "target_images_per_s": round(1.5 * 2470)}
    return {"reference": None}


def _describe(settings: dict) -> str:
    return (f"{settings['num_workers']} loader workers, {settings['torch_threads']} torch threads, "
            f"{'channels_last' if settings['channels_last'] else 'NCHW'}, {settings['amp'] or 'fp32'}")


def markdown(result: dict) -> str:
    s = result["settings"]
    m = result["machine"]
    lines = [
        f"# Training throughput ({s['device']}, {s['arch']}, batch {s['batch_size']}, {CROP} px crops)",
        "",
        f"Machine: {m.get('gpu') or m['cpu']}, {m['cpu_count']} CPUs, load average {result['load_avg_before']} "
        f"before / {result['load_avg_after']} after; torch {m['torch']}, torchvision {m['torchvision']}, "
        f"Pillow {m['pillow']}. Images: {result['images']['count']} generated JPEGs, "
        f"mean {result['images']['mean_megapixels']} MP.",
        "",
        "Baseline: " + _describe(result["baseline"]["settings"]) + ". Ours: " + _describe(result["ours"]["settings"])
        + f". Best of {s['rounds']} interleaved rounds of >= {s['seconds_per_measurement']:g} s per figure.",
        "",
        "| images/s | baseline (Udacity style) | ours | ours / baseline |",
        "|---|---:|---:|---:|",
    ]
    for part, label in (("e2e", "end to end (data + step)"), ("data", "data loading alone"),
                        ("step", "training step alone")):
        b, o = result["baseline"][part]["images_per_s"], result["ours"][part]["images_per_s"]
        lines.append(f"| {label} | {b:.1f} | {o:.1f} | {o / b:.2f}x |")
    b, o = result["baseline"]["e2e"]["data_wait_share"], result["ours"]["e2e"]["data_wait_share"]
    lines.append(f"| share of e2e time waiting for data | {b:.0%} | {o:.0%} | |")
    if "gpu" in result:
        g = result["gpu"]
        lines += ["", f"GPU: {g['gpu']}; ours {g['ours_step_images_per_s']:.0f} images/s (step), "
                      f"{g['ours_e2e_images_per_s']:.0f} images/s (e2e); reference {g.get('reference')}: "
                      f"{g.get('reference_images_per_s')}, target {g.get('target_images_per_s')}."]
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--arch", default=None, help="default: mobilenet_v3_small on cpu, resnet50 on cuda")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 on cpu, 256 on cuda")
    p.add_argument("--freeze-backbone", action="store_true",
                   help="train the head only (the original project's recipe); default trains every layer")
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--per-class", type=int, default=None,
                   help="images per class (default: 96 cpu; 1336 cuda, dogImages' 6,680 training images in all)")
    p.add_argument("--warmup", type=int, default=2, help="batches run before timing (each measurement)")
    p.add_argument("--seconds", type=float, default=5.0, help="time each measurement at least this long")
    p.add_argument("--rounds", type=int, default=4, help="rounds; per figure, the best round counts")
    p.add_argument("--min-batches", type=int, default=3, help="... and over at least this many batches")
    p.add_argument("--only", choices=["baseline", "ours"], help="measure one loop only (no ratio, no results file)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "dogbreed-bench"),
                   help="where the generated JPEGs are kept between runs")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results directory")
    # Ours' knobs: passed to train_lib as the training script would.
    p.add_argument("--workers", type=int, default=None,
                   help="ours: --num-workers (default: train_lib's, from the CPU count)")
    p.add_argument("--ours-flags", nargs=argparse.REMAINDER, default=[],
                   help="ours: further train_lib flags, last on the line (e.g. --ours-flags --compile true)")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.arch = args.arch or ("resnet50" if gpu else "mobilenet_v3_small")
    args.batch_size = args.batch_size or (256 if gpu else 32)
    args.per_class = args.per_class or (1336 if gpu else 96)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.default_threads = torch.get_num_threads()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: torch.cuda.is_available() is False on this machine; "
              "run the CPU benchmark (--device cpu) or run this on a GPU host", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    root = make_images(Path(args.cache_dir), args.classes, args.per_class, args.seed)
    load_before = [round(x, 2) for x in os.getloadavg()]
    result = {
        "command": " ".join(["python", "bench/train_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
        "when_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(device),
        "settings": {"device": args.device, "arch": args.arch, "weights": "none", "batch_size": args.batch_size,
                     "crop": CROP, "freeze_backbone": args.freeze_backbone, "warmup_batches": args.warmup,
                     "seconds_per_measurement": args.seconds, "rounds": args.rounds, "lr": args.lr},
        "images": describe_images(root),
        "load_avg_before": load_before,
    }
    kinds = [k for k in ("baseline", "ours") if args.only in (None, k)]
    rounds = {k: [] for k in kinds}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds} ...", flush=True)
        for kind, measured in measure_round(kinds, args, root, device, args.classes).items():
            rounds[kind].append(measured)
    for kind in kinds:
        result[kind] = best_of(rounds[kind])
    result["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.only:
        print(json.dumps({k: result[k] for k in (args.only, "load_avg_before", "load_avg_after")}, indent=2))
        return 0
    result["ratio"] = {part: result["ours"][part]["images_per_s"] / result["baseline"][part]["images_per_s"]
                       for part in ("data", "step", "e2e")}
    if device.type == "cuda":
        result["gpu"] = {"gpu": result["machine"]["gpu"],
                         "ours_step_images_per_s": result["ours"]["step"]["images_per_s"],
                         "ours_e2e_images_per_s": result["ours"]["e2e"]["images_per_s"],
                         "ours_data_wait_share": result["ours"]["e2e"]["data_wait_share"],
                         **gpu_reference(result["machine"]["gpu"])}
    out = Path(args.out)
    stem = "train" + ("_gpu" if device.type == "cuda" else "") + ("_frozen" if args.freeze_backbone else "")
    atomic_write(out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    atomic_write(out / f"{stem}.md", markdown(result))
    print(markdown(result))
    print(f"wrote {out / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
