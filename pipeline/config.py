"""pipeline.yaml -> a typed, validated Config.

Every knob of the pipeline lives in the YAML file; this module only checks it.
A bad file raises one ConfigError whose message names the file, the field path
(`tuning.ranges.lr.min`) and what would be valid. Role, bucket and region can be
overridden per call (CLI) or by environment (SAGEMAKER_ROLE_ARN, SAGEMAKER_BUCKET,
AWS_REGION), in that order of precedence over the file.
"""
from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import UserError
from pipeline.formats import ISO_DURATION, ROLE_ARN
from pipeline.s3uri import s3_key_problem

REPO_ROOT = Path(__file__).resolve().parents[1]


# data.uri when the config sets none: s3://<aws.bucket>/dogImages/
DEFAULT_DATA_PREFIX = "dogImages"

# Tag key on every resource the pipeline creates, valued with the pipeline name.
PIPELINE_TAG = "dogbreed:pipeline"

class ConfigError(UserError, ValueError):
    """A pipeline config that cannot be used; the message says where and why."""


class _Strict(BaseModel):
    # Unknown keys are typos, not extensions.
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- data ---------------------------------------------------------------------

_PerSplit = Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=3, max_length=3)]


class Sample(_Strict):
    """Generate pipeline.sample_data's dataset at `data.uri` for local runs (no download)."""
    num_classes: int = Field(4, ge=2, le=133)
    per_class: _PerSplit = [24, 6, 6]  # train, valid, test
    image_size: int = Field(64, ge=16, le=1024)
    seed: int = 0


class Data(_Strict):
    # Unset, Config fills it in from the (possibly overridden) bucket: the data follows --bucket.
    uri: str | None = None          # s3://bucket/prefix/ with train/ valid/ test/; default s3://<aws.bucket>/dogImages/
    sample: Sample | None = None
    # --prepare-data: where dogImages.zip comes from, its pinned sha256 (None: record the first
    # download's), strict dogImages checks (133 classes, 6,680/835/836) or consistency only.
    url: str | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    strict: bool = True
    cache_dir: str | None = None


# --- compute ------------------------------------------------------------------

class Instance(_Strict):
    type: str
    count: int = Field(1, ge=1, le=100)
    volume_gb: int = Field(30, ge=1, le=16384)
    max_run_s: int = Field(86400, ge=60, le=2419200)


class Spot(_Strict):
    enabled: bool = False
    max_wait_s: int = Field(172800, ge=60, le=2419200)   # must be >= max_run_s


# --- tuning -------------------------------------------------------------------

Scaling = Literal["Auto", "Linear", "Logarithmic", "ReverseLogarithmic"]


class ContinuousRange(_Strict):
    type: Literal["continuous"]
    min: float
    max: float
    scaling: Scaling = "Auto"


class IntegerRange(_Strict):
    type: Literal["integer"]
    min: int
    max: int
    scaling: Scaling = "Auto"


class CategoricalRange(_Strict):
    type: Literal["categorical"]
    values: list[int | float | str]


Range = Annotated[ContinuousRange | IntegerRange | CategoricalRange, Field(discriminator="type")]
RANGE_TYPES = ("continuous", "integer", "categorical")


class Objective(_Strict):
    metric: str = "average validation loss"
    type: Literal["Minimize", "Maximize"] = "Minimize"


class Tuning(_Strict):
    strategy: Literal["Bayesian", "Random", "Hyperband", "Grid"] = "Bayesian"
    max_jobs: int = Field(8, ge=1, le=500)
    max_parallel_jobs: int = Field(2, ge=1, le=100)
    early_stopping: Literal["Off", "Auto"] = "Auto"
    random_seed: int = Field(0, ge=0)
    objective: Objective = Objective()
    ranges: dict[str, Range]
    instance: Instance
    spot: Spot = Spot()


# --- training -----------------------------------------------------------------

