"""The model dir a training job leaves in SM_MODEL_DIR, which SageMaker packs as model.tar.gz:

    model.pth          the weights (a state_dict, loaded with weights_only=True)
    model.json         arch, classes, labels, eval geometry, normalisation (+ "onnx" once exported)
    evaluation.json    the test metrics of these weights
    code/              inference.py + modeling.py + requirements.txt (SAGEMAKER_PROGRAM=inference.py)

The one writer of that layout: training, bench/ and tests/ all build model dirs with it.
Its reader is modeling.load_model (shipped in code/, so the endpoint reads what this writes).
Imports nothing of the host (pipeline/, steps/): this folder ships on its own.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import artifacts
import modeling

SCRIPTS_DIR = Path(__file__).resolve().parent
# Files that make the model dir a deployable model.tar.gz (SAGEMAKER_PROGRAM=inference.py).
CODE_FILES = ("inference.py", "modeling.py")
INFERENCE_REQUIREMENTS = "requirements-inference.txt"
EVALUATION_FILE = "evaluation.json"


def model_meta(arch: str, classes: list[str], image_size: int, resize_size: int) -> dict:
    """model.json's content: what model_fn needs to rebuild the model and preprocess like evaluation."""
    return {"arch": arch, "classes": list(classes), "labels": [modeling.breed_label(c) for c in classes],
            "image_size": image_size, "resize_size": resize_size,
            "mean": list(modeling.IMAGENET_MEAN), "std": list(modeling.IMAGENET_STD)}


def write_model_dir(model_dir: str | os.PathLike, state: dict, meta: dict, evaluation: dict | None = None,
                    requirements: str | None = None) -> Path:
    """model.pth + model.json (+ evaluation.json) + code/: a deployable model.tar.gz.

    requirements: code/requirements.txt's text; None copies scripts/requirements-inference.txt."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_save(state, model_dir / modeling.MODEL_WEIGHTS_FILE)
    modeling.write_model_meta(model_dir, meta)
    if evaluation is not None:
        artifacts.atomic_write_text(model_dir / EVALUATION_FILE, artifacts.to_json(evaluation))
    code = model_dir / "code"
    code.mkdir(exist_ok=True)
    for name in CODE_FILES:
        if (SCRIPTS_DIR / name).is_file():
            shutil.copyfile(SCRIPTS_DIR / name, code / name)
        else:
            print(f"warning: {SCRIPTS_DIR / name} not found; model dir has no code/{name}", file=sys.stderr)
    if requirements is not None:
        artifacts.atomic_write_text(code / "requirements.txt", requirements)
    elif (SCRIPTS_DIR / INFERENCE_REQUIREMENTS).is_file():
        shutil.copyfile(SCRIPTS_DIR / INFERENCE_REQUIREMENTS, code / "requirements.txt")
    return model_dir
