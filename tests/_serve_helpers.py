"""Model dirs, images and HTTP helpers for the inference and endpoint tests."""
from __future__ import annotations

import base64
import io
import json
import socket
import struct
import sys
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import torch
from PIL import Image

from pipeline.sample_data import DOG_CLASS_DIRS
from scripts import modeling

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # model_dir imports its siblings as top-level modules, as in the container
import model_dir as model_dir_layout  # noqa: E402

CLASSES = DOG_CLASS_DIRS[:5]  # 001.Affenpinscher ... 005.Alaskan_malamute
LABELS = [modeling.breed_label(c) for c in CLASSES]


def make_model_dir(path: Path, arch: str = "resnet18", classes=CLASSES, image_size: int = 48,
                   resize_size: int = 56, seed: int = 0, extra_code: dict[str, str] | None = None) -> Path:
    """A model dir as the training job writes it (scripts/model_dir.py), with random weights
    (resnet18: unlike mobilenet_v3_small, its random init answers differently for different images)."""
    torch.manual_seed(seed)
    model = modeling.build_model(arch, len(classes), weights="none").eval()
    model_dir_layout.write_model_dir(path, model.state_dict(),
                                     model_dir_layout.model_meta(arch, classes, image_size, resize_size),
                                     evaluation={"accuracy": 0.2}, requirements="")
    for name, text in (extra_code or {}).items():
        (path / "code" / name).write_text(text)
    return path


def make_tarball(model_dir: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz", compresslevel=1) as tar:
        for item in sorted(model_dir.iterdir()):
            tar.add(item, arcname=item.name)
    return dest


def image_bytes(fmt: str = "JPEG", size=(80, 60), colour=(200, 40, 30), mode: str = "RGB", **save) -> bytes:
    image = Image.new(mode, size, colour if mode in ("RGB", "RGBA") else colour[0])
    # a stripe so that orientation matters
    for x in range(size[0] // 4):
        for y in range(size[1]):
            image.putpixel((x, y), (0, 0, 255) if mode == "RGB" else (0, 0, 255, 255) if mode == "RGBA" else 0)
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def b64_batch(*files: bytes) -> bytes:
    return json.dumps({"instances": [{"b64": base64.b64encode(f).decode()} for f in files]}).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes, content_type: str | None, accept: str | None = "application/json",
         timeout: float = 30.0) -> tuple[int, dict, dict]:
    """POST to url/invocations; (status, JSON body, headers) for any status."""
    headers = {k: v for k, v in (("Content-Type", content_type), ("Accept", accept)) if v}
    request = urllib.request.Request(url + "/invocations", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read()), {k.lower(): v for k, v in reply.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null"), {k.lower(): v for k, v in err.headers.items()}


def ping(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/ping", timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


def png_header_only(width, height):
    """A PNG that claims width x height: what a decompression bomb looks like before decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
