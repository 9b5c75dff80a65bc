"""The fast paths of scripts/train_lib.py give the results of the plain ones.

Decoding only what a crop needs, uint8 batches normalised on the device, and cached
backbone features for head-only epochs are all shortcuts: each is checked against the
straightforward computation it replaces.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import functional as F

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))  # train_lib imports its siblings as top-level modules, as in the container
import train_lib  # noqa: E402
from pipeline.sample_data import generate_dataset  # noqa: E402
from scripts.modeling import build_model  # noqa: E402


def _photo(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """Smooth colour plus texture, like a photo, so resampling differences show."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (height // 32 + 2, width // 32 + 2, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    img += rng.normal(0, 6, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


@pytest.mark.parametrize("box", [(0, 0, 768, 1024), (100, 200, 300, 400), (500, 700, 240, 230)],
                         ids=["whole", "middle", "small"])
def test_draft_decoded_crop_matches_full_decode(tmp_path, box):
    path = _photo(tmp_path / "big.jpg", 1024, 768)
    with Image.open(path) as img:
        fast = np.asarray(train_lib.decode_crop(img, box, 224), dtype=np.float32)
        # the whole-image crop must have been decoded at a reduced scale, or this tests nothing
        assert box != (0, 0, 768, 1024) or img.size == (512, 384)
    full = Image.open(path).convert("RGB")
    reference = np.asarray(F.resized_crop(full, *box, [224, 224], antialias=True), dtype=np.float32)
    assert fast.shape == reference.shape == (224, 224, 3)
    assert np.abs(fast - reference).mean() < 1.5  # of 255: invisible
    assert np.abs(fast - reference).max() < 40


def test_train_crop_is_seeded_uint8_hwc(tmp_path):
    path = _photo(tmp_path / "a.jpg", 640, 480)
    crop = train_lib.TrainCrop(64)
    torch.manual_seed(3)
    a = crop(path)
    torch.manual_seed(3)
    assert torch.equal(a, crop(path))  # DataLoader workers seed torch: reproducible
    assert a.shape == (64, 64, 3) and a.dtype == torch.uint8


def test_device_normalisation_matches_to_tensor_normalize(tmp_path):
    path = _photo(tmp_path / "a.jpg", 300, 200)
    pixels = train_lib.EvalCrop(resize=80, crop=64)(path)
    # the float transform inference.py reproduces, on the same reduced decode
    expected = train_lib.modeling.eval_transform(80, 64)(train_lib.load_image(path, 80))
    for channels_last in (False, True):
        ctx = train_lib.Context(device=torch.device("cpu"), dtype=None, channels_last=channels_last,
                                d=train_lib.Dist(), callbacks=[])
        images, targets = ctx.to_device(pixels[None], torch.tensor([1]))
        assert images.dtype == torch.float32 and images.shape == (1, 3, 64, 64)
        assert images.is_contiguous(memory_format=torch.channels_last) == channels_last
        torch.testing.assert_close(images[0], expected, atol=1e-5, rtol=0)
        assert targets.tolist() == [1]


def test_cached_features_give_the_full_models_logits(tmp_path):
    root = generate_dataset(tmp_path / "data", num_classes=3, per_class=(6, 2, 2), size=48)
    _, samples = train_lib.scan_dataset({s: root / s for s in ("train", "valid", "test")})
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", 3, weights="none")
    train_lib.set_trainable(model, head_only=True)
    model.eval()  # the head-only phase: frozen BatchNorm, no dropout
    ctx = train_lib.Context(device=torch.device("cpu"), dtype=None, channels_last=False, d=train_lib.Dist(),
                            callbacks=[])
    loader = DataLoader(train_lib.eval_dataset(samples["train"], crop=32, resize=36), batch_size=5)
    features, targets = train_lib.extract_features(model, loader, ctx)
    assert features.shape[0] == len(samples["train"]) == 18
    head = train_lib.head_module(model)
    with torch.no_grad():
        full = torch.cat([model(ctx.to_device(x, y)[0]) for x, y in loader])
        torch.testing.assert_close(head(features), full, atol=1e-5, rtol=1e-5)
    assert targets.tolist() == [t for _, t in samples["train"]]

    # the stand-in loader: make_loader's batch count, pairs kept, reshuffled each epoch
    index = torch.arange(18)
    cached = train_lib.FeatureLoader(index[:, None].float(), index, batch_size=4, shuffle=True, seed=1)
    real = train_lib.make_loader(loader.dataset, 4, 0, ctx.device, ctx.d, train=True)
    assert len(cached) == len(real) == 4
    for x, y in cached:
        assert torch.equal(x[:, 0].long(), y)
    first = torch.cat([y for _, y in cached])
    cached.sampler.set_epoch(1)
    second = torch.cat([y for _, y in cached])
    assert len(set(first.tolist())) == 16 and not torch.equal(first, second)


def test_cache_features_trains_end_to_end(tmp_path, capsys):
    root = generate_dataset(tmp_path / "data", num_classes=3, per_class=(8, 3, 3), size=40)
    args = train_lib.parse_args([
        "--data-dir", str(root), "--model-dir", str(tmp_path / "model"), "--output-data-dir", str(tmp_path / "out"),
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--arch", "mobilenet_v3_small", "--weights", "none",
        "--image-size", "32", "--epochs", "2", "--freeze-epochs", "1", "--batch-size", "8",
        "--num-workers", "0", "--cache-features", "true", "--log-interval", "1000"])
    evaluation = train_lib.run(args)
    assert evaluation["epochs_run"] == 2
    out = capsys.readouterr().out
    assert out.count("cached backbone features: train (24, 1024)") == 1, out  # once, for the head-only epoch
    assert (tmp_path / "model" / "model.pth").is_file()


def test_cpu_threads_leave_the_workers_their_cores(monkeypatch):
    before = torch.get_num_threads()
    cpu = torch.device("cpu")
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        args = train_lib.parse_args(["--data-dir", "x"])
        train_lib.set_cpu_threads(args, cpu, workers=1)
        assert torch.get_num_threads() == max(1, train_lib.cpus_per_process() - 1)
        train_lib.set_cpu_threads(train_lib.parse_args(["--data-dir", "x", "--threads", "3"]), cpu, workers=1)
        assert torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice stands
        torch.set_num_threads(2)
        train_lib.set_cpu_threads(args, cpu, workers=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert train_lib.default_num_workers("cpu") >= 1


@pytest.mark.slow
def test_benchmark_runs_and_writes_its_figures(tmp_path):
    """bench/train_throughput.py end to end on a handful of images (figures not checked: no timing)."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "train_throughput.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(bench), "--classes", "2", "--per-class", "3", "--batch-size", "2", "--seconds", "0",
           "--rounds", "1", "--min-batches", "1", "--warmup", "0", "--cache-dir", str(tmp_path / "cache"),
           "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "train.json").read_text())
    assert set(result["ratio"]) == {"data", "step", "e2e"}
    assert result["baseline"]["settings"]["num_workers"] == 0
    assert result["ours"]["settings"]["channels_last"] is True
    assert result["images"]["count"] == 6
    assert "| end to end (data + step) |" in (tmp_path / "out" / "train.md").read_text()
    if not torch.cuda.is_available():
        done = subprocess.run([*cmd, "--device", "cuda"], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "no CUDA device" in done.stderr
