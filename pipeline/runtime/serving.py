"""The SageMaker PyTorch inference image's own serving stack, started on this machine.

    python run_pipeline.py --serve MODEL --runtime sagemaker [--port 8080]
    python -m pipeline.runtime.serving MODEL [--port 0] [--workers 1]

What runs is what the PyTorch inference image runs: `sagemaker-pytorch-inference`'s
`serving.main()`, which writes TorchServe's config, pip-installs code/requirements.txt
and starts TorchServe (Java) with the toolkit's handler service; that calls the model's
code/inference.py through `sagemaker-inference`'s Transformer. All of it comes from the
toolkit venv (pipeline/runtime/toolkits.py); Java 17 must be on PATH.

The environment contract is the image's: SAGEMAKER_BASE_DIR (model under <base>/model),
SAGEMAKER_PROGRAM, SAGEMAKER_BIND_TO_PORT, SAGEMAKER_SAFE_PORT_RANGE,
SAGEMAKER_MODEL_SERVER_WORKERS, SAGEMAKER_MODEL_SERVER_TIMEOUT, SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT.

Three things differ from the image, all so that several servers can share one host
(the image is alone in its container), none of them in the request path:
  * TorchServe's config file goes to this server's own dir instead of the fixed
    /etc/sagemaker-ts.properties, and TMPDIR is this server's own (TorchServe keeps a
    pid file in the temp dir and refuses to start a second server beside it);
  * the toolkit finds "its" TorchServe among this session's processes only (it looks
    for the one Java ModelServer on the host and fails when there are several);
  * every TorchServe listener binds 127.0.0.1 on a free port (the image binds 0.0.0.0:8080
    and leaves management/metrics/gRPC on fixed ports 8080/8082/7070/7071).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.processes import group_alive, stop_group
from pipeline.runtime import toolkits

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PORT = 8080

# Run by the toolkit venv's python, with cwd = the server's dir. The two patches are
# explained in the module docstring; everything else is the toolkit's own main().
LAUNCHER = r"""
import os
import psutil
from sagemaker_pytorch_serving_container import torchserve

torchserve.TS_CONFIG_FILE = os.environ["LOCAL_TS_CONFIG_FILE"]


class _ThisSessionOnly:
    def __getattr__(self, name):
        return getattr(psutil, name)

    def process_iter(self, *args, **kwargs):
        session = os.getsid(0)
        for process in psutil.process_iter(*args, **kwargs):
            try:
                if os.getsid(process.pid) == session:
                    yield process
            except OSError:
                pass


