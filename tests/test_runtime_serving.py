"""pipeline/runtime/serving.py: the real sagemaker-pytorch-inference + TorchServe stack, started here."""
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from pipeline.runtime import serving, toolkits
from tests._runtime_helpers import require_toolkits
from tests._serve_helpers import LABELS, ROOT, image_bytes, make_model_dir, make_tarball, ping, post

pytestmark = pytest.mark.slow  # see pyproject's markers

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# inference.py with a predict_fn that crashes on 13x13 images, wrapped as inference.py wraps its own.
CRASHING_PROGRAM = '''
from inference import _answering_errors, input_fn, model_fn, output_fn, predict_fn as _predict_fn

@_answering_errors
def predict_fn(data, model):
    if any(image.size == (13, 13) for image in data["images"]):
        raise RuntimeError("secret internal detail")
    return _predict_fn(data, model)
'''


def _group(pid: int) -> list[str]:
    out = subprocess.run(["ps", "ww", "-o", "pid=,args=", "-g", str(pid)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip() and "<defunct>" not in line]


def test_launch_serves_a_tarball_on_free_ports_and_stop_ends_java_and_workers(tmp_path):
    require_toolkits(java=True)
    model = make_tarball(make_model_dir(tmp_path / "model", extra_code={"crashing.py": CRASHING_PROGRAM}),
                         tmp_path / "model.tar.gz")
    with serving.launch(model, env=ENV, workdir=tmp_path / "serving", program="crashing.py") as endpoint:
        endpoint.wait_ready()
        assert len(set(endpoint.ports.values())) == 5 and 8080 not in endpoint.ports.values()
        assert ping(endpoint.url) == 200
        status, answer, headers = post(endpoint.url, image_bytes(), "image/jpeg")
        assert status == 200 and len(answer["probabilities"]) == len(LABELS)
        status, answer, headers = post(endpoint.url, image_bytes("PNG", size=(13, 13)), "image/png")
        assert status == 500 and headers["content-type"] == "application/json"
        assert answer == {"error": "internal error in the model's handlers (RuntimeError); see the server log"}
        for _ in range(100):  # the details go to the log (the worker's lines pass through Java: soon, not at once)
            if "secret internal detail" in endpoint.log_path.read_text():
                break
            time.sleep(0.1)
        assert "secret internal detail" in endpoint.log_path.read_text()
        assert post(endpoint.url, image_bytes(), "image/jpeg")[0] == 200
        group = _group(endpoint.pid)
        assert any("org.pytorch.serve.ModelServer" in line for line in group), group
        pids = {int(line.split()[0]) for line in group}
        listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in pids}
        assert {port for _, port in listening} == set(endpoint.ports.values())  # no fixed 8080/8082/7070/7071
        assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip, _ in listening), listening
        assert any("model_service_worker" in line for line in group), group
    assert _group(endpoint.pid) == []
    with pytest.raises(OSError):
        ping(endpoint.url)


def test_a_model_that_cannot_load_is_reported_not_waited_for(tmp_path):
    require_toolkits(java=True)
    model = make_model_dir(tmp_path / "model")
    (model / "model.pth").write_bytes(b"not a state dict")
    with serving.launch(model, env=ENV, workdir=tmp_path / "serving") as endpoint:
        with pytest.raises(RuntimeError, match="failed to load 2 times .*UnpicklingError"):
            endpoint.wait_ready(load_attempts=2)


def test_a_missing_model_is_named(tmp_path):
    require_toolkits(java=True)
    with pytest.raises(FileNotFoundError, match="nope.tar.gz"):
        serving.launch(tmp_path / "nope.tar.gz")


def test_cli_serve_runtime_sagemaker_answers_and_sigterm_stops_everything(tmp_path):
    require_toolkits(java=True)
    model = make_model_dir(tmp_path / "model")
    port = serving.free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "run_pipeline.py", "--serve", str(model), "--runtime", "sagemaker",
                                 "--port", str(port)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **ENV})
    try:
        deadline = time.monotonic() + 180
        while f"on http://127.0.0.1:{port}" not in log.read_text() and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"serving {model} on http://127.0.0.1:{port}" in log.read_text(), log.read_text()[-3000:]
        assert post(f"http://127.0.0.1:{port}", image_bytes(), "image/jpeg")[0] == 200
        (toolkit,) = psutil.Process(proc.pid).children()  # the toolkit, leading its own process group
        group = _group(toolkit.pid)
        assert any("org.pytorch.serve.ModelServer" in line for line in group), group
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
        assert _group(toolkit.pid) == []  # Java and the workers too
    finally:  # whatever failed above, nothing of the stack outlives the test
        leaders = psutil.Process(proc.pid).children() if proc.poll() is None else []
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for leader in leaders:  # the toolkit leads its own process group (Java, workers)
            try:
                os.killpg(leader.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_toolkit_venv_missing_is_named_with_the_command_that_creates_it(tmp_path, monkeypatch):
    monkeypatch.setenv(toolkits.ENV_VAR, str(tmp_path / "nowhere"))
    reason = toolkits.missing_reason()
    assert str(tmp_path / "nowhere") in reason and "python -m pipeline.runtime.toolkits" in reason
    done = subprocess.run([sys.executable, "-m", "pipeline.runtime.toolkits", "--check"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, toolkits.ENV_VAR: str(tmp_path / "x")})
    assert done.returncode == 1 and done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1
    with pytest.raises(RuntimeError, match="pipeline.runtime.toolkits"):
        serving.launch(tmp_path / "model.tar.gz")
