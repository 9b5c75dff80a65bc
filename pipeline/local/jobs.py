"""One SageMaker training job, run here under the container contract.

Each job gets an `/opt/ml`-shaped sandbox inside the run dir:

  <job>/opt_ml/input/config/{hyperparameters,inputdataconfig,resourceconfig,debughookconfig}.json
  <job>/opt_ml/input/data/<channel>   (the channel's S3 prefix in the local store)
  <job>/opt_ml/code                   (sourcedir.tar.gz, extracted)
  <job>/opt_ml/model, output/data, output/tensors, output/profiler, checkpoints

and the SM_* environment and command line that `sagemaker-training` builds
(sagemaker_training.environment / mapping): every hyperparameter value is
json-decoded once, `sagemaker_*` keys are framework parameters, the rest become
`--name value` in sorted order. The job's log is captured line by line, metrics
are read with the job's own MetricDefinitions, model/ is packed into
model.tar.gz at `<S3OutputPath>/<job>/output/model.tar.gz` in the store, and the
result is returned in the shape of DescribeTrainingJob.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from pipeline.archives import extract_tar
from pipeline.errors import UserError
from pipeline.files import atomic_path, atomic_write
from pipeline.local.store import LocalStore
from pipeline.processes import stop_group
from scripts.metrics import parse_metrics

REGION = "local"
ACCOUNT = "000000000000"
HOST = "algo-1"
TUNING_METRIC = "_tuning_objective_metric"
# SAGEMAKER_TRAINING_MODULE in the PyTorch training images
FRAMEWORK_MODULE = "sagemaker_pytorch_container.training:main"


# ---------------------------------------------------------------- small helpers

def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: Any) -> Path:
    """Atomic: readers see the old file or the new one, never half of one."""
    return atomic_write(path, json.dumps(data, indent=1, default=str))


class RecordError(UserError, ValueError):
    """A record this runner wrote (execution.json, trials.json, the local registry) that no
    longer reads as JSON: truncated or edited by hand. Never a traceback: the path and a way out."""


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise RecordError(f"{path}: not a valid JSON record ({type(err).__name__}: {err}); it was truncated or "
                          f"edited: move it away (for a run dir, or pass another --run-dir) to start afresh") from None


def bar(done: int, total: int, width: int = 12) -> str:
    """`[######......]` for progress lines that also read well in a log file."""
    filled = int(round(width * done / total)) if total else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def arn(kind: str, name: str) -> str:
    return f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:{kind}/{name.lower()}"


def pack_dir(source: Path, store: LocalStore, uri: str) -> str:
    """tar.gz a directory's content (like SageMaker's model.tar.gz) into the store, atomically."""
    with atomic_path(store.path(uri)) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for item in sorted(Path(source).iterdir()) if Path(source).exists() else []:
            tar.add(item, arcname=item.name)
    return uri


def unquote(value: Any) -> Any:
    """json-decode once, as sagemaker-training does; text that is not JSON stays text."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, TypeError):
        return value


def cmd_args(hyperparameters: dict[str, Any]) -> list[str]:
    """sagemaker_training.mapping.to_cmd_args over the user hyperparameters."""
    out = []
    for key in sorted(hyperparameters):
        value = hyperparameters[key]
        out.append(f"--{key}" if len(key) > 1 else f"-{key}")
        out.append(",".join(f"{k}={v}" for k, v in sorted(value.items())) if isinstance(value, dict)
                   else "" if value is None else str(value))
    return out


def _env_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class JobError(UserError, RuntimeError):
    """The job request is malformed (missing source, channel, ...): a clear message, no traceback."""


# ---------------------------------------------------------------- profiler

