"""The local endpoint over real HTTP on 127.0.0.1, in real subprocesses, and the --invoke client."""
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from pipeline import invoke as invoke_mod
from pipeline import serve as serve_mod
from tests._serve_helpers import (
    LABELS,
    ROOT,
    b64_batch,
    free_port,
    image_bytes,
    make_model_dir,
    make_tarball,
    ping,
    png_header_only,
    post,
)

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# A handler program wrapping the real inference.py, loaded through SAGEMAKER_PROGRAM:
# slow enough that concurrent requests pile up into batches, and with inputs that
# crash or hang it (recognised by their size).
TESTING_PROGRAM = '''
import time
from inference import input_fn, output_fn, model_fn as _model_fn, predict_fn as _predict_fn

def model_fn(model_dir):
    time.sleep(1.5)  # a slow load: /ping must say 503 meanwhile
    return _model_fn(model_dir)

def predict_fn(data, model):
    sizes = {image.size for image in data["images"]}
    if (13, 13) in sizes:
        raise RuntimeError("secret internal detail")
    if (17, 17) in sizes:
        time.sleep(3.6)
    if (19, 19) in sizes:
        print("slow request in flight", flush=True)
        time.sleep(1)
    time.sleep(0.05)
    return _predict_fn(data, model)
'''


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("serve") / "model",
                          extra_code={"testing_inference.py": TESTING_PROGRAM})


@pytest.fixture(scope="module")
def tarball(model_dir, tmp_path_factory):
    return make_tarball(model_dir, tmp_path_factory.mktemp("tar") / "model.tar.gz")


@pytest.fixture(scope="module")
def endpoint(tarball, tmp_path_factory):
    """The real handlers, served from a model.tar.gz."""
    ep = serve_mod.launch(tarball, env=ENV, log_path=tmp_path_factory.mktemp("log") / "endpoint.log",
                          max_batch_size=8, max_batch_delay_ms=10)
    try:
        yield ep.wait_ready(120)
    finally:
        assert ep.stop() == 0, ep.log_tail()


@pytest.fixture(scope="module")
def testing_endpoint(model_dir, tmp_path_factory):
    ep = serve_mod.launch(model_dir, env={**ENV, "SAGEMAKER_PROGRAM": "testing_inference.py"},
                          log_path=tmp_path_factory.mktemp("log") / "testing.log",
                          max_batch_size=8, max_batch_delay_ms=50, timeout_s=3)
    try:
        ep.first_ping = None
        while ep.first_ping is None and ep.process.poll() is None:
            if ep.url is None and ep.url_file.is_file():
                ep.url = ep.url_file.read_text().strip()
            try:
                ep.first_ping = ping(ep.url) if ep.url else None
            except OSError:  # not accepting connections yet
                pass
            time.sleep(0.05)
        yield ep.wait_ready(120)
    finally:
        ep.stop()


@pytest.mark.slow
def test_ping_says_503_until_model_fn_has_returned(testing_endpoint):
    assert testing_endpoint.first_ping == 503
    assert ping(testing_endpoint.url) == 200


@pytest.fixture(scope="module")
def reference(model_dir):
    """The handlers called in this process, one image at a time: what every answer must equal."""
    handlers = serve_mod.Handlers(model_dir, "inference.py")
    handlers.load()
    # Handlers puts code/ on sys.path and `inference` in sys.modules, as the container
    # does; undo that here so that other test modules do not import this copy.
    sys.path.remove(str(model_dir / "code"))
    for name in ("inference", "modeling"):
        if str(model_dir) in str(getattr(sys.modules.get(name), "__file__", "")):
            del sys.modules[name]

    def answer(body, content_type="image/jpeg"):
        return json.loads(handlers.output(handlers.predict(handlers.input(body, content_type)), "application/json")[0])

    return answer


IMAGES = [image_bytes("JPEG", size=(90 + 10 * i, 70), colour=(40 * i, 200 - 30 * i, 90)) for i in range(4)]


