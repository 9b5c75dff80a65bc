"""The shared model builder: heads, weight files, geometry, save/load round trip."""
import json

import pytest
import torch

from scripts import modeling


@pytest.mark.parametrize("arch,head", [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3")])
def test_head_is_replaced_by_one_sized_to_the_classes(arch, head):
    model = modeling.build_model(arch, 7, weights="none")
    assert modeling._head_name(model) == head
    assert model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 7)
    assert all(p is q for p, q in zip(modeling.head_parameters(model), dict(model.named_modules())[head].parameters()))


def test_backbone_weights_from_a_file_keep_the_backbone_and_drop_the_old_head(tmp_path):
    donor = modeling.build_model("resnet18", 10, weights="none")
    torch.save({"state_dict": donor.state_dict()}, tmp_path / "backbone.pth")
    model = modeling.build_model("resnet18", 3, weights=str(tmp_path / "backbone.pth"))
    assert torch.equal(model.conv1.weight, donor.conv1.weight)
    assert model.fc.out_features == 3


def test_bad_weights_and_arch_name_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--weights"):
        modeling.build_model("resnet18", 3, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="--arch 'no_such_net'"):
        modeling.build_model("no_such_net", 3)


def test_eval_geometry_follows_the_weights_preset():
    assert modeling.eval_geometry("resnet50", "imagenet") == (232, 224)
    assert modeling.eval_geometry("resnet50", "imagenet", image_size=112) == (116, 112)
    assert modeling.eval_geometry("resnet18", "none", resize_size=80, image_size=64) == (80, 64)


def test_breed_labels_are_readable():
    assert modeling.breed_label("005.Alaskan_malamute") == "Alaskan malamute"
    assert modeling.breed_label("050.Chinese_shar-pei") == "Chinese shar-pei"
    assert modeling.breed_label("cats") == "cats"


def test_save_and_load_round_trip(tmp_path):
    model = modeling.build_model("mobilenet_v3_small", 4, weights="none").eval()
    torch.save(model.state_dict(), tmp_path / modeling.MODEL_WEIGHTS_FILE)
    modeling.write_model_meta(tmp_path, {"arch": "mobilenet_v3_small", "classes": ["a", "b", "c", "d"]})
    loaded, meta = modeling.load_model(tmp_path)
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(loaded(x), model(x))
    assert json.loads((tmp_path / "model.json").read_text())["classes"] == meta["classes"]
    assert not list(tmp_path.glob("*.tmp"))


def test_load_model_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.json"):
        modeling.load_model(tmp_path)