class SystemSampler(threading.Thread):
    """CPU / memory (and GPU when nvidia-smi answers) of the job's process tree,
    every `interval_ms`, as JSON lines: what the Debugger system monitor records."""

    def __init__(self, pid: int, path: Path, interval_ms: int = 500):
        super().__init__(daemon=True)
        self.pid, self.path, self.interval = pid, Path(path), max(interval_ms, 50) / 1000
        self.stop_event = threading.Event()
        self.samples = 0
        self.gpu = shutil.which("nvidia-smi") is not None

    def _gpu(self) -> dict:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=2).stdout
            util, mem = out.splitlines()[0].split(",")
            return {"gpu_percent": float(util), "gpu_memory_mb": float(mem)}
        except Exception:  # noqa: BLE001 - a GPU that will not answer is just not sampled
            return {}

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        procs: dict[int, psutil.Process] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            while not self.stop_event.is_set():
                try:
                    tree = [root] + root.children(recursive=True)
                except psutil.Error:
                    break
                cpu = rss = 0.0
                for p in tree:
                    p = procs.setdefault(p.pid, p)  # keep the object so cpu_percent has a baseline
                    try:
                        cpu += p.cpu_percent(None)
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                sample = {"time": time.time(), "cpu_percent": round(cpu, 1), "memory_mb": round(rss / 2**20, 1),
                          "system_cpu_percent": psutil.cpu_percent(None),
                          "system_memory_percent": psutil.virtual_memory().percent}
                if self.gpu:
                    sample.update(self._gpu())
                f.write(json.dumps(sample) + "\n")
                f.flush()
                self.samples += 1
                self.stop_event.wait(self.interval)


def profiler_summary(samples_path: Path) -> dict:
    rows = [json.loads(line) for line in Path(samples_path).read_text().splitlines() if line.strip()] \
        if Path(samples_path).exists() else []
    if not rows:
        return {"samples": 0}
    def stats(key):
        vals = [r[key] for r in rows if key in r]
        return {"mean": round(sum(vals) / len(vals), 1), "max": round(max(vals), 1)} if vals else None
    out = {"samples": len(rows), "seconds": round(rows[-1]["time"] - rows[0]["time"], 1),
           "cpu_percent": stats("cpu_percent"), "memory_mb": stats("memory_mb")}
    if any("gpu_percent" in r for r in rows):
        out["gpu_percent"] = stats("gpu_percent")
        out["gpu_memory_mb"] = stats("gpu_memory_mb")
    return out


# ---------------------------------------------------------------- the job

def _set_pdeathsig() -> None:
    """The job dies with the executor even when the executor is SIGKILLed (Linux)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the executor's own cleanup still stops jobs
        pass


def _kill_tree(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    stop_group(proc.pid, grace, reap=proc.poll)
    proc.wait()


def _link_channel(store: LocalStore, channel: dict, dest: Path) -> None:
    name = channel.get("ChannelName")
    src = channel.get("DataSource", {}).get("S3DataSource", {})
    uri = src.get("S3Uri")
    if not name or not isinstance(uri, str):
        raise JobError(f"InputDataConfig channel {channel!r}: needs ChannelName and DataSource.S3DataSource.S3Uri")
    try:
        path = store.path(uri)
    except ValueError as e:
        raise JobError(f"channel {name!r}: {e}") from None
    if not path.exists():
        raise JobError(f"channel {name!r}: {uri} is not in the local store ({path}); "
                       "put the data there (run_pipeline.py --local --prepare-data, or --data PATH)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        dest.symlink_to(path, target_is_directory=True)
    else:  # a single object: the channel dir holds that file
        dest.mkdir()
        (dest / path.name).symlink_to(path)


def run_training_job(
    name: str,
    request: dict,
    store: LocalStore,
    job_dir: str | os.PathLike,
    *,
    on_line: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    python: str = sys.executable,
    extra_env: dict[str, str] | None = None,
) -> dict:
    """Run one training job described by a (resolved) CreateTrainingJob request.

    Returns its DescribeTrainingJob. `on_line` sees every log line as it comes,
    `should_stop` is polled (tuning early stopping): True stops the job (Stopped).
    """
    box = make_sandbox(Path(job_dir))
    restore_checkpoints(request, store, box)
    created = now_iso()
    job = read_request(name, request)
    resource_config = write_contract(job, box, store)
    program, submit, entry = install_code(job, box, store)
    env = sm_environment(job, box, resource_config, program, submit, extra_env)
    command = ([python, str(entry)] if program.endswith(".py") else ["/bin/sh", str(entry)]) + cmd_args(job.user_hps)
    run = supervise(command, env, box, job, on_line, should_stop)
    log_text = run.log_path.read_text()
    final = final_metric_list(log_text, job.algo.get("MetricDefinitions") or [], box, run.ended)
    status, secondary, reason, failure_kind = outcome(run, job, box, log_text)
    model_uri, profile = store_outputs(job, box, store)
    return describe_job(job, box, created, run, status, secondary, reason, failure_kind, model_uri, final, profile)


# The steps of run_training_job, in its order.

@dataclass
class Sandbox:
    """A job's /opt/ml-shaped folders (the module docstring draws them)."""
    job_dir: Path

    @property
    def ml(self) -> Path:
        return self.job_dir / "opt_ml"

    @property
    def config(self) -> Path:
        return self.ml / "input" / "config"

    @property
    def data(self) -> Path:
        return self.ml / "input" / "data"

    @property
    def code(self) -> Path:
        return self.ml / "code"

    @property
    def model(self) -> Path:
        return self.ml / "model"

    @property
    def output(self) -> Path:
        return self.ml / "output"

    @property
    def checkpoints(self) -> Path:
        return self.ml / "checkpoints"


