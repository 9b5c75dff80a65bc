"""A hyperparameter tuning job, run here: Optuna over the definition's ParameterRanges.

The request is the Tuning step's resolved Arguments (CreateHyperParameterTuningJob):
HyperParameterTuningJobConfig (Strategy, ResourceLimits, ParameterRanges, objective,
TrainingJobEarlyStoppingType, RandomSeed) and TrainingJobDefinition (static
hyperparameters, image/metric definitions, channels, output path, stopping condition).
Each trial is a training job (jobs.run_training_job) named like AWS names them,
`<tuning job>-<NNN>-<8 hex>`, with the tuned values merged over the static ones and
`_tuning_objective_metric` added, as AWS does. Up to MaxParallelTrainingJobs run at
once. Early stopping ("Auto") is Optuna's median rule over the objective's
intermediate values in the trial's log. Finished trials are recorded (trials.json,
atomically) so an interrupted tuning job resumes without redoing them.
The result is DescribeHyperParameterTuningJob plus TrainingJobSummaries (best first).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from pipeline.errors import UserError
from pipeline.local.jobs import TUNING_METRIC, JobError, arn, bar, now_iso, read_json, run_training_job, write_json
from scripts import metrics

optuna.logging.set_verbosity(optuna.logging.WARNING)


class TuningError(UserError, ValueError):
    pass


# ---------------------------------------------------------------- ranges

def _num(value: Any, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TuningError(f"{where}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise TuningError(f"{where}: {value!r} is not a finite number")
    return number


def distributions(ranges: dict) -> dict[str, optuna.distributions.BaseDistribution]:
    """ParameterRanges -> Optuna distributions. ReverseLogarithmic samples 1-x on a log scale
    (see `to_hyperparameter`)."""
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    known = {"ContinuousParameterRanges", "IntegerParameterRanges", "CategoricalParameterRanges",
             "AutoParameters"}
    unknown = sorted(set(ranges or {}) - known)
    if unknown:
        raise TuningError(f"ParameterRanges: unknown keys {unknown}; known: {sorted(known)}")
    for r in (ranges or {}).get("ContinuousParameterRanges", []):
        where = f"ContinuousParameterRanges[{r.get('Name')}]"
        lo, hi = _num(r.get("MinValue"), where + ".MinValue"), _num(r.get("MaxValue"), where + ".MaxValue")
        if lo > hi:
            raise TuningError(f"{where}: MinValue {lo} > MaxValue {hi}")
        scaling = r.get("ScalingType", "Auto")
        if scaling == "Logarithmic":
            if lo <= 0:
                raise TuningError(f"{where}: Logarithmic scaling needs MinValue > 0")
            out[r["Name"]] = optuna.distributions.FloatDistribution(lo, hi, log=True)
        elif scaling == "ReverseLogarithmic":
            if not (0 <= lo and hi < 1):
                raise TuningError(f"{where}: ReverseLogarithmic scaling needs 0 <= MinValue, MaxValue < 1")
            out[r["Name"]] = optuna.distributions.FloatDistribution(1 - hi, 1 - lo, log=True)
        elif scaling in ("Auto", "Linear"):
            out[r["Name"]] = optuna.distributions.FloatDistribution(lo, hi)
        else:
            raise TuningError(f"{where}: ScalingType {scaling!r}; valid: Auto, Linear, Logarithmic, ReverseLogarithmic")
    for r in (ranges or {}).get("IntegerParameterRanges", []):
        where = f"IntegerParameterRanges[{r.get('Name')}]"
        lo, hi = int(_num(r.get("MinValue"), where)), int(_num(r.get("MaxValue"), where))
        if lo > hi:
            raise TuningError(f"{where}: MinValue {lo} > MaxValue {hi}")
        out[r["Name"]] = optuna.distributions.IntDistribution(lo, hi, log=r.get("ScalingType") == "Logarithmic")
    for r in (ranges or {}).get("CategoricalParameterRanges", []):
        values = r.get("Values") or []
        if not values:
            raise TuningError(f"CategoricalParameterRanges[{r.get('Name')}]: Values is empty")
        out[r["Name"]] = optuna.distributions.CategoricalDistribution(list(values))
    if not out:
        raise TuningError("ParameterRanges: no ranges to tune")
    return out


def _replay_draws(sampler, dists: dict, count: int) -> None:
    """Advance a freshly seeded sampler past the draws of `count` finished trials. Without
    this a resumed search restarts its random stream, and trial 2 gets trial 1's values
    (Random strategy, and Bayesian's random start-up trials). The draws go to a scratch
    study, so the real one holds only the finished trials themselves."""
    scratch = optuna.create_study(sampler=sampler)
    for _ in range(count):
        scratch.tell(scratch.ask(dists), state=optuna.trial.TrialState.FAIL)


def _reverse_log_names(ranges: dict) -> set[str]:
    return {r["Name"] for r in (ranges or {}).get("ContinuousParameterRanges", [])
            if r.get("ScalingType") == "ReverseLogarithmic"}


def to_hyperparameter(name: str, value: Any, reverse_log: set[str]) -> str:
    """How the chosen value is written into the trial's HyperParameters (strings, as AWS)."""
    if name in reverse_log:
        value = 1 - value
    if isinstance(value, float):
        return repr(value)
    return str(value)


# ---------------------------------------------------------------- the tuning job

def run_tuning_job(
    name: str,
    request: dict,
    store,
    step_dir: str | Path,
    *,
    progress: Callable[[str], None] = print,
    run_job: Callable[..., dict] = run_training_job,
) -> dict:
    step_dir = Path(step_dir)
    search = read_tuning_request(request)
    study, sampler = make_study(search)
    record_path = step_dir / "trials.json"
    done = resume_trials(study, sampler, search, record_path, progress)
    started = now_iso()
    t_start = time.monotonic()
    trials = Trials(name, search, study, done, record_path, store, step_dir, progress, run_job)
    todo = [i for i in range(1, search.max_jobs + 1) if i not in {t["index"] for t in done}]
    with ThreadPoolExecutor(max_workers=search.max_parallel) as pool:
        futures = [pool.submit(trials.run, i) for i in todo]
        try:
            for f in futures:
                f.result()
        except BaseException:
            trials.abort.set()
            for f in futures:
                f.cancel()
            raise
    if trials.cannot_start:
        raise TuningError(f"{trials.cannot_start[0]}; no further trials were launched")

    return describe_tuning_job(name, request, done, search.metric, search.direction, started,
                               time.monotonic() - t_start)


# The steps of run_tuning_job, in its order.

@dataclass
class Search:
    """What a tuning request asks for: the trials' job definition, limits, objective and ranges."""
    tjd: dict                        # TrainingJobDefinition: every trial's request, before its values
    max_jobs: int
    max_parallel: int
    metric: str
    direction: str                   # Maximize | Minimize
    dists: dict[str, optuna.distributions.BaseDistribution]
    reverse_log: set[str]
    objective_regex: re.Pattern      # the objective's own MetricDefinitions regex
    early: bool                      # TrainingJobEarlyStoppingType Auto
    seed: int
    strategy: str


def read_tuning_request(request: dict) -> Search:
    cfg = request.get("HyperParameterTuningJobConfig")
    tjd = request.get("TrainingJobDefinition") or (request.get("TrainingJobDefinitions") or [None])[0]
    if not cfg or not tjd:
        raise TuningError("Tuning step Arguments need HyperParameterTuningJobConfig and TrainingJobDefinition")
    limits = cfg.get("ResourceLimits") or {}
    max_jobs = int(limits.get("MaxNumberOfTrainingJobs", 1))
    max_parallel = max(1, int(limits.get("MaxParallelTrainingJobs", 1)))
    objective = cfg.get("HyperParameterTuningJobObjective") or {}
    metric, direction = objective.get("MetricName"), objective.get("Type", "Maximize")
    if direction not in ("Maximize", "Minimize"):
        raise TuningError(f"HyperParameterTuningJobObjective.Type {direction!r}; valid: Maximize, Minimize")
    ranges = cfg.get("ParameterRanges") or {}
    dists = distributions(ranges)
    reverse_log = _reverse_log_names(ranges)
    algo = tjd.get("AlgorithmSpecification") or {}
    defs = {d["Name"]: re.compile(d["Regex"]) for d in algo.get("MetricDefinitions") or []}
    if metric not in defs:
        raise TuningError(f"objective metric {metric!r} has no MetricDefinitions regex "
                          f"(have {sorted(defs)})")
    return Search(tjd=tjd, max_jobs=max_jobs, max_parallel=max_parallel, metric=metric, direction=direction,
                  dists=dists, reverse_log=reverse_log, objective_regex=defs[metric],
                  early=cfg.get("TrainingJobEarlyStoppingType", "Off") == "Auto",
                  seed=int(cfg.get("RandomSeed", 0)), strategy=cfg.get("Strategy", "Bayesian"))


def make_study(search: Search):
    """Random or Bayesian (TPE) sampling; the median rule prunes when early stopping is Auto."""
    sampler = optuna.samplers.RandomSampler(seed=search.seed) if search.strategy == "Random" else \
        optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=max(1, min(10, search.max_jobs // 2)))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=max(1, search.max_parallel), n_warmup_steps=1) \
        if search.early else optuna.pruners.NopPruner()
    return optuna.create_study(direction=search.direction.lower(), sampler=sampler, pruner=pruner), sampler


def resume_trials(study, sampler, search: Search, record_path: Path, progress: Callable[[str], None]) -> list[dict]:
    """The trials an earlier attempt finished (trials.json): they teach the sampler again, nothing re-runs."""
    dists = search.dists
    done: list[dict] = read_json(record_path, default=[]) or []
    for t in done:
        params = {k: v for k, v in t["params"].items() if k in dists}
        if len(params) != len(dists) or not all(dists[k]._contains(dists[k].to_internal_repr(v))
                                                 for k, v in params.items()):
            continue  # the ranges were edited since: that trial no longer belongs to this search
        state = optuna.trial.TrialState.COMPLETE if t["objective"] is not None else optuna.trial.TrialState.FAIL
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                  value=t["objective"] if state.name == "COMPLETE" else None,
                                                  state=state))
    if done:
        _replay_draws(sampler, dists, len(done))
        progress(f"  resuming: {len(done)}/{search.max_jobs} trials already finished")
    return done


class Trials:
    """Runs trials, up to MaxParallelTrainingJobs at once (run() per thread): ask the study,
    run the training job, tell the study, record the trial in trials.json."""

    def __init__(self, name: str, search: Search, study, done: list[dict], record_path: Path, store,
                 step_dir: Path, progress: Callable[[str], None], run_job: Callable[..., dict]):
        self.name, self.search, self.study, self.done = name, search, study, done
        self.record_path, self.store, self.step_dir = record_path, store, step_dir
        self.progress, self.run_job = progress, run_job
        self.lock = threading.Lock()
        self.abort = threading.Event()  # Ctrl-C / kill: stop running trials, record none of them
        self.cannot_start: list[str] = []
        self.static = dict(search.tjd.get("StaticHyperParameters") or {})
        self.static[TUNING_METRIC] = json.dumps(search.metric)

    def trial_name(self, index: int, params: dict) -> str:
        digest = hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]
        return f"{self.name[:32]}-{index:03d}-{digest}"

    def job_request(self, tuned: dict[str, str]) -> dict:
        """The trial's CreateTrainingJob request: the tuned values over the static ones."""
        job_request = {**self.search.tjd, "HyperParameters": {**self.static, **tuned}}
        job_request.pop("StaticHyperParameters", None)
        job_request.pop("HyperParameterRanges", None)
        if "HyperParameterTuningResourceConfig" in job_request and "ResourceConfig" not in job_request:
            job_request["ResourceConfig"] = job_request.pop("HyperParameterTuningResourceConfig")
        return job_request

    def run(self, index: int) -> None:
        search, max_jobs, progress = self.search, self.search.max_jobs, self.progress
        if self.abort.is_set():
            return
        with self.lock:
            trial = self.study.ask(search.dists)
        params = dict(trial.params)
        job = self.trial_name(index, params)
        tuned = {k: to_hyperparameter(k, v, search.reverse_log) for k, v in params.items()}
        shown = " ".join(f"{k}={json.loads(v) if v.startswith(chr(34)) else v}" for k, v in tuned.items())
        progress(f"  trial {index}/{max_jobs} {job} started: {shown}")
        intermediate: list[float] = []

        def on_line(line: str) -> None:
            m = search.objective_regex.search(line)
            if m:
                try:
                    value = float(m.group(1))
                except ValueError:
                    return
                if math.isfinite(value):
                    intermediate.append(value)
                    with self.lock:
                        trial.report(value, len(intermediate))
            epoch = metrics.epoch_progress(line)
            if epoch:
                done, total, rest = epoch
                progress(f"    trial {index}/{max_jobs} epoch {done}/{total} {bar(done, total)} {rest.strip()[:90]}")

        def should_stop() -> bool:
            if self.abort.is_set():
                return True
            with self.lock:
                return search.early and len(intermediate) > 0 and trial.should_prune()

        t0 = time.monotonic()
        try:
            describe = self.run_job(job, self.job_request(tuned), self.store, self.step_dir / "trials" / job,
                                    on_line=on_line, should_stop=should_stop)
        except JobError as e:
            # The sandbox could not be set up (a channel or the code missing from the store):
            # every trial shares that request, so launching the others would only repeat it.
            self.cannot_start.append(f"trial {index} ({job}) could not start: {e}")
            self.abort.set()
            return
        except Exception as e:  # noqa: BLE001 - a trial that breaks is a failed trial
            describe = {"TrainingJobName": job, "TrainingJobArn": arn("training-job", job),
                        "TrainingJobStatus": "Failed", "FailureReason": f"{type(e).__name__}: {e}",
                        "CreationTime": now_iso(), "TrainingEndTime": now_iso(), "FinalMetricDataList": []}
        if self.abort.is_set():
            return  # interrupted, not finished: a resumed tuning job runs this trial again
        final = {m["MetricName"]: m["Value"] for m in describe.get("FinalMetricDataList", [])}
        value = final.get(search.metric)
        status = describe["TrainingJobStatus"]
        if status == "Failed" or value is None or not math.isfinite(value):
            value = None
        with self.lock:
            if value is not None and status == "Completed":
                self.study.tell(trial, value)
            elif value is not None:  # stopped early: its last objective value still counts, as on AWS
                self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            self.done.append({"index": index, "name": job, "params": params, "hyperparameters": tuned,
                              "status": status, "objective": value, "failure": describe.get("FailureReason"),
                              "seconds": round(time.monotonic() - t0, 1), "intermediate": intermediate,
                              "describe": describe})
            self.done.sort(key=lambda t: t["index"])
            write_json(self.record_path, self.done)
        shown_value = "n/a" if value is None else f"{value:.4g}"
        failure = f"  {describe['FailureReason'][:160]}" if describe.get("FailureReason") else ""
        progress(f"  trial {index}/{max_jobs} {job} {status}: {search.metric}={shown_value} "
                 f"({time.monotonic() - t0:.0f}s){failure}")


