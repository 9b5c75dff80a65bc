"""Export the trained network to ONNX for the endpoint's fast path, validated first.

train_model.py calls export_model_dir() after training has written the model dir:

    model.onnx   the network, fp32, dynamic batch (TorchScript-based exporter,
                 which needs the `onnx` package; works on torch 2.6 and later)
    model.json   gains "onnx": {"file", "sha256", "opset", "validated": {...}}

The export is written only when ONNX Runtime, on every test image, gives the same
top-1 class as the PyTorch model and no class probability differs by more than
`tolerance` (1e-4). Otherwise, or when onnx/onnxruntime is not installed, the model
dir stays as it was (model.pth is always there: inference.py falls back to it)
and the job's log says why. Why ONNX Runtime: on a 2-core CPU it ran ResNet50 at
0.62x torch eager's latency (README, "Endpoint speed").
"""
from __future__ import annotations

import hashlib
import io
import os
import sys
import time
import warnings
from pathlib import Path

import torch

import modeling

OPSET = 17
TOLERANCE = 1e-4


class ExportSkipped(Exception):
    """The export was left out; the message says why."""


def to_onnx_bytes(net: torch.nn.Module, image_size: int, opset: int = OPSET) -> bytes:
    """The network as an ONNX model (bytes), batch dimension dynamic."""
    net = net.to("cpu", memory_format=torch.contiguous_format).eval()
    example = torch.zeros(1, 3, image_size, image_size)
    buffer = io.BytesIO()
    kwargs = dict(input_names=[modeling.ONNX_INPUT], output_names=[modeling.ONNX_OUTPUT], opset_version=opset,
                  dynamic_axes={modeling.ONNX_INPUT: {0: "batch"}, modeling.ONNX_OUTPUT: {0: "batch"}},
                  do_constant_folding=True)
    with warnings.catch_warnings():  # torch >= 2.9 warns that this exporter is the legacy one
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            torch.onnx.export(net, (example,), buffer, dynamo=False, **kwargs)
        except TypeError:  # torch < 2.5 has no dynamo= argument: its exporter is this one
            torch.onnx.export(net, (example,), buffer, **kwargs)
    return buffer.getvalue()


def compare(net: torch.nn.Module, fast, batches, tolerance: float = TOLERANCE) -> dict:
    """Both networks over `batches` of preprocessed pixels: top-1 agreement and the
    largest absolute difference of any class probability."""
    images = agree = 0
    worst = 0.0
    with torch.inference_mode():
        for pixels in batches:
            reference = net(pixels).float().softmax(dim=1)
            candidate = fast(pixels).float().softmax(dim=1)
            images += len(pixels)
            agree += int((reference.argmax(1) == candidate.argmax(1)).sum())
            worst = max(worst, float((reference - candidate).abs().max()))
    return {"images": images, "top1_agree": agree, "max_prob_diff": worst, "tolerance": tolerance,
            "passed": images > 0 and agree == images and worst <= tolerance}


def image_batches(paths: list[Path], meta: dict, load_image, batch_size: int = 32):
    """Test images preprocessed exactly as inference.py does (load_image: train_lib's
    reduced-scale decode, the same as serving's)."""
    transform = modeling.eval_transform(int(meta["resize_size"]), int(meta["image_size"]),
                                        meta.get("mean", modeling.IMAGENET_MEAN),
                                        meta.get("std", modeling.IMAGENET_STD))
    for start in range(0, len(paths), batch_size):
        yield torch.stack([transform(load_image(p, int(meta["resize_size"]))) for p in paths[start:start + batch_size]])


def export_model_dir(model_dir: str | os.PathLike, test_images: list[Path], load_image,
                     tolerance: float = TOLERANCE, opset: int = OPSET) -> dict:
    """Export model_dir's model.pth to model.onnx, validate it on test_images, then write
    it and record it in model.json. Returns model.json's "onnx" entry; raises ExportSkipped
    (nothing written) when the export cannot be made or does not match."""
    model_dir = Path(model_dir)
    (model_dir / modeling.ONNX_FILE).unlink(missing_ok=True)  # a previous run's: model.json no longer lists it
    if not test_images:
        raise ExportSkipped("no test images to validate the export on")
    try:
        import onnx  # noqa: F401  the TorchScript-based exporter needs it to write the file
        import onnxruntime
    except ImportError as err:
        raise ExportSkipped(f"{err.name or err} is not installed (pip install onnx onnxruntime; "
                            f"scripts/requirements.txt does)") from err
    net, meta = modeling.load_model(model_dir, device="cpu")
    start = time.perf_counter()
    try:
        data = to_onnx_bytes(net, int(meta["image_size"]), opset)
        fast = modeling.OnnxNet(data, threads=torch.get_num_threads())
    except Exception as err:  # an exporter or runtime limitation: the torch model still serves
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise ExportSkipped(f"export failed: {type(err).__name__}: {first_line}") from err
    check = compare(net, fast, image_batches(test_images, meta, load_image), tolerance)
    if not check["passed"]:
        raise ExportSkipped(f"ONNX Runtime disagrees with PyTorch on the test split: top-1 equal on "
                            f"{check['top1_agree']}/{check['images']} images, largest probability difference "
                            f"{check['max_prob_diff']:.2e} (allowed {tolerance:.0e})")
    path = model_dir / modeling.ONNX_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    entry = {"file": modeling.ONNX_FILE, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
             "opset": opset, "exporter": f"torch.onnx (TorchScript-based), torch {torch.__version__}",
             "validated": {"split": "test", "runtime": f"onnxruntime {onnxruntime.__version__}",
                           **{k: check[k] for k in ("images", "top1_agree", "max_prob_diff", "tolerance")},
                           "seconds": round(time.perf_counter() - start, 1)}}
    modeling.write_model_meta(model_dir, {**meta, "onnx": entry})
    return entry


def export_after_training(model_dir: str | os.PathLike, test_images: list[Path], load_image) -> dict | None:
    """export_model_dir, reported as one log line; never fails the training job (whatever goes
    wrong, model.pth is there and model.json does not name an export)."""
    print(f"onnx export: exporting and validating against PyTorch on {len(test_images)} test images ...", flush=True)
    try:
        entry = export_model_dir(model_dir, test_images, load_image)
    except Exception as err:  # ExportSkipped, or anything unforeseen: the trained model stands
        reason = str(err) if isinstance(err, ExportSkipped) else f"{type(err).__name__}: {err}"
        (Path(model_dir) / modeling.ONNX_FILE).unlink(missing_ok=True)
        print(f"warning: onnx export left out: {reason}; the endpoint serves model.pth with PyTorch",
              file=sys.stderr, flush=True)
        return None
    v = entry["validated"]
    print(f"onnx export: {entry['file']} ({entry['bytes'] / 1e6:.1f} MB) validated on {v['images']} test images: "
          f"top-1 equal on all, largest probability difference {v['max_prob_diff']:.1e} "
          f"({v['runtime']}, {v['seconds']}s)", flush=True)
    return entry
