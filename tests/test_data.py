"""--prepare-data: a tiny dogImages-shaped zip served over loopback HTTP, resumed downloads,
hostile zips, verification errors, and the upload to a moto S3 server / the local store."""
from __future__ import annotations

import hashlib
import io
import shutil
import stat
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest

from pipeline import data
from pipeline.config import load_config
from pipeline.errors import SetupError
from pipeline.local.store import LocalStore
from pipeline.sample_data import DOG_CLASS_DIRS, generate_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 3-class dataset in the dogImages layout, 16px images."""
    return generate_dataset(tmp_path_factory.mktemp("gen") / "dogImages", num_classes=3, per_class=(4, 2, 2), size=16)


def zip_dir(folder: Path, zip_path: Path, prefix: str = "dogImages/") -> Path:
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, prefix + p.relative_to(folder).as_posix())
    return zip_path


@pytest.fixture(scope="module")
def tiny_zip(tiny, tmp_path_factory) -> bytes:
    return zip_dir(tiny, tmp_path_factory.mktemp("zip") / "dogImages.zip").read_bytes()


class Server:
    """Serves one blob at /dogImages.zip on 127.0.0.1 with HTTP Range support.

    cut_first: drop the connection after this many bytes of the first response.
    ignore_range: answer every request with the whole file (200), as some servers do.
    """

    def __init__(self, blob: bytes, cut_first: int | None = None, ignore_range: bool = False):
        self.blob, self.cut_first, self.ignore_range, self.ranges = blob, cut_first, ignore_range, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.ranges.append(rng)
                start = int(rng[len("bytes="):].split("-")[0]) if rng and not server.ignore_range else 0
                body = server.blob[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.blob) - 1}/{len(server.blob)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if len(server.ranges) == 1 and server.cut_first:
                    self.wfile.write(body[:server.cut_first])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/dogImages.zip"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(blob, **kw):
        servers.append(Server(blob, **kw))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


# ---------------------------------------------------------------- download

def test_download_records_size_and_sha(serve, tiny_zip, tmp_path):
    srv = serve(tiny_zip)
    out = io.StringIO()
    dest = data.download(srv.url, tmp_path / "dogImages.zip", out=out)
    assert dest.read_bytes() == tiny_zip
    record = (tmp_path / "dogImages.zip.sha256.json").read_text()
    assert hashlib.sha256(tiny_zip).hexdigest() in record and f'"size": {len(tiny_zip)}' in record
    assert "downloading dogImages.zip: 100.0%" in out.getvalue()
    assert "no expected hash configured" in out.getvalue()
    data.download(srv.url, dest, out=io.StringIO())  # present and matching its record: no request
    assert srv.ranges == [None]


def test_interrupted_download_resumes_with_range(serve, tiny_zip, tmp_path):
    half = len(tiny_zip) // 2
    srv = serve(tiny_zip, cut_first=half)
    out = io.StringIO()
    dest = data.download(srv.url, tmp_path / "dogImages.zip", sha256=hashlib.sha256(tiny_zip).hexdigest(), out=out)
    assert srv.ranges == [None, f"bytes={half}-"]
    assert dest.read_bytes() == tiny_zip
    assert "resuming dogImages.zip.part at" in out.getvalue()
    assert not (tmp_path / "dogImages.zip.part").exists()


def test_partial_file_from_an_earlier_run_is_resumed(serve, tiny_zip, tmp_path):
    (tmp_path / "dogImages.zip.part").write_bytes(tiny_zip[:1000])
    srv = serve(tiny_zip)
    data.download(srv.url, tmp_path / "dogImages.zip", out=io.StringIO())
    assert srv.ranges == ["bytes=1000-"]
    assert (tmp_path / "dogImages.zip").read_bytes() == tiny_zip


def test_server_ignoring_range_restarts_cleanly(serve, tiny_zip, tmp_path):
    (tmp_path / "dogImages.zip.part").write_bytes(b"garbage that is not the start of the zip")
    srv = serve(tiny_zip, ignore_range=True)
    data.download(srv.url, tmp_path / "dogImages.zip", out=io.StringIO())
    assert (tmp_path / "dogImages.zip").read_bytes() == tiny_zip


def test_checksum_mismatch_removes_the_file(serve, tiny_zip, tmp_path):
    srv = serve(tiny_zip)
    with pytest.raises(data.DataError, match="checksum mismatch .* expected sha256 0000"):
        data.download(srv.url, tmp_path / "dogImages.zip", sha256="0" * 64, out=io.StringIO())
    assert list(tmp_path.iterdir()) == []


def test_unreachable_url_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="cannot reach http://127.0.0.1:9/x.zip"):
        data.download("http://127.0.0.1:9/x.zip", tmp_path / "x.zip", out=io.StringIO())


# ---------------------------------------------------------------- safe extraction

def _evil_zip(path: Path, name: str, symlink: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("dogImages/train/001.Affenpinscher/a.jpg", b"ok")
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd" if symlink else b"pwned")
    return path


@pytest.mark.parametrize("name, symlink, message", [
    ("dogImages/../../evil.txt", False, "'..' would write outside"),
    ("/tmp/evil.txt", False, "absolute or Windows-style path"),
    ("C:/evil.txt", False, "absolute or Windows-style path"),
    ("dogImages\\..\\evil.txt", False, "absolute or Windows-style path"),
    ("dogImages/train/link.jpg", True, "a symbolic link"),
])
def test_hostile_zip_is_refused_and_nothing_written(tmp_path, name, symlink, message):
    z = _evil_zip(tmp_path / "evil.zip", name, symlink)
    dest = tmp_path / "out" / "dogImages"
    with pytest.raises(data.DataError, match=message) as err:
        data.safe_extract(z, dest, out=io.StringIO())
    assert repr(name) in str(err.value) or name in str(err.value)
    assert not (tmp_path / "out").exists()  # checked before anything is written
    assert not (tmp_path.parent / "evil.txt").exists()


def test_not_a_zip(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"<html>AccessDenied</html>")
    with pytest.raises(data.DataError, match="is not a valid zip file"):
        data.safe_extract(tmp_path / "x.zip", tmp_path / "x", out=io.StringIO())


# ---------------------------------------------------------------- verification

def test_verify_consistency_and_strict_dog_layout(tiny, tmp_path):
    counts = data.verify_dataset(tiny, strict=False)
    assert {s: sum(c.values()) for s, c in counts.items()} == {"train": 12, "valid": 6, "test": 6}
    with pytest.raises(data.DataError) as err:
        data.verify_dataset(tiny, strict=True)
    text = str(err.value)
    assert "expected the 133 dogImages classes" in text and "found 3" in text
    assert "train/ has 12 images, dogImages has 6680" in text and "strict=False" in text

    broken = shutil.copytree(tiny, tmp_path / "broken")
    shutil.rmtree(broken / "valid" / DOG_CLASS_DIRS[1])
    (broken / "test" / "999.Wolf").mkdir()
    shutil.rmtree(broken / "train" / DOG_CLASS_DIRS[2])
    (broken / "train" / DOG_CLASS_DIRS[2]).mkdir()
    with pytest.raises(data.DataError) as err:
        data.verify_dataset(broken, strict=False)
    text = str(err.value)
    assert f"valid/ classes differ from train/: missing ['{DOG_CLASS_DIRS[1]}']" in text
    assert "extra ['999.Wolf']" in text
    assert f"train/ has empty class folders: {DOG_CLASS_DIRS[2]}" in text


def fake_dogimages(root: Path) -> Path:
    """dogImages' exact layout (133 classes, 6,680 / 835 / 836 files), with empty files."""
    for split, total in data.DOG_SPLIT_SIZES.items():
        for i, cls in enumerate(DOG_CLASS_DIRS):
            (root / split / cls).mkdir(parents=True)
            n = total // 133 + (1 if i < total % 133 else 0)
            for k in range(n):
                (root / split / cls / f"{k}.jpg").touch()
    return root


