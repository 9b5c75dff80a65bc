"""Pre-flight checks before anything is created on AWS: region, credentials, role, bucket,
the data and the endpoint. Each refusal is an AwsSetupError (a SetupError: one line, exit 1)
naming what to fix; warnings go to `out` when a check cannot be made.

Used by the AWS runner (pipeline/aws.py) and by `--prepare-data` (pipeline/data.py) before a
1 GB download, so neither imports the other.
"""
from __future__ import annotations

import json
import sys
import urllib.parse
from typing import TextIO

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

from pipeline.errors import SetupError
from pipeline.formats import ROLE_ARN
from pipeline.s3uri import split_s3_uri


class AwsSetupError(SetupError, RuntimeError):
    """Something the user must fix before the pipeline can run; the message says what."""


def _code(err: ClientError) -> str:
    return err.response.get("Error", {}).get("Code", "")

# ---------------------------------------------------------------- pre-flight checks

def check_region(region: str | None) -> str:
    if not region:
        raise AwsSetupError("no AWS region: set aws.region in the config, pass --region, or set AWS_REGION")
    session = boto3.Session()
    known = {r for p in session.get_available_partitions()
             for r in session.get_available_regions("sagemaker", partition_name=p)}
    if region not in known:
        near = sorted(r for r in known if r.split("-")[0] == region.split("-")[0]) or sorted(known)
        raise AwsSetupError(f"region {region!r} is not a SageMaker region; valid ones include: {', '.join(near)}")
    return region


def check_credentials(session: boto3.Session) -> str:
    """Return the caller's account id, or explain why there are no usable credentials."""
    if session.get_credentials() is None:
        raise AwsSetupError(
            "no AWS credentials found: set AWS_PROFILE (or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), "
            "run `aws sso login`, or in GitHub Actions use the OIDC role (README: Running on AWS)")
    try:
        return session.client("sts").get_caller_identity()["Account"]
    except ClientError as e:
        raise AwsSetupError(f"AWS rejected the credentials ({_code(e)}): "
                            f"{e.response['Error'].get('Message', '')}") from None
    except BotoCoreError as e:
        raise AwsSetupError(f"could not check the AWS credentials: {e}") from None


def _trusts_sagemaker(policy) -> bool:
    if isinstance(policy, str):  # some endpoints return the URL-encoded JSON text
        policy = json.loads(urllib.parse.unquote(policy))
    for stmt in policy.get("Statement", []):
        if stmt.get("Effect") != "Allow":
            continue
        actions = stmt.get("Action", [])
        actions = [actions] if isinstance(actions, str) else actions
        services = stmt.get("Principal", {}).get("Service", []) if isinstance(stmt.get("Principal"), dict) else []
        services = [services] if isinstance(services, str) else services
        if "sagemaker.amazonaws.com" in services and any(a in ("sts:AssumeRole", "sts:*", "*") for a in actions):
            return True
    return False


def check_role(session: boto3.Session, role_arn: str | None, out: TextIO = sys.stdout) -> None:
    if not role_arn:
        raise AwsSetupError("no SageMaker execution role: set aws.role in the config, pass --role, "
                            "or set SAGEMAKER_ROLE_ARN (the infra/ stack outputs it)")
    m = ROLE_ARN.match(role_arn)
    if not m:
        raise AwsSetupError(f"role {role_arn!r} is not an IAM role ARN (arn:aws:iam::<12-digit account>:role/<name>)")
    try:
        role = session.client("iam").get_role(RoleName=m.group(2))["Role"]
    except ClientError as e:
        if _code(e) == "NoSuchEntity":
            raise AwsSetupError(f"IAM role {m.group(2)!r} does not exist in account {m.group(1)} "
                                f"(deploy infra/template.yaml, or fix aws.role / --role)") from None
        if _code(e) in ("AccessDenied", "AccessDeniedException"):
            # Not being allowed to read a role is no proof it is missing: say so and go on.
            print(f"warning: cannot read IAM role {m.group(2)} ({_code(e)}); not checking that it exists", file=out)
            return
        raise
    if not _trusts_sagemaker(role.get("AssumeRolePolicyDocument", {})):
        raise AwsSetupError(f"IAM role {m.group(2)!r} does not trust sagemaker.amazonaws.com "
                            f"(its trust policy needs Principal.Service sagemaker.amazonaws.com, sts:AssumeRole)")


def check_bucket(session: boto3.Session, bucket: str | None, region: str) -> None:
    if not bucket:
        raise AwsSetupError("no S3 bucket: set aws.bucket in the config, pass --bucket, or set SAGEMAKER_BUCKET")
    try:
        resp = session.client("s3").head_bucket(Bucket=bucket)
    except ClientError as e:
        if _code(e) in ("404", "NoSuchBucket", "NotFound"):
            raise AwsSetupError(f"S3 bucket {bucket!r} does not exist "
                                "(deploy infra/template.yaml, or fix aws.bucket / --bucket)") from None
        if _code(e) in ("403", "AccessDenied"):
            raise AwsSetupError(f"no access to S3 bucket {bucket!r} with these credentials") from None
        raise
    where = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
    if where and where != region:
        raise AwsSetupError(f"S3 bucket {bucket!r} is in {where}, but the pipeline runs in {region}: "
                            f"use a bucket in {region} or set region to {where}")