class Training(_Strict):
    instance: Instance
    spot: Spot = Spot()
    # Under spot, checkpoints go to <checkpoint_prefix>/<execution id>/ so a retry
    # resumes its own run and a new execution never resumes a stale one.
    checkpoint_prefix: str | None = None      # default s3://<bucket>/<prefix>/checkpoints
    # Passed to both scripts as --<key> <value>; the tuned ones come from the tuning step.
    hyperparameters: dict[str, str | int | float | bool] = {}


class Rule(_Strict):
    name: str                                  # a sagemaker.debugger.rule_configs function name
    parameters: dict[str, str] = {}


ImageCounts = Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2, max_length=2)]


class Debugger(_Strict):
    enabled: bool = True            # false: no hook, no rules, no profiler (Debugger closed to new accounts 2026-07-30)
    rules: list[Rule] = []
    # Steps between saved tensors. "auto": chosen from the run's size (pipeline.debugger_plan)
    # so every rule sees enough points on the smallest run the tuning ranges allow; a number
    # applies to the hook and every collection the rules ask for (AWS's rules ask for 500).
    save_interval: int | str = "auto"    # steps between saves, or auto: from the run's size
    # unset: the sample's sizes, else dogImages' 6,680 / 835
    dataset_images: ImageCounts | None = None  # [train, valid] images for auto


class Profiler(_Strict):
    enabled: bool = True
    interval_ms: Literal[100, 200, 500, 1000, 5000, 60000] = 500


class Framework(_Strict):
    # The newest PyTorch DLCs SDK 2.257.7 knows: training 2.8.0, inference 2.6.0 (the newest
    # inference image it has; past AWS's end of patch, hence inference_image below).
    training_version: str = "2.8.0"     # PyTorch DLC for tuning and training
    inference_version: str = "2.6.0"    # PyTorch DLC for the endpoint
    py_version: str = "py312"
    # Explicit image URIs (e.g. a newer DLC than the SDK knows, or your own ECR image) win over
    # the versions; checked for CPU/GPU against the instance types that run them.
    training_image: str | None = None   # ECR URI; wins over training_version
    inference_image: str | None = None  # ECR URI; wins over inference_version


# --- model, gate, endpoint ----------------------------------------------------

class Registry(_Strict):
    model_package_group: str
    approval_status: Literal["PendingManualApproval", "Approved", "Rejected"] = "PendingManualApproval"
    content_types: list[str] = ["application/x-image", "image/jpeg", "image/png"]
    response_types: list[str] = ["application/json"]


class Gate(_Strict):
    metric: str = "test accuracy"
    threshold: float


class Endpoint(_Strict):
    name: str
    instance_type: str
    instance_count: int = Field(1, ge=1, le=100)


class Cache(_Strict):
    enabled: bool = True
    expire_after: str = "P30D"                 # ISO 8601 duration


class Retry(_Strict):
    max_attempts: int = Field(3, ge=1, le=20)
    interval_s: int = Field(30, ge=1, le=3600)
    backoff_rate: float = Field(2.0, ge=1.0, le=10.0)


class Pipeline(_Strict):
    name: str
    description: str = ""


class Aws(_Strict):
    region: str
    role: str
    bucket: str
    prefix: str = "dogbreed"


class Config(_Strict):
    @model_validator(mode="before")
    @classmethod
    def _data_follows_bucket(cls, raw: Any) -> Any:
        # No data.uri in the file: the data lives in the (possibly overridden) artifact bucket.
        if not isinstance(raw, dict) or not isinstance(raw.get("aws"), dict) or not raw["aws"].get("bucket"):
            return raw
        data = {} if raw.get("data") is None else raw["data"]
        if isinstance(data, dict) and data.get("uri") is None:
            raw = {**raw, "data": {**data, "uri": f"s3://{raw['aws']['bucket']}/{DEFAULT_DATA_PREFIX}/"}}
        return raw

    pipeline: Pipeline
    aws: Aws
    data: Data
    framework: Framework = Framework()
    tuning: Tuning
    training: Training
    debugger: Debugger = Debugger()
    profiler: Profiler = Profiler()
    registry: Registry
    gate: Gate
    endpoint: Endpoint
    cache: Cache = Cache()
    retry: Retry = Retry()
    tags: dict[str, str] = {}
    source: str = ""                           # the file this came from (set by load_config)

    def resource_tags(self) -> list[dict[str, str]]:
        """Tags for everything the pipeline creates; PIPELINE_TAG is how --cleanup finds them."""
        return [{"Key": k, "Value": v} for k, v in {**self.tags, PIPELINE_TAG: self.pipeline.name}.items()]

    @property
    def s3_root(self) -> str:
        return f"s3://{self.aws.bucket}/{self.aws.prefix}".rstrip("/")

    @property
    def checkpoint_prefix(self) -> str:
        return self.training.checkpoint_prefix or f"{self.s3_root}/checkpoints"


