"""S3 URIs and keys: the one reading of `s3://bucket/key` for both runners, the config and the data.

Neutral ground: imports nothing of the project, so pipeline/aws.py, pipeline/data.py,
pipeline/config.py and the local interpreter (pipeline/local/) share it without importing each other.
"""
from __future__ import annotations

from pipeline.errors import UserError


class StoreError(UserError, ValueError):
    """An S3 URI that is not one, or that the local store cannot hold (or would hold outside its root)."""


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise StoreError(f"expected an s3://bucket/key URI, got {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StoreError(f"S3 URI {uri!r} has no bucket")
    return bucket, key


def s3_key_problem(key: str) -> str | None:
    """Why `key` is not a plain relative key (None if it is). A key maps onto a path
    under the local store, so it must not climb ('..'), stay ('.'), start at '/' or
    hold empty segments ('a//b'): S3 allows those, a file tree cannot hold them safely.
    One trailing '/' (a prefix) is fine."""
    if key == "":
        return None
    segments = key[:-1].split("/") if key.endswith("/") else key.split("/")
    for segment in segments:
        if segment == "":
            return "has an empty path segment ('//' or a leading '/')"
        if segment in (".", ".."):
            return f"has a {segment!r} path segment"
        if "\\" in segment or "\0" in segment:
            return "has a backslash or NUL byte"
    return None


def code_uris(definition: dict) -> list[str]:
    """The source archives (sagemaker_submit_directory) a definition's steps name, in order, once each:
    what must be in S3 (or the local store) before its jobs can start."""
    found: list[str] = []

    def visit(v):
        if isinstance(v, dict):
            for k, x in v.items():
                if k == "sagemaker_submit_directory" and isinstance(x, str):
                    uri = x.strip('"')
                    if uri.startswith("s3://") and uri not in found:
                        found.append(uri)
                else:
                    visit(x)
        elif isinstance(v, list):
            for x in v:
                visit(x)
    visit(definition.get("Steps", []))
    return found
