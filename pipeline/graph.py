"""A PNG of a pipeline definition's DAG (matplotlib only).

Steps, edges and rows come from the one model of the DAG, pipeline/local/dag.py: a box per
step, one row below everything it waits for; an arrow per edge, styled by its kind
(DependsOn, property reference, condition if / else).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.files import atomic_path
from pipeline.local.dag import Dag

STATUS_COLOURS = {
    "Succeeded": "#b7e1b0", "Failed": "#f4a6a6", "Executing": "#a8c8f0", "Starting": "#a8c8f0",
    "Stopping": "#f6d58e", "Stopped": "#d9d9d9", "Skipped": "#eeeeee", "NotExecuted": "#f4f4f4",
    "Cached": "#d4ecd0",
}
TYPE_COLOURS = {"Fail": "#fde2e2", "Condition": "#fff3c4"}
DEFAULT_COLOUR = "#eef2f7"


def _implied(edges) -> set[tuple[str, str]]:
    """Pairs (a, b) also connected by a longer path: left out of the drawing to keep it readable."""
    succ: dict[str, set[str]] = {}
    for a, b, _ in edges:
        succ.setdefault(a, set()).add(b)

    def reach(start, skip_direct_to):
        seen, todo = set(), [n for n in succ.get(start, ()) if n != skip_direct_to]
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(succ.get(n, ()))
        return seen
    return {(a, b) for a, b, _ in edges if b in reach(a, b)}


def draw_dag(definition_json: str, path: str | os.PathLike, statuses: dict[str, str] | None = None) -> Path:
    """Write a PNG of the DAG; boxes coloured by step status when `statuses` is given."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch

    definition = json.loads(definition_json) if isinstance(definition_json, str) else definition_json
    dag = Dag(definition)
    names = list(dag.steps)
    by_name = {name: node.step for name, node in dag.steps.items()}
    edges = dag.edges
    layer = dag.layers()
    rows: dict[int, list[str]] = {}
    for n in names:
        rows.setdefault(layer[n], []).append(n)

    width = max(len(r) for r in rows.values())
    # wide enough for "Package-RegisterModel · RegisterModel · Succeeded"
    box_w, box_h, gap_x, gap_y = 3.7, 0.9, 0.5, 0.9
    pos = {}
    for r, members in rows.items():
        span = len(members) * box_w + (len(members) - 1) * gap_x
        x0 = (width * (box_w + gap_x) - gap_x - span) / 2
        for i, n in enumerate(members):
            pos[n] = (x0 + i * (box_w + gap_x) + box_w / 2, -r * (box_h + gap_y))

    fig_w = max(6.0, width * (box_w + gap_x))
    fig_h = max(3.0, len(rows) * (box_h + gap_y) + 1.0)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    statuses = statuses or {}
    for n, (x, y) in pos.items():
        step = by_name[n]
        status = statuses.get(n)
        colour = STATUS_COLOURS.get(status, TYPE_COLOURS.get(step.get("Type"), DEFAULT_COLOUR))
        ax.add_patch(FancyBboxPatch((x - box_w / 2, y - box_h / 2), box_w, box_h,
                                    boxstyle="round,pad=0.02,rounding_size=0.12",
                                    facecolor=colour, edgecolor="#4a5568", linewidth=1.2))
        title = step.get("DisplayName") or n
        sub = f"{n} · {step.get('Type')}" + (f" · {status}" if status else "")
        ax.text(x, y + 0.13, title, ha="center", va="center", fontsize=10, weight="bold")
        ax.text(x, y - 0.2, sub, ha="center", va="center", fontsize=7.5, color="#2d3748")

    styles = {"depends": ("-", "#4a5568"), "data": ("--", "#3b6ea5"),
              "if": ("-", "#2f855a"), "else": ("-", "#c53030")}
    implied = _implied(edges)
    for src, dst, kind in edges:
        if src not in pos or dst not in pos or (src, dst) in implied:
            continue
        (x1, y1), (x2, y2) = pos[src], pos[dst]
        style, colour = styles[kind]
        rad = 0.0 if layer[dst] - layer[src] == 1 else 0.25
        ax.add_patch(FancyArrowPatch((x1, y1 - box_h / 2), (x2, y2 + box_h / 2), arrowstyle="-|>",
                                     mutation_scale=14, linestyle=style, color=colour, linewidth=1.3,
                                     connectionstyle=f"arc3,rad={rad}", shrinkA=2, shrinkB=2))
        if kind in ("if", "else"):
            ax.text(x1 + (x2 - x1) * 0.35 + 0.1, y1 - box_h / 2 - (y1 - y2 - box_h) * 0.35, kind, color=colour,
                    fontsize=9, weight="bold", ha="left", va="center")

    handles = [Patch(facecolor="none", edgecolor=styles["depends"][1], label="DependsOn"),
               Patch(facecolor="none", edgecolor=styles["data"][1], linestyle="--", label="property reference"),
               Patch(facecolor="none", edgecolor=styles["if"][1], label="condition: if"),
               Patch(facecolor="none", edgecolor=styles["else"][1], label="condition: else")]
    handles += [Patch(facecolor=STATUS_COLOURS[s], edgecolor="#4a5568", label=s)
                for s in dict.fromkeys(statuses.values()) if s in STATUS_COLOURS]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    name = definition.get("PipelineName") or ""
    ax.set_title(f"Pipeline DAG {name}".strip(), fontsize=11)
    ax.set_xlim(-0.3, width * (box_w + gap_x))
    ax.set_ylim(-(len(rows) - 1) * (box_h + gap_y) - box_h, box_h)
    ax.set_aspect("equal")
    ax.axis("off")

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return Path(path)
