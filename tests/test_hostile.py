"""Hostile and broken inputs (issue 13): every class that once lost data, hung the endpoint or
printed a traceback, generated here and small enough for CI. Loopback only; each input is
bounded in size and count, and each test in time (a regression fails, it does not hang).

Classes: 1 store escape, 2 decode bomb, 3 idle sockets, 4 memory amplification, 5 YAML bombs,
6 non-finite training, 7 resumed tuning, 8 orphaned endpoint, 9 empty datasets, 10 bad ranges,
11 corrupt training image, 12 tracebacks instead of one line, 13 container exit codes,
14 deeply nested JSON.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import pipeline.data  # noqa: F401 - imported at collection: its `out=sys.stdout` defaults must not be a test's capsys
from pipeline.config import ConfigError, load_config, parse_config
from pipeline.local.store import LocalStore, StoreError

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BASE = yaml.safe_load((ROOT / "pipeline.smoke.yaml").read_text())


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch):
    for var in ("AWS_REGION", "SAGEMAKER_ROLE_ARN", "SAGEMAKER_BUCKET"):
        monkeypatch.delenv(var, raising=False)


def _one_line_error(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert "Traceback" not in text, text[-3000:]
    assert len(lines) == 1, text[-3000:]
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def _config(**changes) -> dict:
    doc = copy.deepcopy(BASE)
    for path, value in changes.items():
        node = doc
        *parents, last = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return doc


# ---------------------------------------------------------------- 1: keys that climb out of the store

ESCAPING_URIS = ["s3://bucket//etc/passwd", "s3://bucket//tmp/x/", "s3://bucket/a/../../..", "s3://bucket/./a",
                 "s3://bucket/a//b/", "s3://../x", "s3://bucket/a\\..\\b"]


@pytest.mark.parametrize("uri", ESCAPING_URIS)
def test_store_never_resolves_outside_its_root(tmp_path, uri):
    store = LocalStore(tmp_path / "s3")
    with pytest.raises(StoreError, match="S3 URI"):
        store.path(uri)


def test_store_refuses_a_symlink_planted_inside_it(tmp_path):
    store = LocalStore(tmp_path / "s3")
    (tmp_path / "s3" / "bucket").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "s3" / "bucket" / "data").symlink_to(tmp_path / "outside")
    with pytest.raises(StoreError, match="outside the local store"):
        store.path("s3://bucket/data/train/")
    assert store.path("s3://bucket/other/key") == tmp_path / "s3" / "bucket" / "other" / "key"


def test_store_refuses_to_replace_a_whole_bucket(tmp_path):
    store = LocalStore(tmp_path / "s3")
    store.put_bytes("s3://bucket/code/keep.txt", b"x")
    (tmp_path / "src").mkdir()
    with pytest.raises(StoreError, match="whole bucket"):
        store.put_dir("s3://bucket/", tmp_path / "src")
    assert (tmp_path / "s3" / "bucket" / "code" / "keep.txt").read_bytes() == b"x"


@pytest.mark.parametrize("field, uri", [
    ("data.uri", "s3://dogbreed-smoke//some/abs/path/"),
    ("data.uri", "s3://dogbreed-smoke/a/../../"),
    ("data.uri", "s3://dogbreed-smoke/"),
    ("training.checkpoint_prefix", "s3://dogbreed-smoke//tmp/ckpt"),
    ("training.checkpoint_prefix", "s3://dogbreed-smoke/x/../../y"),
    ("aws.prefix", "a/../.."),
])
def test_config_refuses_uris_that_escape(field, uri):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_config(_config(**{field: uri}), source="bad.yaml")


def test_prepare_data_with_an_escaping_uri_deletes_nothing(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(_config(**{"data.uri": f"s3://dogbreed-smoke/{victim}/"})))
    env = {**os.environ, "DOGBREED_LOCAL_STORE": str(tmp_path / "store")}
    out = subprocess.run([PY, "run_pipeline.py", "--config", str(cfg), "--local", "--prepare-data",
                          "--data", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "data.uri" in _one_line_error(out.stderr)
    assert (victim / "precious.txt").read_text() == "keep me"


# ---------------------------------------------------------------- 5: YAML bombs and unreadable configs

def _write(tmp_path, data: bytes | str, name="bad.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _alias_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        refs = ",".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    lines.append(f"pipeline: {{name: *a{levels - 1}}}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("kind, data, message", [
    ("alias bomb", _alias_bomb(), "YAML aliases"),
    ("wide alias fan-out", "a: &a [" + ",".join(["x"] * 500) + "]\nb: [" + ",".join(["*a"] * 60) + "]\n",
     "values once aliases are expanded"),
    ("deep nesting", "a: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than"),
    ("deep mapping", "".join(" " * i + f"k{i}:\n" for i in range(200)) + " " * 200 + "v: 1\n", "nested deeper than"),
    ("over size", "# " + "x" * (300 * 1024) + "\n", "bytes (limit DOGBREED_MAX_CONFIG_BYTES)"),
    ("binary", bytes(range(256)) * 4, "not UTF-8"),
    ("latin-1", "pipeline: {name: caf\xe9}\n".encode("latin-1"), "not UTF-8"),
    ("utf-16", "pipeline: {name: x}\n".encode("utf-16"), "not UTF-8"),
    ("huge integer", "tuning: {max_jobs: " + "9" * 5000 + "}\n", "a value YAML cannot hold"),
    ("unclosed", "tuning: [unclosed\n" + "x" * 10000, "not valid YAML"),
    ("huge value", "pipeline: {name: [" + "xxxxxxxx," * 15000 + "]}\n", "pipeline.name"),
    ("huge name", yaml.safe_dump(_config(**{"pipeline.name": "x" * 200_000})), "pipeline.name"),
])
def test_config_files_that_used_to_hang_or_trace(tmp_path, kind, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    text = str(exc.value)
    assert message in text, text[:500]
    assert str(path) in text and len(text.splitlines()) == 1 and len(text) < 1200, text[:500]


def test_a_huge_integer_inside_pydantic_limits_is_one_short_line():
    with pytest.raises(ConfigError) as exc:
        parse_config(_config(**{"tuning.max_jobs": int("9" * 4000)}), source="bad.yaml")
    text = str(exc.value)
    assert "tuning.max_jobs" in text and len(text) < 500 and len(text.splitlines()) == 1


# ---------------------------------------------------------------- 10: ranges no training can use

@pytest.mark.parametrize("field, value", [
    ("tuning.ranges.lr", {"type": "continuous", "min": float("nan"), "max": 0.01}),
    ("tuning.ranges.lr", {"type": "continuous", "min": 0.001, "max": float("inf")}),
    ("tuning.ranges.lr", {"type": "continuous", "min": "nan", "max": 0.01}),
    ("tuning.ranges.lr", {"type": "continuous", "min": -0.1, "max": 0.01}),
    ("tuning.ranges.lr", {"type": "categorical", "values": [0.01, 0]}),
    ("tuning.ranges.epochs", {"type": "integer", "min": 0, "max": 3}),
    ("tuning.ranges.epochs", {"type": "integer", "min": -3, "max": -1}),
    ("tuning.ranges.batch-size", {"type": "categorical", "values": [16, 0]}),
    ("tuning.ranges.batch-size", {"type": "categorical", "values": [16, -8]}),
    ("tuning.ranges.test-batch-size", {"type": "integer", "min": 0, "max": 8}),
])
def test_ranges_no_training_can_use(field, value):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_config(_config(**{field: value}), source="bad.yaml")


@pytest.mark.parametrize("name, value", [("lr", 0), ("lr", float("inf")), ("lr", "nan"), ("epochs", 0),
                                         ("batch-size", 0), ("test-batch-size", -1), ("epochs", 2.5)])
def test_static_hyperparameters_no_training_can_use(name, value):
    doc = _config()
    del doc["tuning"]["ranges"][name]
    doc["training"]["hyperparameters"][name] = value
    with pytest.raises(ConfigError, match=f"training\\.hyperparameters\\.{name}"):
        parse_config(doc, source="bad.yaml")


def test_good_static_hyperparameters_still_pass():
    doc = _config()
    for name, value in (("lr", 0.01), ("epochs", 2), ("batch-size", "16")):
        del doc["tuning"]["ranges"][name]
        doc["training"]["hyperparameters"][name] = value
    cfg = parse_config(doc, source="ok.yaml")
    assert {k: cfg.training.hyperparameters[k] for k in ("lr", "epochs", "batch-size")} == \
        {"lr": 0.01, "epochs": 2, "batch-size": "16"}


# ---------------------------------------------------------------- 2, 4, 14: what a request may cost to decode

def _jpeg_segments(data: bytes):
    """(marker, start, end) of each top-level JPEG segment; a scan includes its entropy-coded data."""
    i, out = 2, []
    while i < len(data):
        marker = data[i + 1]
        if marker == 0xD9:
            return out
        end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
        out.append((marker, i, end))
        i = end
    return out


def progressive_bomb(side: int = 256, repeats: int = 2000) -> bytes:
    """A progressive JPEG whose last refinement scan (Ah > 0) repeats `repeats` times: a few
    bytes each, yet the decoder walks every coefficient block again for each (issue 13's
    200 KB file was ~48 s of CPU)."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 80, 40)).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    refinements = [(s, e) for m, s, e in _jpeg_segments(data)
                   if m == 0xDA and data[s + 5 + 2 * data[s + 4] + 2] >> 4]
    start, end = refinements[-1]
    return data[:-2] + data[start:end] * repeats + b"\xff\xd9"


