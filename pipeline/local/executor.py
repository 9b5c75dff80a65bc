"""Run a SageMaker pipeline definition JSON on this machine: no AWS, no Docker.

    execute(definition JSON, store=LocalStore, run_dir=...) -> the execution record

The pure interpreter: it reads the definition JSON and the object store, and imports nothing
of the config, the steps or the SageMaker SDK (pipeline/local_run.py is the host side that
prepares data and code, as pipeline/aws.py does for SageMaker). It interprets the same bytes AWS
gets: Parameters (defaults + overrides), Get /
Std:Join / Std:JsonGet, DependsOn and data dependencies in topological order,
Condition steps with their If/Else branches, Fail steps, RetryPolicies and
CacheConfig. Step runners: Training (jobs.py), Tuning (tuner.py), Debugger rules
(rules.py), Model / RegisterModel (a local registry), EndpointConfig / Endpoint
(pipeline.serve). S3 URIs resolve against the local object store (store.py).

The run dir holds the execution record (execution.json, rewritten atomically after
every change), the definition that ran, one folder per step (job sandboxes and
logs) and the report. Running the same command again after a Ctrl-C or a kill
resumes that execution: finished steps and tuning trials are not redone.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import signal
import sys
import tarfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import DefinitionError
from pipeline.formats import duration_seconds
from pipeline.local import expressions as ex
from pipeline.local.dag import Dag
from pipeline.local.document import load_definition
from pipeline.local.jobs import JobError, arn, bar, now_iso, read_json, run_training_job, write_json
from pipeline.local.store import LocalStore
from pipeline.local.tuner import TuningError, run_tuning_job
from pipeline.params import resolve_parameters
from pipeline.processes import stop_group
from scripts import metrics

SUPPORTED = ("Training", "Tuning", "Model", "RegisterModel", "Condition", "Fail", "EndpointConfig", "Endpoint")
RESUMABLE = ("Executing", "Stopping", "Stopped")
# the summary lines of a training log echoed with its progress
SHOWN_SUMMARIES = ("test accuracy", "average test loss", "validation accuracy")


class StepFailed(Exception):
    def __init__(self, reason: str, retry_kind: str | None = None):
        super().__init__(reason)
        self.reason, self.retry_kind = reason, retry_kind


# ---------------------------------------------------------------- definition



def parse_parameters(definition: dict, overrides: list[str] | dict | None) -> dict[str, Any]:
    """Defaults + overrides, typed; a ParameterError (a DefinitionError) names a bad one."""
    return resolve_parameters(definition, overrides)


def _duration_s(text: str | None) -> float | None:
    """ISO 8601 durations as CacheConfig.ExpireAfter uses them (P30D, PT1H, P1DT12H)."""
    if not text:
        return None
    seconds = duration_seconds(text)
    if seconds is None:
        raise DefinitionError(f"CacheConfig.ExpireAfter {text!r} is not an ISO 8601 duration like P30D or PT1H")
    return seconds


# ---------------------------------------------------------------- execution

class Execution:
    def __init__(self, definition: dict, store: LocalStore, run_dir: Path, *, parameters: dict,
                 pipeline_name: str, progress: Callable[[str], None] = print, keep_endpoint: bool = False,
                 python: str = sys.executable, endpoint_runtime: str = "local"):
        self.definition, self.store, self.run_dir = definition, store, Path(run_dir)
        self.progress, self.keep_endpoint, self.python = progress, keep_endpoint, python
        self.endpoint_runtime = endpoint_runtime  # "local" (pipeline/serve.py) or "sagemaker" (the real stack)
        dag = Dag(definition)
        self.flat, self.deps, self.order = dag.steps, dag.predecessors, dag.order
        self.definition_sha = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
        self.registry = store.root / ".sagemaker"  # the control plane's records: models, endpoints, cache
        self.endpoints: list = []
        self.missing_metrics: dict[str, str] = {}   # condition step -> why its metric could not be read
        self.t0 = time.monotonic()
        previous = read_json(self.run_dir / "execution.json")
        if (previous and previous.get("PipelineExecutionStatus") in RESUMABLE
                and previous.get("DefinitionSha256") == self.definition_sha
                and previous.get("ParameterValues") == json.loads(json.dumps(parameters))):
            self.record = previous
            self.resumed = True
        else:
            if previous and previous.get("PipelineExecutionStatus") in RESUMABLE:
                progress(f"execution {previous['PipelineExecutionId']} was interrupted, but the definition or "
                         "parameters differ now: starting a new execution (cached steps still apply)")
            exec_id = secrets.token_hex(6)
            self.record = {
                "PipelineName": pipeline_name,
                "PipelineArn": arn("pipeline", pipeline_name),
                "PipelineExecutionId": exec_id,
                "PipelineExecutionArn": f"{arn('pipeline', pipeline_name)}/execution/{exec_id}",
                "PipelineExecutionStatus": "Executing",
                "StartTime": now_iso(),
                "Parameters": [{"Name": k, "Value": ex.to_text(v)} for k, v in parameters.items()],
                "ParameterValues": parameters,
                "DefinitionSha256": self.definition_sha,
                "Steps": {},
            }
            self.resumed = False
        self.record["PipelineExecutionStatus"] = "Executing"
        self.record.pop("FailureReason", None)
        self.ctx = ex.Context(
            parameters=parameters,
            execution={"PipelineExecutionId": self.record["PipelineExecutionId"],
                       "PipelineExecutionArn": self.record["PipelineExecutionArn"],
                       "PipelineName": pipeline_name, "PipelineArn": self.record["PipelineArn"],
                       "StartDateTime": self.record["StartTime"], "CurrentDateTime": now_iso(),
                       "_property_file_owners": {pf["PropertyFileName"]: n for n, i in self.flat.items()
                                                 for pf in i.step.get("PropertyFiles", []) or []}},
            property_file_loader=self._property_file,
            s3_json_loader=lambda uri: ex.read_json_file(self.store.path(uri), uri))
        for name, rec in self.record["Steps"].items():
            if rec.get("StepStatus") == "Succeeded":
                self.ctx.properties[name] = rec.get("Properties", {})

    # -- bookkeeping
    def save(self) -> None:
        self.record["LastModifiedTime"] = now_iso()
        write_json(self.run_dir / "execution.json", self.record)

    def say(self, text: str) -> None:
        self.progress(f"[{time.monotonic() - self.t0:6.0f}s] {text}")

    def step_dir(self, name: str) -> Path:
        """Per execution, so a new execution never reuses an old one's job names or trials."""
        return self.run_dir / "steps" / self.record["PipelineExecutionId"] / re.sub(r"[^A-Za-z0-9_.-]", "_", name)

    # -- the run
    def run(self) -> dict:
        self.save()
        if self.resumed:
            done = [n for n, r in self.record["Steps"].items() if r.get("StepStatus") == "Succeeded"]
            self.say(f"resuming execution {self.record['PipelineExecutionId']}: "
                     f"{len(done)} step(s) already succeeded ({', '.join(done) or 'none'})")
        else:
            self.say(f"execution {self.record['PipelineExecutionId']} of {self.record['PipelineName']}: "
                     f"{len(self.order)} steps; run dir {self.run_dir}")
        failed: str | None = None
        for name in self.order:
            info = self.flat[name]
            rec = self.record["Steps"].get(name)
            if rec and rec.get("StepStatus") == "Succeeded":
                self.say(f"{name} ({info.step['Type']}): Succeeded earlier, not redone")
                continue
            if failed:
                break  # AWS stops scheduling new steps once one fails
            if not self._branch_taken(name) or any(
                    self.record["Steps"].get(d, {}).get("StepStatus") == "NotExecuted" for d in self.deps[name]):
                self.record["Steps"][name] = {"StepName": name, "StepType": info.step["Type"],
                                              "StepStatus": "NotExecuted"}
                continue
            status = self._run_step(name, info.step)
            if status == "Failed":
                failed = name
            self.save()
        if failed:
            self.record["PipelineExecutionStatus"] = "Failed"
            self.record["FailureReason"] = f"Step {failed} failed: {self.record['Steps'][failed].get('FailureReason')}"
        else:
            self.record["PipelineExecutionStatus"] = "Succeeded"
        self.record["EndTime"] = now_iso()
        self.save()
        return self.record

    def _branch_taken(self, name: str) -> bool:
        info = self.flat[name]
        if not info.condition:
            return True
        cond = self.record["Steps"].get(info.condition, {})
        outcome = cond.get("Properties", {}).get("Outcome")
        return cond.get("StepStatus") == "Succeeded" and outcome == ("True" if info.branch == "If" else "False")

    def _run_step(self, name: str, step: dict) -> str:
        kind = step["Type"]
        rec = {"StepName": name, "StepType": kind, "StepStatus": "Executing", "StartTime": now_iso(),
               "AttemptCount": 0}
        if step.get("DisplayName"):
            rec["StepDisplayName"] = step["DisplayName"]
        self.record["Steps"][name] = rec
        self.save()
        self.say(f"{name} ({kind}): Executing")
        t0 = time.monotonic()
        policies = step.get("RetryPolicies") or []
        attempt = 0
        while True:
            attempt += 1
            rec["AttemptCount"] = attempt
            try:
                self.ctx.execution["CurrentDateTime"] = now_iso()
                if kind == "Condition":  # record what was compared, not the branches
                    args = {}
                    rec["Arguments"] = {"Conditions": self._gate_operands(name, step)}
                elif kind == "Fail":
                    args = rec["Arguments"] = self._fail_arguments(name, step)
                else:
                    args = rec["Arguments"] = ex.resolve(step.get("Arguments", {}), self.ctx)
                cached = self._cache_lookup(name, step, args)
                if cached:
                    rec["Properties"], rec["CacheHitResult"] = cached
                    self.say(f"{name}: cache hit (from execution "
                             f"{rec['CacheHitResult']['SourcePipelineExecutionArn'].rsplit('/', 1)[-1]})")
                else:
                    rec["Properties"] = self._dispatch(name, kind, step, args)
                    self._cache_store(name, step, args, rec["Properties"])
                rec["StepStatus"] = "Succeeded"
                break
            except Exception as e:  # noqa: BLE001 - every failure is the step's, with its reason
                if isinstance(e, (StepFailed, ex.ExpressionError, JobError, TuningError, DefinitionError)):
                    reason = e.reason if isinstance(e, StepFailed) else f"{type(e).__name__}: {e}"
                    retry_kind = e.retry_kind if isinstance(e, StepFailed) else None
                else:  # our own fault, not the definition's: AWS calls that a service fault
                    import traceback
                    trace = self.step_dir(name) / "error.txt"
                    trace.parent.mkdir(parents=True, exist_ok=True)
                    trace.write_text(traceback.format_exc())
                    reason = f"InternalError: {type(e).__name__}: {e} (traceback: {trace})"
                    retry_kind = "SERVICE_FAULT"
                wait = _retry_wait(policies, retry_kind, attempt)
                if wait is not None:
                    self.say(f"{name}: attempt {attempt} failed ({reason[:120]}); retrying in {wait:g}s "
                             f"(RetryPolicies {retry_kind})")
                    time.sleep(wait)
                    continue
                rec["StepStatus"], rec["FailureReason"] = "Failed", reason
                if isinstance(e, StepFailed) and getattr(e, "properties", None):
                    rec["Properties"] = e.properties
                break
        rec["EndTime"] = now_iso()
        if rec["StepStatus"] == "Succeeded":
            self.ctx.properties[name] = rec["Properties"]
        extra = ""
        if kind == "Condition" and rec["StepStatus"] == "Succeeded":
            extra = f" -> {'IfSteps' if rec['Properties']['Outcome'] == 'True' else 'ElseSteps'}"
        self.say(f"{name} ({kind}): {rec['StepStatus']}{extra} ({time.monotonic() - t0:.0f}s)"
                 + (f": {rec['FailureReason']}" if rec.get("FailureReason") else ""))
        return rec["StepStatus"]

    # -- a gate metric that was never emitted: the Fail step says so, not a step error
    def _gate_operands(self, name: str, step: dict) -> list:
        """The condition's resolved operands. A metric missing from FinalMetricDataList (the
        script never printed it) takes the Else branch with the reason, recorded as
        LocalMissingMetric: the definition language has no 'exists' test to say it itself."""
        conditions = step["Arguments"].get("Conditions", [])
        try:
            return ex.resolve(conditions, self.ctx)
        except ex.ExpressionError as e:
            if not _missing_metric(e):
                raise
            self.missing_metrics[name] = (f"{e}: the training job never emitted this metric (its log has no line "
                                          f"the metric's regex matches), so the model was not deployed")
            return conditions

    def _fail_arguments(self, name: str, step: dict) -> dict:
        try:
            return ex.resolve(step.get("Arguments", {}), self.ctx)
        except ex.ExpressionError as e:
            cond = self.record["Steps"].get(self.flat[name].condition or "", {})
            reason = cond.get("Properties", {}).get("LocalMissingMetric")
            if not (_missing_metric(e) and reason):
                raise
            return {"ErrorMessage": reason}

    # -- caching: same step type + same resolved arguments -> same result
    def _cache_key(self, name: str, step: dict, args: dict) -> str:
        blob = json.dumps({"Type": step["Type"], "Name": name, "Arguments": args}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _cache_lookup(self, name: str, step: dict, args: dict):
        cfg = step.get("CacheConfig") or {}
        if not cfg.get("Enabled") or step["Type"] not in ("Training", "Tuning"):
            return None
        entry = read_json(self.registry / "cache" / f"{self._cache_key(name, step, args)}.json")
        if not entry:
            return None
        expire = _duration_s(cfg.get("ExpireAfter"))
        age = time.time() - entry["time"]
        if expire is not None and age > expire:
            return None
        model = entry["properties"].get("ModelArtifacts", {}).get("S3ModelArtifacts")
        if model and not self.store.exists(model):
            return None  # the artifact it promises is gone
        return entry["properties"], {"SourcePipelineExecutionArn": entry["execution_arn"]}

    def _cache_store(self, name: str, step: dict, args: dict, properties: dict) -> None:
        if (step.get("CacheConfig") or {}).get("Enabled") and step["Type"] in ("Training", "Tuning"):
            write_json(self.registry / "cache" / f"{self._cache_key(name, step, args)}.json",
                       {"time": time.time(), "execution_arn": self.record["PipelineExecutionArn"],
                        "step": name, "properties": properties})

    # -- property files (Std:JsonGet): read from the job's output.tar.gz, then model.tar.gz
    def _property_file(self, step_name: str, file_name: str) -> Any:
        info = self.flat.get(step_name)
        decl = next((pf for pf in (info.step.get("PropertyFiles") or []) if pf.get("PropertyFileName") == file_name),
                    None) if info else None
        if decl is None:
            raise ex.ExpressionError(f"step {step_name!r} declares no property file {file_name!r}")
        props = self.ctx.properties.get(step_name, {})
        model = props.get("ModelArtifacts", {}).get("S3ModelArtifacts")
        if not model:
            raise ex.ExpressionError(f"property file {file_name}: step {step_name} has no job output")
        archives = [model.rsplit("/", 1)[0] + "/output.tar.gz", model]
        if decl.get("OutputName") == "model":
            archives.reverse()
        for uri in archives:
            path = self.store.path(uri)
            if not path.is_file():
                continue
            with tarfile.open(path) as tar:
                try:
                    member = tar.extractfile(decl["FilePath"].lstrip("/"))
                except KeyError:
                    continue
                if member is not None:
                    return json.load(io.TextIOWrapper(member))
        raise ex.ExpressionError(f"property file {file_name}: {decl['FilePath']} is in none of {archives}")

    # -- step runners
    def _dispatch(self, name: str, kind: str, step: dict, args: dict) -> dict:
        if kind == "Training":
            return self._training(name, args)
        if kind == "Tuning":
            return self._tuning(name, args)
        if kind == "Condition":
            if name in self.missing_metrics:
                return {"Outcome": "False", "LocalMissingMetric": self.missing_metrics[name]}
            outcome = all(ex.evaluate_condition(c, self.ctx) for c in step["Arguments"].get("Conditions", []))
            return {"Outcome": "True" if outcome else "False"}
        if kind == "Fail":
            message = ex.to_text(args.get("ErrorMessage", ""))
            self.record["FailStepMessage"] = message
            raise StepFailed(message)
        if kind == "Model":
            return self._model(name, args)
        if kind == "RegisterModel":
            return self._register(name, args)
        if kind == "EndpointConfig":
            return self._endpoint_config(args)
        if kind == "Endpoint":
            return self._endpoint(name, args)
        raise StepFailed(f"step type {kind!r} is not supported by the local executor; supported: {list(SUPPORTED)}")

    def _job_name(self, name: str, limit: int = 63) -> str:
        stem = re.sub(r"[^A-Za-z0-9-]", "-", name)[:24]
        return f"pipelines-{self.record['PipelineExecutionId']}-{stem}-{secrets.token_hex(3)}"[:limit]

    def _epoch_printer(self, label: str) -> Callable[[str], None]:
        def on_line(line: str) -> None:
            progress = metrics.epoch_progress(line)
            if progress:
                done, total, rest = progress
                self.say(f"  {label} epoch {done}/{total} {bar(done, total)} {rest[:100]}")
            elif metrics.summary_name(line) in SHOWN_SUMMARIES:
                self.say(f"  {label} {line.strip()}")
        return on_line

    def _training(self, name: str, args: dict) -> dict:
        sdir = self.step_dir(name)
        previous = read_json(sdir / "job_name.json")  # resume: the same job name keeps its checkpoints
        job = previous or self._job_name(name)
        write_json(sdir / "job_name.json", job)
        if args.get("DebugRuleConfigurations"):
            # smdebug takes seconds to import: do it while the job trains, as AWS runs rules alongside
            import importlib
            import threading
            threading.Thread(target=importlib.import_module, args=("pipeline.local.rules",), daemon=True).start()
        describe = run_training_job(job, args, self.store, sdir / "job", on_line=self._epoch_printer(name),
                                    python=self.python)
        tensors = Path(describe["LocalJobDir"]) / "opt_ml" / "output" / "tensors"
        if args.get("DebugRuleConfigurations"):
            from pipeline.local import rules  # smdebug is slow to import: only when rules are asked for
            describe["DebugRuleEvaluationStatuses"] = rules.evaluate_rules(
                args["DebugRuleConfigurations"], tensors, job)
            for s in describe["DebugRuleEvaluationStatuses"]:
                self.say(f"  {name} rule {s['RuleConfigurationName']}: {s['RuleEvaluationStatus']} "
                         f"({s['StatusDetails'][:100]})")
        if args.get("ProfilerRuleConfigurations"):
            describe["ProfilerRuleEvaluationStatuses"] = [
                {"RuleConfigurationName": c.get("RuleConfigurationName"),
                 "RuleEvaluationJobArn": arn("processing-job", f"{job[:40]}-{c.get('RuleConfigurationName', '')[:20]}"),
                 "RuleEvaluationStatus": "NoIssuesFound" if describe.get("ProfilerSummary", {}).get("samples")
                 else "Error",
                 "StatusDetails": f"system metrics: {json.dumps(describe.get('ProfilerSummary', {}))}",
                 "LastModifiedTime": now_iso()} for c in args["ProfilerRuleConfigurations"]]
        if describe["TrainingJobStatus"] != "Completed":
            err = StepFailed(f"{describe['TrainingJobStatus']}: {describe.get('FailureReason', '')}",
                             describe.get("LocalFailureKind"))
            err.properties = describe
            raise err
        return describe

    def _tuning(self, name: str, args: dict) -> dict:
        sdir = self.step_dir(name)
        job = read_json(sdir / "job_name.json") or (
            f"{self.record['PipelineExecutionId'][:12]}-{re.sub(r'[^A-Za-z0-9-]', '-', name)[:12]}-"
            f"{secrets.token_hex(2)}")
        write_json(sdir / "job_name.json", job)
        describe = run_tuning_job(job, args, self.store, sdir, progress=self.say)
        write_json(sdir / "leaderboard.json", describe.get("TrainingJobSummaries", []))
        if describe["HyperParameterTuningJobStatus"] != "Completed":
            err = StepFailed(describe.get("FailureReason", "tuning job failed"))
            err.properties = describe
            raise err
        best = describe["BestTrainingJob"]
        self.say(f"  {name} best: {best['TrainingJobName']} "
                 f"{best['FinalHyperParameterTuningJobObjectiveMetric']['MetricName']}="
                 f"{best['FinalHyperParameterTuningJobObjectiveMetric']['Value']:.4g} {best['TunedHyperParameters']}")
        return describe

    def _put_record(self, kind: str, name: str, data: dict) -> None:
        write_json(self.registry / kind / f"{name}.json", data)

    def _get_record(self, kind: str, name: str, what: str) -> dict:
        data = read_json(self.registry / kind / f"{name}.json")
        if data is None:
            raise StepFailed(f"{what} {name!r} does not exist (ValidationException)")
        return data

    def _model(self, name: str, args: dict) -> dict:
        containers = [args["PrimaryContainer"]] if args.get("PrimaryContainer") else args.get("Containers", [])
        if not containers:
            raise StepFailed("CreateModel needs PrimaryContainer or Containers")
        for c in containers:
            url = c.get("ModelDataUrl")
            if url and not self.store.exists(url):
                raise StepFailed(f"ModelDataUrl {url} is not in the local store")
        model_name = args.get("ModelName") or self._job_name(name)
        describe = {"ModelName": model_name, "ModelArn": arn("model", model_name),
                    "PrimaryContainer": containers[0], "Containers": containers,
                    "ExecutionRoleArn": args.get("ExecutionRoleArn"), "CreationTime": now_iso(),
                    "EnableNetworkIsolation": bool(args.get("EnableNetworkIsolation", False))}
        self._put_record("models", model_name, describe)
        return describe

    def _register(self, name: str, args: dict) -> dict:
        group = args.get("ModelPackageGroupName")
        if not group:
            raise StepFailed("RegisterModel needs ModelPackageGroupName")
        gdir = self.registry / "model-packages" / group
        version = len(list(gdir.glob("*.json"))) + 1 if gdir.exists() else 1
        describe = {"ModelPackageGroupName": group, "ModelPackageVersion": version,
                    "ModelPackageName": f"{group}/{version}",
                    "ModelPackageArn": arn("model-package", f"{group}/{version}"),
                    "ModelPackageStatus": "Completed", "ModelApprovalStatus": args.get("ModelApprovalStatus",
                                                                                       "PendingManualApproval"),
                    "InferenceSpecification": args.get("InferenceSpecification"),
                    "ModelMetrics": args.get("ModelMetrics"), "CustomerMetadataProperties":
                        args.get("CustomerMetadataProperties"), "CreationTime": now_iso()}
        write_json(gdir / f"{version:04d}.json", describe)
        return describe

    def _endpoint_config(self, args: dict) -> dict:
        cname = args.get("EndpointConfigName")
        variants = args.get("ProductionVariants") or []
        if not cname or not variants:
            raise StepFailed("EndpointConfig needs EndpointConfigName and ProductionVariants")
        for v in variants:
            self._get_record("models", v.get("ModelName"), "model")
        describe = {"EndpointConfigName": cname, "EndpointConfigArn": arn("endpoint-config", cname),
                    "ProductionVariants": variants, "CreationTime": now_iso()}
        self._put_record("endpoint-configs", cname, describe)
        return describe

    def _endpoint(self, name: str, args: dict) -> dict:
        ename, cname = args.get("EndpointName"), args.get("EndpointConfigName")
        config = self._get_record("endpoint-configs", cname, "endpoint config")
        model = self._get_record("models", config["ProductionVariants"][0]["ModelName"], "model")
        container = model["PrimaryContainer"]
        model_path = self.store.path(container["ModelDataUrl"])
        old = read_json(self.registry / "endpoints" / f"{ename}.json")
        refusal = endpoint_refusal(old, ename, self.registry / "endpoints" / f"{ename}.json")
        if refusal:
            raise StepFailed(refusal)
        if old and old.get("LocalPid"):
            # UpdateEndpoint: the new model replaces the old one; or a run killed while this
            # step waited left its server running (recorded as Creating below): stop it too.
            _stop_pid(old["LocalPid"], old.get("LocalStartTime"))
        log_path = self.step_dir(name) / "endpoint.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if self.endpoint_runtime == "sagemaker":  # the PyTorch inference image's own serving stack
                from pipeline.runtime.serving import launch as launch_sagemaker
                endpoint = launch_sagemaker(model_path, env=container.get("Environment") or {}, log_path=log_path,
                                            workdir=self.step_dir(name) / "serving")
            else:
                from pipeline.serve import launch
                endpoint = launch(model_path, env=container.get("Environment") or {}, log_path=log_path)
        except (RuntimeError, FileNotFoundError, ValueError) as e:
            raise StepFailed(f"endpoint could not start: {e}") from None
        self.endpoints.append(endpoint)
        # Recorded before waiting: if this run is killed (SIGKILL, no cleanup) the server lives on
        # in its own session, and only this record lets the rerun find and stop it.
        self._put_record("endpoints", ename, {"EndpointName": ename, "EndpointConfigName": cname,
                                              "EndpointStatus": "Creating", "LocalPid": endpoint.pid,
                                              "LocalStartTime": _start_time(endpoint.pid), "CreationTime": now_iso()})
        try:
            endpoint.wait_ready(timeout=180)
        except (RuntimeError, TimeoutError) as e:
            # As on AWS, an endpoint that never came up is Failed (the old model was already stopped)
            self._put_record("endpoints", ename, {"EndpointName": ename, "EndpointArn": arn("endpoint", ename),
                                                  "EndpointConfigName": cname, "EndpointStatus": "Failed",
                                                  "FailureReason": str(e)[:1024], "LastModifiedTime": now_iso()})
            raise StepFailed(f"endpoint did not become InService: {e}") from None
        smoke = _smoke_invoke(endpoint.url)
        self.say(f"  {name}: InService at {endpoint.url} (smoke test: {smoke})")
        describe = {"EndpointName": ename, "EndpointArn": arn("endpoint", ename), "EndpointConfigName": cname,
                    "EndpointStatus": "InService", "ProductionVariants": [
                        {"VariantName": v.get("VariantName"), "CurrentInstanceCount": v.get("InitialInstanceCount", 1)}
                        for v in config["ProductionVariants"]],
                    "CreationTime": now_iso(), "LastModifiedTime": now_iso(),
                    "LocalUrl": endpoint.url, "LocalPid": endpoint.pid,
                    "LocalStartTime": _start_time(endpoint.pid), "LocalSmokeTest": smoke}
        self._put_record("endpoints", ename, describe)
        return describe

    def close(self) -> None:
        for endpoint in self.endpoints:
            if self.keep_endpoint:
                stop = f"kill -- -{endpoint.pid}" if self.endpoint_runtime == "sagemaker" else f"kill {endpoint.pid}"
                self.say(f"endpoint kept up at {endpoint.url} (pid {endpoint.pid}); stop it with {stop}")
            else:
                endpoint.stop()


def _missing_metric(e: Exception) -> bool:
    """An ExpressionError for a FinalMetricDataList entry the job never reported."""
    return "FinalMetricDataList" in str(e) and "no element named" in str(e)


# EndpointStep on AWS: CreateEndpoint, or UpdateEndpoint when the endpoint exists. UpdateEndpoint
# refuses an endpoint that is still changing, and one that failed (SageMaker cannot update it:
# it must be deleted). The local registry answers the same way.
ENDPOINT_IN_PROGRESS = ("Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting")


def endpoint_refusal(old: dict | None, ename: str, record_path) -> str | None:
    """Why DeployEndpoint cannot create or update endpoint `ename` given its current record, or None."""
    status = (old or {}).get("EndpointStatus")
    if status == "Creating" and (old or {}).get("LocalPid"):
        # Recorded by a local run before it waited for its server, and that run never finished
        # (killed): nothing is creating it any more. The caller stops the orphaned server.
        return None
    if status in ENDPOINT_IN_PROGRESS:
        return (f"ValidationException: Cannot update in-progress endpoint {ename!r} (EndpointStatus {status}): "
                f"wait until it is InService, then run the pipeline again")
    if status == "Failed":
        return (f"ValidationException: endpoint {ename!r} is Failed ({old.get('FailureReason') or 'no reason'}) and "
                f"cannot be updated: delete it (locally: rm {record_path}; on AWS: run_pipeline.py --cleanup), "
                f"then run the pipeline again")
    return None


def _start_time(pid: int) -> float | None:
    """The process's start time: with the pid, what tells our server from a later process
    that got the same pid."""
    import psutil
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _stop_pid(pid: int, start_time: float | None = None) -> None:
    """Stop an endpoint server from an earlier run (kept, or orphaned by a killed run), only if
    that pid is still our server: same start time (when recorded), `pipeline.serve` in its
    command line, leader of its own process group (launch starts a new session). The whole
    group gets SIGTERM (graceful drain), then SIGKILL after 30 s."""
    import psutil
    try:
        proc = psutil.Process(int(pid))
        if start_time is not None and abs(proc.create_time() - float(start_time)) > 0.01:
            return
        command = " ".join(proc.cmdline())
        ours = "pipeline.serve" in command or "sagemaker_pytorch_serving_container" in command
        if not ours or os.getpgid(proc.pid) != proc.pid:
            return
        def reap():  # when the server is this process's own child (psutil then collects it)
            with contextlib.suppress(psutil.Error):
                proc.wait(0)

        # the whole group: our server, or the toolkit with TorchServe's Java process and its workers
        stop_group(proc.pid, 30, reap=reap)
        with contextlib.suppress(psutil.Error):
            proc.wait(10)
    except (psutil.Error, ProcessLookupError, PermissionError, ValueError, TypeError):
        pass


def _smoke_invoke(url: str) -> str:
    """One real request over HTTP: a small JPEG in, JSON out."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 80, 40)).save(buf, format="JPEG")
    req = urllib.request.Request(url + "/invocations", data=buf.getvalue(), method="POST",
                                 headers={"Content-Type": "image/jpeg", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as reply:
            body = reply.read()
            json.loads(body)
            return f"HTTP {reply.status}, {len(body)} bytes of JSON"
    except Exception as e:  # noqa: BLE001 - reported, the endpoint step decides
        raise StepFailed(f"endpoint smoke test failed: {type(e).__name__}: {e}") from None


def _retry_wait(policies: list[dict], kind: str | None, attempt: int) -> float | None:
    """Seconds to wait before the next attempt, or None when no policy retries this failure."""
    if not kind:
        return None
    for p in policies:
        types = p.get("ExceptionType", [])
        if any(t.split(".", 1)[-1] == kind for t in types):
            if attempt >= int(p.get("MaxAttempts", 1)):
                return None
            return float(p.get("IntervalSeconds", 1)) * float(p.get("BackoffRate", 2.0)) ** (attempt - 1)
    return None


# ---------------------------------------------------------------- entry point

def execute(definition: str | dict, *, store: LocalStore, run_dir: str | Path, params=None,
            pipeline_name: str = "pipeline", keep_endpoint: bool = False, progress=print,
            report: bool = True, endpoint_runtime: str = "local") -> dict:
    """Run a definition; the execution record. Ctrl-C / SIGTERM leaves a resumable record."""
    definition = load_definition(definition)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    parameters = parse_parameters(definition, params)
    lock = _lock_run_dir(run_dir)
    try:
        write_json(run_dir / "definition.json", definition)
        execution = Execution(definition, store, run_dir, parameters=parameters, pipeline_name=pipeline_name,
                              progress=progress, keep_endpoint=keep_endpoint, endpoint_runtime=endpoint_runtime)
    except BaseException:
        lock.close()
        raise

    def on_term(signum, frame):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    try:
        record = execution.run()
    except KeyboardInterrupt:
        rec = execution.record
        rec["PipelineExecutionStatus"] = "Stopped"
        for s in rec["Steps"].values():
            if s.get("StepStatus") == "Executing":
                s["StepStatus"], s["FailureReason"] = "Stopped", "interrupted"
        execution.save()
        execution.say("interrupted: run the same command again to resume")
        raise
    finally:
        execution.close()
        lock.close()
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    if report:
        try:
            from pipeline.local.report import write_report
            path = write_report(run_dir, record, definition, store)
            execution.say(f"report: {path}")
        except Exception as e:  # noqa: BLE001 - the run's result stands without its report
            execution.say(f"report could not be written: {type(e).__name__}: {e}")
    return record


def _lock_run_dir(run_dir: Path):
    """One execution per run dir at a time; the lock dies with the process, however it ends."""
    import fcntl
    f = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise DefinitionError(f"{run_dir} is in use by another execution (pid {holder}); "
                              "wait for it or pass another --run-dir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