def make_sandbox(job_dir: Path) -> Sandbox:
    """A re-run of the same job starts clean, but keeps its checkpoints (spot-style resume)."""
    box = Sandbox(job_dir)
    for sub in ("input", "code", "model", "output"):
        shutil.rmtree(box.ml / sub, ignore_errors=True)
    for d in (box.config, box.data, box.code, box.model, box.output / "data", box.checkpoints):
        d.mkdir(parents=True, exist_ok=True)
    return box


def restore_checkpoints(request: dict, store: LocalStore, box: Sandbox) -> None:
    """CheckpointConfig: what an earlier attempt synced to S3 comes back into the sandbox."""
    checkpoint_uri = (request.get("CheckpointConfig") or {}).get("S3Uri")
    if isinstance(checkpoint_uri, str) and store.exists(checkpoint_uri):
        shutil.copytree(store.path(checkpoint_uri), box.checkpoints, dirs_exist_ok=True)


@dataclass
class JobRequest:
    """The parts of a CreateTrainingJob request the job runs by."""
    name: str
    request: dict
    hps_raw: dict[str, str]        # as SageMaker stores them: strings
    framework: dict[str, Any]      # sagemaker_* and the tuner's _tuning_objective_metric: the platform's
    user_hps: dict[str, Any]       # the script's, json-decoded once
    algo: dict
    resources: dict
    instance_type: str
    channels: list[dict]
    out_path: str
    max_runtime: Any
    checkpoint_uri: Any
    hook: dict | None
    profiler: dict
    profiling: bool


def read_request(name: str, request: dict) -> JobRequest:
    hps_raw = {k: (v if isinstance(v, str) else json.dumps(v))
               for k, v in (request.get("HyperParameters") or {}).items()}
    hps = {k: unquote(v) for k, v in hps_raw.items()}
    framework = {k: v for k, v in hps.items() if k.startswith("sagemaker_") or k == TUNING_METRIC}
    resources = request.get("ResourceConfig") or request.get("HyperParameterTuningResourceConfig") or {}
    out_path = (request.get("OutputDataConfig") or {}).get("S3OutputPath")
    if not isinstance(out_path, str) or not out_path.startswith("s3://"):
        raise JobError(f"job {name}: OutputDataConfig.S3OutputPath must be an s3:// URI, got {out_path!r}")
    profiler = request.get("ProfilerConfig") or {}
    return JobRequest(
        name=name, request=request, hps_raw=hps_raw, framework=framework,
        user_hps={k: v for k, v in hps.items() if k not in framework},
        algo=request.get("AlgorithmSpecification") or {}, resources=resources,
        instance_type=resources.get("InstanceType", "local"), channels=request.get("InputDataConfig") or [],
        out_path=out_path, max_runtime=(request.get("StoppingCondition") or {}).get("MaxRuntimeInSeconds"),
        checkpoint_uri=(request.get("CheckpointConfig") or {}).get("S3Uri"),
        hook=request.get("DebugHookConfig"), profiler=profiler,
        profiling=bool(profiler) and not profiler.get("DisableProfiler", False))