torchserve.psutil = _ThisSessionOnly()
from sagemaker_pytorch_serving_container import serving
serving.main()
"""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def java_missing() -> str | None:
    """None when a Java runtime is on PATH; else what to install."""
    if shutil.which("java"):
        return None
    return ("java is not on PATH: TorchServe needs a Java 17 runtime "
            "(Debian/Ubuntu: apt-get install openjdk-17-jre-headless)")


class Endpoint:
    """A running serving stack: .url, .pid, .wait_ready(), .stop(); a context manager.
    Stopping ends the whole process group: the toolkit's python, TorchServe's Java
    process and its Python workers (they outlive the toolkit's process otherwise)."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path, workdir: Path, ports: dict,
                 tmp: Path):
        self.process, self.url, self.log_path, self.workdir, self.ports = process, url, log_path, workdir, ports
        self.tmp = tmp

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _ping(self) -> int | None:
        try:
            with urllib.request.urlopen(self.url + "/ping", timeout=5) as reply:
                return reply.status
        except urllib.error.HTTPError as err:
            return err.code
        except (urllib.error.URLError, OSError):
            return None

    def _model_ready(self) -> bool:
        """TorchServe answers /ping before the model's worker has run model_fn: ask the
        management API whether a worker is READY, as SageMaker waits for the model to load."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['management']}/models/model",
                                        timeout=5) as reply:
                workers = json.loads(reply.read())[0].get("workers", [])
                return any(w.get("status") == "READY" for w in workers)
        except (urllib.error.URLError, OSError, ValueError, IndexError, KeyError):
            return False

    def _load_failure(self, attempts: int) -> str | None:
        """TorchServe retries a worker whose model_fn (or handler import) fails, forever, with
        backoff; after `attempts` failures: the worker's last exception line."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return None
        if text.count("Load model failed: model") < attempts:
            return None
        errors = re.findall(r"MODEL_LOG - ([\w.]*(?:Error|Exception)\b.*)", text)
        return errors[-1] if errors else "the worker died while loading the model"

    def wait_ready(self, timeout: float = 180.0, load_attempts: int = 3) -> Endpoint:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the SageMaker serving stack exited with status {self.process.returncode} "
                                   f"before it was ready; log {self.log_path}:\n{self.log_tail()}")
            if self._ping() == 200 and self._model_ready():
                return self
            failure = self._load_failure(load_attempts)
            if failure:
                raise RuntimeError(f"the model's TorchServe worker failed to load {load_attempts} times "
                                   f"(model_fn or importing the handlers): {failure[:500]}; log {self.log_path}")
            time.sleep(0.2)
        raise TimeoutError(f"the SageMaker serving stack was not ready after {timeout:g} s; "
                           f"log {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to the process group (the toolkit forwards it to TorchServe, which stops its
        workers), SIGKILL to whatever is left after timeout; the toolkit process's exit status."""
        if group_alive(self.process.pid):
            stop_group(self.process.pid, timeout, reap=self.process.poll)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        # the extracted model and TorchServe's model store; the log stays for reading
        for path in (self.tmp, self.workdir / "ml", self.workdir / ".sagemaker"):
            shutil.rmtree(path, ignore_errors=True)
        return self.process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _place_model(model: Path, model_dir: Path) -> None:
    """The model where the image has it (<base>/model): a model.tar.gz extracted safely, as
    SageMaker extracts ModelDataUrl; a model dir linked (TorchServe reads it in place)."""
    from pipeline.archives import extract_tar
    if model.is_dir():
        model_dir.symlink_to(model.resolve(), target_is_directory=True)
    elif model.is_file():
        extract_tar(model, model_dir)
    else:
        raise FileNotFoundError(f"MODEL {str(model)!r} is neither a model dir nor a model.tar.gz")