def describe_tuning_job(name: str, request: dict, trials: list[dict], metric: str, direction: str,
                        started: str, seconds: float) -> dict:
    def summary(t: dict) -> dict:
        d = t["describe"]
        s = {"TrainingJobName": t["name"], "TrainingJobArn": arn("training-job", t["name"]),
             "CreationTime": d.get("CreationTime"), "TrainingStartTime": d.get("TrainingStartTime"),
             "TrainingEndTime": d.get("TrainingEndTime"), "TrainingJobStatus": t["status"],
             "TunedHyperParameters": t["hyperparameters"],
             "ObjectiveStatus": "Succeeded" if t["objective"] is not None else "Failed"}
        if t["objective"] is not None:
            s["FinalHyperParameterTuningJobObjectiveMetric"] = {"Type": direction, "MetricName": metric,
                                                                "Value": t["objective"]}
        if t.get("failure"):
            s["FailureReason"] = t["failure"]
        return s

    scored = [t for t in trials if t["objective"] is not None]
    scored.sort(key=lambda t: t["objective"], reverse=(direction == "Maximize"))
    summaries = [summary(t) for t in scored] + [summary(t) for t in trials if t["objective"] is None]
    counts = {"Completed": 0, "InProgress": 0, "RetryableError": 0, "NonRetryableError": 0, "Stopped": 0}
    for t in trials:
        counts[{"Completed": "Completed", "Stopped": "Stopped"}.get(t["status"], "NonRetryableError")] += 1
    out = {
        "HyperParameterTuningJobName": name,
        "HyperParameterTuningJobArn": arn("hyper-parameter-tuning-job", name),
        "HyperParameterTuningJobConfig": request.get("HyperParameterTuningJobConfig"),
        "TrainingJobDefinition": request.get("TrainingJobDefinition"),
        "HyperParameterTuningJobStatus": "Completed" if scored else "Failed",
        "CreationTime": started, "HyperParameterTuningEndTime": now_iso(), "LastModifiedTime": now_iso(),
        "TrainingJobStatusCounters": counts,
        "ObjectiveStatusCounters": {"Succeeded": len(scored), "Pending": 0, "Failed": len(trials) - len(scored)},
        "ConsumedResources": {"RuntimeInSeconds": int(seconds)},
        "TrainingJobSummaries": summaries,  # ListTrainingJobsForHyperParameterTuningJob, best first
    }
    if scored:
        out["BestTrainingJob"] = summaries[0]
    else:
        reasons = "; ".join(f"{t['name']}: {t.get('failure') or 'no objective metric ' + repr(metric)}"
                            for t in trials)[:1000]
        out["FailureReason"] = f"No training job succeeded with an objective metric: {reasons}"
    return out


def leaderboard(describe: dict) -> list[dict]:
    """Rows for the report: rank, job, objective, status, hyperparameters."""
    rows = []
    for rank, s in enumerate(describe.get("TrainingJobSummaries", []), start=1):
        obj = s.get("FinalHyperParameterTuningJobObjectiveMetric", {}).get("Value")
        rows.append({"rank": rank, "job": s["TrainingJobName"], "objective": obj, "status": s["TrainingJobStatus"],
                     "hyperparameters": {k: v for k, v in s["TunedHyperParameters"].items()}})
    return rows
