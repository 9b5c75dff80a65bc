"""A moto server on 127.0.0.1 for tests that talk to "AWS" over real HTTP, and fake credentials.

The fixtures are in tests/conftest.py:

    def test_x(aws_env):            # env points boto3 at a fresh (reset) moto server
        boto3.client("s3").create_bucket(Bucket="b")

`moto_server` (session scope) starts moto's ThreadedMotoServer on a free loopback port
(in a child process, `start_moto`) and yields its URL; `aws_env` resets moto's state (`reset_moto`) and
sets AWS_ENDPOINT_URL, fake credentials and the region for one test (`fake_aws_env`), with no shared
config/credentials files read.
"""
from __future__ import annotations

import subprocess
import sys
import urllib.request

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
SAGEMAKER_TRUST = ('{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", '
                   '"Principal": {"Service": "sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole"}]}')


# moto's ThreadedMotoServer, in a child process: an in-process server would share its state
# with any `mock_aws()` block in the test process (the offline definition build uses one),
# and entering or leaving such a block resets every backend. The child exits when its stdin closes.
_SERVER = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
"""


class MotoProcess:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        port = self.proc.stdout.readline().strip()
        if not port.isdigit():
            self.stop()
            raise RuntimeError(f"moto server did not start (exit code {self.proc.returncode})")
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_moto() -> tuple[MotoProcess, str]:
    server = MotoProcess()
    return server, server.url


def reset_moto(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=30).read()


def fake_aws_env(monkeypatch, endpoint: str | None, region: str = REGION, tmp_path=None) -> None:
    """Fake credentials and region; nothing from ~/.aws; endpoint (if any) via AWS_ENDPOINT_URL."""
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "GITHUB_SHA", "GITHUB_STEP_SUMMARY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", region)
    monkeypatch.setenv("AWS_DEFAULT_REGION", region)
    if endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    else:
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)