def write_contract(job: JobRequest, box: Sandbox, store: LocalStore) -> dict:
    """input/config/*.json and the channels' folders, as the toolkit reads them; the resource config."""
    cfg_dir = box.config
    write_json(cfg_dir / "hyperparameters.json", job.hps_raw)
    write_json(cfg_dir / "inputdataconfig.json", {
        c["ChannelName"]: {"TrainingInputMode": c.get("InputMode", job.algo.get("TrainingInputMode", "File")),
                           "S3DistributionType": c.get("DataSource", {}).get("S3DataSource", {}).get(
                               "S3DataDistributionType", "FullyReplicated"),
                           "RecordWrapperType": c.get("RecordWrapperType", "None")}
        for c in job.channels if "ChannelName" in c})
    resource_config = {"current_host": HOST, "current_instance_type": job.instance_type,
                       "current_group_name": "homogeneousCluster", "hosts": [HOST],
                       "instance_groups": [{"instance_group_name": "homogeneousCluster",
                                            "instance_type": job.instance_type, "hosts": [HOST]}],
                       "network_interface_name": "eth0"}
    write_json(cfg_dir / "resourceconfig.json", resource_config)
    for c in job.channels:
        _link_channel(store, c, box.data / c.get("ChannelName", "?"))
    if job.hook:
        write_json(cfg_dir / "debughookconfig.json", {
            "LocalPath": str(box.output / "tensors"), "S3OutputPath": job.hook.get("S3OutputPath"),
            "HookParameters": job.hook.get("HookParameters") or {},
            "CollectionConfigurations": job.hook.get("CollectionConfigurations") or []})
    if job.profiling:
        write_json(cfg_dir / "profilerconfig.json", {**job.profiler, "LocalPath": str(box.output / "profiler")})
    return resource_config


def install_code(job: JobRequest, box: Sandbox, store: LocalStore) -> tuple[str, Any, Path]:
    """sagemaker_submit_directory (an S3 sourcedir.tar.gz) extracted into code/; (program, submit, entry)."""
    name = job.name
    program = job.framework.get("sagemaker_program")
    submit = job.framework.get("sagemaker_submit_directory")
    if not program:
        raise JobError(f"job {name}: HyperParameters has no sagemaker_program (the entry point)")
    if submit:
        if not str(submit).startswith("s3://"):
            raise JobError(f"job {name}: sagemaker_submit_directory must be an s3:// URI, got {submit!r}")
        archive = store.path(submit)
        if not archive.is_file():
            raise JobError(f"job {name}: source archive {submit} is not in the local store ({archive})")
        extract_tar(archive, box.code)
    entry = box.code / program
    if not entry.is_file():
        raise JobError(f"job {name}: entry point {program!r} is not in the source archive {submit}")
    return program, submit, entry