@pytest.fixture(scope="module")
def handlers(tmp_path_factory):
    from pipeline.serve import Handlers
    from tests._serve_helpers import make_model_dir
    model_dir = make_model_dir(tmp_path_factory.mktemp("hostile") / "model")
    h = Handlers(model_dir, "inference.py")
    h.load()
    sys.path.remove(str(model_dir / "code"))
    for name in ("inference", "modeling"):
        if str(model_dir) in str(getattr(sys.modules.get(name), "__file__", "")):
            del sys.modules[name]
    return h


def _refusal(handlers, body: bytes, content_type: str):
    with pytest.raises(Exception) as exc:
        handlers.input(body, content_type)
    err = exc.value
    assert type(err).__name__ == "InferenceError", repr(err)
    return err.status_code, str(err)


def test_a_progressive_jpeg_with_thousands_of_scans_is_refused_before_decoding(handlers):
    bomb = progressive_bomb(repeats=3000)
    assert handlers.module._jpeg_scans(bomb) > 64
    status, message = _refusal(handlers, bomb, "image/jpeg")
    assert status == 413 and "INFERENCE_MAX_JPEG_SCANS" in message


def test_normal_progressive_and_baseline_photos_pass_the_decode_guards(handlers):
    import io

    from PIL import Image
    for progressive in (True, False):
        buf = io.BytesIO()
        Image.new("RGB", (1600, 1200), (90, 60, 30)).save(buf, "JPEG", progressive=progressive)
        assert handlers.module._jpeg_scans(buf.getvalue()) == (10 if progressive else 1)
        assert len(handlers.input(buf.getvalue(), "image/jpeg")["images"]) == 1


