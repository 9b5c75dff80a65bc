"""pipeline/local/dag.py: the one model of a definition's DAG (steps, edges by kind, order, cycles)."""
import json
from pathlib import Path

import pytest

from pipeline.local.dag import EDGE_KINDS, Dag, DefinitionError, all_steps, references, step_of_ref

GOLDEN = Path(__file__).resolve().parent / "golden" / "pipeline.definition.json"


def _step(name, kind="Training", args=None, depends=None, **extra):
    step = {"Name": name, "Type": kind, "Arguments": args or {}, **extra}
    if depends:
        step["DependsOn"] = depends
    return step


def _condition(name, left, if_steps=(), else_steps=()):
    return _step(name, "Condition", {
        "Conditions": [{"Type": "GreaterThanOrEqualTo", "LeftValue": left, "RightValue": 0.5}],
        "IfSteps": list(if_steps), "ElseSteps": list(else_steps)})


def test_golden_definition_edges_by_kind_and_order():
    dag = Dag(json.loads(GOLDEN.read_text()))
    by_kind = {}
    for e in dag.edges:
        by_kind.setdefault(e.kind, set()).add((e.src, e.dst))
    assert by_kind == {
        "data": {("TuneHyperparameters", "TrainModel"), ("TrainModel", "Model-CreateModel"),
                 ("TrainModel", "Package-RegisterModel"), ("TrainModel", "CheckAccuracy"),
                 ("TrainModel", "AccuracyTooLow"), ("Model-CreateModel", "CreateEndpointConfig"),
                 ("CreateEndpointConfig", "DeployEndpoint")},
        "if": {("CheckAccuracy", "CreateEndpointConfig"), ("CheckAccuracy", "DeployEndpoint")},
        "else": {("CheckAccuracy", "AccuracyTooLow")},
    }
    assert len(dag.edges) == 10  # no edge twice
    assert set(by_kind) <= set(EDGE_KINDS)
    assert dag.order == ["TuneHyperparameters", "TrainModel", "Model-CreateModel", "Package-RegisterModel",
                         "CheckAccuracy", "CreateEndpointConfig", "DeployEndpoint", "AccuracyTooLow"]
    position = {n: i for i, n in enumerate(dag.order)}
    assert all(position[e.src] < position[e.dst] for e in dag.edges)
    assert {n: (node.condition, node.branch) for n, node in dag.steps.items() if node.condition} == {
        "CreateEndpointConfig": ("CheckAccuracy", "If"), "DeployEndpoint": ("CheckAccuracy", "If"),
        "AccuracyTooLow": ("CheckAccuracy", "Else")}
    assert dag.predecessors["DeployEndpoint"] == {"CheckAccuracy", "CreateEndpointConfig"}
    assert dag.layers() == {"TuneHyperparameters": 0, "TrainModel": 1, "Model-CreateModel": 2,
                            "Package-RegisterModel": 2, "CheckAccuracy": 2, "CreateEndpointConfig": 3,
                            "DeployEndpoint": 4, "AccuracyTooLow": 3}


def test_nested_condition_branches():
    inner = _condition("Inner", {"Get": "Steps.Train.FinalMetricDataList['loss'].Value"},
                       if_steps=[_step("Deploy", "Endpoint", {"EndpointConfigName": {"Get": "Steps.Config.X"}})],
                       else_steps=[_step("Stop", "Fail")])
    outer = _condition("Outer", {"Get": "Steps.Train.FinalMetricDataList['acc'].Value"},
                       if_steps=[_step("Config", "EndpointConfig"), inner], else_steps=[_step("TooLow", "Fail")])
    dag = Dag({"Steps": [outer, _step("Train")]})
    assert list(dag.steps) == ["Outer", "Config", "Inner", "Deploy", "Stop", "TooLow", "Train"]
    assert [(n, node.condition, node.branch) for n, node in dag.steps.items()] == [
        ("Outer", None, None), ("Config", "Outer", "If"), ("Inner", "Outer", "If"), ("Deploy", "Inner", "If"),
        ("Stop", "Inner", "Else"), ("TooLow", "Outer", "Else"), ("Train", None, None)]
    assert set(dag.edges) == {
        ("Outer", "Config", "if"), ("Outer", "Inner", "if"), ("Outer", "TooLow", "else"),
        ("Inner", "Deploy", "if"), ("Inner", "Stop", "else"),
        ("Train", "Outer", "data"), ("Train", "Inner", "data"), ("Config", "Deploy", "data")}
    # a branch step waits for its own condition only, not the one around it
    assert dag.predecessors["Deploy"] == {"Inner", "Config"}
    assert dag.order == ["Train", "Outer", "Config", "Inner", "Deploy", "Stop", "TooLow"]
    assert [s["Name"] for s in all_steps({"Steps": [outer]})] == \
        ["Outer", "Config", "Inner", "Deploy", "Stop", "TooLow"]