def _probs(answer):
    return torch.tensor(answer["probabilities"])


@pytest.mark.slow
def test_round_trips_jpeg_png_and_json_batch(endpoint, reference):
    assert ping(endpoint.url) == 200
    png = image_bytes("PNG", colour=(10, 220, 30))
    for body, ctype in [(IMAGES[0], "image/jpeg"), (png, "image/png"), (png, "application/x-image")]:
        status, answer, headers = post(endpoint.url, body, ctype, accept="*/*")
        assert status == 200 and headers["content-type"].startswith("application/json")
        probs = _probs(answer)
        assert probs.shape == (len(LABELS),) and probs.sum().item() == pytest.approx(1, abs=1e-5)
        assert [t["label"] for t in answer["top"]] == [LABELS[i] for i in probs.argsort(descending=True)[:5]]
        assert torch.allclose(probs, _probs(reference(body, ctype)), atol=1e-5)
    status, answer, headers = post(endpoint.url, b64_batch(IMAGES[0], png, IMAGES[1]), "application/json")
    assert status == 200 and len(answer["predictions"]) == 3 and headers["x-batch-size"] == "3"
    for got, body in zip(answer["predictions"], (IMAGES[0], png, IMAGES[1])):
        assert torch.allclose(_probs(got), _probs(reference(body)), atol=1e-5)


BAD_REQUESTS = [
    (b"", "image/jpeg", None, 400, "empty"),
    (b"just some text", "text/plain", None, 415, "image/jpeg"),
    (b"just some text", "image/jpeg", None, 400, "not an image"),
    (IMAGES[0][:300], "image/jpeg", None, 400, "truncated"),
    (b'{"instances": [{"b64": "@@@"}]}', "application/json", None, 400, "base64"),
    (b'{"instances": ', "application/json", None, 400, "JSON"),
    (b"\xff\xfe\xfa", "application/json", None, 500, "UTF-8"),  # as the inference toolkit answers
    (IMAGES[0], None, None, 415, "Content-Type"),
    (IMAGES[0], "image/jpeg", "text/csv", 406, "application/json"),
    (b"\0" * (6 * 1024 * 1024 + 1), "image/jpeg", None, 413, "6 MB"),
]


@pytest.mark.slow
def test_bad_requests_get_their_4xx_and_the_server_stays_healthy(endpoint):
    for body, ctype, accept, status, word in BAD_REQUESTS + [(png_header_only(9000, 9000), "image/png", None, 413,
                                                              "INFERENCE_MAX_PIXELS")]:
        got, answer, headers = post(endpoint.url, body, ctype, accept or "application/json")
        assert (got, word in answer["error"]) == (status, True), (ctype, answer)
        assert headers["content-type"] == "application/json"
        assert ping(endpoint.url) == 200
    assert post(endpoint.url, IMAGES[0], "image/jpeg")[0] == 200
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(endpoint.url + "/predict")
    assert err.value.code == 404 and "POST /invocations" in json.loads(err.value.read())["error"]


@pytest.mark.slow
def test_concurrent_clients_are_batched_and_answer_as_unbatched(testing_endpoint, reference):
    expected = [_probs(reference(body)) for body in IMAGES]
    start = threading.Barrier(8)

    def client(k):
        start.wait()
        out = []
        for i in range(3):
            image = (k + i) % len(IMAGES)
            status, answer, headers = post(testing_endpoint.url, IMAGES[image], "image/jpeg")
            out.append((status, image, answer, int(headers.get("x-batch-size", 0))))
        return out

    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(client, range(8)) for r in rs]
    assert [r[0] for r in results] == [200] * 24
    assert max(r[3] for r in results) > 1, "no request shared a forward pass"
    for _, image, answer, _ in results:
        assert torch.allclose(_probs(answer), expected[image], atol=1e-5)
    log = testing_endpoint.log_path.read_text()
    assert any(f"batch={n}" in log for n in range(2, 9))


