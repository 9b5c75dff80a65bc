"""One request set, two servers: our local endpoint (pipeline/serve.py) and the real SageMaker
PyTorch serving stack (sagemaker-pytorch-inference + sagemaker-inference + TorchServe, started by
pipeline/runtime/serving.py) must give the same status codes, the same error bodies byte for byte,
and answers equal to 1e-5. Where the toolkit or TorchServe decides before any handler, the test
pins down what each side does (README: Fidelity)."""
from __future__ import annotations

import http.client
import io
import json
import urllib.error
import urllib.parse
import urllib.request

import pytest
import torch
from PIL import Image

from pipeline import serve as serve_mod
from pipeline.runtime import serving
from tests._runtime_helpers import require_toolkits
from tests._serve_helpers import b64_batch, image_bytes, make_model_dir, make_tarball, png_header_only
from tests.test_serve import BAD_REQUESTS, IMAGES

pytestmark = pytest.mark.slow  # see pyproject's markers

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SIX_MB = 6 * 1024 * 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("fidelity") / "model")


@pytest.fixture(scope="module")
def real(model_dir, tmp_path_factory):
    """The real serving stack, from a model.tar.gz as SageMaker gets it: one per session."""
    require_toolkits(java=True)
    tarball = make_tarball(model_dir, tmp_path_factory.mktemp("tar") / "model.tar.gz")
    endpoint = serving.launch(tarball, env=ENV, workdir=tmp_path_factory.mktemp("real"))
    with endpoint:
        yield endpoint.wait_ready()


@pytest.fixture(scope="module")
def local(model_dir, tmp_path_factory):
    endpoint = serve_mod.launch(model_dir, env=ENV, log_path=tmp_path_factory.mktemp("local") / "endpoint.log")
    try:
        yield endpoint.wait_ready(120)
    finally:
        endpoint.stop()


