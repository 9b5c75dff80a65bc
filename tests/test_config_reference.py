"""README's config reference is generated from the typed config and must not drift from it."""
from pipeline import config_reference
from pipeline.config import Config


def test_readme_reference_matches_the_typed_config():
    readme = config_reference.README.read_text()
    assert config_reference.readme_with_reference(readme) == readme, (
        "README's config reference is stale: run `python -m pipeline.config_reference --write`")


def test_every_config_field_has_a_row():
    paths = {row[0] for row in config_reference.rows()}
    for section in Config.model_fields:
        if section == "source":
            continue
        assert section in paths
    assert "tuning.ranges.<name> (continuous).scaling" in paths
    assert "debugger.rules[].name" in paths and "gate.threshold" in paths


def test_required_fields_and_constraints_are_shown():
    by_path = {row[0]: row for row in config_reference.rows()}
    assert by_path["gate.threshold"][2] == "**required**"
    assert "≥ 1, ≤ 100" in by_path["endpoint.instance_count"][1]
    assert "Minimize \\| Maximize" in by_path["tuning.objective.type"][1]
