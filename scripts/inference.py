"""SageMaker PyTorch inference handlers: image in, breed probabilities out.

The serving container (and our local server, pipeline/serve.py) imports this
file from the model's code/ dir and calls, per request:

    model = model_fn(model_dir)                  once, at start-up (model.onnx under
                                                 ONNX Runtime when present and valid, else model.pth)
    data = input_fn(body, content_type)          decode + validate
    prediction = predict_fn(data, model)         preprocess + forward
    body, type = output_fn(prediction, accept)   serialise

Requests:
  image/jpeg, image/png, application/x-image   one image (the raw file)
  application/json  {"instances": [{"b64": "<base64 image file>"}, ...]}   a batch

Answers (application/json), one object per image:
  {"probabilities": [one float per class, in model.json class order],
   "top": [{"index": 4, "label": "Alaskan malamute", "probability": 0.93}, ... 5]}
A single image answers that object; a JSON request answers
{"predictions": [object, ...]} in instance order, even for one instance: the
shape of the answer follows the shape of the request.

Bad input raises InferenceError(status, message): the inference toolkit (and
our server) turn its status into the HTTP status and its message into the body.

Handlers exchange plain data so that a server may batch several requests into
one forward pass: input_fn returns {"images": [PIL RGB images], "batch": bool},
predict_fn returns {"probabilities": Tensor[N, classes], "labels": [...],
"batch": bool} row-aligned with "images".

Nothing here imports the host's pipeline/: this file runs inside the container.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import importlib.util
import io
import json
import os
import stat
import sys
import tempfile
from http import HTTPStatus
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no core sharing, every call on all threads
    fcntl = None

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_TYPES = ("image/jpeg", "image/png", "application/x-image")
JSON_TYPE = "application/json"
ACCEPTED_INPUTS = ", ".join(IMAGE_TYPES + (JSON_TYPE + ' {"instances": [{"b64": ...}]}',))
TOP_K = 5
# Decompression-bomb guard: total decoded pixels per request (a 6 MB PNG can
# hold gigapixels of one colour). 40 MP = four 10-megapixel photos.
MAX_PIXELS = int(os.environ.get("INFERENCE_MAX_PIXELS", 40_000_000))
MAX_INSTANCES = int(os.environ.get("INFERENCE_MAX_INSTANCES", 64))
# Decode-work guards, per request. A progressive JPEG's decoder walks every coefficient block
# once per scan, so a 200 KB file repeating one refinement scan thousands of times costs
# minutes of CPU: work is counted in pixels x scans. Photos have 1 (baseline) to ~20 scans
# (libjpeg's progressive script has 10), so a 12 MP progressive photo is ~120 M of work.
MAX_JPEG_SCANS = int(os.environ.get("INFERENCE_MAX_JPEG_SCANS", 64))
MAX_DECODE_WORK = int(os.environ.get("INFERENCE_MAX_DECODE_WORK", 640_000_000))
# Memory a request's decoded images may take, with each mode's bytes per pixel and the
# conversion to RGB: a 39 KB PNG can declare 40 MP of one colour (160 MB decoded). 96 MiB
# holds a 24 MP RGB PNG; JPEGs decode at reduced size (reduced_decode) and stay far below.
MAX_DECODED_BYTES = int(os.environ.get("INFERENCE_MAX_DECODED_BYTES", 96 * 2**20))
# Training's loader decodes JPEGs at a reduced DCT scale (modeling.reduced_decode)
# while both sides stay >= the resize size; serving must see the same pixels.
# model_fn sets it: the toolkit and our server call model_fn before any input_fn.
_decode = {"min_size": None}

try:  # the toolkit turns its own error type into the HTTP status and message
    from sagemaker_inference.errors import GenericInferenceToolkitError as _ToolkitError
except ImportError:  # outside the container: same shape, no dependency
    class _ToolkitError(Exception):
        def __init__(self, status_code, message=None, phrase=None):
            self.status_code, self.message, self.phrase = status_code, message, phrase
            super().__init__(status_code, message, phrase)


class InferenceError(_ToolkitError):
    """A request the handlers refuse: `status_code` (4xx) and a message for the caller."""

    def __init__(self, status_code: int, message: str):
        # phrase becomes the HTTP reason phrase in the toolkit: keep it short
        super().__init__(int(status_code), message, HTTPStatus(status_code).phrase)

    def __str__(self) -> str:
        return self.message


def _load_modeling():
    """modeling.py ships next to this file in code/: load that very file, whatever
    else is on sys.path (the container puts code/ on it; tests and our server may not)."""
    path = Path(__file__).resolve().with_name("modeling.py")
    loaded = sys.modules.get("modeling")
    if loaded is not None and getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == path:
        return loaded
    if not path.is_file():
        raise ImportError(f"{path} is missing: the model's code/ dir must hold modeling.py next to inference.py")
    name = "modeling" if loaded is None else f"_modeling_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


modeling = _load_modeling()


class CoreShare:
    """The host's cores, shared by the model server's worker processes.

    The serving stack runs SAGEMAKER_MODEL_SERVER_WORKERS processes, each allowed every vCPU
    (OMP_NUM_THREADS). A lone request is answered fastest on all cores, but two forward passes
    that each spread over both cores of a 2-vCPU host cost more CPU per request than two on one
    core each (bench/endpoint.py --knobs: 2 workers x 1 thread serve 8 clients 8% faster than
    2 x 2, and a lone client 60% slower). So each forward pass counts the others in flight on
    this host and runs on cores // (others + 1) threads. Workers are separate processes: each
    call flock()s one of `slots` files in `directory` for its duration, and counts the slots
    it finds locked. A slot file is opened per call, so threads of one process count too."""

    def __init__(self, cores: int, slots: int, directory: str | os.PathLike):
        self.cores, self.slots, self.directory = max(1, cores), max(1, slots), Path(directory)
        self._warned = False

    @classmethod
    def for_host(cls, cores: int, slots: int) -> CoreShare | None:
        """One per host and user in the temp dir (INFERENCE_CORE_SLOTS_DIR elsewhere); None
        when there is nothing to share or the directory is not safely ours."""
        if fcntl is None or cores < 2 or slots < 2:
            return None
        directory = Path(os.environ.get("INFERENCE_CORE_SLOTS_DIR")
                         or Path(tempfile.gettempdir()) / f"inference-cores-{os.getuid()}")
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.lstat(directory)
        except OSError as err:
            print(f"warning: core sharing off: {directory}: {err}", file=sys.stderr, flush=True)
            return None
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
            print(f"warning: core sharing off: {directory} is not a directory only this user may write",
                  file=sys.stderr, flush=True)
            return None
        return cls(cores, slots, directory)

    @contextlib.contextmanager
    def threads(self):
        """Holds a slot while the body runs; yields the threads the body may use. A slot
        directory that fails (removed, disk full) costs the sharing, never the request."""
        try:
            held, busy = self._claim()
        except OSError as err:
            if not self._warned:
                self._warned = True
                print(f"warning: core sharing skipped: {self.directory}: {err}", file=sys.stderr, flush=True)
            held, busy = None, 0
        try:
            yield max(1, self.cores // (busy + 1))
        finally:
            if held is not None:
                os.close(held)

    def _claim(self) -> tuple[int | None, int]:
        """(the fd of the slot now held by this call or None, how many slots others hold)."""
        held, busy = None, 0
        try:
            for slot in range(self.slots):
                fd = os.open(self.directory / f"slot-{slot}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                             | getattr(os, "O_NOFOLLOW", 0), 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    busy += 1
                    os.close(fd)
                    continue
                if held is None:
                    held = fd
                else:
                    os.close(fd)  # a free slot: closing it unlocks it
        except BaseException:
            if held is not None:
                os.close(held)
            raise
        return held, busy


def _server_workers() -> int:
    """The model server's worker processes on this host: TorchServe starts one per vCPU
    unless SAGEMAKER_MODEL_SERVER_WORKERS says otherwise."""
    try:
        return max(1, int(os.environ.get("SAGEMAKER_MODEL_SERVER_WORKERS") or os.cpu_count() or 1))
    except ValueError:
        return os.cpu_count() or 1


def _fast_net(model_dir: str, meta: dict, device: torch.device, shares: int):
    """model.onnx under ONNX Runtime when model.json lists it, the runtime imports and the
    file's sha256 matches, with sessions for `shares` calls at once; else None (the torch
    path serves). INFERENCE_RUNTIME=torch skips it; INFERENCE_RUNTIME=onnx makes its
    absence an error instead of a fallback."""
    wanted = os.environ.get("INFERENCE_RUNTIME", "auto").strip().lower() or "auto"
    if wanted not in ("auto", "onnx", "torch"):
        raise ValueError(f"INFERENCE_RUNTIME={wanted!r}: use auto, onnx or torch")
    if wanted == "torch" or (wanted == "auto" and (device.type != "cpu" or "onnx" not in meta)):
        return None
    try:
        return modeling.load_onnx(model_dir, meta, threads=torch.get_num_threads(), shares=shares)
    except Exception as err:  # ImportError, missing or corrupt file, a runtime that refuses it
        if wanted == "onnx":
            raise RuntimeError(f"INFERENCE_RUNTIME=onnx but the ONNX model cannot be served: {err}") from err
        print(f"warning: {model_dir}/{modeling.ONNX_FILE} not used ({type(err).__name__}: {err}); "
              f"serving model.pth with PyTorch", file=sys.stderr, flush=True)
        return None


def _shares() -> int:
    """How many forward passes may share the cores at once: the server's workers, unless
    INFERENCE_SHARE_CORES=0 gives every call all threads."""
    if os.environ.get("INFERENCE_SHARE_CORES", "1").strip().lower() in ("0", "false", "no", "off"):
        return 1
    return min(_server_workers(), torch.get_num_threads())


def model_fn(model_dir: str) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta_path = Path(model_dir) / modeling.MODEL_META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    shares = _shares()
    net = _fast_net(model_dir, meta, device, shares)
    share = None
    if net is None:
        net, meta = modeling.load_model(model_dir, device=device)
        net = net.to(memory_format=torch.channels_last).eval()
    elif len(net.sessions) > 1:
        share = CoreShare.for_host(net.threads, shares)
    runtime = getattr(net, "runtime", "torch")
    print(f"model_fn: {model_dir}: {'model.onnx with ONNX Runtime' if runtime != 'torch' else 'model.pth with PyTorch'}"
          f" on {device}, {torch.get_num_threads()} threads"
          + (f", shared with up to {share.slots - 1} other calls" if share else ""), flush=True)
    labels = list(meta.get("labels") or [modeling.breed_label(c) for c in meta["classes"]])
    _decode["min_size"] = int(meta["resize_size"])
    return {"net": net, "meta": meta, "labels": labels, "transform": modeling.eval_transform(
        int(meta["resize_size"]), int(meta["image_size"]), meta.get("mean", modeling.IMAGENET_MEAN),
        meta.get("std", modeling.IMAGENET_STD)), "device": device,
        "runtime": runtime, "core_share": share}


def _media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


class DecodeBudget:
    """What one request's images may still cost to decode: pixels, work (pixels x JPEG scans)
    and decoded bytes. _decode_image charges it before it decodes anything."""

    def __init__(self, pixels: int | None = None, work: int | None = None, decoded_bytes: int | None = None):
        self.pixels = MAX_PIXELS if pixels is None else pixels
        self.work = MAX_DECODE_WORK if work is None else work
        self.bytes = MAX_DECODED_BYTES if decoded_bytes is None else decoded_bytes


# Bytes per pixel PIL holds for a mode (multi-band modes take 4), and what _to_rgb adds.
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4}
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "F")


def _decoded_bytes(mode: str, pixels: int) -> int:
    """Peak bytes of decoding an image of this mode and size and converting it to RGB."""
    per_pixel = _MODE_BYTES.get(mode, 4)
    if mode != "RGB":
        per_pixel += 4                      # the RGB copy
    if mode in _WIDE_MODES:
        per_pixel += 4 + 4 + 1              # rescaled via float ("F", twice) and 8-bit ("L")
    return pixels * per_pixel


def _jpeg_scans(raw: bytes, what: str = "JPEG") -> int:
    """Start-of-scan markers in a JPEG's top-level marker stream (embedded thumbnails are
    skipped with their segments). Stops counting once over MAX_JPEG_SCANS: the answer is
    then already 'too many'. A malformed stream stops the walk; PIL reports it."""
    scans, i, n, segments = 0, 2, len(raw), 0
    while i + 4 <= n and scans <= MAX_JPEG_SCANS:
        if raw[i] != 0xFF:
            break
        segments += 1
        if segments > 16 * MAX_JPEG_SCANS:  # photos have a few dozen; millions of empty ones cost CPU too
            raise InferenceError(413, f"{what} is a JPEG with over {16 * MAX_JPEG_SCANS} marker segments "
                                      f"(16 x INFERENCE_MAX_JPEG_SCANS); re-save it as a baseline JPEG")
        marker = raw[i + 1]
        if marker == 0xFF:                    # fill byte
            i += 1
            continue
        if marker == 0xD9:                    # end of image
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length
            i += 2
            continue
        i += 2 + int.from_bytes(raw[i + 2:i + 4], "big")
        if marker != 0xDA:
            continue
        scans += 1
        while True:                           # entropy-coded data: up to the next real marker
            i = raw.find(b"\xff", i)
            if i < 0 or i + 1 >= n:
                return scans
            following = raw[i + 1]
            if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
                i += 1 if following == 0xFF else 2
                continue
            break
    return scans


def _decode_image(raw: bytes, what: str, budget: DecodeBudget | int) -> Image.Image:
    if isinstance(budget, int):  # a pixel budget alone (the older signature)
        budget = DecodeBudget(pixels=budget)
    if not raw:
        raise InferenceError(400, f"{what} is empty: send a JPEG or PNG file")
    scans = _jpeg_scans(raw, what) if raw[:2] == b"\xff\xd8" else 1
    if scans > MAX_JPEG_SCANS:
        raise InferenceError(413, f"{what} is a JPEG with over {MAX_JPEG_SCANS} scans (INFERENCE_MAX_JPEG_SCANS); "
                                  f"photos have at most ~20: re-save it as a baseline JPEG")
    try:
        image = Image.open(io.BytesIO(raw))  # reads the header only
        width, height = image.size
        if width * height > budget.pixels:
            raise InferenceError(413, f"{what} is {width}x{height} pixels: over the limit of {MAX_PIXELS} "
                                      f"pixels per request (INFERENCE_MAX_PIXELS); send a smaller image")
        work = width * height * max(scans, 1)
        if work > budget.work:
            raise InferenceError(413, f"{what} is {width}x{height} pixels in {scans} JPEG scans: decoding it is over "
                                      f"the limit of {MAX_DECODE_WORK} pixel-scans per request "
                                      f"(INFERENCE_MAX_DECODE_WORK); send a smaller or baseline JPEG")
        image = modeling.reduced_decode(image, _decode["min_size"])
        decoded = _decoded_bytes(image.mode, image.width * image.height)
        if decoded > budget.bytes:
            raise InferenceError(413, f"{what} decodes to {image.width}x{image.height} {image.mode} pixels "
                                      f"(~{decoded // 2**20} MiB): over the limit of {MAX_DECODED_BYTES // 2**20} MiB "
                                      f"of decoded images per request (INFERENCE_MAX_DECODED_BYTES); "
                                      f"send a smaller image or a JPEG")
        budget.pixels -= image.width * image.height  # as decoded (JPEGs at reduced scale)
        budget.work -= work
        budget.bytes -= decoded
        image.load()  # decodes: a truncated file fails here
        ImageOps.exif_transpose(image, in_place=True)  # no copy of a 20 MP image when upright
    except InferenceError:
        raise
    except Image.DecompressionBombError as err:
        raise InferenceError(413, f"{what}: {err} Send a smaller image: at most {MAX_PIXELS} pixels "
                                  f"per request (INFERENCE_MAX_PIXELS)") from err
    except UnidentifiedImageError as err:
        raise InferenceError(400, f"{what} is not an image PIL can read ({len(raw)} bytes): "
                                  f"send a JPEG or PNG file") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise InferenceError(400, f"{what} is truncated or corrupt ({err}): send the complete image file") from err
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit/float greyscale: rescale, don't clip
        image = image.convert("F")
        lo, hi = image.getextrema()
        image = image.point(lambda v: (v - lo) * 255.0 / ((hi - lo) or 1.0)).convert("L")
    # same pixels as torchvision's ImageFolder loader (convert("RGB")), without its copy of RGB images
    return image if image.mode == "RGB" else image.convert("RGB")


def _decode_json(body: bytes | str) -> list[bytes]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: '[' nested 100,000 deep
        raise InferenceError(400, f"body is not valid JSON ({err}): "
                                  f"send {{\"instances\": [{{\"b64\": \"...\"}}]}}") from err
    instances = payload.get("instances") if isinstance(payload, dict) else None
    if not isinstance(instances, list) or not instances:
        raise InferenceError(400, 'JSON body needs a non-empty "instances" list: '
                                  '{"instances": [{"b64": "<base64 JPEG or PNG>"}]}')
    if len(instances) > MAX_INSTANCES:
        raise InferenceError(413, f'"instances" holds {len(instances)} images: at most {MAX_INSTANCES} per request')
    files = []
    for i, instance in enumerate(instances):
        encoded = instance.get("b64") if isinstance(instance, dict) else None
        if not isinstance(encoded, str):
            raise InferenceError(400, f'instances[{i}] must be {{"b64": "<base64 JPEG or PNG>"}}, '
                                      f'got {type(instance).__name__}'
                                      + (f" with keys {sorted(instance)}" if isinstance(instance, dict) else ""))
        try:
            files.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError) as err:
            raise InferenceError(400, f"instances[{i}].b64 is not valid base64 ({err})") from err
    return files


def input_fn(request_body: bytes | str, content_type: str | None) -> dict:
    media = _media_type(content_type)
    if media in IMAGE_TYPES:
        if isinstance(request_body, str):  # only if a server decoded it: not an image anyway
            request_body = request_body.encode("utf-8")
        return {"images": [_decode_image(request_body, "image", DecodeBudget())], "batch": False}
    if media == JSON_TYPE:
        budget = DecodeBudget()  # one for the whole request: _decode_image charges it
        return {"images": [_decode_image(raw, f"instances[{i}]", budget)
                           for i, raw in enumerate(_decode_json(request_body))], "batch": True}
    raise InferenceError(415, f"Content-Type {content_type!r} is not supported: send one of {ACCEPTED_INPUTS}")


def predict_fn(data: dict, model: dict) -> dict:
    pixels = torch.stack([model["transform"](image) for image in data["images"]])
    if model.get("runtime", "torch") == "torch":
        pixels = pixels.to(model["device"], memory_format=torch.channels_last)
    share = model.get("core_share")
    with torch.inference_mode():
        if share is None:
            logits = model["net"](pixels)
        else:
            with share.threads() as threads:
                logits = model["net"](pixels, threads=threads)
        probabilities = logits.float().softmax(dim=1).cpu()
    return {"probabilities": probabilities, "labels": model["labels"], "batch": data["batch"]}


def _accepts_json(accept: str | None) -> bool:
    if not accept:
        return True
    return any(_media_type(part) in (JSON_TYPE, "application/*", "*/*") for part in accept.split(","))


def _describe(row: torch.Tensor, labels: list[str]) -> dict:
    top = row.topk(min(TOP_K, row.numel()))
    return {"probabilities": row.tolist(),
            "top": [{"index": int(i), "label": labels[int(i)], "probability": float(p)}
                    for p, i in zip(top.values, top.indices)]}


def output_fn(prediction: dict, accept: str | None) -> tuple[str, str]:
    if not _accepts_json(accept):
        raise InferenceError(406, f"Accept {accept!r} is not supported: answers are {JSON_TYPE}")
    answers = [_describe(row, prediction["labels"]) for row in prediction["probabilities"]]
    body = {"predictions": answers} if prediction["batch"] else answers[0]
    return json.dumps(body), JSON_TYPE


# ---------------------------------------------------------------- errors on the serving stack
# The inference toolkit (sagemaker-inference's Transformer) answers a handler's exception
# in plain text with a full Python traceback appended (Transformer.handle_error), file
# paths included. It passes the request context to a handler that takes one more argument,
# so each handler below takes `context`: with one, a refusal becomes the HTTP status set on
# the context and a JSON body {"error": message}, the same status and body as our own
# server (pipeline/serve.py) gives; without one (our server, tests) the exception is raised
# as before. Anything that is not an InferenceError is a 500 whose details go to the log.
import functools  # noqa: E402
import logging  # noqa: E402

_log = logging.getLogger(__name__)


class _Refusal:
    """An answered error travelling through the remaining handlers to output_fn."""

    def __init__(self, status_code: int, message: str):
        self.status_code, self.message = status_code, message


def _refusal(err: Exception) -> _Refusal:
    if isinstance(err, _ToolkitError) and 400 <= int(getattr(err, "status_code", 0) or 0) < 600:
        return _Refusal(int(err.status_code), str(getattr(err, "message", None) or err))
    _log.error("handler error", exc_info=err)
    return _Refusal(500, f"internal error in the model's handlers ({type(err).__name__}); see the server log")


def _answering_errors(handler):
    @functools.wraps(handler)
    def with_context(first, second, context=None):
        if context is None:
            return handler(first, second)
        if isinstance(first, _Refusal):
            return first
        try:
            return handler(first, second)
        except Exception as err:  # noqa: BLE001 - the contract: every failure is a JSON answer
            return _refusal(err)
    del with_context.__wrapped__  # the toolkit counts this function's own parameters
    return with_context


def _output_answering_errors(handler):
    answer = _answering_errors(handler)

    @functools.wraps(handler)
    def with_context(prediction, accept, context=None):
        result = answer(prediction, accept, context)
        if isinstance(result, _Refusal):
            context.set_response_status(result.status_code, HTTPStatus(result.status_code).phrase)
            # byte for byte what our server's JSONResponse writes
            return json.dumps({"error": result.message}, ensure_ascii=False, separators=(",", ":")), JSON_TYPE
        return result
    del with_context.__wrapped__
    return with_context


input_fn = _answering_errors(input_fn)
predict_fn = _answering_errors(predict_fn)
output_fn = _output_answering_errors(output_fn)
