"""--param overrides read from the definition alone, the same for AWS and local runs."""
import pytest

from pipeline.params import ParameterError, check_overrides, resolve_parameters

DEFINITION = {"Parameters": [
    {"Name": "Approval", "Type": "String", "DefaultValue": "PendingManualApproval",
     "EnumValues": ["Approved", "PendingManualApproval"]},
    {"Name": "Debug", "Type": "Boolean", "DefaultValue": False},
    {"Name": "Needed", "Type": "Integer"},
]}


def test_defaults_fill_in_and_overrides_are_typed():
    assert resolve_parameters(DEFINITION, ["Needed=3", "Debug=TRUE"]) == {
        "Approval": "PendingManualApproval", "Debug": True, "Needed": 3}


def test_only_given_overrides_come_back_from_the_check():
    assert check_overrides(DEFINITION, {"Approval": "Approved"}) == {"Approval": "Approved"}


@pytest.mark.parametrize("overrides, message", [
    (["Approval=Rejected", "Needed=1"],
     "--param Approval='Rejected': not one of \\['Approved', 'PendingManualApproval'\\]"),
    (["Debug=maybe", "Needed=1"], "--param Debug='maybe': expected Boolean"),
    ([], "parameter Needed has no DefaultValue: pass --param Needed=VALUE"),
    (["=1"], "expected NAME=VALUE"),
])
def test_bad_overrides_name_the_parameter_and_what_is_valid(overrides, message):
    with pytest.raises(ParameterError, match=message):
        resolve_parameters(DEFINITION, overrides)