def test_decode_work_is_bounded_per_request(handlers, monkeypatch):
    # 40 scans of 256x256 is 2.6 M pixel-scans: over a budget of 1 M, under one of 3 M.
    bomb = progressive_bomb(side=256, repeats=30)
    monkeypatch.setattr(handlers.module, "MAX_DECODE_WORK", 1_000_000)
    status, message = _refusal(handlers, bomb, "image/jpeg")
    assert status == 413 and "INFERENCE_MAX_DECODE_WORK" in message
    monkeypatch.setattr(handlers.module, "MAX_DECODE_WORK", 3_000_000)
    handlers.input(bomb, "image/jpeg")
    from tests._serve_helpers import b64_batch
    status, message = _refusal(handlers, b64_batch(bomb, bomb), "application/json")  # one budget per request
    assert status == 413 and "instances[1]" in message


@pytest.mark.parametrize("mode, side", [("RGB", 6300), ("I;16", 3000)])
def test_a_small_png_declaring_megapixels_is_refused_by_decoded_bytes(handlers, mode, side):
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new(mode, (side, side)).save(buf, "PNG")
    assert len(buf.getvalue()) < 200_000
    status, message = _refusal(handlers, buf.getvalue(), "image/png")
    assert status == 413 and "INFERENCE_MAX_DECODED_BYTES" in message


def test_many_small_png_bombs_share_one_budget(handlers):
    import io

    from PIL import Image

    from tests._serve_helpers import b64_batch
    buf = io.BytesIO()
    Image.new("RGB", (3000, 3000)).save(buf, "PNG")   # 36 MB decoded: alone fine, three are not
    handlers.input(buf.getvalue(), "image/png")
    status, message = _refusal(handlers, b64_batch(*[buf.getvalue()] * 3), "application/json")
    assert status == 413 and "instances[2]" in message and "INFERENCE_MAX_DECODED_BYTES" in message


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"instances": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                                  b'{"a":' * 30_000 + b"1" + b"}" * 30_000])
def test_deeply_nested_json_is_400(handlers, body):
    status, message = _refusal(handlers, body, "application/json")
    assert status == 400 and len(message) < 500


# ---------------------------------------------------------------- 2, 3, 4 at the local endpoint

HOSTILE_PROGRAM = '''
import time
from inference import input_fn, output_fn, model_fn, predict_fn as _predict_fn

def predict_fn(data, model):
    if any(image.size == (23, 23) for image in data["images"]):
        print("holding request in predict_fn", flush=True)
        time.sleep(3)
    return _predict_fn(data, model)
'''


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    from pipeline import serve as serve_mod
    from tests._serve_helpers import make_model_dir
    model_dir = make_model_dir(tmp_path_factory.mktemp("hostile-ep") / "model",
                               extra_code={"hostile_inference.py": HOSTILE_PROGRAM})
    ep = serve_mod.launch(model_dir, env={"OMP_NUM_THREADS": "1", "SAGEMAKER_PROGRAM": "hostile_inference.py"},
                          log_path=tmp_path_factory.mktemp("log") / "endpoint.log", timeout_s=20,
                          max_queued_mb=2, idle_timeout_s=1, header_timeout_s=1)
    try:
        yield ep.wait_ready(120)
    finally:
        assert ep.stop() == 0, ep.log_tail()


