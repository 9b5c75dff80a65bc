"""The local object store: S3 URIs mapped onto a directory tree.

`s3://bucket/some/key` lives at `<root>/bucket/some/key`. Local runs put code,
data, models and outputs here exactly where AWS would put them in S3, so the
same definition JSON resolves the same URIs in both places.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath

from pipeline.files import atomic_dir, atomic_path, atomic_write

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO_ROOT / "runs" / "s3"


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError(f"expected an s3://bucket/key URI, got {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"S3 URI {uri!r} has no bucket")
    return bucket, key


class LocalStore:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root or os.environ.get("DOGBREED_LOCAL_STORE") or DEFAULT_ROOT).resolve()

    def path(self, uri: str) -> Path:
        """Where `uri` lives on disk. Keys cannot climb out of the store."""
        bucket, key = split_s3_uri(uri)
        parts = PurePosixPath(key).parts
        if bucket in ("..", ".") or any(p in ("..",) for p in parts):
            raise ValueError(f"S3 URI {uri!r} escapes the local store")
        return self.root.joinpath(bucket, *parts)

    def exists(self, uri: str) -> bool:
        return self.path(uri).exists()

    def put_bytes(self, uri: str, data: bytes) -> Path:
        return atomic_write(self.path(uri), data)

    def put_file(self, uri: str, source: str | os.PathLike) -> Path:
        with atomic_path(self.path(uri)) as tmp:
            shutil.copyfile(source, tmp)
        return self.path(uri)

    def put_dir(self, uri: str, source: str | os.PathLike) -> Path:
        """Copy a directory tree under `uri` (a prefix), replacing what was there."""
        dest = self.path(uri.rstrip("/"))
        with atomic_dir(dest) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
        return dest