def sm_environment(job: JobRequest, box: Sandbox, resource_config: dict, program: str, submit: Any,
                   extra_env: dict[str, str] | None) -> dict[str, str]:
    """The SM_* environment: sagemaker_training.environment.Environment's to_env_vars() and
    its properties (SM_TRAINING_ENV), key for key; tests/test_fidelity_training.py runs the
    toolkit's own Environment on this sandbox and requires the same variables."""
    ml, cfg_dir, output_dir, framework = box.ml, box.config, box.output, job.framework
    channel_dirs = {c["ChannelName"]: str(box.data / c["ChannelName"]) for c in job.channels}
    framework_params = {k: v for k, v in framework.items()
                        if k not in ("sagemaker_program", "sagemaker_submit_directory", "sagemaker_region",
                                     "sagemaker_container_log_level", "sagemaker_job_name", TUNING_METRIC)}
    group = resource_config["current_group_name"]
    common = {
        "current_host": HOST, "current_instance_group": group, "current_instance_group_hosts": [HOST],
        "current_instance_type": job.instance_type, "hosts": [HOST], "instance_groups": [group],
        "instance_groups_dict": {group: resource_config["instance_groups"][0]},
        "distribution_instance_groups": [], "is_hetero": False, "network_interface_name": "eth0",
        "framework_module": FRAMEWORK_MODULE, "input_config_dir": str(cfg_dir),
        "input_data_config": read_json(cfg_dir / "inputdataconfig.json"), "input_dir": str(ml / "input"),
        "log_level": framework.get("sagemaker_container_log_level", 20), "model_dir": str(box.model),
        "module_dir": submit or str(box.code), "module_name": Path(program).stem,
        "num_cpus": os.cpu_count() or 1, "num_gpus": _num_gpus(), "num_neurons": 0,
        "output_data_dir": str(output_dir / "data"), "output_dir": str(output_dir),
        "output_intermediate_dir": str(output_dir / "intermediate"), "resource_config": resource_config,
        "user_entry_point": program,
    }
    training_env = {**common, "additional_framework_parameters": framework_params,
                    "channel_input_dirs": channel_dirs, "distribution_hosts": [], "hyperparameters": job.user_hps,
                    "is_master": True, "is_modelparallel_enabled": None, "is_smddpmprun_installed": False,
                    "is_smddprun_installed": False, "job_name": job.name, "master_hostname": HOST, "topology": []}
    env_map: dict[str, Any] = {**common, "hps": job.user_hps, "framework_params": framework_params,
                               "channels": sorted(channel_dirs), "training_env": training_env,
                               "user_args": cmd_args(job.user_hps)}
    env_map.update({f"channel_{k}": v for k, v in channel_dirs.items()})
    env_map.update({f"hp_{k}": v for k, v in job.user_hps.items()})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_SECRET", "AWS_SESSION"))}
    env.update({f"SM_{k.upper()}": _env_value(v) for k, v in env_map.items()})
    # Not the toolkit's: scripts default to /opt/ml/checkpoints (what CheckpointConfig syncs), which
    # this sandbox is not; the one SM_* variable a local job has that a SageMaker job does not.
    env["SM_CHECKPOINT_DIR"] = str(box.checkpoints)
    env.update({"SAGEMAKER_PROGRAM": program, "SAGEMAKER_REGION": str(framework.get("sagemaker_region", REGION)),
                "TRAINING_JOB_NAME": job.name, "TRAINING_JOB_ARN": arn("training-job", job.name),
                "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(box.code)] + (
                    [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))})
    if job.hook:
        env["SMDEBUG_CONFIG_FILE_PATH"] = str(cfg_dir / "debughookconfig.json")
    if job.profiling:
        env["SMPROFILER_CONFIG_PATH"] = str(cfg_dir / "profilerconfig.json")
    env.update(extra_env or {})
    for key, value in (job.request.get("Environment") or {}).items():
        env[key] = str(value)
    return env


@dataclass
class Run:
    """How the job's process went."""
    returncode: int
    secondary: str                 # Completed, or why it was stopped: MaxRuntimeExceeded / Stopped
    started: str
    ended: str
    seconds: int
    log_path: Path