# --- loading ------------------------------------------------------------------

_PIPELINE_NAME = re.compile(r"^[A-Za-z0-9](-*[A-Za-z0-9]){0,255}$")
_ENTITY_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d$")
_INSTANCE = re.compile(r"^ml\.[a-z0-9]+\.[a-z0-9]+$")
# Flags both training scripts accept besides the tuned ones (scripts/hpo.py, scripts/train_model.py).
TUNABLE = ("lr", "batch-size", "test-batch-size", "epochs")
# What each of them may be, tuned or static: (integer?, smallest, largest). A learning rate of
# 0, inf or NaN trains nothing (or NaN weights); a batch or epoch count below 1 is no run at all.
DOMAIN = {"lr": (False, 0.0, 10.0), "batch-size": (True, 1, 65536), "test-batch-size": (True, 1, 65536),
          "epochs": (True, 1, 10000)}


def _domain_problem(name: str, value: Any) -> str | None:
    """Why `value` is no valid --<name> (None if it is, or if `name` has no known domain)."""
    if name not in DOMAIN:
        return None
    integer, lo, hi = DOMAIN[name]
    what = (f"an integer in [{lo}, {hi}]" if integer else f"a finite number in ({lo:g}, {hi:g}]")
    if isinstance(value, str):
        try:
            value = int(value) if integer else float(value)
        except ValueError:
            return what
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return what
    if integer and not float(value).is_integer():
        return what
    if not math.isfinite(value) or value > hi or (value < lo if integer else value <= lo):
        return what
    return None


def scripts_module(name: str):
    """scripts/<name>.py, imported by path: scripts/ is container code, not a host package."""
    import importlib.util
    import sys
    key = f"_dogbreed_scripts_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO_ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def metric_names() -> list[str]:
    """Names the training scripts report (scripts/metrics.py is their one source)."""
    return [d["Name"] for d in scripts_module("metrics").METRIC_DEFINITIONS]


def debugger_rule_names() -> list[str]:
    """Built-in Debugger rules the pinned SDK knows (sagemaker.debugger.rule_configs.<name>)."""
    import inspect

    from smdebug_rulesconfig.debugger_rules import builtin_rules
    return sorted(n for n, f in vars(builtin_rules).items()
                  if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == builtin_rules.__name__)


def _s3_uri_problem(uri: str) -> str | None:
    """Why `uri` is not s3://<bucket>/<relative key> (None if it is): a key with '//', '.' or '..'
    would map outside its folder in the local store, and is never what was meant on S3 either."""
    match = re.match(r"^s3://([^/]*)/(.*)$", uri)
    if not match:
        return "not of the form s3://bucket/key"
    if not _BUCKET.match(match.group(1)):
        return f"bucket {match.group(1)!r} is not an S3 bucket name"
    problem = s3_key_problem(match.group(2))
    return f"key {match.group(2)!r} {problem}" if problem else None


def _fail(source: str, path: str, message: str) -> None:
    message = " ".join(message.split())  # one line, and short even when a value is not
    raise ConfigError(f"{source}: {path}: {message if len(message) <= 1000 else message[:997] + '...'}")


