"""A SageMaker PipelineSession that talks to an in-process moto, never to AWS.

Building a definition makes the SDK call S3 (code upload, default-bucket checks) and
STS; moto absorbs those in memory. Fake credentials and the region are set here, so
a build needs no AWS account, no network and no environment from the user.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

# Before the SDK is imported anywhere: no v2 banner, no instance-metadata probing.
os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
logging.getLogger("sagemaker.config").setLevel(logging.WARNING)

# Given to the session directly, so no SDK config file is read and telemetry
# (an HTTP GET per SDK call, outside moto) is off.
SDK_CONFIG = {"SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}}
FAKE_ACCOUNT = "123456789012"   # moto's account


def sdk_session(boto_session, bucket: str):
    from sagemaker.workflow.pipeline_context import PipelineSession
    return PipelineSession(boto_session=boto_session, default_bucket=bucket, sagemaker_config=SDK_CONFIG)


@contextmanager
def _isolated_env() -> Iterator[None]:
    """No AWS settings of the user's shell reach the build: an AWS_ENDPOINT_URL would send
    the SDK's calls past moto, a profile could name one; moto sets its own fake keys."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith("AWS_") and key != "AWS_EC2_METADATA_DISABLED":
            del os.environ[key]
    os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextmanager
def offline_session(region: str, bucket: str) -> Iterator:
    """Yield a PipelineSession backed by moto; S3 objects live only as long as the block."""
    import boto3
    from moto import mock_aws

    with _isolated_env(), mock_aws():
        boto_session = boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                     aws_session_token="testing", region_name=region)
        s3 = boto_session.client("s3")
        # default_bucket() checks the bucket even when it is given: it must exist.
        if region == "us-east-1":
            s3.create_bucket(Bucket=bucket)
        else:
            s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})
        yield sdk_session(boto_session, bucket)


def s3_objects(boto_session) -> dict[str, bytes]:
    """Every object in the (moto) S3 of this session: what the build uploaded."""
    s3 = boto_session.client("s3")
    out = {}
    for b in s3.list_buckets()["Buckets"]:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=b["Name"]):
            for obj in page.get("Contents", []):
                uri = f"s3://{b['Name']}/{obj['Key']}"
                out[uri] = s3.get_object(Bucket=b["Name"], Key=obj["Key"])["Body"].read()
    return dict(sorted(out.items()))