def launch(model: str | os.PathLike, port: int = 0, env: dict | None = None, *, workers: int = 1,
           log_path: str | os.PathLike | None = None, workdir: str | os.PathLike | None = None,
           program: str | None = None, timeout_s: int | None = None,
           python: str | os.PathLike | None = None) -> Endpoint:
    """Start the real serving stack on 127.0.0.1 for a model.tar.gz or model dir; returns at once.
    port 0 picks a free port; TorchServe's management, metrics and gRPC ports are always free
    ports picked here. env: extra environment (e.g. SAGEMAKER_PROGRAM, TS_* settings).
    workers: SAGEMAKER_MODEL_SERVER_WORKERS (the image defaults to one per CPU).
    Call .wait_ready() before use and .stop() (or use `with`) when done."""
    reason = java_missing()
    if reason:
        raise RuntimeError(reason)
    if python is None and toolkits.missing_reason():
        raise RuntimeError(toolkits.missing_reason())
    python = Path(python) if python else toolkits.venv_python()
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="sagemaker-serving-"))
    workdir.mkdir(parents=True, exist_ok=True)
    base = workdir / "ml"
    if base.exists() or base.is_symlink():
        shutil.rmtree(base) if not base.is_symlink() else base.unlink()
    base.mkdir()
    _place_model(Path(model), base / "model")
    # Short and private: TorchServe's worker sockets (<java.io.tmpdir>/.ts.sock.9000, ...) and pid file
    # live here, and a unix socket path must stay under 108 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="ts-"))
    log_path = Path(log_path) if log_path else workdir / "serving.log"

    port = port or free_port()
    ports = {"inference": port, "management": free_port(), "metrics": free_port(),
             "grpc_inference": free_port(), "grpc_management": free_port()}
    run_env = {**os.environ, **(env or {})}
    run_env.update({
        "SAGEMAKER_BASE_DIR": str(base),
        "SAGEMAKER_BIND_TO_PORT": str(port),
        "SAGEMAKER_SAFE_PORT_RANGE": f"{port}-{port}",
        "SAGEMAKER_MODEL_SERVER_WORKERS": str(run_env.get("SAGEMAKER_MODEL_SERVER_WORKERS") or workers),
        "LOCAL_TS_CONFIG_FILE": str(workdir / "sagemaker-ts.properties"),
        "TMPDIR": str(tmp),
        "TEMP": str(tmp),  # torchserve's CLI passes it to Java as java.io.tmpdir
        "PATH": f"{python.parent}{os.pathsep}{run_env.get('PATH', '')}",
        # TorchServe reads TS_<KEY> over its config file (enable_envvars_config=true in the image's config)
        "TS_INFERENCE_ADDRESS": f"http://127.0.0.1:{port}",
        "TS_MANAGEMENT_ADDRESS": f"http://127.0.0.1:{ports['management']}",
        "TS_METRICS_ADDRESS": f"http://127.0.0.1:{ports['metrics']}",
        "TS_GRPC_INFERENCE_ADDRESS": "127.0.0.1",
        "TS_GRPC_MANAGEMENT_ADDRESS": "127.0.0.1",
        "TS_GRPC_INFERENCE_PORT": str(ports["grpc_inference"]),
        "TS_GRPC_MANAGEMENT_PORT": str(ports["grpc_management"]),
        "TS_DISABLE_TOKEN_AUTHORIZATION": "true",
    })
    if program:
        run_env["SAGEMAKER_PROGRAM"] = program
    run_env.setdefault("SAGEMAKER_PROGRAM", "inference.py")
    if timeout_s:
        run_env["SAGEMAKER_MODEL_SERVER_TIMEOUT"] = str(int(timeout_s))
    run_env.pop("PYTHONPATH", None)  # the toolkit sets it to code/; nothing of the host's leaks in
    with open(log_path, "ab") as out:
        process = subprocess.Popen([str(python), "-c", LAUNCHER], cwd=workdir, env=run_env,
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its own process group: stop() ends all of it
    return Endpoint(process, f"http://127.0.0.1:{port}", log_path, workdir, ports, tmp)


def serve(model: str | os.PathLike, port: int | None = None, workers: int = 1, program: str | None = None) -> int:
    """Foreground: start, say where, run until SIGINT/SIGTERM, then stop the whole stack."""
    if port is None:
        port = int(os.environ.get("SAGEMAKER_BIND_TO_PORT", DEFAULT_PORT))

    def _stop(signo, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)  # before launch: a SIGTERM never leaves TorchServe behind
    endpoint = None
    try:
        endpoint = launch(model, port=port, workers=workers, program=program)
        print(f"starting the SageMaker serving stack (TorchServe) for {model}; log {endpoint.log_path}", flush=True)
        endpoint.wait_ready()
        print(f"serving {model} on {endpoint.url} (POST /invocations, GET /ping); Ctrl-C stops", flush=True)
        while endpoint.process.poll() is None:
            time.sleep(0.5)
        print(f"error: --serve: the serving stack exited with status {endpoint.process.returncode}; "
              f"log {endpoint.log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError, FileNotFoundError, ValueError) as err:
        where = f"; log {endpoint.log_path}" if endpoint else ""
        print(f"error: --serve: {str(err).splitlines()[0]}{where}", file=sys.stderr)
        return 1
    finally:
        if endpoint is not None:
            endpoint.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve a model.tar.gz or model dir under the real SageMaker "
                                            "PyTorch serving stack (sagemaker-pytorch-inference + TorchServe).")
    p.add_argument("model")
    p.add_argument("--port", type=int, default=None, help="default: SAGEMAKER_BIND_TO_PORT or 8080; 0 picks one")
    p.add_argument("--workers", type=int, default=1, help="TorchServe workers (SAGEMAKER_MODEL_SERVER_WORKERS)")
    p.add_argument("--program", help="handler file in code/ (default: SAGEMAKER_PROGRAM or inference.py)")
    args = p.parse_args(argv)
    return serve(args.model, port=args.port, workers=args.workers, program=args.program)


if __name__ == "__main__":
    sys.exit(main())