def _check(cfg: Config) -> None:
    """What pydantic's types cannot say: cross-field rules and AWS name formats."""
    src = cfg.source
    if not _PIPELINE_NAME.match(cfg.pipeline.name):
        _fail(src, "pipeline.name", f"letters, digits and single hyphens, 1-256 chars; got {cfg.pipeline.name!r}")
    if not _REGION.match(cfg.aws.region):
        _fail(src, "aws.region", f"an AWS region like 'us-east-1'; got {cfg.aws.region!r}")
    if not ROLE_ARN.match(cfg.aws.role):
        _fail(src, "aws.role", f"an IAM role ARN like 'arn:aws:iam::123456789012:role/Name' "
                               f"(or set SAGEMAKER_ROLE_ARN / --role); got {cfg.aws.role!r}")
    if not _BUCKET.match(cfg.aws.bucket):
        _fail(src, "aws.bucket", f"an S3 bucket name (3-63 chars, lowercase, digits, '.', '-'); got {cfg.aws.bucket!r}")
    if cfg.aws.prefix.startswith("/") or s3_key_problem(cfg.aws.prefix):
        _fail(src, "aws.prefix", f"a relative S3 key prefix like 'dogbreed' (no '//', '.' or '..' segments); "
                                 f"got {cfg.aws.prefix!r}")
    problem = _s3_uri_problem(cfg.data.uri)
    if problem or not cfg.data.uri.endswith("/") or cfg.data.uri.count("/") < 4:
        _fail(src, "data.uri", f"an s3://bucket/prefix/ URI ending in '/' (holding train/ valid/ test/)"
                               f"{'; ' + problem if problem else ''}; got {cfg.data.uri!r}")
    if cfg.training.checkpoint_prefix is not None:
        problem = _s3_uri_problem(cfg.training.checkpoint_prefix)
        if problem or cfg.training.checkpoint_prefix.rstrip("/").count("/") < 3:
            _fail(src, "training.checkpoint_prefix", f"an s3://bucket/prefix URI{'; ' + problem if problem else ''}; "
                                                     f"got {cfg.training.checkpoint_prefix!r}")

    for where, inst in (("tuning.instance", cfg.tuning.instance), ("training.instance", cfg.training.instance)):
        if not _INSTANCE.match(inst.type):
            _fail(src, f"{where}.type", f"a SageMaker instance type like 'ml.g4dn.xlarge'; got {inst.type!r}")
    if not _INSTANCE.match(cfg.endpoint.instance_type):
        _fail(src, "endpoint.instance_type",
              f"a SageMaker instance type like 'ml.m5.large'; got {cfg.endpoint.instance_type!r}")
    for where, spot, inst in (("tuning", cfg.tuning.spot, cfg.tuning.instance),
                              ("training", cfg.training.spot, cfg.training.instance)):
        if spot.enabled and spot.max_wait_s < inst.max_run_s:
            _fail(src, f"{where}.spot.max_wait_s", f"must be >= {where}.instance.max_run_s ({inst.max_run_s}); "
                                                   f"got {spot.max_wait_s}")

    t = cfg.tuning
    if t.max_parallel_jobs > t.max_jobs:
        _fail(src, "tuning.max_parallel_jobs", f"must be <= tuning.max_jobs ({t.max_jobs}); got {t.max_parallel_jobs}")
    if not t.ranges:
        _fail(src, "tuning.ranges", "at least one hyperparameter range")
    for name, r in t.ranges.items():
        path = f"tuning.ranges.{name}"
        if name not in TUNABLE:
            _fail(src, path, f"tunable hyperparameters are {list(TUNABLE)}; got {name!r}")
        if name in cfg.training.hyperparameters:
            _fail(src, f"training.hyperparameters.{name}", f"{name!r} is tuned (tuning.ranges.{name}); remove it here")
        if isinstance(r, CategoricalRange):
            if not r.values:
                _fail(src, f"{path}.values", "a non-empty list of values")
            if len(set(map(str, r.values))) != len(r.values):
                _fail(src, f"{path}.values", f"distinct values; got {r.values}")
            for i, value in enumerate(r.values):
                if problem := _domain_problem(name, value):
                    _fail(src, f"{path}.values.{i}", f"{problem}; got {_short_repr(value)}")
        else:
            if r.min >= r.max:
                _fail(src, f"{path}.min", f"must be less than max ({r.max}); got {r.min}")
            if r.scaling in ("Logarithmic", "ReverseLogarithmic") and r.min <= 0:
                _fail(src, f"{path}.min", f"must be > 0 for {r.scaling} scaling; got {r.min}")
            if r.scaling == "ReverseLogarithmic" and r.max >= 1:
                _fail(src, f"{path}.max", f"must be < 1 for ReverseLogarithmic scaling; got {r.max}")
            for bound in ("min", "max"):
                if problem := _domain_problem(name, getattr(r, bound)):
                    _fail(src, f"{path}.{bound}", f"{problem}; got {_short_repr(getattr(r, bound))}")
    for name, value in cfg.training.hyperparameters.items():
        if problem := _domain_problem(name, value):
            _fail(src, f"training.hyperparameters.{name}", f"{problem}; got {_short_repr(value)}")
    missing = [n for n in TUNABLE if n not in t.ranges and n not in cfg.training.hyperparameters]
    if missing:
        _fail(src, "tuning.ranges", f"needs a range (or a static training.hyperparameters value) for {missing}")
    if t.strategy == "Grid" and any(not isinstance(r, CategoricalRange) for r in t.ranges.values()):
        _fail(src, "tuning.strategy", "Grid search needs only categorical ranges")

    names = metric_names()
    if t.objective.metric not in names:
        _fail(src, "tuning.objective.metric", f"one of {names}; got {t.objective.metric!r}")
    if cfg.gate.metric not in names:
        _fail(src, "gate.metric", f"one of {names}; got {cfg.gate.metric!r}")
    if not 0.0 <= cfg.gate.threshold <= 1.0:
        _fail(src, "gate.threshold", f"a fraction in [0, 1]; got {cfg.gate.threshold}")

    if cfg.debugger.enabled:
        known = debugger_rule_names()
        for i, rule in enumerate(cfg.debugger.rules):
            if rule.name not in known:
                _fail(src, f"debugger.rules.{i}.name", f"a built-in Debugger rule, one of {known}; got {rule.name!r}")
    for where, name in (("registry.model_package_group", cfg.registry.model_package_group),
                        ("endpoint.name", cfg.endpoint.name)):
        if not _ENTITY_NAME.match(name):
            _fail(src, where, f"letters, digits and single hyphens, 1-63 chars; got {name!r}")
    if len(cfg.endpoint.name) > 63 - 13:
        # The endpoint config is named <endpoint>-<execution id (12 chars)>.
        _fail(src, "endpoint.name",
              f"at most 50 chars (its configs append an execution id); got {len(cfg.endpoint.name)}")
    if not ISO_DURATION.match(cfg.cache.expire_after):
        _fail(src, "cache.expire_after", f"an ISO 8601 duration like 'P30D' or 'PT12H'; got {cfg.cache.expire_after!r}")
    if not cfg.registry.content_types or not cfg.registry.response_types:
        _fail(src, "registry.content_types", "non-empty content_types and response_types")
    for key in cfg.training.hyperparameters:
        if not re.match(r"^[a-z][a-z0-9-]*$", key):
            _fail(src, f"training.hyperparameters.{key}", "a flag name without '--' (lowercase, digits, '-')")
    _check_images(cfg)
    _check_debugger_plan(cfg)


