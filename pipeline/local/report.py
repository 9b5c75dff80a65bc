"""The run report: report.md + PNGs in the run dir, from the execution record alone.

DAG coloured by step status, step table, tuning leaderboard, loss curves, Debugger
rule results, profiler summary, final metrics, endpoint URL.
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.files import atomic_write  # noqa: E402
from pipeline.local.jobs import read_json  # noqa: E402

COLOURS = {"Succeeded": "#4caf50", "Failed": "#e53935", "Executing": "#fb8c00", "Stopped": "#9e9e9e",
           "NotExecuted": "#eeeeee", None: "#ffffff"}


def _seconds(rec: dict) -> str:
    try:
        a, b = (dt.datetime.fromisoformat(rec[k]) for k in ("StartTime", "EndTime"))
        return f"{(b - a).total_seconds():.0f}s"
    except (KeyError, ValueError, TypeError):
        return ""


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(out)


def draw_status_dag(definition: dict, statuses: dict[str, str], path: Path) -> Path:
    """pipeline.graph.draw_dag when the build side provides it (one DAG picture for both)."""
    from pipeline.graph import draw_dag
    draw_dag(json.dumps(definition), str(path), statuses=statuses)
    return path


def _loss_curves(record: dict, path: Path, run_dir: Path) -> Path | None:
    series = []  # (label, values, style)
    for name, rec in record["Steps"].items():
        job_dir = (rec.get("Properties") or {}).get("LocalJobDir")
        metrics = read_json(Path(job_dir) / "metrics.json") if job_dir else None
        for metric, values in (metrics or {}).items():
            if "loss" in metric and len(values) > 1 and metric.startswith("epoch"):
                series.append((f"{name}: {metric.split(':', 1)[-1]}", values, "-"))
    # the tuning trials' validation loss, thin and dashed, behind the final job's curves
    for trial in sorted(run_dir.glob(f"steps/{record['PipelineExecutionId']}/*/trials/*/metrics.json")):
        values = (read_json(trial) or {}).get("epoch:valid_loss", [])
        if len(values) > 1:
            series.insert(0, (f"trial {trial.parent.name.rsplit('-', 2)[-2]}: valid_loss", values, "--"))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, values, style in series:
        ax.plot(range(1, len(values) + 1), values, style, marker="o", label=label,
                linewidth=1 if style == "--" else 2, alpha=0.6 if style == "--" else 1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _leaderboard_plot(summaries: list[dict], path: Path) -> Path | None:
    scored = [s for s in summaries if "FinalHyperParameterTuningJobObjectiveMetric" in s]
    if not scored:
        return None
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(scored) + 1.2))
    names = ["trial " + s["TrainingJobName"].rsplit("-", 2)[-2] for s in scored][::-1]
    values = [s["FinalHyperParameterTuningJobObjectiveMetric"]["Value"] for s in scored][::-1]
    ax.barh(names, values, color="#1976d2")
    ax.set_xlabel(scored[0]["FinalHyperParameterTuningJobObjectiveMetric"]["MetricName"])
    ax.set_ylabel("trial")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(run_dir: str | Path, record: dict, definition: dict, store=None) -> Path:
    run_dir = Path(run_dir)
    fig_dir = run_dir / "report"
    fig_dir.mkdir(parents=True, exist_ok=True)
    steps = record["Steps"]
    lines = [f"# {record['PipelineName']} — execution {record['PipelineExecutionId']}", "",
             f"**Status: {record['PipelineExecutionStatus']}**  ", f"Started {record.get('StartTime')}, "
             f"ended {record.get('EndTime', '-')}."]
    if record.get("FailureReason"):
        lines += ["", f"Failure: `{record['FailureReason']}`"]
    lines += ["", "Parameters: " + ", ".join(f"`{p['Name']}={p['Value']}`" for p in record.get("Parameters", [])), ""]

    statuses = {n: r.get("StepStatus") for n, r in steps.items()}
    try:
        dag = draw_status_dag(definition, statuses, fig_dir / "dag.png")
        lines += ["## DAG", "", f"![DAG](report/{dag.name})", ""]
    except Exception as e:  # noqa: BLE001 - the picture is optional, the tables are not
        lines += ["## DAG", "", f"(not drawn: {type(e).__name__}: {e})", ""]
    lines += ["## Steps", "", _table(["step", "type", "status", "time", "attempts", "cache", "failure"], [
        [n, r.get("StepType"), r.get("StepStatus"), _seconds(r), r.get("AttemptCount", ""),
         "hit" if r.get("CacheHitResult") else "", (r.get("FailureReason") or "")[:200]]
        for n, r in steps.items()]), ""]

    for name, rec in steps.items():
        props = rec.get("Properties") or {}
        if rec.get("StepType") == "Tuning" and props.get("TrainingJobSummaries"):
            summaries = props["TrainingJobSummaries"]
            lines += [f"## Tuning leaderboard ({name})", ""]
            plot = _leaderboard_plot(summaries, fig_dir / f"leaderboard-{name}.png")
            if plot:
                lines += [f"![leaderboard](report/{plot.name})", ""]
            lines += [_table(["rank", "training job", "objective", "status", "hyperparameters"], [
                [i, s["TrainingJobName"], s.get("FinalHyperParameterTuningJobObjectiveMetric", {}).get("Value", "-"),
                 s["TrainingJobStatus"], ", ".join(f"{k}={v}" for k, v in s["TunedHyperParameters"].items())]
                for i, s in enumerate(summaries, start=1)]), ""]

    curves = _loss_curves(record, fig_dir / "loss_curves.png", run_dir)
    if curves:
        lines += ["## Loss curves", "", f"![loss curves](report/{curves.name})", ""]

    for name, rec in steps.items():
        props = rec.get("Properties") or {}
        if rec.get("StepType") != "Training":
            continue
        if props.get("FinalMetricDataList"):
            lines += [f"## Metrics ({name})", "", _table(["metric", "value"], [
                [m["MetricName"], f"{m['Value']:.4g}"] for m in props["FinalMetricDataList"]
                if not m["MetricName"].startswith("epoch:")]), ""]
        rules = props.get("DebugRuleEvaluationStatuses", []) + props.get("ProfilerRuleEvaluationStatuses", [])
        if rules:
            lines += [f"## Debugger rules ({name})", "", _table(["rule", "status", "details"], [
                [r["RuleConfigurationName"], r["RuleEvaluationStatus"], r.get("StatusDetails", "")[:200]]
                for r in rules]), ""]
        prof = props.get("ProfilerSummary")
        if prof:
            labels = {"cpu_percent": "CPU % of the job's processes (100 = one core)",
                      "memory_mb": "resident memory, MB", "gpu_percent": "GPU utilisation %",
                      "gpu_memory_mb": "GPU memory, MB", "seconds": "sampled seconds", "samples": "samples"}
            rows = [[labels.get(k, k), ", ".join(f"{a} {b}" for a, b in v.items()) if isinstance(v, dict) else v]
                    for k, v in prof.items()]
            lines += [f"## Profiler ({name})", "", _table(["system metric", "value"], rows), ""]
            job_dir = props.get("LocalJobDir")
            framework = Path(job_dir) / "opt_ml" / "output" / "profiler" / "framework" if job_dir else None
            summary = framework / "summary.txt" if framework else None
            if summary and summary.is_file():
                top = summary.read_text(errors="replace").splitlines()[:25]
                lines += ["torch.profiler summary (the job's own, first lines):", "", "```", *top, "```", ""]
            if framework and framework.is_dir():
                lines += [f"Framework profiler files: `{framework}`", ""]

    for rec in steps.values():
        props = rec.get("Properties") or {}
        if rec.get("StepType") == "Endpoint" and props.get("LocalUrl"):
            lines += ["## Endpoint", "", f"`{props['EndpointName']}` was InService at {props['LocalUrl']} "
                      f"(smoke test: {props.get('LocalSmokeTest')}); it stops with the run unless "
                      "`--keep-endpoint` was given.", "",
                      f"    python run_pipeline.py --invoke {props['LocalUrl']} IMAGE.jpg", ""]
    if record.get("FailStepMessage") is not None:
        lines += ["## Fail step", "", f"`{record['FailStepMessage']}`", ""]

    return atomic_write(run_dir / "report.md", "\n".join(lines) + "\n")