@pytest.mark.slow
def test_handler_crash_is_a_500_without_internals_and_the_server_goes_on(testing_endpoint):
    status, answer, _ = post(testing_endpoint.url, image_bytes("PNG", size=(13, 13)), "image/png")
    assert status == 500 and "RuntimeError" in answer["error"]
    assert "secret" not in answer["error"] and "Traceback" not in answer["error"]
    assert "secret internal detail" in testing_endpoint.log_path.read_text()  # the details go to the log
    assert ping(testing_endpoint.url) == 200
    assert post(testing_endpoint.url, IMAGES[1], "image/jpeg")[0] == 200


@pytest.mark.slow
def test_a_request_past_the_timeout_gets_504_and_the_server_recovers(testing_endpoint):
    status, answer, _ = post(testing_endpoint.url, image_bytes("PNG", size=(17, 17)), "image/png")
    assert status == 504 and "3 s" in answer["error"]
    assert ping(testing_endpoint.url) == 200
    for _ in range(20):  # the hung forward pass still holds the model for a moment
        if post(testing_endpoint.url, IMAGES[1], "image/jpeg")[0] == 200:
            break
    else:
        pytest.fail("the endpoint did not recover after a timeout")


@pytest.mark.slow
def test_bounded_load_ends_with_zero_errors_and_one_log_line_per_request(endpoint):
    before = endpoint.log_path.read_text().count('"POST /invocations"')
    bodies = [(IMAGES[i % 4], "image/jpeg") for i in range(4)] + [(b64_batch(IMAGES[0], IMAGES[2]), "application/json")]

    def one(i):
        body, ctype = bodies[i % len(bodies)]
        return post(endpoint.url, body, ctype)[0]

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(120)))
    assert statuses == [200] * 120
    for _ in range(100):  # a line is written just after its answer is sent
        lines = [line for line in endpoint.log_path.read_text().splitlines() if '"POST /invocations"' in line]
        if len(lines) - before >= 120:
            break
        time.sleep(0.05)
    assert len(lines) - before == 120
    assert all(re.search(r'"POST /invocations" 200 [\d.]+ms batch=[1-8]$', line) for line in lines[before:])


@pytest.mark.slow
def test_cli_serve_takes_sagemaker_program_and_stops_gracefully_on_sigterm(model_dir, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "run_pipeline.py", "--serve", str(model_dir), "--port", str(port)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **ENV, "SAGEMAKER_PROGRAM": "testing_inference.py"})
    endpoint = serve_mod.Endpoint(proc, tmp_path / "unused", log)
    endpoint.url = f"http://127.0.0.1:{port}"
    try:
        endpoint.wait_ready(120)
        with ThreadPoolExecutor(1) as pool:  # a slow request in flight while SIGTERM arrives
            slow = pool.submit(post, endpoint.url, image_bytes("PNG", size=(19, 19)), "image/png")
            while "slow request in flight" not in log.read_text() and not slow.done():
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert slow.result(timeout=60)[0] == 200
        assert proc.wait(60) == 0, log.read_text()
    finally:
        endpoint.stop()
    assert "stopped" in log.read_text()


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(member, io.BytesIO(data) if data else None)
    return path