def supervise(command: list[str], env: dict[str, str], box: Sandbox, job: JobRequest,
              on_line: Callable[[str], None] | None, should_stop: Callable[[], bool] | None) -> Run:
    """Run the job's process to its end: its log captured line by line (job.log), the system
    sampled when profiling, stopped on MaxRuntimeInSeconds or should_stop(), and killed with
    its process group whatever happens here."""
    log_path = box.job_dir / "job.log"
    started = now_iso()
    t0 = time.monotonic()
    secondary = "Completed"
    sampler = None
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=box.code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True, preexec_fn=_set_pdeathsig)
        if job.profiling:
            sampler = SystemSampler(proc.pid, box.output / "profiler" / "system_metrics.jsonl",
                                    int(job.profiler.get("ProfilingIntervalInMilliseconds", 500)))
            sampler.start()
        stop = threading.Event()

        def watchdog():
            nonlocal secondary
            while not stop.wait(0.5):
                if job.max_runtime and time.monotonic() - t0 > float(job.max_runtime):
                    secondary = "MaxRuntimeExceeded"
                elif should_stop is not None and should_stop():
                    secondary = "Stopped"
                else:
                    continue
                _kill_tree(proc)
                return
        watcher = threading.Thread(target=watchdog, daemon=True)
        watcher.start()
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if on_line is not None:
                    on_line(line.rstrip("\n"))
            proc.wait()
        finally:
            stop.set()
            _kill_tree(proc)  # Ctrl-C / kill of the executor: the job goes too
            if sampler is not None:
                sampler.stop_event.set()
                sampler.join(2)
    ended = now_iso()
    return Run(returncode=proc.returncode, secondary=secondary, started=started, ended=ended,
               seconds=int(round(time.monotonic() - t0)), log_path=log_path)


def final_metric_list(log_text: str, definitions: list[dict], box: Sandbox, ended: str) -> list[dict]:
    """The job's own MetricDefinitions over its log: every value in metrics.json, the last finite
    one of each as FinalMetricDataList."""
    series = parse_metrics(log_text, definitions) if definitions else {}
    write_json(box.job_dir / "metrics.json", series)
    final = []
    for metric, values in series.items():
        finite = [v for v in values if v == v]
        if finite:
            final.append({"MetricName": metric, "Value": finite[-1], "Timestamp": ended})
    return final


def outcome(run: Run, job: JobRequest, box: Sandbox, log_text: str) -> tuple[str, str, str | None, str | None]:
    """(TrainingJobStatus, SecondaryStatus, FailureReason, local failure kind) of a finished run."""
    secondary, failure_kind = run.secondary, None
    if secondary == "Completed" and run.returncode != 0:
        status, secondary = "Failed", "Failed"
        failure_file = box.output / "failure"
        reason = failure_file.read_text().strip() if failure_file.exists() else ""
        tail = " | ".join(log_text.strip().splitlines()[-5:])[-800:]
        if run.returncode < 0:
            # killed from outside (OOM killer, a signal): the platform's fault, retryable
            # under a SageMaker.JOB_INTERNAL_ERROR RetryPolicy
            failure_kind = "JOB_INTERNAL_ERROR"
            reason = reason or f"InternalServerError: the job's process was killed by signal {-run.returncode}: {tail}"
        reason = reason or f"AlgorithmError: exit code {run.returncode}: {tail}"
    elif secondary == "Completed":
        status, reason = "Completed", None
    else:
        status = "Stopped"
        reason = (f"MaxRuntimeExceeded: stopped after {job.max_runtime} s (StoppingCondition.MaxRuntimeInSeconds)"
                  if secondary == "MaxRuntimeExceeded" else "Stopped by the tuning job (early stopping)")
    return status, secondary, reason, failure_kind


