"""scripts/inference.py under its contract: the real sagemaker-inference Transformer calls it,
in process, the way the SageMaker PyTorch serving container does (minus the Java model server)."""
import importlib.util
import io
import json
import sys
import types

import pytest
import torch
from PIL import Image
from sagemaker_inference import transformer as transformer_mod

from scripts import modeling
from tests._serve_helpers import CLASSES, LABELS, ROOT, b64_batch, image_bytes, make_model_dir, png_header_only


class _Request:
    def __init__(self, headers):
        self.headers = headers

    def get_request_properties(self):
        return self.headers


class Context:
    """What the model server hands Transformer.transform: request headers in, status out."""

    def __init__(self, model_dir, content_type, accept):
        self.system_properties = {"model_dir": str(model_dir)}
        headers = {k: v for k, v in (("Content-Type", content_type), ("Accept", accept)) if v is not None}
        self.request_processor = [_Request(headers)]
        self.status, self.phrase, self.content_type = 200, None, None

    def set_response_status(self, code, phrase):
        self.status, self.phrase = code, phrase

    def set_response_content_type(self, idx, content_type):
        self.content_type = content_type


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("inference") / "model")


@pytest.fixture(scope="module")
def handlers(model_dir):
    """code/inference.py imported as the container does: code/ on sys.path, module `inference`."""
    sys.path.insert(0, str(model_dir / "code"))
    saved = {name: sys.modules.pop(name) for name in ("inference", "modeling") if name in sys.modules}
    try:
        yield importlib.import_module("inference")
    finally:
        sys.path.remove(str(model_dir / "code"))
        for name in ("inference", "modeling"):
            sys.modules.pop(name, None)
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def transform(model_dir, handlers):
    t = transformer_mod.Transformer()
    worker = {}

    def call(body, content_type, accept="application/json"):
        # TorchServe keeps one context per worker and swaps in each request's headers and status;
        # the Transformer hands handlers the context it saw first, so reuse one here too.
        fresh = Context(model_dir, content_type, accept)
        ctx = worker.setdefault("ctx", fresh)
        ctx.__dict__.update(fresh.__dict__)
        (out,) = t.transform([{"body": body}], ctx)
        return ctx, out

    return call


def _answer(ctx, out):
    assert ctx.status == 200, out
    assert ctx.content_type == "application/json"
    return json.loads(out)


def _check_answer(answer):
    probs = torch.tensor(answer["probabilities"])
    assert probs.shape == (len(CLASSES),)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    top = answer["top"]
    assert len(top) == 5 and [t["label"] for t in top] == [LABELS[t["index"]] for t in top]
    assert top[0]["index"] == int(probs.argmax())
    assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
    assert all(t["probability"] == pytest.approx(answer["probabilities"][t["index"]]) for t in top)
    return probs


@pytest.mark.parametrize("fmt,content_type", [("JPEG", "image/jpeg"), ("PNG", "image/png"),
                                               ("PNG", "application/x-image"), ("JPEG", "image/jpeg; q=1")])
def test_single_image_answers_probabilities_and_named_top5(transform, fmt, content_type):
    answer = _answer(*transform(image_bytes(fmt), content_type, accept="*/*"))
    _check_answer(answer)
    assert set(t["label"] for t in answer["top"]) <= set(LABELS) and "Alaskan malamute" in LABELS


def test_json_batch_answers_predictions_in_order_equal_to_single_images(transform):
    jpeg, png = image_bytes("JPEG"), image_bytes("PNG", colour=(10, 200, 90))
    answer = _answer(*transform(b64_batch(jpeg, png, jpeg), "application/json"))
    assert list(answer) == ["predictions"] and len(answer["predictions"]) == 3
    singles = [_check_answer(_answer(*transform(f, "image/jpeg"))) for f in (jpeg, png)]
    batch = [_check_answer(a) for a in answer["predictions"]]
    assert torch.allclose(batch[0], singles[0], atol=1e-6) and torch.allclose(batch[2], singles[0], atol=1e-6)
    assert torch.allclose(batch[1], singles[1], atol=1e-6)
    assert not torch.allclose(singles[0], singles[1], atol=1e-6)  # the images differ, so must the answers


def test_json_with_charset_arrives_as_bytes_and_still_works(transform):
    answer = _answer(*transform(b64_batch(image_bytes()), "application/json; charset=utf-8"))
    assert len(answer["predictions"]) == 1


def test_exif_orientation_is_applied(handlers):
    upright = Image.open(io.BytesIO(image_bytes("PNG", size=(80, 60))))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a camera held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    stored.save(buf, "PNG", exif=exif)
    (decoded,) = handlers.input_fn(buf.getvalue(), "image/png")["images"]
    assert decoded.size == (80, 60) and decoded.tobytes() == upright.convert("RGB").tobytes()


@pytest.mark.parametrize("mode,fmt", [("RGBA", "PNG"), ("L", "PNG"), ("P", "PNG"), ("I;16", "PNG"), ("CMYK", "JPEG"),
                                      ("1", "PNG"), ("LA", "PNG")])
def test_any_image_mode_becomes_rgb(handlers, mode, fmt):
    image = Image.new("RGB", (40, 30), (200, 40, 30)).convert(mode)
    if mode == "I;16":
        image = Image.frombytes("I;16", (40, 30), bytes(range(256)) * 9 + bytes(96))
    buf = io.BytesIO()
    image.save(buf, fmt)
    (decoded,) = handlers.input_fn(buf.getvalue(), "image/png")["images"]
    assert decoded.mode == "RGB" and decoded.size == (40, 30)


