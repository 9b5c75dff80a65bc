"""The classifier: a torchvision backbone with its head resized to our classes.

Shared by training (train_lib.py) and serving (inference.py): the model archive
ships this file next to inference.py under code/, so both sides build the very
same module tree and a state_dict saved by one loads in the other.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision import transforms

# ImageNet statistics: what every torchvision classification weight was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MODEL_WEIGHTS_FILE = "model.pth"
MODEL_META_FILE = "model.json"


def breed_label(class_dir: str) -> str:
    """`"005.Alaskan_malamute"` -> `"Alaskan malamute"` (dogImages folder naming)."""
    name = re.sub(r"^\d+[._-]", "", class_dir)
    return name.replace("_", " ").strip() or class_dir


def _last_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    last = None
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                last = (parent, name, child)
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head to replace")
    return last


def _head_name(model: nn.Module) -> str:
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head to replace")
    return names[-1]


def replace_head(model: nn.Module, num_classes: int) -> nn.Linear:
    """Swap the classifier's final Linear layer for one with `num_classes` outputs."""
    parent, name, old = _last_linear(model)
    head = nn.Linear(old.in_features, num_classes)
    setattr(parent, name, head)
    return head


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(_last_linear(model)[2].parameters())


def resolve_weights(arch: str, weights: str):
    """`imagenet` -> the architecture's DEFAULT torchvision weights (IMAGENET1K_V2 for
    ResNet50); `none` -> None. Anything else is a file path, handled by the caller."""
    if weights == "none":
        return None
    if weights == "imagenet":
        try:
            return torchvision.models.get_model_weights(arch).DEFAULT
        except (ValueError, KeyError) as err:
            raise ValueError(f"--arch {arch!r} has no pretrained torchvision weights: {err}") from err
    return None


def build_model(arch: str, num_classes: int, weights: str = "none") -> nn.Module:
    """A torchvision classifier with a fresh `num_classes` head.

    weights: `imagenet` (downloads on first use), `none` (random init), or a path
    to a state_dict / torchvision checkpoint of the backbone (for accounts
    without internet); its own head, if any, is dropped.
    """
    # classification models only: get_model() would also build detection/video models
    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=4, cutoff=0.5)
        raise ValueError(f"--arch {arch!r}: not a torchvision classification model"
                         + (f"; did you mean {', '.join(close)}?" if close else "")
                         + f" (e.g. resnet50, resnet18, mobilenet_v3_small, efficientnet_b0; {len(known)} in all)")
    builder_weights = resolve_weights(arch, weights)
    model = torchvision.models.get_model(arch, weights=builder_weights)
    if weights not in ("imagenet", "none"):
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"--weights {weights!r}: not 'imagenet', 'none' or an existing file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        head_prefix = _head_name(model) + "."
        state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
        _, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"--weights {weights!r}: keys not in {arch}: {unexpected[:5]}")
    replace_head(model, num_classes)
    return model


def eval_geometry(arch: str, weights: str, image_size: int | None = None,
                  resize_size: int | None = None) -> tuple[int, int]:
    """(resize, crop) for evaluation: the weights' own preset (232/224 for ResNet50
    IMAGENET1K_V2) unless overridden; 256/224 without pretrained weights."""
    resize, crop = 256, 224
    try:
        preset = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
        resize, crop = int(preset.resize_size[0]), int(preset.crop_size[0])
    except Exception:  # models without registered weights keep the classic preset
        pass
    if image_size:
        resize = round(resize * image_size / crop)
        crop = image_size
    if resize_size:
        resize = resize_size
    return resize, crop


def reduced_decode(image, min_size: int | None):
    """Have a just-opened JPEG decode at the smallest DCT scale (1/2, 1/4, 1/8) at which
    both sides stay >= min_size: much faster on big photos, and the resize that follows
    loses nothing. Other formats are left as they are. Training and serving both call it,
    so they see the same pixels."""
    if min_size and image.format == "JPEG":
        image.draft("RGB", (min_size, min_size))
    return image


