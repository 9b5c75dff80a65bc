"""One model of a pipeline definition's DAG: its steps, its edges by kind, a run order.

Pure: a definition (the JSON, parsed) in; nothing of config, steps or the SDK. The local
executor, the drawing (pipeline/graph.py) and the parameter checks (pipeline/params.py)
all read a definition's structure through it.

    steps   every step by name, those inside condition branches included, in definition
            order (a condition, then its IfSteps, then its ElseSteps), each with the
            condition and branch ("If" / "Else") it sits in
    edges   (src, dst, kind): dst runs after src, because of
              "depends"    dst's DependsOn names src
              "data"       dst reads src's properties, {"Get": "Steps.src..."}, in its Arguments
                           or PropertyFiles: the service orders those too, with no DependsOn
              "if"/"else"  dst sits in the IfSteps / ElseSteps of condition src
    order   a topological order, definition order among independent steps; a cycle is
            refused with the steps that form it
"""
from __future__ import annotations

from typing import Any, NamedTuple

from pipeline.errors import DefinitionError  # noqa: F401 - raised here, imported from here by callers

EDGE_KINDS = ("depends", "data", "if", "else")


class Node(NamedTuple):
    step: dict                 # the step's JSON, as in the definition
    condition: str | None      # the Condition step whose branch holds it, if any
    branch: str | None         # "If" or "Else" within that condition


class Edge(NamedTuple):
    src: str
    dst: str
    kind: str                  # one of EDGE_KINDS


def flatten_steps(steps: list[dict], condition: str | None = None, branch: str | None = None,
                  out: dict[str, Node] | None = None) -> dict[str, Node]:
    """Every step by name, branch steps included (nested conditions too), in definition order."""
    out = {} if out is None else out
    for step in steps:
        name = step.get("Name") if isinstance(step, dict) else None
        if not name or "Type" not in step:
            raise DefinitionError(f"step {step!r:.120}: needs Name and Type")
        if name in out:
            raise DefinitionError(f"step name {name!r} appears twice")
        out[name] = Node(step, condition, branch)
        if step["Type"] == "Condition":
            args = step.get("Arguments", {})
            flatten_steps(args.get("IfSteps", []), name, "If", out)
            flatten_steps(args.get("ElseSteps", []), name, "Else", out)
    return out


def all_steps(definition: dict) -> list[dict]:
    """Every step's JSON, those inside condition branches included, in definition order."""
    return [node.step for node in flatten_steps(definition.get("Steps", [])).values()]


def references(value: Any) -> list[str]:
    """What `value` (any JSON) reads of other steps: the `X.Some.Path` of each
    {"Get": "Steps.X.Some.Path"}, in order of appearance, once each."""
    found: list[str] = []

    def visit(v):
        if isinstance(v, list):
            for x in v:
                visit(x)
        elif isinstance(v, dict):
            for k, x in v.items():
                if k == "Get" and isinstance(x, str) and x.startswith("Steps."):
                    if x[len("Steps."):] not in found:
                        found.append(x[len("Steps."):])
                else:
                    visit(x)
    visit(value)
    return found


def step_of_ref(ref: str, names) -> str | None:
    """The step a reference `X.Some.Path` reads: step names may hold '.', so the longest that fits."""
    fits = [n for n in names if ref == n or ref.startswith(n + ".") or ref.startswith(n + "[")]
    return max(fits, key=len) if fits else None


def _body(step: dict) -> dict:
    """What a step evaluates: its Arguments (a condition's without its branches) and PropertyFiles."""
    args = step.get("Arguments", {})
    if step["Type"] == "Condition":
        args = {k: v for k, v in args.items() if k not in ("IfSteps", "ElseSteps")}
    return {"Arguments": args, "PropertyFiles": step.get("PropertyFiles")}


def dag_edges(steps: dict[str, Node]) -> list[Edge]:
    """Every edge, per step in definition order: its DependsOn, its branches (a condition), the
    steps it reads. A reference also covered by DependsOn is one "depends" edge; no self-edges."""
    names = list(steps)
    edges: list[Edge] = []
    for name, node in steps.items():
        step = node.step
        data = []
        for ref in references(_body(step)):
            src = step_of_ref(ref, names)
            if src is None:
                raise DefinitionError(f"step {name!r} refers to unknown step in Get 'Steps.{ref}'")
            if src not in data:
                data.append(src)
        depends = step.get("DependsOn", []) or []
        for dep in depends:
            if dep not in steps:
                raise DefinitionError(f"step {name!r}: DependsOn {dep!r} is not a step (have {names})")
        edges += [Edge(dep, name, "depends") for dep in dict.fromkeys(depends) if dep != name]
        if step["Type"] == "Condition":
            edges += [Edge(name, child, "if" if child_node.branch == "If" else "else")
                      for child, child_node in steps.items() if child_node.condition == name]
        edges += [Edge(src, name, "data") for src in data if src != name and src not in depends]
    return edges


def predecessors(steps: dict[str, Node], edges: list[Edge]) -> dict[str, set[str]]:
    """Each step's set of steps it waits for."""
    preds: dict[str, set[str]] = {name: set() for name in steps}
    for e in edges:
        preds[e.dst].add(e.src)
    return preds


def topological_order(preds: dict[str, set[str]]) -> list[str]:
    """Every step after all it waits for; among independent steps, definition order."""
    order, state = [], {}

    def visit(n, path):
        if state.get(n) == "done":
            return
        if state.get(n) == "visiting":
            cycle = path[path.index(n):] + [n]
            raise DefinitionError(f"dependency cycle: {' -> '.join(cycle)} (each step waits for the next)")
        state[n] = "visiting"
        for m in sorted(preds[n]):
            visit(m, path + [n])
        state[n] = "done"
        order.append(n)
    for n in preds:
        visit(n, [])
    return order


def layers(order: list[str], preds: dict[str, set[str]]) -> dict[str, int]:
    """Longest path from a source: each step one row below everything it waits for."""
    layer: dict[str, int] = {}
    for n in order:
        layer[n] = 1 + max((layer[p] for p in preds[n]), default=-1)
    return layer


class Dag:
    """A definition's steps, edges, predecessors and run order, worked out once."""

    def __init__(self, definition: dict):
        self.steps = flatten_steps(definition.get("Steps", []))
        self.edges = dag_edges(self.steps)
        self.predecessors = predecessors(self.steps, self.edges)
        self.order = topological_order(self.predecessors)

    def layers(self) -> dict[str, int]:
        return layers(self.order, self.predecessors)
