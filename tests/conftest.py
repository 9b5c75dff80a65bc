"""Suite-wide environment (offline, quiet, reproducible, light on 2 CPU cores) and the fixtures
tests share: a moto server and the built definitions, each made once per session.

Plain helpers (no fixtures) live in tests/_*_helpers.py and are imported as usual.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from tests._aws_helpers import REGION, fake_aws_env, reset_moto, start_moto  # no boto3 import: env below comes first
from tests._scripts_helpers import SCRIPTS

# Set before any test imports torch, sagemaker or boto3.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# Never reach a real AWS account from the tests, whatever the developer's shell holds.
for var in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
    os.environ.pop(var, None)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- a moto server, once per session

@pytest.fixture(scope="session")
def moto_server():
    """moto's server on a free loopback port, in a child process (tests/_aws_helpers.py says why);
    started once: `aws_env` resets its state before every test that uses it."""
    server, url = start_moto()
    yield url
    server.stop()


@pytest.fixture
def aws_env(moto_server, monkeypatch):
    """boto3 pointed at a freshly reset moto server, with fake credentials and region, for one test."""
    reset_moto(moto_server)
    fake_aws_env(monkeypatch, moto_server)
    return moto_server


@pytest.fixture
def stubbed_sm(monkeypatch):
    """(SageMaker client, its botocore Stubber) for calls moto lacks: fake credentials, no
    endpoint, so an unstubbed call fails; every queued response must be used."""
    import boto3
    from botocore.stub import Stubber

    fake_aws_env(monkeypatch, endpoint=None)
    sm = boto3.client("sagemaker", region_name=REGION)
    with Stubber(sm) as stub:
        yield sm, stub
        stub.assert_no_pending_responses()


# ---------------------------------------------------------------- the built definition, once per session

def _bare_config():
    """Debugger (the one line: profiler.enabled stays true), spot and cache off, CPU instances:
    the account-without-Debugger variant."""
    from pipeline.config import parse_config
    doc = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
    doc["debugger"]["enabled"] = False
    doc["training"]["spot"]["enabled"] = doc["tuning"]["spot"]["enabled"] = False
    doc["cache"]["enabled"] = False
    doc["training"]["instance"]["type"] = doc["tuning"]["instance"]["type"] = "ml.m5.xlarge"
    return parse_config(doc, source="bare")


@pytest.fixture(scope="session")
def configs():
    """The shipped configs, as the file says (no AWS_REGION / SAGEMAKER_* override from the shell):
    real (pipeline.yaml), smoke (pipeline.smoke.yaml) and bare (_bare_config)."""
    from pipeline.config import load_config
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_REGION", "SAGEMAKER_ROLE_ARN", "SAGEMAKER_BUCKET"):
            mp.delenv(var, raising=False)
        return {"real": load_config(ROOT / "pipeline.yaml"), "smoke": load_config(ROOT / "pipeline.smoke.yaml"),
                "bare": _bare_config()}


@pytest.fixture(scope="session")
def smoke_store(tmp_path_factory):
    """The local object store the smoke build uploads its code to."""
    from pipeline.local.store import LocalStore
    return LocalStore(tmp_path_factory.mktemp("s3"))


@pytest.fixture(scope="session")
def built(configs, smoke_store):
    """pipeline.definition's Build of each config, built once per session (each build takes seconds).
    The smoke profile goes through build_definition with a local object store, as local runs do."""
    from pipeline.definition import Build, build, build_definition
    out = {name: build(cfg) for name, cfg in configs.items() if name != "smoke"}
    out["smoke"] = Build(definition=build_definition(configs["smoke"], object_store=smoke_store))
    return out


@pytest.fixture(scope="session")
def definitions(built):
    """The built definitions as dicts (read-only: json.loads a Build's text for a copy to edit)."""
    return {name: json.loads(b.definition) for name, b in built.items()}


@pytest.fixture(scope="module")
def train_lib():
    """scripts/train_lib.py imported as the container imports it (scripts/ on sys.path)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        import train_lib
        yield train_lib
    finally:
        sys.path.remove(str(SCRIPTS))