def eval_pixels(resize: int, crop: int) -> transforms.Compose:
    """Evaluation geometry: shorter side to `resize`, centre crop `crop`."""
    return transforms.Compose([transforms.Resize(resize, antialias=True), transforms.CenterCrop(crop)])


def eval_transform(resize: int, crop: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> transforms.Compose:
    """Evaluation preprocessing of a loaded RGB image into a normalised float tensor."""
    return transforms.Compose([*eval_pixels(resize, crop).transforms, transforms.ToTensor(),
                               transforms.Normalize(mean, std)])


def write_model_meta(model_dir: str | os.PathLike, meta: dict) -> Path:
    path = Path(model_dir) / MODEL_META_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def load_model(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from model.json and load model.pth (weights_only=True)."""
    model_dir = Path(model_dir)
    meta_path = model_dir / MODEL_META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing: a model dir holds {MODEL_WEIGHTS_FILE} and {MODEL_META_FILE}")
    meta = json.loads(meta_path.read_text())
    model = build_model(meta["arch"], len(meta["classes"]), weights="none")
    state = torch.load(model_dir / MODEL_WEIGHTS_FILE, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), meta


# ----------------------------------------------------------------------------- ONNX fast path

ONNX_FILE = "model.onnx"
ONNX_INPUT, ONNX_OUTPUT = "pixels", "logits"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OnnxNet:
    """The exported network run by ONNX Runtime, called like the torch module:
    float pixels [N, 3, H, W] in, float32 logits [N, classes] out (CPU tensors).

    `threads` is the most intra-op threads a call may use. With `shares` > 1 it also holds
    sessions for threads/2, threads/4, ... down to threads/shares (ONNX Runtime fixes a
    session's thread count), so a caller that shares the cores with other processes can run
    a call on fewer threads: net(pixels, threads=1). Each session holds its own weights."""

    runtime = "onnxruntime"

    def __init__(self, model: bytes | str, threads: int = 0, shares: int = 1):
        import onnxruntime as ort  # lazily: the torch path must work without it

        def session(intra_op_threads: int):
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.intra_op_num_threads = intra_op_threads  # 0: one per physical core
            options.inter_op_num_threads = 1
            if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
                # idle threads sleep instead of spinning, like torch's OpenMP under the same setting
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])

        self.threads = max(0, int(threads))
        counts, floor = [self.threads], max(1, self.threads // max(1, int(shares)))
        while counts[-1] // 2 >= floor:
            counts.append(counts[-1] // 2)
        self.sessions = {count: session(count) for count in counts}  # most threads first
        self.session = self.sessions[self.threads]
        self.version = ort.__version__

    def __call__(self, pixels: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        session = self.session
        if threads is not None:  # the session with the most threads up to `threads`
            session = next((s for count, s in self.sessions.items() if count <= max(1, threads)), session)
        array = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = session.run([ONNX_OUTPUT], {ONNX_INPUT: array})
        return torch.from_numpy(logits)

    def eval(self):  # the torch module's interface, for code that calls it
        return self


def load_onnx(model_dir: str | os.PathLike, meta: dict, threads: int = 0, shares: int = 1) -> OnnxNet:
    """model.json's "onnx" entry -> an OnnxNet, after checking the file's sha256 against it.
    Raises (ImportError, FileNotFoundError, ValueError, onnxruntime's errors) when that
    cannot be had: the caller decides whether to fall back to model.pth."""
    entry = meta.get("onnx")
    if not isinstance(entry, dict) or not entry.get("file"):
        raise FileNotFoundError(f"{MODEL_META_FILE} lists no ONNX export")
    name = Path(entry["file"])
    if name.is_absolute() or ".." in name.parts:
        raise ValueError(f"{MODEL_META_FILE}: onnx.file {entry['file']!r} must be a file inside the model dir")
    path = Path(model_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.get("sha256"):
        raise ValueError(f"{path}: sha256 {digest[:12]}... differs from {MODEL_META_FILE}'s "
                         f"{str(entry.get('sha256'))[:12]}...: the file is corrupt or not this model's")
    return OnnxNet(data, threads, shares)