def test_cycle_refused_naming_its_steps():
    steps = [_step("Root", depends=["A"]),
             _step("A", depends=["B"]),
             _step("B", args={"In": {"Get": "Steps.C.ModelArtifacts.S3ModelArtifacts"}}),
             _step("C", depends=["A"])]
    with pytest.raises(DefinitionError) as e:
        Dag({"Steps": steps})
    # only the steps that form the cycle, in waits-for order; Root merely waits on it
    assert str(e.value) == "dependency cycle: A -> B -> C -> A (each step waits for the next)"
    steps[3]["DependsOn"] = []
    assert Dag({"Steps": steps}).order == ["C", "B", "A", "Root"]


def test_depends_and_data_on_the_same_step_is_one_depends_edge_and_self_reference_is_no_edge():
    steps = [_step("A"), _step("B", args={"X": {"Get": "Steps.A.P"}, "Y": {"Get": "Steps.B.Q"}}, depends=["A"])]
    assert Dag({"Steps": steps}).edges == [("A", "B", "depends")]


def test_property_file_references_are_data_edges():
    steps = [_step("Eval", PropertyFiles=[{"PropertyFileName": "ev", "OutputName": "evaluation",
                                           "FilePath": {"Get": "Steps.Train.ModelArtifacts.S3ModelArtifacts"}}]),
             _step("Train")]
    assert Dag({"Steps": steps}).edges == [("Train", "Eval", "data")]


def test_references_of_an_expression():
    value = {"Std:Join": {"On": "/", "Values": [
        {"Get": "Steps.b.c.Properties.X"}, {"Get": "Parameters.P"}, {"Get": "Steps.a.Y['k'][0]"},
        {"Std:JsonGet": {"PropertyFile": {"Get": "Steps.b.c.PropertyFiles.ev"}, "Path": "m.v"}},
        {"Get": "Steps.b.c.Properties.X"}]}}
    assert references(value) == ["b.c.Properties.X", "a.Y['k'][0]", "b.c.PropertyFiles.ev"]
    names = ["a", "b", "b.c"]  # a step name may hold '.': the longest that fits
    assert [step_of_ref(r, names) for r in references(value)] == ["b.c", "a", "b.c"]
    assert step_of_ref("bc.X", names) is None


@pytest.mark.parametrize("steps, message", [
    ([_step("X", args={"A": {"Get": "Steps.Nope.Y"}})], "step 'X' refers to unknown step in Get 'Steps.Nope.Y'"),
    ([_step("X", depends=["Nope"])], "step 'X': DependsOn 'Nope' is not a step (have ['X'])"),
    ([_step("X"), _condition("C", 1, else_steps=[_step("X")])], "step name 'X' appears twice"),
    ([{"Name": "X"}], "needs Name and Type"),
])
def test_malformed_definitions_refused(steps, message):
    with pytest.raises(DefinitionError) as e:
        Dag({"Steps": steps})
    assert message in str(e.value)


def test_definition_docstring_draws_every_step():
    """pipeline/definition.py opens with the DAG drawn: every step of the built definition is in it."""
    import ast
    source = (Path(__file__).resolve().parents[1] / "pipeline" / "definition.py").read_text()
    drawing = ast.get_docstring(ast.parse(source))
    missing = [name for name in Dag(json.loads(GOLDEN.read_text())).steps if name not in drawing]
    assert not missing, f"pipeline/definition.py's docstring does not draw {missing}"