@pytest.mark.slow
def test_four_decode_bombs_leave_the_endpoint_answering(endpoint):
    from concurrent.futures import ThreadPoolExecutor

    from tests._serve_helpers import image_bytes, ping, post
    bomb = progressive_bomb(side=512, repeats=3000)
    with ThreadPoolExecutor(5) as pool:
        bombs = [pool.submit(post, endpoint.url, bomb, "image/jpeg", timeout=15) for _ in range(4)]
        normal = pool.submit(post, endpoint.url, image_bytes("JPEG"), "image/jpeg", timeout=15)
        status, answer, _ = normal.result()
        assert status == 200 and len(answer["top"]) == 5
        for future in bombs:
            status, answer, _ = future.result()
            assert status == 413 and "INFERENCE_MAX_JPEG_SCANS" in answer["error"]
    assert ping(endpoint.url) == 200


def _connect(url: str):
    import socket
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=15)
    return sock


def _read_all(sock) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.slow
def test_connections_that_send_nothing_are_closed(endpoint):
    from tests._serve_helpers import ping
    idle = [_connect(endpoint.url) for _ in range(20)]
    try:
        assert ping(endpoint.url) == 200
        for sock in idle:   # closed by the server after --idle-timeout-s (1 s): recv sees EOF, not a timeout
            assert _read_all(sock) == b""
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.slow
def test_request_headers_that_trickle_in_are_answered_408_and_closed(endpoint):
    import time
    sock = _connect(endpoint.url)
    try:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\n")
        for _ in range(3):               # a header line now and then, never the blank line
            time.sleep(0.5)
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
        reply = _read_all(sock)
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 408") and b"--header-timeout-s" in reply


