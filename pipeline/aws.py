"""Run the pipeline on SageMaker: pre-flight checks, upsert, start, wait, clean up.

Plain boto3, so that every call is one you can find in the SageMaker API reference,
and so that tests can point it at a moto server (boto3 honours AWS_ENDPOINT_URL).
`execute(cfg, ...)` and `cleanup(cfg, ...)` are the thin config-taking entry points
of run_pipeline.py; everything under them takes plain arguments.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import sys
import time
import urllib.parse
from typing import Callable, Iterable, TextIO

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

from pipeline.config import PIPELINE_TAG
from pipeline.formats import ROLE_ARN
from pipeline.local.store import split_s3_uri
from pipeline.params import ParameterError, check_overrides, split_overrides

# Our own ownership tag, set on the pipeline and (by the definition) on the models,
# endpoint configs and endpoints its steps create: --cleanup deletes what carries it.
# SageMaker stamps resources made by a pipeline step with the execution ARN; we accept it too.
EXECUTION_ARN_TAG = "sagemaker:pipeline-execution-arn"
TERMINAL = ("Succeeded", "Failed", "Stopped")
INLINE_DEFINITION_LIMIT = 100_000  # bytes: CreatePipeline's PipelineDefinition maximum; larger goes via S3
DISPLAY_NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,81}$")


class AwsSetupError(RuntimeError):
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
        raise AwsSetupError(f"AWS rejected the credentials ({_code(e)}): {e.response['Error'].get('Message', '')}")
    except BotoCoreError as e:
        raise AwsSetupError(f"could not check the AWS credentials: {e}")


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
                                f"(deploy infra/template.yaml, or fix aws.role / --role)")
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
            raise AwsSetupError(f"S3 bucket {bucket!r} does not exist (deploy infra/template.yaml, or fix aws.bucket / --bucket)")
        if _code(e) in ("403", "AccessDenied"):
            raise AwsSetupError(f"no access to S3 bucket {bucket!r} with these credentials")
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


# ---------------------------------------------------------------- upsert and start

def parse_params(params: Iterable[str], definition: str) -> list[dict]:
    """`NAME=VALUE` strings -> PipelineParameters, checked against the definition's Parameters."""
    try:
        check_overrides(json.loads(definition), params)
    except ParameterError as e:
        raise AwsSetupError(str(e)) from None
    return [{"Name": name, "Value": value} for name, value in split_overrides(params).items()]


def upsert_pipeline(sm, name: str, definition: str, role_arn: str, tags: dict[str, str],
                    description: str = "", bucket: str | None = None, s3=None) -> tuple[str, bool]:
    """Create the pipeline, or update it if it exists. Returns (pipeline ARN, created)."""
    tag_list = [{"Key": k, "Value": str(v)} for k, v in {**tags, PIPELINE_TAG: name}.items()]
    body: dict = {"PipelineDefinition": definition}
    if len(definition.encode()) > INLINE_DEFINITION_LIMIT:
        if not bucket or s3 is None:
            raise AwsSetupError("the definition exceeds 100 KB and must go through S3, but no bucket was given")
        key = f"{name}/definitions/{hashlib.sha256(definition.encode()).hexdigest()[:16]}.json"
        s3.put_object(Bucket=bucket, Key=key, Body=definition.encode())
        body = {"PipelineDefinitionS3Location": {"Bucket": bucket, "ObjectKey": key}}
    common = dict(PipelineName=name, RoleArn=role_arn, PipelineDescription=description, **body)
    try:
        arn = sm.create_pipeline(PipelineDisplayName=name, Tags=tag_list, **common)["PipelineArn"]
        return arn, True
    except ClientError as e:
        # The service's way of saying "exists" (the SageMaker SDK's upsert relies on the same text).
        if _code(e) != "ValidationException" or "must be unique" not in str(e):
            raise
    arn = sm.update_pipeline(**common)["PipelineArn"]
    sm.add_tags(ResourceArn=arn, Tags=tag_list)  # UpdatePipeline takes no tags; AddTags overwrites by key
    return arn, False


def ci_display_name(env=os.environ) -> str:
    """The execution's display name: the commit in CI, a timestamp otherwise."""
    if env.get("GITHUB_SHA"):
        return f"commit-{env['GITHUB_SHA'][:12]}"
    return "cli-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


def ci_description(env=os.environ) -> str:
    if env.get("GITHUB_SHA"):
        run = f"{env.get('GITHUB_SERVER_URL', 'https://github.com')}/{env.get('GITHUB_REPOSITORY', '')}" \
              f"/actions/runs/{env.get('GITHUB_RUN_ID', '')}"
        return f"commit {env['GITHUB_SHA']} on {env.get('GITHUB_REF_NAME', '?')} by {env.get('GITHUB_ACTOR', '?')}: {run}"
    return "started with run_pipeline.py --execute"