def send(url: str, body: bytes, content_type: str | None, accept: str | None = "application/json"):
    """POST /invocations with exactly these headers (urllib would add a form Content-Type);
    (status, Content-Type, body bytes)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    headers = {k: v for k, v in (("Content-Type", content_type), ("Accept", accept)) if v}
    try:
        conn.request("POST", "/invocations", body=body, headers=headers)
        reply = conn.getresponse()
        return reply.status, (reply.getheader("Content-Type") or "").split(";")[0], reply.read()
    finally:
        conn.close()


def _jpeg(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **save)
    return buf.getvalue()


def _exif_rotated() -> bytes:
    image = Image.open(io.BytesIO(image_bytes("JPEG", size=(90, 50))))
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW on display
    return _jpeg(image, exif=exif.tobytes())


GOOD_REQUESTS = [
    ("jpeg", IMAGES[0], "image/jpeg", "application/json"),
    ("png", image_bytes("PNG", colour=(10, 220, 30)), "image/png", "application/json"),
    ("x-image", image_bytes("PNG", size=(64, 64)), "application/x-image", "*/*"),
    ("rgba", image_bytes("PNG", mode="RGBA", colour=(20, 90, 200, 128)), "image/png", "application/json"),
    ("grayscale", image_bytes("JPEG", mode="L", colour=(120,)), "image/jpeg", "application/json"),
    ("cmyk", _jpeg(Image.new("CMYK", (70, 90), (10, 200, 30, 40))), "image/jpeg", "application/json"),
    ("exif-rotated", _exif_rotated(), "image/jpeg", None),
    ("json-batch", b64_batch(IMAGES[1], image_bytes("PNG"), IMAGES[2]), "application/json", "application/json"),
]


def _answers(body: bytes) -> list[dict]:
    answer = json.loads(body)
    return answer["predictions"] if "predictions" in answer else [answer]


@pytest.mark.parametrize("name,body,content_type,accept", GOOD_REQUESTS, ids=[r[0] for r in GOOD_REQUESTS])
def test_same_answers(real, local, name, body, content_type, accept):
    got_real, got_local = send(real.url, body, content_type, accept), send(local.url, body, content_type, accept)
    assert got_real[:2] == got_local[:2] == (200, "application/json"), (got_real, got_local)
    real_answers, local_answers = _answers(got_real[2]), _answers(got_local[2])
    assert len(real_answers) == len(local_answers) >= 1
    for r, loc in zip(real_answers, local_answers):
        assert torch.allclose(torch.tensor(r["probabilities"]), torch.tensor(loc["probabilities"]), atol=1e-5)
        assert [t["label"] for t in r["top"]] == [t["label"] for t in loc["top"]]


# Every refusal the local server makes that reaches the handlers (oversize bodies are the
# front door's, below), plus what only the real stack could have answered differently.
HANDLER_REFUSALS = [r[:4] for r in BAD_REQUESTS if len(r[0]) <= SIX_MB and r[1] is not None and r[3] < 500] + [
    (IMAGES[0], None, None, 415),  # no Content-Type header at all
    (png_header_only(9000, 9000), "image/png", None, 413),
    (b"a,b\n1,2\n", "text/csv", None, 415),
    (b'{"instances": []}', "application/json; charset=utf-8", None, 400),
    (b"\xff\xfe", "application/json; charset=utf-8", None, 400),  # not the toolkit's exact UTF-8 type
]


@pytest.mark.parametrize("body,content_type,accept,status", HANDLER_REFUSALS,
                         ids=[f"{r[1]}-{r[3]}-{len(r[0])}B" for r in HANDLER_REFUSALS])
def test_same_refusals_as_json_without_traceback(real, local, body, content_type, accept, status):
    got_real = send(real.url, body, content_type, accept or "application/json")
    got_local = send(local.url, body, content_type, accept or "application/json")
    assert got_real == got_local, (got_real, got_local)
    code, media, answer = got_real
    assert (code, media) == (status, "application/json")
    assert set(json.loads(answer)) == {"error"}
    assert b"Traceback" not in answer and b".py" not in answer


@pytest.mark.parametrize("content_type", ["application/json", "text/csv"])
def test_non_utf8_text_is_a_500_on_both_as_the_toolkit_decodes_it_before_any_handler(real, local, content_type):
    got_real, got_local = send(real.url, b"\xff\xfe\xfa", content_type), send(local.url, b"\xff\xfe\xfa", content_type)
    assert got_real[0] == got_local[0] == 500
    assert b"codec can't decode" in got_real[2] and b"Traceback" in got_real[2]  # the toolkit's own answer
    assert "UTF-8" in json.loads(got_local[2])["error"]


def test_oversize_bodies_are_refused_by_the_front_door_not_the_container(real, local):
    """On SageMaker, InvokeEndpoint refuses bodies over 6 MB before the container sees them; the
    local server plays that front door (413). The container alone (TorchServe) takes up to
    max_request_size = 6553500 bytes; beyond, it answers 413 with an empty body and closes the
    connection, which a client still sending sees as a reset."""
    just_over = b"\0" * (SIX_MB + 1)
    assert send(local.url, just_over, "image/jpeg")[0] == 413
    status, _, answer = send(real.url, just_over, "image/jpeg")
    assert status == 400 and b"not an image" in answer  # reached the handlers
    assert send(real.url, b"\0" * 6553500, "image/jpeg")[0] == 400
    try:
        status, _, answer = send(real.url, b"\0" * (6553500 + 1), "image/jpeg")
    except OSError:  # reset while sending
        pass
    else:
        assert (status, answer) == (413, b"")
    assert send(real.url, IMAGES[0], "image/jpeg")[0] == 200


def test_other_routes_are_404_on_both_though_torchserve_words_it_its_own_way(real, local):
    """SageMaker's front door only sends GET /ping and POST /invocations; other paths are 404 on
    both, in TorchServe's words on the real stack (README: Fidelity)."""
    for endpoint in (real, local):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(endpoint.url + "/predict", timeout=30)
        assert err.value.code == 404
        body = err.value.read()
        assert b"ResourceNotFoundException" in body if endpoint is real else b"POST /invocations" in body
    for endpoint in (real, local):
        with urllib.request.urlopen(endpoint.url + "/ping", timeout=30) as reply:
            assert reply.status == 200
