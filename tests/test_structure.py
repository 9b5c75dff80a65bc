"""The module map's directions (README "Layout"), read from the imports themselves (ast): every
import counts, those inside functions too, since a lazy import is still a dependency."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "steps", "scripts")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    found = {"run_pipeline": ROOT / "run_pipeline.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (`from pipeline import aws` -> pipeline.aws)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            # the longest project module the target names (pipeline.local.store.LocalStore -> pipeline.local.store)
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target not in PACKAGES:
                out.add(target)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def _offenders(graph, where, forbidden) -> list[str]:
    return sorted(f"{m} imports {t}" for m, targets in graph.items() if where(m)
                  for t in targets if any(t == f or t.startswith(f + ".") for f in forbidden))


def test_the_local_interpreter_reads_only_the_definition_json(graph):
    """pipeline/local/ gets the definition JSON and an object store: no config, no steps, no SDK
    wiring, no AWS runner, no host launcher."""
    forbidden = ("pipeline.config", "pipeline.definition", "pipeline.offline", "steps", "pipeline.aws",
                 "pipeline.preflight", "pipeline.local_run", "pipeline.data", "run_pipeline")
    assert _offenders(graph, lambda m: m.startswith("pipeline.local."), forbidden) == []


def test_the_local_interpreter_never_imports_the_sagemaker_sdk():
    offenders = []
    for path in sorted((ROOT / "pipeline" / "local").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n == "sagemaker" or n.startswith("sagemaker.")]
    assert offenders == []


def test_the_two_runners_never_import_each_other(graph):
    assert _offenders(graph, lambda m: m in ("pipeline.aws", "pipeline.preflight"),
                      ("pipeline.local", "pipeline.local_run")) == []
    assert _offenders(graph, lambda m: m == "pipeline.local_run" or m.startswith("pipeline.local."),
                      ("pipeline.aws", "pipeline.preflight")) == []


def test_data_preparation_imports_no_runner(graph):
    assert _offenders(graph, lambda m: m == "pipeline.data",
                      ("pipeline.aws", "pipeline.local", "pipeline.local_run")) == []


def test_steps_share_only_their_common_module(graph):
    assert _offenders(graph, lambda m: m.startswith("steps.") and m != "steps.common",
                      [m for m in graph if m.startswith("steps.") and m != "steps.common"]) == []
    assert _offenders(graph, lambda m: m == "steps.common",
                      [m for m in graph if m.startswith("steps.") and m != "steps.common"]) == []


def test_container_scripts_import_nothing_of_the_host(graph):
    assert _offenders(graph, lambda m: m.startswith("scripts."), ("pipeline", "steps", "run_pipeline")) == []


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    cycles, state = [], {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        if state.get(node) == "visiting":
            cycles.append(" -> ".join(path[path.index(node):] + [node]))
            return
        state[node] = "visiting"
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        state[node] = "done"
    for module in sorted(graph):
        visit(module, [])
    return cycles


def test_no_import_cycle_among_project_modules(graph):
    assert find_cycles(graph) == []


def test_the_checks_see_an_import_and_a_cycle(tmp_path):
    """The walker itself: a lazy import inside a function is an edge, and a cycle is found."""
    (tmp_path / "pipeline" / "local").mkdir(parents=True)
    a = tmp_path / "pipeline" / "local" / "a.py"
    a.write_text("def f():\n    from pipeline.config import load_config\n    from . import b\n")
    modules = {"pipeline.config": a, "pipeline.local.a": a, "pipeline.local.b": a}
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert imports_of(a, modules) == {"pipeline.config", "pipeline.local.b"}
    finally:
        ROOT = saved
    graph = {"pipeline.local.a": {"pipeline.config"}, "pipeline.config": {"pipeline.local.a"}}
    assert find_cycles(graph) == ["pipeline.config -> pipeline.local.a -> pipeline.config"]
    assert _offenders(graph, lambda m: m.startswith("pipeline.local."), ("pipeline.config",)) == \
        ["pipeline.local.a imports pipeline.config"]