def check_display_name(display_name: str) -> str:
    if not DISPLAY_NAME_RE.match(display_name):
        raise AwsSetupError(f"display name {display_name!r} is invalid: 1-82 letters, digits and hyphens, "
                            f"starting with a letter or digit")
    return display_name


def start_execution(sm, name: str, parameters: list[dict], display_name: str, description: str) -> str:
    return sm.start_pipeline_execution(
        PipelineName=name, PipelineParameters=parameters,
        PipelineExecutionDisplayName=display_name,
        PipelineExecutionDescription=description[:3072])["PipelineExecutionArn"]


def console_urls(region: str, pipeline_name: str, execution_arn: str, studio_domain_id: str | None = None) -> list[str]:
    exec_id = execution_arn.rsplit("/", 1)[-1]
    urls = [f"https://{region}.console.aws.amazon.com/sagemaker/home?region={region}"
            f"#/pipelines/{pipeline_name}/executions/{exec_id}"]
    if studio_domain_id:
        urls.insert(0, f"https://studio-{studio_domain_id}.studio.{region}.sagemaker.aws"
                       f"/pipelines/view/{pipeline_name}/executions/{exec_id}/graph")
    return urls


# ---------------------------------------------------------------- wait and report

def list_steps(sm, execution_arn: str) -> list[dict]:
    """The execution's steps, oldest first."""
    steps = []
    for page in sm.get_paginator("list_pipeline_execution_steps").paginate(
            PipelineExecutionArn=execution_arn, SortOrder="Ascending"):
        steps.extend(page["PipelineExecutionSteps"])
    return steps


def _clock(t) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%H:%M:%S") if t else ""


def step_table(steps: list[dict]) -> str:
    rows = [("STEP", "STATUS", "START", "END", "DETAIL")]
    for s in steps:
        detail = s.get("FailureReason", "") or ("cache hit" if s.get("CacheHitResult") else "")
        rows.append((s["StepName"], s.get("StepStatus", "?"), _clock(s.get("StartTime")),
                     _clock(s.get("EndTime")), detail[:80]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows).rstrip()


def failure_report(description: dict, steps: list[dict]) -> list[str]:
    """One line per failed step: its FailureReason, and a FailStep's ErrorMessage."""
    lines = []
    if description.get("FailureReason"):
        lines.append(f"execution: {description['FailureReason']}")
    for s in steps:
        if s.get("StepStatus") != "Failed":
            continue
        lines.append(f"step {s['StepName']}: {s.get('FailureReason') or 'failed (no reason given)'}")
        message = s.get("Metadata", {}).get("Fail", {}).get("ErrorMessage")
        if message:
            lines.append(f"step {s['StepName']} (FailStep) says: {message}")
    hint = debugger_hint(lines)
    if hint:
        lines.append(hint)
    return lines


# What a job refused for Debugger or its profiler says (DebugHookConfig, DebugRuleConfigurations,
# ProfilerConfig, ProfilerRuleConfigurations, "Debugger"): AWS closed both to new customers on 2026-07-30.
_DEBUGGER_WORDS = re.compile(r"debugger|debug ?hook|debug ?rule|profiler", re.IGNORECASE)
DEBUGGER_OFF = "debugger:\n  enabled: false"


def debugger_hint(lines: list[str]) -> str | None:
    """The one line to change when a failure names Debugger or the profiler."""
    if not any(_DEBUGGER_WORDS.search(line) for line in lines):
        return None
    return ("hint: this account cannot use SageMaker Debugger or its profiler (closed to new customers on "
            "2026-07-30): set `enabled: false` under `debugger:` in your pipeline.yaml (turns off hook, rules "
            "and profiler) and run again")


def wait_execution(sm, execution_arn: str, poll_s: float = 10.0, max_poll_s: float = 120.0,
                   timeout_s: float | None = None, out: TextIO = sys.stdout,
                   sleep: Callable[[float], None] = time.sleep) -> tuple[dict, list[dict]]:
    """Poll until the execution ends; print the step table whenever it changes.

    Back-off: the delay grows by half each unchanged poll up to max_poll_s and drops back
    to poll_s when something moves, so a long training step costs few API calls.
    """
    delay, shown, start, steps_ok = poll_s, None, time.monotonic(), True
    tty, drawn = hasattr(out, "isatty") and out.isatty(), 0  # on a terminal, redraw the table in place
    while True:
        desc = sm.describe_pipeline_execution(PipelineExecutionArn=execution_arn)
        status = desc["PipelineExecutionStatus"]
        steps = []
        if steps_ok:
            try:
                steps = list_steps(sm, execution_arn)
            except (ClientError, BotoCoreError) as e:  # e.g. a service without this call
                steps_ok = False
                reason = f"{_code(e)} from {e.operation_name}" if isinstance(e, ClientError) else str(e)
                print(f"(step statuses unavailable: {reason})", file=out)
        elapsed = int(time.monotonic() - start)
        view = f"execution {status}\n{step_table(steps)}" if steps else f"execution {status}"
        if view != shown:
            text = f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {view}"
            if tty and drawn:
                out.write(f"\x1b[{drawn}F\x1b[J")  # cursor up to the old table, clear below
            print(text, file=out, flush=True)
            shown, delay, drawn = view, poll_s, text.count("\n") + 1
        else:
            delay = min(delay * 1.5, max_poll_s)
        if status in TERMINAL:
            return desc, steps
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"execution still {status} after {timeout_s:.0f}s: {execution_arn}")
        sleep(delay)


