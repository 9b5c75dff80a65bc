"""bench/endpoint.py's real photographs: which files of a directory or a scikit-image wheel
it takes, and that it sends each as the RGB JPEG a client would."""
from __future__ import annotations

import importlib.util
import io
import zipfile

import pytest
from PIL import Image

from tests._serve_helpers import ROOT, image_bytes


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_endpoint_under_test", ROOT / "bench" / "endpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_scikit_image_wheel_gives_its_photographs_only(bench, tmp_path):
    wheel = tmp_path / "scikit_image-0.26.0-cp311-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("skimage/data/chelsea.png", image_bytes("PNG", size=(45, 30)))
        z.writestr("skimage/data/camera.png", image_bytes("PNG", size=(40, 40), mode="L"))
        z.writestr("skimage/data/rocket.jpg", image_bytes("JPEG", size=(30, 45)))
        z.writestr("skimage/data/logo.png", image_bytes("PNG"))         # a drawing, not a photograph
        z.writestr("skimage/data/chelsea.txt", b"not an image")
        z.writestr("skimage/__init__.py", b"")
    photos = bench.real_photos(wheel)
    assert sorted(photos) == ["camera", "chelsea", "rocket"]
    for name, size in (("chelsea", (45, 30)), ("camera", (40, 40)), ("rocket", (30, 45))):
        image = Image.open(io.BytesIO(photos[name]))
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", size)


def test_a_directory_gives_every_image_in_it(bench, tmp_path):
    (tmp_path / "dog.JPG").write_bytes(image_bytes("JPEG"))
    (tmp_path / "cat.png").write_bytes(image_bytes("PNG", mode="RGBA"))
    (tmp_path / "notes.txt").write_text("skip me")
    assert sorted(bench.real_photos(tmp_path)) == ["cat", "dog"]


def test_nothing_to_take_is_an_error_naming_the_path(bench, tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        bench.real_photos(tmp_path)
