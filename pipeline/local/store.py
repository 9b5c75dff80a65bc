"""The local object store: S3 URIs mapped onto a directory tree.

`s3://bucket/some/key` lives at `<root>/bucket/some/key`. Local runs put code,
data, models and outputs here exactly where AWS would put them in S3, so the
same definition JSON resolves the same URIs in both places.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.files import atomic_dir, atomic_path, atomic_write
from pipeline.s3uri import StoreError, s3_key_problem, split_s3_uri  # noqa: F401  (StoreError: re-exported)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO_ROOT / "runs" / "s3"


class LocalStore:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root or os.environ.get("DOGBREED_LOCAL_STORE") or DEFAULT_ROOT).resolve()

    def path(self, uri: str) -> Path:
        """Where `uri` lives on disk. Keys cannot climb out of the store."""
        bucket, key = split_s3_uri(uri)
        problem = ("has a bucket name that is a path segment" if bucket in ("..", ".") or "\\" in bucket
                   else s3_key_problem(key))
        if problem:
            raise StoreError(f"S3 URI {uri!r} {problem}: the local store maps keys onto folders under "
                             f"{self.root}, so a key must be relative segments like 'prefix/name'")
        path = self.root.joinpath(bucket, *[p for p in key.split("/") if p])
        if not path.resolve().is_relative_to(self.root):  # e.g. a symlink planted inside the store
            raise StoreError(f"S3 URI {uri!r} resolves to {path.resolve()}, outside the local store {self.root}")
        return path

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
        if dest.parent == self.root:  # replacing a bucket would take code, models and outputs with it
            raise StoreError(f"S3 URI {uri!r} is a whole bucket: put a folder under a prefix, like "
                             f"s3://bucket/prefix/")
        with atomic_dir(dest) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
        return dest