@pytest.fixture(scope="module")
def full_layout(tmp_path_factory) -> Path:
    return fake_dogimages(tmp_path_factory.mktemp("full") / "dogImages")


def test_verify_accepts_the_real_layout_shape(full_layout):
    counts = data.verify_dataset(full_layout, strict=True)
    assert sum(counts["train"].values()) == 6680 and len(counts["test"]) == 133


def test_missing_split_and_no_root(tmp_path, tiny):
    with pytest.raises(data.DataError, match="has no train/, valid/, test/ folders"):
        data.find_root(tmp_path)
    partial = shutil.copytree(tiny, tmp_path / "p")
    shutil.rmtree(partial / "test")
    with pytest.raises(data.DataError, match="missing folder .*test"):
        data.verify_dataset(partial, strict=False)


# ---------------------------------------------------------------- end to end: S3 and the local store

def _config(**data_fields):
    """The real pipeline.yaml config in us-east-1 with its `data` block changed."""
    cfg = load_config(ROOT / "pipeline.yaml", region="us-east-1")
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=data_fields)})


def test_prepare_data_downloads_verifies_and_uploads_to_s3(aws_env, serve, tiny_zip, tmp_path, monkeypatch):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="dogbreed-data")
    srv = serve(tiny_zip)
    monkeypatch.setattr(data, "DEFAULT_CACHE", tmp_path / "cache")
    cfg = _config(uri="s3://dogbreed-data/dogs/", url=srv.url, strict=False)
    assert data.prepare_data(cfg, source=None) == "s3://dogbreed-data/dogs/"
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="dogbreed-data")["Contents"])
    assert len(keys) == 24 and keys[0].startswith(f"dogs/test/{DOG_CLASS_DIRS[0]}/")
    assert (tmp_path / "cache" / "dogImages" / "dogImages" / "train").is_dir()

    # Unchanged objects are skipped; a changed file goes up again.
    root = tmp_path / "cache" / "dogImages" / "dogImages"
    out = io.StringIO()
    assert data.upload_s3(root, "s3://dogbreed-data/dogs", s3, out=out) == (0, 24)
    victim = next((root / "train").rglob("*.jpg"))
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert data.upload_s3(root, "s3://dogbreed-data/dogs", s3, out=io.StringIO()) == (1, 23)


