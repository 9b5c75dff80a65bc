"""Ask an endpoint about images: a local URL (pipeline/serve.py) or a SageMaker endpoint name.

    python run_pipeline.py --invoke http://127.0.0.1:8080 dog.jpg [more.png ...] [--json]
    python run_pipeline.py --invoke dogbreed-endpoint dog.jpg --region eu-west-1

One request per image, the body the image file itself; prints a top-5 table
(breed, probability) per image, or the raw JSON answers with --json.
"""
from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.errors import UserError

CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}


def content_type(path: Path) -> str:
    return CONTENT_TYPES.get(path.suffix.lower(), "application/x-image")


class InvokeError(UserError):
    """The endpoint refused or could not be reached: the message says which and why."""


def _error_text(body: bytes) -> str:
    try:
        return json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace").strip()[:500]


def _http_caller(url: str):
    url = url.rstrip("/")
    if not url.endswith("/invocations"):
        url += "/invocations"

    def call(body: bytes, ctype: str) -> bytes:
        request = urllib.request.Request(url, data=body, method="POST",
                                         headers={"Content-Type": ctype, "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=70) as reply:
                return reply.read()
        except urllib.error.HTTPError as err:
            raise InvokeError(f"{url} answered {err.code}: {_error_text(err.read())}") from None
        except (urllib.error.URLError, OSError) as err:
            raise InvokeError(f"cannot reach {url}: {getattr(err, 'reason', err)}") from None

    return call


def _client(service: str, region: str):
    import boto3
    return boto3.client(service, region_name=region)


def _sagemaker_caller(name: str, region: str | None):
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    region = (region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
              or boto3.Session().region_name)
    if not region:
        raise InvokeError(f"endpoint {name!r}: no AWS region; pass --region or set AWS_REGION")
    try:  # boto3 honours AWS_ENDPOINT_URL (e.g. a moto server) for both clients
        described = _client("sagemaker", region).describe_endpoint(EndpointName=name)
    except ClientError as err:
        message = err.response.get("Error", {}).get("Message", str(err))
        if "Could not find" in message or err.response.get("Error", {}).get("Code") == "ValidationException":
            raise InvokeError(f"SageMaker endpoint {name!r} does not exist in {region} ({message}); "
                              f"`aws sagemaker list-endpoints --region {region}` lists those that do") from None
        raise InvokeError(f"cannot describe endpoint {name!r} in {region}: {message}") from None
    except BotoCoreError as err:
        raise InvokeError(f"cannot reach SageMaker in {region}: {err}") from None
    status = described.get("EndpointStatus")
    if status != "InService":
        reason = described.get("FailureReason")
        raise InvokeError(f"SageMaker endpoint {name!r} is {status}, not InService"
                          + (f": {reason}" if reason else "; wait for it (or check its events in the console)"))
    runtime = _client("sagemaker-runtime", region)

    def call(body: bytes, ctype: str) -> bytes:
        try:
            reply = runtime.invoke_endpoint(EndpointName=name, Body=body, ContentType=ctype, Accept="application/json")
        except ClientError as err:
            error = err.response.get("Error", {})
            original = err.response.get("OriginalMessage") or error.get("Message", str(err))
            raise InvokeError(f"endpoint {name!r} answered {error.get('Code', 'an error')}: "
                              f"{_error_text(original.encode()) if isinstance(original, str) else original}") from None
        return reply["Body"].read()

    return call


def format_table(answer: dict, title: str) -> str:
    rows = [f"{title}", f"  {'#':>2}  {'breed':<36} {'probability':>11}"]
    for rank, entry in enumerate(answer.get("top", []), start=1):
        rows.append(f"  {rank:>2}  {entry['label']:<36} {entry['probability']:>11.2%}")
    return "\n".join(rows)


def invoke(target: str, images: list[str], raw_json: bool = False, region: str | None = None) -> int:
    """Send each image to TARGET; 0 when every image got an answer, 1 otherwise (each failed image
    gets its own line on stderr). An InvokeError before any request: no such image file, or an
    endpoint that is missing or not InService."""
    paths = [Path(p) for p in images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InvokeError(f"--invoke: no such image file: {', '.join(missing)}; give paths of JPEG or PNG files")
    try:
        call = _http_caller(target) if target.startswith(("http://", "https://")) else _sagemaker_caller(target, region)
    except InvokeError as err:
        raise InvokeError(f"--invoke: {err}") from None
    failures = 0
    for path in paths:
        try:
            body = call(path.read_bytes(), content_type(path))
        except InvokeError as err:
            print(f"{path}: {err}", file=sys.stderr)
            failures += 1
            continue
        if raw_json:
            print(body.decode("utf-8", "replace"))
            continue
        try:
            answer = json.loads(body)
        except ValueError:
            print(f"{path}: the answer is not JSON: {body[:200]!r}", file=sys.stderr)
            failures += 1
            continue
        print(format_table(answer, str(path)))
    return 1 if failures else 0
