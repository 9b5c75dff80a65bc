"""The one model-dir writer (scripts/model_dir.py) and what reads it back (modeling.load_model)."""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # model_dir imports its siblings as top-level modules, as in the container
import model_dir  # noqa: E402
import modeling  # noqa: E402


def test_the_model_dir_is_what_the_endpoint_loads(tmp_path):
    net = modeling.build_model("mobilenet_v3_small", 3, weights="none").eval()
    meta = model_dir.model_meta("mobilenet_v3_small", ["001.Affenpinscher", "002.Afghan_hound", "003.Airedale_terrier"],
                                image_size=64, resize_size=72)
    out = model_dir.write_model_dir(tmp_path / "model", net.state_dict(), meta, {"test_accuracy": float("nan")})
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["code/inference.py", "code/modeling.py", "code/requirements.txt", "evaluation.json",
                     "model.json", "model.pth"]
    shipped = ROOT / "scripts" / model_dir.INFERENCE_REQUIREMENTS
    assert (out / "code" / "requirements.txt").read_text() == shipped.read_text()
    assert json.loads((out / "evaluation.json").read_text()) == {"test_accuracy": None}  # strict JSON, no NaN
    loaded, read = modeling.load_model(out)
    assert read["labels"] == ["Affenpinscher", "Afghan hound", "Airedale terrier"]
    assert (read["image_size"], read["resize_size"]) == (64, 72)
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(loaded(x), net(x))


def test_requirements_can_be_given_and_evaluation_left_out(tmp_path):
    net = modeling.build_model("mobilenet_v3_small", 2, weights="none")
    meta = model_dir.model_meta("mobilenet_v3_small", ["a", "b"], 32, 40)
    out = model_dir.write_model_dir(tmp_path, net.state_dict(), meta, requirements="onnxruntime\n")
    assert (out / "code" / "requirements.txt").read_text() == "onnxruntime\n"
    assert not (out / "evaluation.json").exists()
    assert not list(out.rglob("*.tmp"))