def preflight(region: str | None, role_arn: str | None, bucket: str | None,
              out: TextIO = sys.stdout) -> boto3.Session:
    """Check region, credentials, role and bucket, in that order; create nothing."""
    region = check_region(region)
    session = boto3.Session(region_name=region)
    check_credentials(session)
    check_role(session, role_arn, out=out)
    check_bucket(session, bucket, region)
    return session

def check_data(s3, data_uri: str, out: TextIO = sys.stdout, iam=None, role_arn: str | None = None) -> None:
    """The training data must be there, and readable by the execution role, before hours of tuning start."""
    bucket, prefix = split_s3_uri(data_uri)
    try:
        found = s3.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/" if prefix else "", MaxKeys=1)
    except ClientError as e:
        if _code(e) in ("NoSuchBucket", "404"):
            raise AwsSetupError(f"data URI {data_uri}: bucket {bucket!r} does not exist") from None
        raise AwsSetupError(f"data URI {data_uri}: these credentials cannot list it ({_code(e)}); use data in the "
                            f"artifact bucket (leave data.uri unset) or grant s3:ListBucket on {bucket}") from None
    if not found.get("KeyCount", len(found.get("Contents", []))):
        raise AwsSetupError(f"no data at {data_uri}: run `python run_pipeline.py --prepare-data` first "
                            f"(or pass --param DataUri=s3://...)")
    if iam is not None and role_arn:
        check_role_reads(iam, role_arn, data_uri, out=out)


def check_role_reads(iam, role_arn: str, data_uri: str, out: TextIO = sys.stdout) -> None:
    """Ask IAM's policy simulator whether the execution role may list and read the data.

    The jobs read the data as the role, not as the caller: a role scoped to the artifact
    bucket (infra/template.yaml) fails every trial on data kept elsewhere, hours in.
    """
    bucket, prefix = split_s3_uri(data_uri)
    partition = role_arn.split(":")[1]
    checks = (("s3:ListBucket", f"arn:{partition}:s3:::{bucket}"),
              ("s3:GetObject", f"arn:{partition}:s3:::{bucket}/{prefix.rstrip('/')}/train/example.jpg"))
    for action, resource in checks:
        try:
            result = iam.simulate_principal_policy(PolicySourceArn=role_arn, ActionNames=[action],
                                                   ResourceArns=[resource])["EvaluationResults"][0]
        except (ClientError, BotoCoreError, ResponseParserError) as e:
            # Not being allowed to simulate is no proof the role cannot read: say so and go on.
            why = _code(e) if isinstance(e, ClientError) else type(e).__name__
            print(f"warning: cannot ask IAM whether the role may read {data_uri} ({why}); not checked", file=out)
            return
        if result.get("EvalDecision") != "allowed":
            raise AwsSetupError(f"data URI {data_uri}: the execution role {role_arn.rsplit('/', 1)[-1]} may not "
                                f"{action} {resource} ({result.get('EvalDecision')}); keep the data in the artifact "
                                f"bucket (leave data.uri unset) or grant the role read access")


# UpdateEndpoint refuses these; DeployEndpoint would fail after hours of tuning and training.
ENDPOINT_IN_PROGRESS = ("Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting")


def check_endpoint(sm, endpoint_name: str | None, out: TextIO = sys.stdout) -> None:
    """DeployEndpoint creates the endpoint or updates it; SageMaker cannot update a Failed one."""
    if not endpoint_name:
        return
    try:
        desc = sm.describe_endpoint(EndpointName=endpoint_name)
    except ClientError as e:
        if _code(e) == "ValidationException":  # "Could not find endpoint": DeployEndpoint creates it
            return
        print(f"warning: cannot read endpoint {endpoint_name} ({_code(e)}); not checking its status", file=out)
        return
    status = desc.get("EndpointStatus")
    if status == "Failed":
        raise AwsSetupError(
            f"endpoint {endpoint_name} is Failed ({desc.get('FailureReason') or 'no reason given'}): SageMaker cannot "
            f"update a failed endpoint, so DeployEndpoint would fail after training; delete it first "
            f"(python run_pipeline.py --cleanup, or aws sagemaker delete-endpoint --endpoint-name {endpoint_name})")
    if status in ENDPOINT_IN_PROGRESS:
        print(f"warning: endpoint {endpoint_name} is {status}; DeployEndpoint fails if it still is when training "
              f"ends (UpdateEndpoint refuses an endpoint in progress)", file=out)


def simulation_client(session: boto3.Session):
    """IAM for the policy simulator; one attempt (a server without the call answers 500s)."""
    return session.client("iam", config=BotoConfig(retries={"max_attempts": 1, "mode": "standard"}))
