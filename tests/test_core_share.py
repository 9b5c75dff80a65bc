"""inference.py's CoreShare: the serving stack's worker processes share the host's cores.
A forward pass alone runs on every thread; one that starts while others are in flight
runs on cores // (others + 1), in another process or another thread alike, with the same
answers. Sharing stays off where there is nothing to share or the slot directory is not
safely this user's."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests._serve_helpers import image_bytes
from tests.test_export import BODIES, answers, exported, load_inference, scripts, test_images  # noqa: F401


@pytest.fixture
def inference(exported, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setenv("INFERENCE_CORE_SLOTS_DIR", str(tmp_path / "slots"))
    monkeypatch.setenv("SAGEMAKER_MODEL_SERVER_WORKERS", "2")
    monkeypatch.delenv("INFERENCE_SHARE_CORES", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # OMP_NUM_THREADS=2, as serving_env sets it on ml.m5.large
    yield load_inference(exported[0])
    torch.set_num_threads(before)


def hold_slot_in_another_process(directory, slot: int):
    """A process that flock()s one slot file, as another worker's forward pass does."""
    code = textwrap.dedent(f"""
        import fcntl, os, sys
        fd = os.open({str(directory / f'slot-{slot}')!r}, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_lone_call_gets_every_core_and_a_concurrent_one_its_share(inference, tmp_path):
    share = inference.CoreShare(cores=4, slots=4, directory=tmp_path)
    with share.threads() as first:
        with share.threads() as second:
            with share.threads() as third:
                assert (first, second, third) == (4, 2, 1)
        with share.threads() as again:  # the slot the second call held is free again
            assert again == 2
    with share.threads() as alone:
        assert alone == 4


def test_calls_in_other_processes_count(inference, tmp_path):
    share = inference.CoreShare(cores=2, slots=2, directory=tmp_path)
    other = hold_slot_in_another_process(tmp_path, slot=1)
    try:
        with share.threads() as threads:
            assert threads == 1
    finally:
        other.communicate("")
    with share.threads() as threads:  # the other process ended: its lock went with it
        assert threads == 2


def test_model_fn_shares_the_cores_between_the_servers_workers(inference, exported):  # noqa: F811
    model = inference.model_fn(str(exported[0]))
    assert model["runtime"] == "onnxruntime"
    assert list(model["net"].sessions) == [2, 1]
    assert model["core_share"] is not None
    assert str(model["core_share"].directory) == os.environ["INFERENCE_CORE_SLOTS_DIR"]

    seen = []
    net = model["net"]

    class Watched:  # the real net; records the threads each call was given
        runtime, sessions = net.runtime, net.sessions

        def __call__(self, pixels, threads=None):
            seen.append(threads)
            return net(pixels, threads=threads)

    alone = answers(inference, {**model, "net": Watched()}, BODIES)
    other = hold_slot_in_another_process(model["core_share"].directory, slot=0)
    try:
        shared = answers(inference, {**model, "net": Watched()}, BODIES)
    finally:
        other.communicate("")
    assert seen == [2] * len(BODIES) + [1] * len(BODIES)
    for a, b in zip(alone, shared):  # one thread or two: the same answers
        assert a["top"][0]["index"] == b["top"][0]["index"]
        assert max(abs(x - y) for x, y in zip(a["probabilities"], b["probabilities"])) <= 1e-6


@pytest.mark.parametrize("env,why", [
    ({"SAGEMAKER_MODEL_SERVER_WORKERS": "1"}, "one worker"),
    ({"INFERENCE_SHARE_CORES": "0"}, "switched off"),
])
def test_no_sharing_when_there_is_nothing_to_share(inference, exported, monkeypatch, env, why):  # noqa: F811
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    model = inference.model_fn(str(exported[0]))
    assert model["core_share"] is None, why
    assert list(model["net"].sessions) == [2]
    out = inference.predict_fn(inference.input_fn(image_bytes(), "image/jpeg"), model)
    assert out["probabilities"].shape[0] == 1


@pytest.mark.parametrize("case", ["group-writable", "symlink"])
def test_a_slot_directory_that_is_not_safely_ours_turns_sharing_off(inference, tmp_path, monkeypatch, capsys, case):
    target = tmp_path / "slots"
    target.mkdir(mode=0o700)
    if case == "group-writable":
        target.chmod(0o770)
        directory = target
    else:
        directory = tmp_path / "link"
        directory.symlink_to(target)
    monkeypatch.setenv("INFERENCE_CORE_SLOTS_DIR", str(directory))
    assert inference.CoreShare.for_host(cores=2, slots=2) is None
    assert "core sharing off" in capsys.readouterr().err
    assert not list(target.iterdir())  # nothing written through it


def test_a_slot_directory_that_fails_later_costs_the_sharing_not_the_request(inference, exported, capsys):  # noqa: F811
    model = inference.model_fn(str(exported[0]))
    share = model["core_share"]
    for slot in share.directory.iterdir():
        slot.unlink()
    share.directory.rmdir()  # e.g. a tmp cleaner removed it under the running server
    out = [inference.predict_fn(inference.input_fn(body, "image/jpeg"), model) for body in BODIES]
    assert [o["probabilities"].shape[0] for o in out] == [1, 1, 1]
    with share.threads() as threads:  # every core, as if alone
        assert threads == 2
    assert capsys.readouterr().err.count("core sharing skipped") == 1  # said once, not per request