_IMAGE_URI = re.compile(r"^(\d{12})\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?/[a-z0-9._/-]+"
                        r"(:[\w.-]+|@sha256:[0-9a-f]{64})$")


def image_processor(uri: str) -> str | None:
    """'gpu' / 'cpu' from a DLC-style tag (2.8.0-gpu-py312-cu129-...), None when the tag does not say."""
    tag = uri.rsplit(":", 1)[-1] if ":" in uri.rsplit("/", 1)[-1] else ""
    m = re.search(r"(?:^|-)(gpu|cpu)(?:-|$)", tag)
    return m.group(1) if m else None


def _check_images(cfg: Config) -> None:
    """Explicit image URIs: ECR URIs in the pipeline's region, CPU/GPU as the instances that run them."""
    from pipeline.params import gpu_instance
    f, src = cfg.framework, cfg.source
    uses = {"framework.training_image": (f.training_image, [("tuning.instance.type", cfg.tuning.instance.type),
                                                            ("training.instance.type", cfg.training.instance.type)]),
            "framework.inference_image": (f.inference_image, [("endpoint.instance_type", cfg.endpoint.instance_type)])}
    for field, (uri, instances) in uses.items():
        if uri is None:
            continue
        m = _IMAGE_URI.match(uri)
        if not m:
            _fail(src, field, f"an ECR image URI like '763104351884.dkr.ecr.{cfg.aws.region}.amazonaws.com/"
                              f"pytorch-training:2.8.0-gpu-py312'; got {uri!r}")
        if m.group(2) != cfg.aws.region:
            _fail(src, field, f"an image in the pipeline's region {cfg.aws.region} (SageMaker pulls from its own "
                              f"region); got one in {m.group(2)}")
        processor = image_processor(uri)
        for where, itype in instances:
            want = "gpu" if gpu_instance(itype) else "cpu"
            if processor and processor != want:
                _fail(src, field,
                      f"a {want.upper()} image for {where} {itype}; got the {processor.upper()} image {uri}")
    if f.training_image is None or f.inference_image is None:
        from pipeline.images import sdk_image_versions
        for field, scope, version, explicit in (
                ("framework.training_version", "training", f.training_version, f.training_image),
                ("framework.inference_version", "inference", f.inference_version, f.inference_image)):
            known = sdk_image_versions(scope, f.py_version)
            if explicit is None and version not in known:
                _fail(src, field, f"a PyTorch {scope} version the SDK has {f.py_version} images for, one of "
                                  f"{known} (or set framework.{scope}_image); got {version!r}")