def store_outputs(job: JobRequest, box: Sandbox, store: LocalStore) -> tuple[str, dict]:
    """model.tar.gz, output.tar.gz, checkpoints, Debugger tensors and profiler output into the
    store, where AWS puts them; (model URI, profiler summary)."""
    name, output_dir, hook, profiler = job.name, box.output, job.hook, job.profiler
    prefix = f"{job.out_path.rstrip('/')}/{name}"
    model_uri = pack_dir(box.model, store, f"{prefix}/output/model.tar.gz")
    pack_dir(output_dir / "data", store, f"{prefix}/output/output.tar.gz")
    if isinstance(job.checkpoint_uri, str) and any(box.checkpoints.iterdir()):
        store.put_dir(job.checkpoint_uri, box.checkpoints)
    if hook and (output_dir / "tensors").exists() and isinstance(hook.get("S3OutputPath"), str):
        store.put_dir(f"{hook['S3OutputPath'].rstrip('/')}/{name}/debug-output", output_dir / "tensors")
    profile = {}
    if job.profiling:
        profile = profiler_summary(output_dir / "profiler" / "system_metrics.jsonl")
        write_json(output_dir / "profiler" / "system_summary.json", profile)
        for extra in (output_dir / "data").glob("*profil*"):  # the job's own torch.profiler summary
            if extra.is_dir():
                shutil.copytree(extra, output_dir / "profiler" / "framework", dirs_exist_ok=True)
            elif extra.is_file():
                shutil.copy2(extra, output_dir / "profiler" / extra.name)
        if isinstance(profiler.get("S3OutputPath"), str):
            store.put_dir(f"{profiler['S3OutputPath'].rstrip('/')}/{name}/profiler-output", output_dir / "profiler")
    return model_uri, profile


def describe_job(job: JobRequest, box: Sandbox, created: str, run: Run, status: str, secondary: str,
                 reason: str | None, failure_kind: str | None, model_uri: str, final: list[dict],
                 profile: dict) -> dict:
    """The result in the shape of DescribeTrainingJob (+ Local* extensions)."""
    request, ended = job.request, run.ended
    describe = {
        "TrainingJobName": job.name,
        "TrainingJobArn": arn("training-job", job.name),
        "TrainingJobStatus": status,
        "SecondaryStatus": secondary,
        "HyperParameters": job.hps_raw,
        "AlgorithmSpecification": job.algo,
        "RoleArn": request.get("RoleArn"),
        "InputDataConfig": job.channels,
        "OutputDataConfig": request.get("OutputDataConfig"),
        "ResourceConfig": job.resources,
        "StoppingCondition": request.get("StoppingCondition") or {},
        "CreationTime": created, "TrainingStartTime": run.started, "TrainingEndTime": ended,
        "LastModifiedTime": ended,
        "TrainingTimeInSeconds": run.seconds, "BillableTimeInSeconds": run.seconds,
        "ModelArtifacts": {"S3ModelArtifacts": model_uri},
        "FinalMetricDataList": final,
        "SecondaryStatusTransitions": [
            {"Status": "Starting", "StartTime": created, "EndTime": run.started},
            {"Status": "Training", "StartTime": run.started, "EndTime": ended},
            {"Status": secondary, "StartTime": ended, "EndTime": ended}],
        "Environment": request.get("Environment") or {},
        "EnableNetworkIsolation": False,
    }
    if reason:
        describe["FailureReason"] = reason
    if failure_kind:
        describe["LocalFailureKind"] = failure_kind
    for key in ("DebugHookConfig", "DebugRuleConfigurations", "ProfilerConfig", "ProfilerRuleConfigurations",
                "CheckpointConfig", "TensorBoardOutputConfig", "ExperimentConfig"):
        if request.get(key) is not None:
            describe[key] = request[key]
    if job.profiling:
        describe["ProfilingStatus"] = "Enabled"
        describe["ProfilerSummary"] = profile  # local extension: the sampled CPU/memory
    describe["LocalJobDir"] = str(box.job_dir)  # local extension: where the sandbox and log are
    return describe


def _num_gpus() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=5).stdout
        return sum(1 for line in out.splitlines() if line.startswith("GPU"))
    except (OSError, subprocess.SubprocessError):
        return 0
