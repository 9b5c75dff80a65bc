"""pipeline/runtime/serving.py: the real sagemaker-pytorch-inference + TorchServe stack, started here."""
import os
import subprocess

import pytest

from pipeline.runtime import serving
from tests._runtime_helpers import require_toolkits
from tests._serve_helpers import LABELS, image_bytes, make_model_dir, make_tarball, ping, post

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _group(pid: int) -> list[str]:
    out = subprocess.run(["ps", "ww", "-o", "pid=,args=", "-g", str(pid)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip() and "<defunct>" not in line]


def test_launch_serves_a_tarball_on_free_ports_and_stop_ends_java_and_workers(tmp_path):
    require_toolkits(java=True)
    model = make_tarball(make_model_dir(tmp_path / "model"), tmp_path / "model.tar.gz")
    with serving.launch(model, env=ENV, workdir=tmp_path / "serving") as endpoint:
        endpoint.wait_ready()
        assert len(set(endpoint.ports.values())) == 5 and 8080 not in endpoint.ports.values()
        assert ping(endpoint.url) == 200
        status, answer, headers = post(endpoint.url, image_bytes(), "image/jpeg")
        assert status == 200 and len(answer["probabilities"]) == len(LABELS)
        group = _group(endpoint.pid)
        assert any("org.pytorch.serve.ModelServer" in line for line in group), group
        assert any("model_service_worker" in line for line in group), group
    assert _group(endpoint.pid) == []
    with pytest.raises(OSError):
        ping(endpoint.url)


def test_a_missing_model_is_named(tmp_path):
    require_toolkits(java=True)
    with pytest.raises(FileNotFoundError, match="nope.tar.gz"):
        serving.launch(tmp_path / "nope.tar.gz")