@pytest.mark.slow
def test_decoded_images_held_by_the_server_are_bounded(endpoint):
    """A request holding ~1.9 MB of decoded images sits in predict_fn; with --max-queued-mb 2 the
    next one that would go over is answered 503 at once, and is served once memory is free."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from tests._serve_helpers import b64_batch, image_bytes, post
    holder = b64_batch(image_bytes("PNG", size=(23, 23)), image_bytes("PNG", size=(690, 690)))
    second = image_bytes("PNG", size=(500, 500))
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(post, endpoint.url, holder, "application/json", timeout=30)
        deadline = time.monotonic() + 20
        while "holding request in predict_fn" not in endpoint.log_tail(200) and time.monotonic() < deadline:
            time.sleep(0.05)
        status, answer, headers = post(endpoint.url, second, "image/png")
        assert status == 503 and "--max-queued-mb" in answer["error"] and headers.get("retry-after") == "1"
        assert held.result()[0] == 200
    assert post(endpoint.url, second, "image/png")[0] == 200


# ---------------------------------------------------------------- 7: a resumed tuning job

@pytest.mark.parametrize("strategy", ["Random", "Bayesian"])
def test_a_resumed_tuning_job_neither_repeats_nor_reorders_trials(tmp_path, strategy):
    """Killed while trial 2 runs, then rerun: trial 2 gets fresh values (it used to get trial 1's),
    the very values an uninterrupted tuning job gives it."""
    from pipeline.local.jobs import run_training_job
    from pipeline.local.tuner import run_tuning_job
    from tests._local_helpers import DATA_URI, put_toy_code_and_data, toy_definition
    store = LocalStore(tmp_path / "store")
    put_toy_code_and_data(store)
    tune = toy_definition(max_jobs=3, parallel=1, cache=False)["Steps"][0]["Arguments"]
    tune = json.loads(json.dumps(tune).replace(json.dumps({"Get": "Parameters.TrainingData"}), json.dumps(DATA_URI)))
    tune["HyperParameterTuningJobConfig"]["Strategy"] = strategy

    def killed_in_trial_2(name, request, *args, **kwargs):
        if "-002-" in name:
            raise KeyboardInterrupt
        return run_training_job(name, request, *args, **kwargs)

    quiet = {"progress": lambda line: None}
    with pytest.raises(KeyboardInterrupt):
        run_tuning_job("tune", tune, store, tmp_path / "killed", run_job=killed_in_trial_2, **quiet)
    run_tuning_job("tune", tune, store, tmp_path / "killed", **quiet)
    run_tuning_job("tune", tune, store, tmp_path / "whole", **quiet)

    def params(step_dir):
        return [t["params"] for t in json.loads((step_dir / "trials.json").read_text())]

    resumed = params(tmp_path / "killed")
    assert len(resumed) == 3 and resumed[1] != resumed[0], resumed
    assert resumed == params(tmp_path / "whole")


# ---------------------------------------------------------------- 8: an endpoint orphaned by a killed run

def _endpoint_definition(model_uri: str) -> dict:
    return {"Version": "2020-12-01", "Metadata": {}, "Parameters": [], "Steps": [
        {"Name": "Model", "Type": "Model", "Arguments": {
            "ExecutionRoleArn": "arn:aws:iam::111111111111:role/x",
            "PrimaryContainer": {"Image": "inference:latest", "ModelDataUrl": model_uri,
                                 "Environment": {"SAGEMAKER_PROGRAM": "inference.py"}}}},
        {"Name": "Config", "Type": "EndpointConfig", "Arguments": {
            "EndpointConfigName": "hostile-config", "ProductionVariants": [
                {"ModelName": {"Get": "Steps.Model.ModelName"}, "VariantName": "AllTraffic",
                 "InitialInstanceCount": 1, "InstanceType": "ml.m5.large"}]}},
        {"Name": "Endpoint", "Type": "Endpoint", "Arguments": {
            "EndpointName": "hostile-endpoint", "EndpointConfigName": {"Get": "Steps.Config.EndpointConfigName"}}},
    ]}


@pytest.mark.slow
def test_a_run_killed_during_the_endpoint_step_leaves_no_server_behind(tmp_path):
    import signal
    import time

    import psutil

    from pipeline.local.executor import execute
    from tests._serve_helpers import make_model_dir, make_tarball
    store = LocalStore(tmp_path / "store")
    tarball = make_tarball(make_model_dir(tmp_path / "model"), tmp_path / "model.tar.gz")
    store.put_file("s3://toy-bucket/model/model.tar.gz", tarball)
    definition = tmp_path / "definition.json"
    definition.write_text(json.dumps(_endpoint_definition("s3://toy-bucket/model/model.tar.gz")))
    record = store.root / ".sagemaker" / "endpoints" / "hostile-endpoint.json"
    script = ("import json, sys\n"
              "from pipeline.local.executor import execute\n"
              "from pipeline.local.store import LocalStore\n"
              "execute(json.load(open(sys.argv[1])), store=LocalStore(sys.argv[2]), run_dir=sys.argv[3], "
              "report=False)\n")
    run = subprocess.Popen([PY, "-c", script, str(definition), str(store.root), str(tmp_path / "run")], cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    orphan = None
    try:
        deadline = time.monotonic() + 120
        while orphan is None and time.monotonic() < deadline and run.poll() is None:
            data = json.loads(record.read_text()) if record.is_file() else {}
            orphan = data.get("LocalPid") if data.get("EndpointStatus") == "Creating" else None
            time.sleep(0.05)
        assert orphan, "the Endpoint step never recorded its server"
        run.send_signal(signal.SIGKILL)   # no cleanup at all: the server is now an orphan
        run.wait(30)
        server = psutil.Process(orphan)
        assert "pipeline.serve" in " ".join(server.cmdline())

        rec = execute(json.loads(definition.read_text()), store=store, run_dir=tmp_path / "run", report=False,
                      progress=lambda line: None)
        assert rec["PipelineExecutionStatus"] == "Succeeded", rec
        assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
        assert json.loads(record.read_text())["LocalPid"] != orphan
    finally:
        if run.poll() is None:
            run.kill()
        if orphan and psutil.pid_exists(orphan):
            try:
                os.killpg(orphan, signal.SIGKILL)
            except OSError:
                pass


# ---------------------------------------------------------------- 9: datasets with fewer than 2 classes

def _dataset(root: Path, classes: int, per_split: int = 1) -> Path:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "JPEG")
    for split in ("train", "valid", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
        for c in range(classes):
            folder = root / split / f"{c + 1:03d}.Breed_{c}"
            folder.mkdir(exist_ok=True)
            for i in range(per_split):
                (folder / f"img{i}.jpg").write_bytes(buf.getvalue())
    return root


@pytest.mark.parametrize("mode", [["--local", "--prepare-data"], ["--local", "--execute"]])
@pytest.mark.parametrize("classes", [0, 1])
def test_datasets_with_fewer_than_two_classes_replace_nothing(tmp_path, monkeypatch, capsys, mode, classes):
    import run_pipeline
    monkeypatch.setenv("DOGBREED_LOCAL_STORE", str(tmp_path / "store"))
    doc = _config(**{"data.strict": False})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    store = LocalStore(tmp_path / "store")
    _dataset(store.path(doc["data"]["uri"]), classes=3)       # the data a run would lose
    before = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))
    bad = _dataset(tmp_path / "bad", classes=classes)
    rc = run_pipeline.main(["--config", str(cfg), *mode, "--data", str(bad), "--run-dir", str(tmp_path / "run")]
                           if "--execute" in mode else ["--config", str(cfg), *mode, "--data", str(bad)])
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 1 and "class folder" in line and "at least 2" in line
    assert sorted(p.relative_to(store.root) for p in store.root.rglob("*")) == before


# ---------------------------------------------------------------- 12: corrupt zip members

def _zip(tmp_path: Path, corrupt: str) -> Path:
    import zipfile
    path = tmp_path / f"{corrupt}.zip"
    files = {f"dogs/{s}/{c:03d}.Breed/img.jpg": bytes(range(256)) * 40 for s in ("train", "valid", "test")
             for c in (1, 2)}
    if corrupt == "clash":
        files["dogs/train/001.Breed"] = b"a file where a folder is"
    if corrupt == "long name":
        files["dogs/train/" + "x" * 300 + ".jpg"] = b"x"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        if corrupt == "duplicate":
            zf.writestr(next(iter(files)), b"again")
    data = bytearray(path.read_bytes())
    first = data.find(b"PK\x03\x04")
    name_len = int.from_bytes(data[first + 26:first + 28], "little")
    payload = first + 30 + name_len
    if corrupt == "crc":
        data[first + 14] ^= 0xFF                       # local header's CRC-32
        central = data.find(b"PK\x01\x02")
        data[central + 16] ^= 0xFF                     # and the central directory's
    elif corrupt == "deflate":
        data[payload:payload + 8] = b"\xff" * 8        # not a deflate stream
    elif corrupt == "encrypted":
        for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
            at = data.find(sig)
            data[at + offset] |= 0x01
    elif corrupt == "method":
        for sig, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
            at = data.find(sig)
            data[at + offset:at + offset + 2] = (99).to_bytes(2, "little")
    elif corrupt == "truncated":
        data = data[:len(data) // 2]
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("corrupt, words", [
    ("crc", "cannot be extracted"), ("deflate", "cannot be extracted"), ("encrypted", "encrypted"),
    ("method", "compression method 99"), ("clash", "both a file and a folder"), ("duplicate", "appears twice"),
    ("long name", "over 255 bytes"), ("truncated", "not a valid zip"),
])
@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_corrupt_zip_members_are_one_line_and_change_nothing(tmp_path, monkeypatch, capsys, corrupt, words):
    import run_pipeline
    monkeypatch.setenv("DOGBREED_LOCAL_STORE", str(tmp_path / "store"))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_config(**{"data.strict": False, "data.cache_dir": str(tmp_path / "cache")})))
    rc = run_pipeline.main(["--config", str(cfg), "--local", "--prepare-data", "--data", str(_zip(tmp_path, corrupt))])
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 1 and words in line, line
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.jpg"))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.jpg"))


# ---------------------------------------------------------------- 12: every entry point, one bad input each

def _run(argv: list[str], tmp_path: Path, env: dict | None = None, timeout: float = 240) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AWS_EC2_METADATA_DISABLED": "true",
           "DOGBREED_LOCAL_STORE": str(tmp_path / "store"), **(env or {})}
    for var in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        env.pop(var, None)
    env["AWS_SHARED_CREDENTIALS_FILE"] = env["AWS_CONFIG_FILE"] = str(tmp_path / "no-aws-config")
    proc = subprocess.run([PY, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stderr


def _busy_port():
    import socket
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


ENTRY_POINTS = {
    # name: (argv, what the one line must name); {tmp} is the test's folder
    "definition, bad config": (["run_pipeline.py", "--config", "{tmp}/bad.yaml", "--definition", "{tmp}/d.json"],
                               "unknown key"),
    "prepare-data, missing --data": (["run_pipeline.py", "--config", "pipeline.smoke.yaml", "--local",
                                      "--prepare-data", "--data", "{tmp}/nope"], "no such file or folder"),
    "local execute, truncated execution.json": (["run_pipeline.py", "--config", "pipeline.smoke.yaml", "--local",
                                                 "--execute", "--run-dir", "{tmp}/run"], "execution.json"),
    "execute on AWS, no credentials": (["run_pipeline.py", "--config", "pipeline.smoke.yaml", "--execute"],
                                       "credentials"),
    "cleanup, no credentials": (["run_pipeline.py", "--config", "pipeline.smoke.yaml", "--cleanup", "--yes"],
                                "credentials"),
    "serve, missing model": (["run_pipeline.py", "--serve", "{tmp}/nope.tar.gz"], "no such file or folder"),
    "serve, truncated archive": (["run_pipeline.py", "--serve", "{tmp}/truncated.tar.gz"], "truncated or corrupt"),
    "serve, refused archive": (["run_pipeline.py", "--serve", "{tmp}/evil.tar.gz"], "outside"),
    "serve, port out of range": (["run_pipeline.py", "--serve", "{tmp}/model", "--port", "70000"], "out of range"),
    "serve, port in use": (["run_pipeline.py", "--serve", "{tmp}/model", "--port", "{busy}"], "is in use"),
    "invoke, missing image": (["run_pipeline.py", "--invoke", "http://127.0.0.1:9", "{tmp}/nope.jpg"],
                              "no such image file"),
    "python -m pipeline.serve, missing model": (["-m", "pipeline.serve", "{tmp}/nope"], "no such file or folder"),
    "python -m pipeline.serve, bad port": (["-m", "pipeline.serve", "{tmp}/model", "--port", "-1"], "out of range"),
}


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
@pytest.mark.slow
def test_every_entry_point_answers_bad_input_with_one_line_and_exit_1(tmp_path, name):
    import tarfile

    from tests._serve_helpers import make_model_dir, make_tarball
    argv, words = ENTRY_POINTS[name]
    (tmp_path / "bad.yaml").write_text("pipeline: {name: x}\nfoo: 1\n")
    if "model" in " ".join(argv) or "archive" in name:
        make_model_dir(tmp_path / "model")
        good = make_tarball(tmp_path / "model", tmp_path / "good.tar.gz").read_bytes()
        (tmp_path / "truncated.tar.gz").write_bytes(good[:len(good) // 2])
        with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as tar:
            info = tarfile.TarInfo("code/link")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    if "execution.json" in name:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "execution.json").write_text('{"PipelineExecutionId": "abc", "Steps": {')
    busy = _busy_port()
    try:
        argv = [a.format(tmp=tmp_path, busy=busy.getsockname()[1]) for a in argv]
        rc, err = _run(argv, tmp_path)
    finally:
        busy.close()
    line = _one_line_error(err)
    assert rc == 1 and words in line, (rc, line)


def test_usage_errors_exit_2_with_argparse_usage(tmp_path):
    rc, err = _run(["run_pipeline.py", "--no-such-flag"], tmp_path)
    assert rc == 2 and "usage:" in err and "Traceback" not in err


# ---------------------------------------------------------------- 6, 11, 13: the training scripts' contract

TRAIN_HP = {"arch": "resnet18", "weights": "none", "image-size": 32, "epochs": 1, "freeze-epochs": 0,
            "patience": 0, "batch-size": 4, "test-batch-size": 4, "lr": 0.01, "num-workers": 0, "seed": 0}


def _train(tmp_path: Path, script: str, changes: dict, corrupt: str | None = None):
    from tests._scripts_helpers import hyperparameter_args, sagemaker_env
    data = _dataset(tmp_path / "data", classes=2, per_split=2)
    if corrupt:
        (data / corrupt).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    hps = {**TRAIN_HP, **changes}
    env = sagemaker_env(tmp_path, {s: data / s for s in ("train", "valid", "test")}, hps)
    proc = subprocess.run([PY, str(ROOT / "scripts" / script), *hyperparameter_args(hps)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    failure = Path(env["SM_OUTPUT_DIR"]) / "failure"
    return proc, (failure.read_text() if failure.is_file() else None), Path(env["SM_MODEL_DIR"])


def _assert_refused(proc, failure: str | None, model_dir: Path, *words: str | tuple[str, ...]):
    """README's contract for the container scripts: exit 1, one `error:` line on stderr, the same
    reason in /opt/ml/output/failure, no traceback, no model. Each of `words` (or one of a tuple
    of alternatives) is named in the line and in the failure file."""
    import re
    err_lines = [line for line in proc.stderr.splitlines() if re.match(r"^(\S+: )?error:", line)]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(err_lines) == 1, proc.stderr[-3000:]
    assert failure and len(failure.splitlines()) == 1
    for word in words:
        alternatives = word if isinstance(word, tuple) else (word,)
        assert any(w in err_lines[0].lower() and w in failure.lower() for w in alternatives), (err_lines[0], failure)
    assert not (model_dir / "model.pth").exists()


# A bad hyperparameter, a diverging loss, a corrupt test/ image and an empty checkpoint, each in a real
# job: tests/test_train_hardening.py. Here: a corrupt image in train/, beyond the --max-bad-images bound.

@pytest.mark.parametrize("where", ["train/001.Breed_0/img0.jpg"])
@pytest.mark.slow
def test_one_corrupt_image_is_one_line_naming_the_file(tmp_path, where):
    proc, failure, model_dir = _train(tmp_path, "train_model.py", {}, corrupt=where)
    _assert_refused(proc, failure, model_dir, Path(where).name)



@pytest.mark.slow
def test_memory_goes_back_after_a_burst_of_large_images(endpoint):
    """16 clients sending 23 MP PNGs (92 MB decoded each, each under the per-request bounds):
    once they are answered (200 or 503), the server's memory returns to about where it was
    (it stayed 2 GB higher: the batcher's last batch, refused requests' images in exception
    cycles, and glibc's arenas kept them)."""
    import io
    import time
    from concurrent.futures import ThreadPoolExecutor

    import psutil
    from PIL import Image

    from tests._serve_helpers import post
    server = psutil.Process(endpoint.pid)
    before = server.memory_info().rss
    buf = io.BytesIO()
    Image.new("RGB", (4800, 4800), (9, 9, 9)).save(buf, "PNG")
    with ThreadPoolExecutor(16) as pool:
        statuses = [s for s, _, _ in pool.map(lambda _: post(endpoint.url, buf.getvalue(), "image/png", timeout=60),
                                              range(16))]
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    deadline = time.monotonic() + 10
    while server.memory_info().rss > before + 150 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.memory_info().rss <= before + 150 * 2**20, (before >> 20, server.memory_info().rss >> 20)


def test_a_jpeg_of_a_million_empty_segments_is_refused_quickly(handlers):
    from tests._serve_helpers import image_bytes
    jpeg = image_bytes("JPEG")
    padded = jpeg[:2] + b"\xff\xfe\x00\x02" * 1_000_000 + jpeg[2:]   # COM segments of no text
    status, message = _refusal(handlers, padded, "image/jpeg")
    assert status == 413 and "marker segments" in message


def test_a_json_batch_of_four_12_mp_photos_still_fits_the_pixel_budget(handlers):
    import io

    from PIL import Image

    from tests._serve_helpers import b64_batch
    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), (90, 60, 30)).save(buf, "JPEG")
    assert len(handlers.input(b64_batch(*[buf.getvalue()] * 4), "application/json")["images"]) == 4


