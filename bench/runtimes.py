"""Which CPU runtime serves the classifier fastest: one process, the same input, interleaved.

    python bench/runtimes.py [--arch resnet50] [--image-size 224] [--threads 2] [--rounds 5]

Candidates (each skipped, with the reason, when it cannot run here): torch eager
(contiguous and channels_last, what inference.py's torch path runs), torch.compile,
torch dynamic int8 quantization (Linear layers), the model exported by
scripts/export.py under ONNX Runtime (what the endpoint's fast path runs), and the
same ONNX file under OpenVINO. Per candidate: batch-1 latency p50/min and batch-8
time per image, as ratios to torch eager measured in the same rounds, and the
largest class-probability difference from torch eager on a few natural-ish
images (which must stay <= 1e-4 for the export to be accepted). Random weights:
speed does not depend on them. Writes bench/results/runtimes.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/endpoint.py: same for every candidate

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import export  # noqa: E402  scripts/export.py
import modeling  # noqa: E402

BASE = "torch eager, channels_last (today's torch path)"


def candidates(net: torch.nn.Module, onnx_bytes: bytes, threads: int) -> dict:
    """name -> (callable(pixels) -> logits, or the reason it is not available)."""
    net_cl = __import__("copy").deepcopy(net).to(memory_format=torch.channels_last)
    out = {BASE: lambda x: net_cl(x.contiguous(memory_format=torch.channels_last)),
           "torch eager, contiguous": lambda x: net(x)}
    try:
        compiled = torch.compile(__import__("copy").deepcopy(net).to(memory_format=torch.channels_last))
        compiled(torch.zeros(1, 3, 224, 224).contiguous(memory_format=torch.channels_last))
        compiled(torch.zeros(8, 3, 224, 224).contiguous(memory_format=torch.channels_last))
        out["torch.compile (inductor), channels_last"] = \
            lambda x: compiled(x.contiguous(memory_format=torch.channels_last))
    except Exception as err:  # noqa: BLE001
        out["torch.compile (inductor), channels_last"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    try:
        quantized = torch.ao.quantization.quantize_dynamic(__import__("copy").deepcopy(net), {torch.nn.Linear},
                                                           dtype=torch.qint8)
        out["torch dynamic int8 (Linear)"] = lambda x: quantized(x)
    except Exception as err:  # noqa: BLE001
        out["torch dynamic int8 (Linear)"] = f"{type(err).__name__}: {err}"
    try:
        ort_net = modeling.OnnxNet(onnx_bytes, threads)
        out[f"ONNX Runtime {ort_net.version} (the fast path)"] = ort_net
    except Exception as err:  # noqa: BLE001
        out["ONNX Runtime"] = f"{type(err).__name__}: {err}"
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        try:  # what a dedicated instance gets by default: idle threads spin
            os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
            out["ONNX Runtime, spinning threads"] = modeling.OnnxNet(onnx_bytes, threads)
        except Exception as err:  # noqa: BLE001
            out["ONNX Runtime, spinning threads"] = f"{type(err).__name__}: {err}"
        finally:
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        import openvino as ov

        core = ov.Core()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            path.write_bytes(onnx_bytes)
            compiled_ov = core.compile_model(core.read_model(str(path)), "CPU",
                                             {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                              "INFERENCE_PRECISION_HINT": "f32"})
        request = compiled_ov.create_infer_request()
        out[f"OpenVINO {ov.__version__.split('-')[0]} (same ONNX file)"] = \
            lambda x: torch.from_numpy(request.infer({0: x.numpy()})[0].copy())
    except Exception as err:  # noqa: BLE001
        out["OpenVINO"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return out


def natural_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth, photo-like pixels (blurred noise + gradients), normalised as serving does."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        coarse = rng.uniform(0, 1, (3, 8, 8))
        smooth = torch.nn.functional.interpolate(torch.tensor(coarse)[None], size=(size, size), mode="bicubic")[0]
        noise = torch.Generator().manual_seed(int(rng.integers(1e9)))
        smooth = smooth + 0.05 * torch.randn(3, size, size, generator=noise)
        mean = torch.tensor(modeling.IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(modeling.IMAGENET_STD)[:, None, None]
        images.append(((smooth.clamp(0, 1) - mean) / std).float())
    return torch.stack(images)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=133)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-round", type=int, default=6, help="batch-1 forwards per candidate per round")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "runtimes.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    net = modeling.build_model(args.arch, args.classes, weights="none").eval()
    onnx_bytes = export.to_onnx_bytes(net, args.image_size)
    print(f"{args.arch} {args.image_size}px {args.classes} classes, {args.threads} threads; compiling candidates ...",
          flush=True)
    with torch.inference_mode():
        runs = candidates(net, onnx_bytes, args.threads)
        usable = {k: v for k, v in runs.items() if callable(v)}
        x1 = natural_images(1, args.image_size)
        x8 = natural_images(8, args.image_size, seed=1)
        check = natural_images(16, args.image_size, seed=2)
        reference = net(check).softmax(1)  # eager fp32: the model the export is validated against
        accuracy = {}
        for name, fn in usable.items():
            fn(x1), fn(x8)  # warm-up
            probs = fn(check).float().softmax(1)
            accuracy[name] = {"max_prob_diff": float((probs - reference).abs().max()),
                              "top1_equal": int((probs.argmax(1) == reference.argmax(1)).sum()), "images": len(check)}
        b1 = {k: [] for k in usable}
        b8 = {k: [] for k in usable}
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            for _ in range(args.per_round):  # one call per candidate in turn: they share the load
                for name, fn in usable.items():
                    start = time.perf_counter()
                    fn(x1)
                    b1[name].append(time.perf_counter() - start)
            for name, fn in usable.items():
                start = time.perf_counter()
                fn(x8)
                b8[name].append((time.perf_counter() - start) / 8)
    base = BASE
    p50 = {k: float(np.median(v)) * 1000 for k, v in b1.items()}
    per8 = {k: float(np.median(v)) * 1000 for k, v in b8.items()}
    rows = []
    for name in runs:
        if name not in usable:
            rows.append({"runtime": name, "skipped": runs[name]})
            continue
        rows.append({"runtime": name, "batch1_p50_ms": round(p50[name], 2),
                     "batch1_min_ms": round(min(b1[name]) * 1000, 2),
                     "batch1_p50_over_eager": round(p50[name] / p50[base], 3),
                     "batch8_per_image_ms": round(per8[name], 2),
                     "batch8_over_eager": round(per8[name] / per8[base], 3), **accuracy[name]})
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_average_before": [round(x, 2) for x in load_before],
                          "load_average_after": [round(x, 2) for x in os.getloadavg()],
                          "note": "shared 2-core machine: ratios from interleaved rounds, absolute times noisy"},
              "versions": {"python": platform.python_version(), "torch": torch.__version__},
              "settings": {k: getattr(args, k) for k in ("arch", "image_size", "classes", "threads", "rounds",
                                                          "per_round")}
              | {"OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"]},
              "runtimes": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| runtime | batch 1 p50 (ms) | vs eager | batch 8 per image (ms) | vs eager | max prob diff "
             "| top-1 equal |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['runtime']} | skipped: {row['skipped']} | | | | | |")
        else:
            lines.append(f"| {row['runtime']} | {row['batch1_p50_ms']:.1f} | {row['batch1_p50_over_eager']:.2f}x | "
                         f"{row['batch8_per_image_ms']:.1f} | {row['batch8_over_eager']:.2f}x | "
                         f"{row['max_prob_diff']:.1e} | {row['top1_equal']}/{row['images']} |")
    out.with_suffix(".md").write_text(
        f"{args.arch}, {args.image_size} px, {args.classes} classes, fp32, {args.threads} threads, "
        f"load {result['machine']['load_average_before'][0]} -> {result['machine']['load_average_after'][0]} "
        f"({result['when']})\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