JPEG = image_bytes("JPEG", size=(64, 48))
BAD_INPUTS = [
    # body, content type, accept, status, words the message must hold
    (b"", "image/jpeg", None, 400, ["empty", "JPEG"]),
    (b"hello, not a picture", "image/jpeg", None, 400, ["not an image", "JPEG or PNG"]),
    (JPEG[: len(JPEG) // 2], "image/jpeg", None, 400, ["truncated", "complete image"]),
    (JPEG, "text/plain", None, 415, ["text/plain", "image/jpeg", "image/png", "application/json"]),
    (JPEG, None, None, 415, ["None", "image/jpeg"]),
    (JPEG, "image/jpeg", "text/csv", 406, ["text/csv", "application/json"]),
    (png_header_only(8000, 6000), "image/png", None, 413, ["8000x6000", "INFERENCE_MAX_PIXELS"]),
    (png_header_only(100_000, 100_000), "image/png", None, 413, ["decompression bomb", "INFERENCE_MAX_PIXELS"]),
    (b'{"instances": [{"b64": "%%% not base64"}]}', "application/json", None, 400, ["instances[0].b64", "base64"]),
    (b"{not json", "application/json", None, 400, ["not valid JSON", "instances"]),
    (b'{"images": []}', "application/json", None, 400, ['"instances"']),
    (b'{"instances": ["abc"]}', "application/json", None, 400, ["instances[0]", "b64"]),
    (b64_batch(JPEG, b"junk"), "application/json", None, 400, ["instances[1]", "not an image"]),
    (b64_batch(*[JPEG] * 65), "application/json", None, 413, ["65", "at most 64"]),
]


@pytest.mark.parametrize("body,content_type,accept,status,words", BAD_INPUTS,
                         ids=[f"{i}-{case[3]}" for i, case in enumerate(BAD_INPUTS)])
def test_bad_input_becomes_a_4xx_naming_the_problem(transform, body, content_type, accept, status, words):
    ctx, out = transform(body, content_type, accept or "application/json")
    assert ctx.status == status, out
    assert ctx.content_type == "application/json" and "Traceback" not in out  # not the toolkit's error text
    message = json.loads(out)["error"]
    for word in words:
        assert word in message
    assert ctx.phrase and "\n" not in ctx.phrase


def test_batched_predict_equals_one_by_one(handlers, model_dir):
    model = handlers.model_fn(str(model_dir))
    files = [image_bytes("PNG", colour=(i * 60, 100, 255 - i * 60), size=(50 + i * 7, 40)) for i in range(4)]
    together = handlers.predict_fn(handlers.input_fn(b64_batch(*files), "application/json"), model)
    alone = [handlers.predict_fn(handlers.input_fn(f, "image/png"), model)["probabilities"][0] for f in files]
    assert torch.allclose(together["probabilities"], torch.stack(alone), atol=1e-6)


def test_labels_fall_back_to_breed_names_from_class_folders(tmp_path, handlers):
    model_dir = make_model_dir(tmp_path / "m")
    meta = json.loads((model_dir / "model.json").read_text())
    del meta["labels"]
    (model_dir / "model.json").write_text(json.dumps(meta))
    assert handlers.model_fn(str(model_dir))["labels"] == LABELS


def _load_copy(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_imports_its_own_modeling_whatever_else_is_loaded(model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "modeling", types.ModuleType("modeling"))  # someone else's module
    module = _load_copy(model_dir / "code" / "inference.py", "inference_copy")
    assert module.modeling.__file__ == str((model_dir / "code" / "modeling.py").resolve())
    assert module.model_fn(str(model_dir))["labels"] == LABELS


def test_works_without_the_inference_toolkit(model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "sagemaker_inference", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "sagemaker_inference.errors", None)
    module = _load_copy(model_dir / "code" / "inference.py", "inference_no_toolkit")
    with pytest.raises(module.InferenceError) as err:
        module.input_fn(b"", "image/jpeg")
    assert err.value.status_code == 400 and "empty" in str(err.value)
    assert "sagemaker_inference" not in type(err.value).__mro__[1].__module__


@pytest.fixture()
def train_lib(monkeypatch):
    """scripts/train_lib.py as the training container imports it (scripts/ on sys.path),
    with the process-wide state its import changes put back afterwards."""
    from PIL import ImageFile
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", ImageFile.LOAD_TRUNCATED_IMAGES)
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    before = set(sys.modules)
    saved = {name: sys.modules.pop(name) for name in ("modeling", "metrics", "train_lib") if name in sys.modules}
    try:
        yield importlib.import_module("train_lib")
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]
        sys.modules.update(saved)


def test_preprocessing_matches_training_eval(handlers, model_dir, tmp_path, train_lib):
    """Served pixels and tensors equal what training evaluated on (train_lib's loader and
    eval transform), including its reduced-scale JPEG decoding of big photos."""
    model = handlers.model_fn(str(model_dir))
    meta = model["meta"]
    for size in [(1200, 900), (90, 70)]:  # DCT-scaled decode, plain decode
        path = tmp_path / f"{size[0]}.jpg"
        path.write_bytes(image_bytes("JPEG", size=size))
        (served,) = handlers.input_fn(path.read_bytes(), "image/jpeg")["images"]
        trained = train_lib.load_image(path, meta["resize_size"])
        assert served.size == trained.size and served.tobytes() == trained.tobytes()
        expected = modeling.eval_transform(meta["resize_size"], meta["image_size"], meta["mean"], meta["std"])(trained)
        assert torch.equal(model["transform"](served), expected)
    assert served.size == (90, 70) and trained.size == (90, 70)
