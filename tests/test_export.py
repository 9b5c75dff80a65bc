"""scripts/export.py and inference.py's fast path: model.onnx is written only when ONNX
Runtime agrees with PyTorch on the test images, model.json records it, inference.py
serves it, and every way of not having it (runtime not importable, file missing,
corrupt, tampered) serves model.pth with torch instead, or fails clearly when asked to."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
import time

import pytest
import torch

from pipeline.sample_data import generate_dataset
from tests._serve_helpers import ROOT, image_bytes, make_model_dir

SCRIPTS = ROOT / "scripts"


@pytest.fixture(scope="module")
def scripts():
    """export, modeling and train_lib imported as train_model.py imports them (scripts/ on sys.path)."""
    sys.path.insert(0, str(SCRIPTS))
    saved = {name: sys.modules.pop(name) for name in ("export", "modeling", "train_lib", "metrics")
             if name in sys.modules}
    try:
        import export
        import train_lib
        yield export, train_lib
    finally:
        sys.path.remove(str(SCRIPTS))
        for name in ("export", "modeling", "train_lib", "metrics"):
            sys.modules.pop(name, None)
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def test_images(tmp_path_factory):
    root = generate_dataset(tmp_path_factory.mktemp("data") / "dogImages", num_classes=5, size=64,
                            per_class=(1, 1, 3))
    return sorted((root / "test").glob("*/*"))


@pytest.fixture(scope="module")
def exported(scripts, test_images, tmp_path_factory):
    export, train_lib = scripts
    model_dir = make_model_dir(tmp_path_factory.mktemp("export") / "model")
    entry = export.export_model_dir(model_dir, test_images, train_lib.load_image)
    return model_dir, entry


def load_inference(model_dir, name="packaged_inference_under_test"):
    """code/inference.py as the container imports it (a fresh module each time)."""
    spec = importlib.util.spec_from_file_location(name, model_dir / "code" / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def answers(inference, model, bodies):
    return [json.loads(inference.output_fn(inference.predict_fn(inference.input_fn(b, "image/jpeg"), model),
                                           "application/json")[0]) for b in bodies]


BODIES = [image_bytes(colour=c, size=(90, 70)) for c in ((200, 40, 30), (20, 160, 60), (90, 90, 220))]


def test_export_is_validated_on_every_test_image_and_recorded_in_model_json(exported, test_images):
    model_dir, entry = exported
    onnx_file = model_dir / "model.onnx"
    assert onnx_file.is_file()
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["onnx"] == entry
    assert entry["file"] == "model.onnx" and entry["bytes"] == onnx_file.stat().st_size
    assert entry["sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    checked = entry["validated"]
    assert checked["images"] == checked["top1_agree"] == len(test_images) == 15
    assert 0 <= checked["max_prob_diff"] <= checked["tolerance"] == 1e-4
    assert meta["arch"] == "resnet18" and len(meta["classes"]) == 5  # the rest of model.json kept


def test_inference_serves_the_onnx_model_with_the_same_answers_as_torch(exported, monkeypatch, capsys):
    model_dir, _ = exported
    inference = load_inference(model_dir)
    fast = inference.model_fn(str(model_dir))
    assert fast["runtime"] == "onnxruntime"
    monkeypatch.setenv("INFERENCE_RUNTIME", "torch")
    slow = inference.model_fn(str(model_dir))
    assert slow["runtime"] == "torch" and isinstance(slow["net"], torch.nn.Module)
    for a, b in zip(answers(inference, fast, BODIES), answers(inference, slow, BODIES)):
        assert a["top"][0]["index"] == b["top"][0]["index"]
        assert max(abs(x - y) for x, y in zip(a["probabilities"], b["probabilities"])) <= 1e-4
    # a batch through ONNX Runtime answers as one by one
    batch = inference.predict_fn({"images": [inference.input_fn(b, "image/jpeg")["images"][0] for b in BODIES],
                                  "batch": True}, fast)
    single = torch.cat([inference.predict_fn(inference.input_fn(b, "image/jpeg"), fast)["probabilities"]
                        for b in BODIES])
    assert torch.allclose(batch["probabilities"], single, atol=1e-5)


def _copy(model_dir, tmp_path):
    return shutil.copytree(model_dir, tmp_path / "model")


def _flip_bytes(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _garbage_with_matching_hash(path):
    data = b"not an onnx model" * 100
    path.write_bytes(data)
    meta_path = path.parent / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["onnx"]["sha256"] = hashlib.sha256(data).hexdigest()
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("case,damage,words", [
    ("runtime not importable", None, "onnxruntime"),
    ("file missing", lambda p: p.unlink(), "missing"),
    ("file corrupt", _flip_bytes, "sha256"),
    ("file not a model, hash matching", _garbage_with_matching_hash, "model.onnx not used"),
])
def test_without_a_usable_onnx_model_it_falls_back_to_torch_and_says_why(exported, tmp_path, monkeypatch, capsys,
                                                                        case, damage, words):
    model_dir = _copy(exported[0], tmp_path)
    if damage is None:
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    else:
        damage(model_dir / "model.onnx")
    inference = load_inference(model_dir)
    model = inference.model_fn(str(model_dir))
    assert model["runtime"] == "torch"
    err = capsys.readouterr().err
    assert "serving model.pth with PyTorch" in err and words in err, err
    (answer,) = answers(inference, model, BODIES[:1])
    assert len(answer["probabilities"]) == 5


def test_asking_for_onnx_without_a_usable_file_fails_clearly(exported, tmp_path, monkeypatch):
    model_dir = _copy(exported[0], tmp_path)
    _flip_bytes(model_dir / "model.onnx")
    monkeypatch.setenv("INFERENCE_RUNTIME", "onnx")
    inference = load_inference(model_dir)
    with pytest.raises(RuntimeError, match="INFERENCE_RUNTIME=onnx.*sha256"):
        inference.model_fn(str(model_dir))
    monkeypatch.setenv("INFERENCE_RUNTIME", "fastest")
    with pytest.raises(ValueError, match="auto, onnx or torch"):
        inference.model_fn(str(model_dir))


def test_an_export_that_disagrees_with_pytorch_is_refused(scripts, exported, test_images, tmp_path):
    export, train_lib = scripts
    modeling = sys.modules["modeling"]
    model_dir = exported[0]
    net, meta = modeling.load_model(model_dir)
    torch.manual_seed(1)
    other = modeling.build_model(meta["arch"], len(meta["classes"])).eval()  # other weights, same shapes
    fast = modeling.OnnxNet(export.to_onnx_bytes(other, meta["image_size"]))
    check = export.compare(net, fast, export.image_batches(test_images, meta, train_lib.load_image))
    assert check["images"] == len(test_images) and not check["passed"]
    assert check["max_prob_diff"] > 1e-4
    same = export.compare(net, modeling.OnnxNet(export.to_onnx_bytes(net, meta["image_size"])),
                          export.image_batches(test_images, meta, train_lib.load_image))
    assert same["passed"]


def test_without_onnxruntime_the_export_is_left_out_and_a_stale_file_removed(scripts, test_images, tmp_path,
                                                                           monkeypatch):
    export, train_lib = scripts
    model_dir = make_model_dir(tmp_path / "model")
    (model_dir / "model.onnx").write_bytes(b"left over from an earlier run")
    before = (model_dir / "model.json").read_text()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(export.ExportSkipped, match="onnxruntime"):
        export.export_model_dir(model_dir, test_images, train_lib.load_image)
    assert not (model_dir / "model.onnx").exists()
    assert (model_dir / "model.json").read_text() == before
    assert export.export_after_training(model_dir, test_images, train_lib.load_image) is None


@pytest.mark.slow
def test_sagemakers_serving_stack_serves_the_onnx_model(exported, tmp_path, monkeypatch):
    """The archive as train_model.py writes it, under the real sagemaker-pytorch-inference +
    TorchServe stack with the Model step's Environment: code/requirements.txt is installed,
    both workers' model_fn take the fast path and share the cores, and the answers are torch's."""
    from pipeline.runtime import serving
    from steps.model import serving_env
    from tests._runtime_helpers import require_toolkits
    from tests._serve_helpers import make_tarball, post

    require_toolkits(java=True)
    model_dir = _copy(exported[0], tmp_path)
    (model_dir / "code" / "requirements.txt").write_text((SCRIPTS / "requirements-inference.txt").read_text())
    archive = make_tarball(model_dir, tmp_path / "model.tar.gz")
    env = {**serving_env("ml.m5.large"), "INFERENCE_CORE_SLOTS_DIR": str(tmp_path / "slots")}  # as deployed
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)  # conftest's 1 would cap torch's threads under OMP's 2
    monkeypatch.setenv("INFERENCE_RUNTIME", "torch")
    inference = load_inference(model_dir)
    reference = answers(inference, inference.model_fn(str(model_dir)), BODIES)
    monkeypatch.delenv("INFERENCE_RUNTIME")
    with serving.launch(archive, env=env, workdir=tmp_path / "serving") as endpoint:
        endpoint.wait_ready()
        for body, expected in zip(BODIES, reference):
            status, answer, _ = post(endpoint.url, body, "image/jpeg")
            assert status == 200, answer
            assert answer["top"][0]["index"] == expected["top"][0]["index"]
            assert max(abs(x - y) for x, y in zip(answer["probabilities"], expected["probabilities"])) <= 1e-4
        # both workers load it and share the two cores (inference.py CoreShare); the endpoint is
        # ready with one worker READY, so the other may still be in model_fn
        shared = "model.onnx with ONNX Runtime on cpu, 2 threads, shared with up to 1 other calls"
        deadline = time.monotonic() + 120
        while (log := endpoint.log_path.read_text(errors="replace")).count(shared) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
    assert log.count(shared) == 2, log[-3000:]