def _check_debugger_plan(cfg: Config) -> None:
    interval = cfg.debugger.save_interval
    if isinstance(interval, str) and interval != "auto" or isinstance(interval, int) and interval < 1:
        _fail(cfg.source, "debugger.save_interval", f"Input should be greater than or equal to 1 (or 'auto'); "
                                                    f"got {interval!r}")
    if not cfg.debugger.enabled or not cfg.debugger.rules:
        return
    from pipeline.debugger_plan import PlanError, plan_for_config
    try:
        plan_for_config(cfg)
    except PlanError as e:
        _fail(cfg.source, e.field, str(e))


def _format_loc(loc: tuple[Any, ...]) -> str:
    # pydantic puts the discriminator ('continuous') into the path of a range; users never wrote it.
    parts = [str(p) for i, p in enumerate(loc) if not (p in RANGE_TYPES and i >= 3 and loc[i - 2] == "ranges")]
    return ".".join(parts) or "(top level)"


def _short_repr(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too long for str()
        return f"an integer of over {sys.get_int_max_str_digits()} digits"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _format_error(source: str, err: dict) -> str:
    path = _format_loc(err["loc"])
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return f"{source}: {path}: unknown key (check spelling; see pipeline.yaml for every key)"
    if kind == "missing":
        return f"{source}: {path}: required field is missing"
    if kind == "union_tag_invalid":
        return f"{source}: {path}.type: one of {list(RANGE_TYPES)}; got {err['input'].get('type')!r}"
    if kind == "union_tag_not_found":
        return f"{source}: {path}.type: required, one of {list(RANGE_TYPES)}"
    return f"{source}: {path}: {msg}; got {_short_repr(err.get('input'))}"


def parse_config(raw: Any, source: str = "<config>", region: str | None = None,
                 role: str | None = None, bucket: str | None = None) -> Config:
    """Validate an already-parsed YAML document (a dict) into a Config."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (pipeline, aws, data, ...), "
                          f"got {type(raw).__name__}")
    raw = dict(raw)
    aws = dict(raw.get("aws") or {}) if isinstance(raw.get("aws", {}), dict) else raw.get("aws")
    if isinstance(aws, dict):
        for key, arg, env in (("region", region, "AWS_REGION"), ("role", role, "SAGEMAKER_ROLE_ARN"),
                              ("bucket", bucket, "SAGEMAKER_BUCKET")):
            value = arg or os.environ.get(env)
            if value:
                aws[key] = value
        raw["aws"] = aws
    raw["source"] = source
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        errors = [_format_error(source, e)[len(source) + 2:] for e in exc.errors()]
        more = f"; and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise ConfigError(f"{source}: " + "; ".join(errors[:10]) + more) from None
    _check(cfg)
    return cfg


# Bounds on the config file itself: pipeline.yaml is ~5 KB with no aliases and depth 5, so
# these are far above any real config and far below what an alias bomb or a pasted binary needs.
# Each can be raised by environment (DOGBREED_<NAME>) for a config that truly needs it.
MAX_CONFIG_BYTES = int(os.environ.get("DOGBREED_MAX_CONFIG_BYTES", 256 * 1024))
MAX_YAML_ALIASES = int(os.environ.get("DOGBREED_MAX_YAML_ALIASES", 64))    # `*name` references
MAX_YAML_DEPTH = int(os.environ.get("DOGBREED_MAX_YAML_DEPTH", 32))        # nested mappings/lists
MAX_YAML_NODES = int(os.environ.get("DOGBREED_MAX_YAML_NODES", 20_000))    # values, aliases expanded


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses alias bombs and deep nesting while it composes, before any
    value is built: a 2.6 KB file of nested aliases expands to gigabytes otherwise."""

    def __init__(self, stream):
        super().__init__(stream)
        self._aliases, self._depth = 0, 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise _LimitError(f"more than {MAX_YAML_ALIASES} YAML aliases (*name) "
                                  "(limit DOGBREED_MAX_YAML_ALIASES); write the values out")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _LimitError(f"nested deeper than {MAX_YAML_DEPTH} levels (limit DOGBREED_MAX_YAML_DEPTH)")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _LimitError(Exception):
    pass


def _count_nodes(value: Any, limit: int) -> int:
    """Values in the document with aliases expanded, counting stops past `limit`."""
    count, stack = 0, [value]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def _one_line(text: str, limit: int = 300) -> str:
    """Collapse a message (YAML's are multi-line and quote the input) into one short line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def read_yaml(path: str | os.PathLike, what: str = "config") -> Any:
    """Parse a YAML file under the bounds above; every failure is one ConfigError line naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} ({exc.strerror})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: over {MAX_CONFIG_BYTES} bytes (limit DOGBREED_MAX_CONFIG_BYTES); "
                          f"a pipeline config is a few KB of YAML")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
                          f"save the {what} as UTF-8 YAML") from None
    if "\0" in text:
        raise ConfigError(f"{path}: holds NUL bytes (a binary or UTF-16 file?); save the {what} as UTF-8 YAML")
    try:
        loader = _BoundedLoader(text)
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
    except _LimitError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(exc)}") from None
    except (ValueError, TypeError, RecursionError, MemoryError) as exc:  # e.g. an integer of 5,000 digits
        raise ConfigError(f"{path}: a value YAML cannot hold: {_one_line(exc)}") from None
    if _count_nodes(raw, MAX_YAML_NODES) > MAX_YAML_NODES:
        raise ConfigError(f"{path}: more than {MAX_YAML_NODES} values once aliases are expanded "
                          f"(limit DOGBREED_MAX_YAML_NODES)")
    return raw


def load_config(path: str | os.PathLike, region: str | None = None, role: str | None = None,
                bucket: str | None = None) -> Config:
    """Read and validate pipeline.yaml; CLI values beat environment beats the file."""
    return parse_config(read_yaml(path), source=str(path), region=region, role=role, bucket=bucket)
