"""The definition's expression language, on small inputs in the SDK's exact shapes."""
import pytest

from pipeline.local import expressions as ex
from pipeline.local.dag import Dag
from pipeline.local.executor import DefinitionError, parse_parameters


@pytest.fixture
def ctx():
    return ex.Context(
        parameters={"Threshold": 0.5, "Kind": "ml.m5.large"},
        execution={"PipelineExecutionId": "abc123"},
        properties={
            "Tune": {"BestTrainingJob": {"TunedHyperParameters": {"lr": "0.01", "batch-size": '"64"'}},
                     "TrainingJobSummaries": [{"TrainingJobName": "t-001"}, {"TrainingJobName": "t-002"}]},
            "Train": {"FinalMetricDataList": [{"MetricName": "test accuracy", "Value": 0.8},
                                              {"MetricName": "average test loss", "Value": 0.4}],
                      "ModelArtifacts": {"S3ModelArtifacts": "s3://b/m/model.tar.gz"}},
            "Model-CreateModel": {"ModelName": "m1"},
        },
        property_file_loader=lambda step, name: {"metrics": {"acc": [{"v": 0.9}]}} if (step, name) == (
            "Train", "Eval") else (_ for _ in ()).throw(ex.ExpressionError("no such file")))


def test_get_parameters_execution_and_step_paths(ctx):
    assert ex.resolve({"Get": "Parameters.Threshold"}, ctx) == 0.5
    assert ex.resolve({"Get": "Execution.PipelineExecutionId"}, ctx) == "abc123"
    assert ex.resolve({"Get": "Steps.Tune.BestTrainingJob.TunedHyperParameters['batch-size']"}, ctx) == '"64"'
    assert ex.resolve({"Get": "Steps.Train.FinalMetricDataList['test accuracy'].Value"}, ctx) == 0.8
    assert ex.resolve({"Get": "Steps.Tune.TrainingJobSummaries[1].TrainingJobName"}, ctx) == "t-002"
    # step names with '-' resolve, nested inside ordinary JSON
    assert ex.resolve({"A": [{"Get": "Steps.Model-CreateModel.ModelName"}]}, ctx) == {"A": ["m1"]}


@pytest.mark.parametrize("ref, words", [
    ("Parameters.Nope", "unknown parameter 'Nope'"),
    ("Steps.Train.FinalMetricDataList['f1'].Value", "no element named 'f1'"),
    ("Steps.Tune.TrainingJobSummaries[5].TrainingJobName", "index out of range"),
    ("Steps.Ghost.X", "step not run or unknown"),
    ("Steps.Train.ModelArtifacts.Nope", "no such property"),
    ("Foo.Bar", "must start with"),
])
def test_get_errors_name_what_is_wrong(ctx, ref, words):
    with pytest.raises(ex.ExpressionError, match=words.replace("[", r"\[").replace("(", r"\(")):
        ex.resolve({"Get": ref}, ctx)


def test_join_and_jsonget(ctx):
    join = {"Std:Join": {"On": "/", "Values": ["s3://b", {"Get": "Execution.PipelineExecutionId"}, 3, True]}}
    assert ex.resolve(join, ctx) == "s3://b/abc123/3/true"
    get = {"Std:JsonGet": {"PropertyFile": {"Get": "Steps.Train.PropertyFiles.Eval"}, "Path": "metrics.acc[0].v"}}
    assert ex.resolve(get, ctx) == 0.9
    with pytest.raises(ex.ExpressionError, match="no such property"):
        ex.resolve({"Std:JsonGet": {"PropertyFile": {"Get": "Steps.Train.PropertyFiles.Eval"}, "Path": "nope"}}, ctx)


def test_all_condition_types(ctx):
    acc = {"Get": "Steps.Train.FinalMetricDataList['test accuracy'].Value"}
    thr = {"Get": "Parameters.Threshold"}
    cases = [("GreaterThanOrEqualTo", True), ("GreaterThan", True), ("LessThan", False),
             ("LessThanOrEqualTo", False), ("Equals", False)]
    for kind, expected in cases:
        assert ex.evaluate_condition({"Type": kind, "LeftValue": acc, "RightValue": thr}, ctx) is expected, kind
    # a number against its text (a --param string, a JSON-quoted value) compares as a number
    assert ex.evaluate_condition({"Type": "Equals", "LeftValue": "0.8", "RightValue": acc}, ctx)
    assert ex.evaluate_condition({"Type": "In", "QueryValue": {"Get": "Parameters.Kind"},
                                  "Values": ["ml.c5.xlarge", "ml.m5.large"]}, ctx)
    eq = {"Type": "Equals", "LeftValue": 1, "RightValue": 2}
    assert ex.evaluate_condition({"Type": "Not", "Condition": eq}, ctx)
    assert ex.evaluate_condition({"Type": "Or", "Conditions": [eq, {"Type": "Not", "Condition": eq}]}, ctx)
    assert not ex.evaluate_condition({"Type": "Or", "Conditions": [eq, eq]}, ctx)
    with pytest.raises(ex.ExpressionError, match="unknown condition Type 'Between'"):
        ex.evaluate_condition({"Type": "Between"}, ctx)


def test_topological_order_follows_data_and_explicit_dependencies():
    steps = [
        {"Name": "C", "Type": "Condition", "Arguments": {
            "Conditions": [{"Type": "Equals", "LeftValue": {"Get": "Steps.B.X"}, "RightValue": 1}],
            "IfSteps": [{"Name": "D", "Type": "Fail", "Arguments": {}}], "ElseSteps": []}},
        {"Name": "B", "Type": "Model", "Arguments": {"U": {"Get": "Steps.A.Y"}}},
        {"Name": "A", "Type": "Training", "Arguments": {}, "DependsOn": ["E"]},
        {"Name": "E", "Type": "Training", "Arguments": {}},
    ]
    order = Dag({"Steps": steps}).order
    assert order.index("E") < order.index("A") < order.index("B") < order.index("C") < order.index("D")
    steps[3]["DependsOn"] = ["C"]
    with pytest.raises(DefinitionError, match="dependency cycle"):
        Dag({"Steps": steps})
    with pytest.raises(DefinitionError, match="unknown step"):
        Dag({"Steps": [{"Name": "X", "Type": "Model", "Arguments": {"A": {"Get": "Steps.Nope.Y"}}}]})


def test_parameters_defaults_overrides_and_errors():
    d = {"Parameters": [{"Name": "T", "Type": "Float", "DefaultValue": 0.5},
                        {"Name": "N", "Type": "Integer", "DefaultValue": 2},
                        {"Name": "S", "Type": "String", "DefaultValue": "a"}], "Steps": []}
    assert parse_parameters(d, ["T=1.01"]) == {"T": 1.01, "N": 2, "S": "a"}
    with pytest.raises(DefinitionError, match="not a parameter of this pipeline; known: \\['N', 'S', 'T'\\]"):
        parse_parameters(d, ["X=1"])
    with pytest.raises(DefinitionError, match="expected Integer"):
        parse_parameters(d, ["N=two"])
    with pytest.raises(DefinitionError, match="expected NAME=VALUE"):
        parse_parameters(d, ["T"])