# ---------------------------------------------------------------- 2, 4, 14 inside the SageMaker container's toolkit

@pytest.mark.slow
def test_the_decode_guards_answer_4xx_through_the_inference_toolkit(tmp_path):
    """The same refusals reach SageMaker: the real sagemaker-inference Transformer (what the PyTorch
    serving container runs per request) turns them into the same 4xx, before any decoding."""
    import importlib
    import io

    from PIL import Image
    from sagemaker_inference import transformer as transformer_mod

    from tests._serve_helpers import make_model_dir

    class Context:
        def __init__(self, model_dir, content_type):
            request = type("Request", (), {"get_request_properties": lambda self: {
                "Content-Type": content_type, "Accept": "application/json"}})()
            self.system_properties, self.request_processor = {"model_dir": str(model_dir)}, [request]
            self.status, self.phrase, self.content_type = 200, None, None

        def set_response_status(self, code, phrase):
            self.status, self.phrase = code, phrase

        def set_response_content_type(self, idx, content_type):
            self.content_type = content_type

    model_dir = make_model_dir(tmp_path / "model")
    sys.path.insert(0, str(model_dir / "code"))
    saved = {name: sys.modules.pop(name) for name in ("inference", "modeling") if name in sys.modules}
    try:
        importlib.import_module("inference")
        transformer = transformer_mod.Transformer()
        buf = io.BytesIO()
        Image.new("RGB", (6300, 6300)).save(buf, "PNG")
        cases = [(progressive_bomb(repeats=3000), "image/jpeg", 413, "INFERENCE_MAX_JPEG_SCANS"),
                 (buf.getvalue(), "image/png", 413, "INFERENCE_MAX_DECODED_BYTES"),
                 (b"[" * 100_000, "application/json", 400, "not valid JSON")]
        ctx = None
        for body, content_type, status, words in cases:
            # TorchServe keeps one context per worker and swaps in each request's headers and
            # status; the Transformer keeps the first context it saw, so reuse one here too.
            fresh = Context(model_dir, content_type)
            ctx = ctx or fresh
            ctx.__dict__.update(fresh.__dict__)
            (out,) = transformer.transform([{"body": body}], ctx)
            assert ctx.status == status and words in json.loads(out)["error"], (ctx.status, out[:300])
            assert "Traceback" not in out
    finally:
        sys.path.remove(str(model_dir / "code"))
        for name in ("inference", "modeling"):
            sys.modules.pop(name, None)
        sys.modules.update(saved)


@pytest.mark.slow
def test_a_model_that_cannot_load_ends_the_server_log_with_one_error_line(tmp_path):
    from tests._serve_helpers import make_model_dir
    model_dir = make_model_dir(tmp_path / "model")
    (model_dir / "model.pth").write_bytes(b"not a state dict")
    rc, err = _run(["-m", "pipeline.serve", str(model_dir), "--port", "0"], tmp_path)
    last = err.strip().splitlines()[-1]
    assert rc == 1 and last.startswith("error: ") and "model_fn failed" in last and "UnpicklingError" in last, last