def _member(name, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, (1 if kind == tarfile.REGTYPE else 0)
    return info


@pytest.mark.parametrize("name,kind,link,words", [
    ("{tmp}/evil", tarfile.REGTYPE, "", "absolute path"),
    ("code/../../evil", tarfile.REGTYPE, "", "'..'"),
    ("code/link", tarfile.SYMTYPE, "../../evil", "outside the model dir"),
    ("code/link", tarfile.SYMTYPE, "{tmp}/evil", "outside the model dir"),
    ("hard", tarfile.LNKTYPE, "../evil", "outside the model dir"),
    ("fifo", tarfile.FIFOTYPE, "", "device or fifo"),
])
def test_unsafe_archives_are_refused(tmp_path, name, kind, link, words):
    member = _member(name.format(tmp=tmp_path), kind, link.format(tmp=tmp_path))
    tarball = _tar_with(tmp_path / "model.tar.gz", member, b"x" if member.isfile() else b"")
    with pytest.raises(ValueError, match=words):
        serve_mod.resolve_model(tarball, tmp_path / "work")  # extracts under work/model/
    assert not (tmp_path / "evil").exists() and not (tmp_path / "work" / "model" / "code" / "link").exists()


def test_links_inside_the_archive_are_fine(tmp_path):
    path = tmp_path / "model.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(_member("code/inference.py"), io.BytesIO(b"x"))
        tar.addfile(_member("code/alias.py", tarfile.SYMTYPE, "inference.py"))
    extracted = serve_mod.resolve_model(path, tmp_path / "work")
    assert (extracted / "code" / "alias.py").read_text() == "x"


def test_a_model_tarball_or_dir_resolves(tmp_path, model_dir, tarball):
    extracted = serve_mod.resolve_model(tarball, tmp_path / "work")
    assert (extracted / "code" / "inference.py").is_file() and (extracted / "model.json").is_file()
    assert serve_mod.resolve_model(model_dir, tmp_path / "unused") == model_dir.resolve()
    with pytest.raises(serve_mod.ServeError, match="no such file or folder"):
        serve_mod.resolve_model(tmp_path / "nope.tar.gz", tmp_path / "work2")
    (tmp_path / "notes.txt").write_text("not an archive")
    with pytest.raises(serve_mod.ServeError, match="neither a model dir nor a model.tar.gz"):
        serve_mod.resolve_model(tmp_path / "notes.txt", tmp_path / "work2")


def test_missing_program_is_named(model_dir):
    with pytest.raises(FileNotFoundError, match="code/nope.py"):
        serve_mod.Handlers(model_dir, "nope.py")


@pytest.mark.slow
def test_a_model_fn_failure_stops_the_server_with_the_reason_logged(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    (model_dir / "model.pth").write_bytes(b"not a state dict")
    ep = serve_mod.launch(model_dir, env=ENV)
    with pytest.raises(RuntimeError, match="model_fn failed, so the endpoint cannot serve .*UnpicklingError"):
        ep.wait_ready(120)
    assert ep.stop() == 1


def test_launch_reports_a_server_that_cannot_start(tmp_path):
    tarball = _tar_with(tmp_path / "model.tar.gz", _member("code/../../evil"), b"x")
    ep = serve_mod.launch(tarball, env=ENV)
    with pytest.raises(RuntimeError, match="contains '..'"):
        ep.wait_ready(120)
    assert ep.stop() != 0


# ---------------------------------------------------------------- --invoke

@pytest.fixture()
def image_files(tmp_path):
    (tmp_path / "dog.jpg").write_bytes(IMAGES[0])
    (tmp_path / "dog.png").write_bytes(image_bytes("PNG"))
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


@pytest.mark.slow
def test_invoke_a_local_url_prints_a_top5_table(endpoint, image_files, capsys):
    assert invoke_mod.invoke(endpoint.url, [str(image_files / "dog.jpg"), str(image_files / "dog.png")]) == 0
    out = capsys.readouterr().out
    assert str(image_files / "dog.jpg") in out and str(image_files / "dog.png") in out
    assert out.count("%") == 10 and sum(label in out for label in LABELS) == 5


@pytest.mark.slow
def test_invoke_reports_refusals_and_missing_files(endpoint, image_files, capsys):
    assert invoke_mod.invoke(endpoint.url + "/invocations", [str(image_files / "notes.txt")]) == 1
    assert "answered 400" in capsys.readouterr().err
    with pytest.raises(invoke_mod.InvokeError, match="no such image file: .*absent.jpg"):
        invoke_mod.invoke(endpoint.url, [str(image_files / "absent.jpg")])
    assert invoke_mod.invoke(f"http://127.0.0.1:{free_port()}", [str(image_files / "dog.jpg")]) == 1
    assert "cannot reach" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_invoke_json(endpoint, image_files):
    proc = subprocess.run([sys.executable, "run_pipeline.py", "--invoke", endpoint.url, str(image_files / "dog.jpg"),
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **ENV})
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert len(answer["probabilities"]) == len(LABELS)


@pytest.fixture(scope="module")
def moto_sagemaker():
    from moto.server import ThreadedMotoServer
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_REGION": "us-east-1"}.items():
            mp.setenv(key, value)
        try:
            yield url
        finally:
            server.stop()


def _deploy_on_moto(name):
    import boto3
    sm = boto3.client("sagemaker", region_name="us-east-1")
    sm.create_model(ModelName=name, ExecutionRoleArn="arn:aws:iam::123456789012:role/r",
                    PrimaryContainer={"Image": "pytorch-inference:2.6-cpu", "ModelDataUrl": "s3://b/model.tar.gz"})
    sm.create_endpoint_config(EndpointConfigName=name, ProductionVariants=[
        {"VariantName": "AllTraffic", "ModelName": name, "InitialInstanceCount": 1, "InstanceType": "ml.m5.large"}])
    sm.create_endpoint(EndpointName=name, EndpointConfigName=name)
    return name


@pytest.fixture()
def stubbed_runtime(monkeypatch):
    """moto's sagemaker-runtime decodes request bodies as UTF-8, so it fails on image bytes:
    the runtime call goes to botocore's Stubber, describe_endpoint still to moto."""
    import boto3
    from botocore.stub import Stubber
    runtime = boto3.client("sagemaker-runtime", region_name="us-east-1")
    stubber = Stubber(runtime)
    real_client = invoke_mod._client
    monkeypatch.setattr(invoke_mod, "_client", lambda service, region: runtime if service == "sagemaker-runtime"
                        else real_client(service, region))
    with stubber:
        yield stubber
        stubber.assert_no_pending_responses()


@pytest.mark.slow
def test_invoke_a_sagemaker_endpoint_by_name(moto_sagemaker, stubbed_runtime, endpoint, image_files, capsys):
    import io

    from botocore.response import StreamingBody
    name = _deploy_on_moto("dogbreed-endpoint")
    status, answer, _ = post(endpoint.url, IMAGES[0], "image/jpeg")  # what our handlers really answer
    raw = json.dumps(answer).encode()
    stubbed_runtime.add_response(
        "invoke_endpoint", {"Body": StreamingBody(io.BytesIO(raw), len(raw)), "ContentType": "application/json"},
        {"EndpointName": name, "Body": IMAGES[0], "ContentType": "image/jpeg", "Accept": "application/json"})
    stubbed_runtime.add_client_error(
        "invoke_endpoint", service_error_code="ModelError", http_status_code=424,
        service_message="Received client error (400) from primary with message ...",
        modeled_fields={"OriginalStatusCode": 400, "OriginalMessage": json.dumps({"error": "image is empty"})})
    (image_files / "empty.jpg").write_bytes(b"")
    assert invoke_mod.invoke(name, [str(image_files / "dog.jpg"), str(image_files / "empty.jpg")]) == 1
    captured = capsys.readouterr()
    assert answer["top"][0]["label"] in captured.out and f"{answer['top'][0]['probability']:.2%}" in captured.out
    assert "ModelError: image is empty" in captured.err


@pytest.mark.slow
def test_invoke_names_a_missing_or_not_inservice_endpoint(moto_sagemaker, image_files, capsys):
    with pytest.raises(invoke_mod.InvokeError, match="'no-such-endpoint' does not exist in us-east-1"):
        invoke_mod.invoke("no-such-endpoint", [str(image_files / "dog.jpg")])
    name = _deploy_on_moto("creating-endpoint")
    from moto.sagemaker.models import sagemaker_backends  # moto's endpoints are born InService
    sagemaker_backends["123456789012"]["us-east-1"].endpoints[name].endpoint_status = "Creating"
    with pytest.raises(invoke_mod.InvokeError, match="is Creating, not InService"):
        invoke_mod.invoke(name, [str(image_files / "dog.jpg")])