def test_prepare_data_missing_bucket_fails_before_download(aws_env, serve, tiny_zip, capsys):
    srv = serve(tiny_zip)
    cfg = _config(uri="s3://nope-bucket/dogs", url=srv.url)
    with pytest.raises(SetupError, match="S3 bucket 'nope-bucket' does not exist"):
        data.prepare_data(cfg, source=None)
    assert srv.ranges == []


def test_multipart_etag_matches_s3(aws_env, tmp_path):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="etag-check")
    big = tmp_path / "big" / "blob.bin"
    big.parent.mkdir()
    big.write_bytes(b"x" * (data.S3_PART + 5))
    assert data.upload_s3(big.parent, "s3://etag-check/p", s3, out=io.StringIO()) == (1, 0)
    assert s3.head_object(Bucket="etag-check", Key="p/blob.bin")["ETag"] == data.s3_etag(big)
    assert data.s3_etag(big).endswith('-2"')
    assert data.upload_s3(big.parent, "s3://etag-check/p", s3, out=io.StringIO()) == (0, 1)


def test_local_zip_source_into_local_store(tiny, tmp_path):
    z = zip_dir(tiny, tmp_path / "mydogs.zip", prefix="")
    store = LocalStore(tmp_path / "store")
    uri = data.prepare_dataset("s3://bucket/data/dogs", source=z, strict=False, cache_dir=tmp_path / "cache",
                               store=store, out=io.StringIO())
    assert uri == "s3://bucket/data/dogs"
    placed = store.path(uri)
    assert sorted(p.relative_to(placed) for p in placed.rglob("*.jpg")) == \
        sorted(p.relative_to(tiny) for p in tiny.rglob("*.jpg"))


def test_folder_source_strict_rejects_tiny(tiny, tmp_path):
    with pytest.raises(data.DataError, match="133 dogImages classes"):
        data.prepare_dataset("s3://b/d", source=tiny, store=LocalStore(tmp_path), out=io.StringIO())
    with pytest.raises(data.DataError, match="no such file or folder"):
        data.prepare_dataset("s3://b/d", source=tmp_path / "nope", store=LocalStore(tmp_path), out=io.StringIO())


def test_cli_prepare_data_local_with_the_real_config(full_layout, tmp_path, monkeypatch):
    import run_pipeline
    from pipeline.config import load_config
    root = full_layout
    monkeypatch.setenv("DOGBREED_LOCAL_STORE", str(tmp_path / "store"))
    assert run_pipeline.main(["--config", str(ROOT / "pipeline.yaml"), "--prepare-data", "--local",
                              "--data", str(root)]) == 0
    placed = LocalStore(tmp_path / "store").path(load_config(ROOT / "pipeline.yaml").data.uri)
    assert sum(1 for _ in placed.rglob("*.jpg")) == 6680 + 835 + 836
