"""The embedded sample dataset: dogImages layout, deterministic, atomic."""
import hashlib

import numpy as np
import pytest
from PIL import Image

from pipeline.sample_data import DOG_CLASS_DIRS, SPLITS, generate_dataset


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.jpg")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_layout_matches_dogimages(tmp_path):
    root = generate_dataset(tmp_path / "data", num_classes=3, per_class=(4, 2, 1), size=32)
    for split, count in zip(SPLITS, (4, 2, 1)):
        classes = sorted(p.name for p in (root / split).iterdir())
        assert classes == DOG_CLASS_DIRS[:3]
        for c in classes:
            files = list((root / split / c).glob("*.jpg"))
            assert len(files) == count
            assert Image.open(files[0]).size == (32, 32)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = generate_dataset(tmp_path / "a", num_classes=2, per_class=(2, 1, 1), size=16, seed=1)
    b = generate_dataset(tmp_path / "b", num_classes=2, per_class=(2, 1, 1), size=16, seed=1)
    c = generate_dataset(tmp_path / "c", num_classes=2, per_class=(2, 1, 1), size=16, seed=2)
    assert _digest(a) == _digest(b) != _digest(c)


def test_classes_differ_in_colour(tmp_path):
    root = generate_dataset(tmp_path / "d", num_classes=4, per_class=(8, 0, 0), size=32)
    means = [np.mean([np.asarray(Image.open(p), dtype=float).reshape(-1, 3).mean(0)
                      for p in (root / "train" / c).glob("*.jpg")], axis=0) for c in DOG_CLASS_DIRS[:4]]
    gaps = [np.abs(means[i] - means[j]).max() for i in range(4) for j in range(i + 1, 4)]
    assert min(gaps) > 5


def test_bad_class_count_is_refused(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        generate_dataset(tmp_path / "x", num_classes=1)