def report(desc: dict, steps: list[dict], out: TextIO = sys.stdout) -> int:
    status = desc["PipelineExecutionStatus"]
    if status == "Succeeded":
        print("execution Succeeded", file=out)
        return 0
    print(f"execution {status}:", file=out)
    for line in failure_report(desc, steps) or ["(no failure reason reported)"]:
        print(f"  {line}", file=out)
    return 1


# ---------------------------------------------------------------- cleanup

def owned_by(tags: list[dict], pipeline_name: str, tag_key: str = PIPELINE_TAG) -> bool:
    values = {t["Key"]: t["Value"] for t in tags}
    if values.get(tag_key) == pipeline_name:
        return True
    # Pipeline names appear lower-cased in ARNs.
    return f":pipeline/{pipeline_name.lower()}/execution/" in values.get(EXECUTION_ARN_TAG, "").lower()


_KINDS = (  # deletion order: endpoints before the configs and models they use
    ("endpoint", "list_endpoints", "Endpoints", "EndpointName", "EndpointArn", "delete_endpoint"),
    ("endpoint-config", "list_endpoint_configs", "EndpointConfigs", "EndpointConfigName", "EndpointConfigArn",
     "delete_endpoint_config"),
    ("model", "list_models", "Models", "ModelName", "ModelArn", "delete_model"),
)


def find_owned(sm, pipeline_name: str, tag_key: str = PIPELINE_TAG) -> list[tuple[str, str]]:
    """(kind, name) of every endpoint, endpoint config and model carrying our tag."""
    found = []
    for kind, lister, key, name_key, arn_key, _ in _KINDS:
        for page in sm.get_paginator(lister).paginate():
            for item in page[key]:
                tags = [t for p in sm.get_paginator("list_tags").paginate(ResourceArn=item[arn_key]) for t in p["Tags"]]
                if owned_by(tags, pipeline_name, tag_key):
                    found.append((kind, item[name_key]))
    return found


def delete_owned(sm, found: list[tuple[str, str]], out: TextIO = sys.stdout) -> None:
    calls = {kind: (getattr(sm, deleter), name_key) for kind, _, _, name_key, _, deleter in _KINDS}
    for kind, name in found:
        deleter, name_key = calls[kind]
        deleter(**{name_key: name})
        print(f"deleted {kind} {name}", file=out)


def cleanup_pipeline(sm, pipeline_name: str, assume_yes: bool, out: TextIO = sys.stdout,
                     ask: Callable[[str], str] = input) -> int:
    found = find_owned(sm, pipeline_name)
    if not found:
        print(f"nothing to delete: no endpoint, endpoint config or model tagged {PIPELINE_TAG}={pipeline_name}",
              file=out)
        return 0
    print(f"resources of pipeline {pipeline_name}:", file=out)
    for kind, name in found:
        print(f"  {kind:16s} {name}", file=out)
    if not assume_yes:
        try:
            answer = ask(f"delete these {len(found)}? [y/N] ")
        except EOFError:  # no terminal (CI): never delete without --yes
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted (pass --yes to skip this question)", file=out)
            return 1
    delete_owned(sm, found, out=out)
    return 0


# ---------------------------------------------------------------- code and data in S3

def upload_objects(s3, uploads: dict[str, bytes], out: TextIO = sys.stdout) -> int:
    """Put what the definition expects in S3 (the code tarball the offline build made); skip equal objects."""
    sent = 0
    for uri, body in sorted(uploads.items()):
        bucket, key = split_s3_uri(uri)
        try:
            head = s3.head_object(Bucket=bucket, Key=key)
            if head["ContentLength"] == len(body) and head["ETag"].strip('"') == hashlib.md5(body).hexdigest():
                continue
        except ClientError as e:
            if _code(e) not in ("404", "NoSuchKey", "NotFound"):
                raise
        s3.put_object(Bucket=bucket, Key=key, Body=body)
        print(f"uploaded {uri} ({len(body) / 1e3:.0f} kB)", file=out)
        sent += 1
    return sent


def check_data(s3, data_uri: str, out: TextIO = sys.stdout, iam=None, role_arn: str | None = None) -> None:
    """The training data must be there, and readable by the execution role, before hours of tuning start."""
    bucket, prefix = split_s3_uri(data_uri)
    try:
        found = s3.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/" if prefix else "", MaxKeys=1)
    except ClientError as e:
        if _code(e) in ("NoSuchBucket", "404"):
            raise AwsSetupError(f"data URI {data_uri}: bucket {bucket!r} does not exist")
        raise AwsSetupError(f"data URI {data_uri}: these credentials cannot list it ({_code(e)}); use data in the "
                            f"artifact bucket (leave data.uri unset) or grant s3:ListBucket on {bucket}")
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


# ---------------------------------------------------------------- config-taking entry points
# cfg is pipeline.config.Config: pipeline.name/.description, aws.region/.role/.bucket, data.uri, tags.

def _studio_domain() -> str | None:
    return os.environ.get("SAGEMAKER_STUDIO_DOMAIN_ID")


def _refused(e: ClientError) -> str:
    return f"AWS refused {e.operation_name}: {_code(e)}: {e.response['Error'].get('Message', '')}"


def _setup_failed(e: AwsSetupError | ClientError) -> int:
    """One line on stderr for a check or a call that AWS refused; exit code 1 (a refused run)."""
    print(f"error: {_refused(e) if isinstance(e, ClientError) else e}", file=sys.stderr)
    return 1


def execute(cfg, definition: str, params: list[str], wait: bool, display_name: str | None,
            uploads: dict[str, bytes] | None = None, out: TextIO = sys.stdout,
            sleep: Callable[[float], None] = time.sleep) -> int:
    """Check, upload code, upsert, start (and with wait, follow) the pipeline. Returns the exit code."""
    name, region, role, bucket = cfg.pipeline.name, cfg.aws.region, cfg.aws.role, cfg.aws.bucket
    try:
        parameters = parse_params(params, definition)
        display = check_display_name(display_name or ci_display_name())
        session = preflight(region, role, bucket, out=out)
        s3, sm = session.client("s3"), session.client("sagemaker")
        data_uri = next((p["Value"] for p in parameters if p["Name"] == "DataUri"), cfg.data.uri)
        check_data(s3, data_uri, out=out, iam=simulation_client(session), role_arn=role)
        check_endpoint(sm, getattr(getattr(cfg, "endpoint", None), "name", None), out=out)
        upload_objects(s3, uploads or {}, out=out)
        arn, created = upsert_pipeline(sm, name, definition, role, dict(cfg.tags),
                                       description=cfg.pipeline.description, bucket=bucket, s3=s3)
        print(f"{'created' if created else 'updated'} pipeline {arn}", file=out)
        exec_arn = start_execution(sm, name, parameters, display, ci_description())
    except (AwsSetupError, ClientError) as e:
        return _setup_failed(e)
    print(f"execution {exec_arn}", file=out)
    urls = console_urls(region, name, exec_arn, _studio_domain())
    for url in urls:
        print(f"  {url}", file=out)
    _summary(f"SageMaker execution `{exec_arn}` ([console]({urls[-1]}))")
    if not wait:
        return 0
    try:
        desc, steps = wait_execution(sm, exec_arn, out=out, sleep=sleep)
    except KeyboardInterrupt:  # only the waiting stops; the execution runs on in AWS
        print(f"\nstopped waiting; the execution goes on. To stop it too: aws sagemaker "
              f"stop-pipeline-execution --pipeline-execution-arn {exec_arn}", file=out)
        return 130
    _summary(f"Status: **{desc['PipelineExecutionStatus']}**\n\n```\n{step_table(steps)}\n"
             + "\n".join(failure_report(desc, steps)) + "\n```")
    return report(desc, steps, out=out)


def _summary(markdown: str) -> None:
    """Append to the GitHub Actions job summary when running there."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if path:
        with open(path, "a") as f:
            f.write(markdown + "\n\n")


def cleanup(cfg, assume_yes: bool, out: TextIO = sys.stdout, ask: Callable[[str], str] = input) -> int:
    try:
        session = boto3.Session(region_name=check_region(cfg.aws.region))
        check_credentials(session)
        return cleanup_pipeline(session.client("sagemaker"), cfg.pipeline.name, assume_yes, out=out, ask=ask)
    except (AwsSetupError, ClientError) as e:
        return _setup_failed(e)
