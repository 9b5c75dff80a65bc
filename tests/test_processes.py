"""pipeline/processes.py: stopping a process group stops all of it, a child that outlives its
leader's SIGTERM included (the jobs, our server and TorchServe's Java process and workers)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from pipeline.processes import group_alive, stop_group

LEADER = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", {child!r}])
    time.sleep(120)
""")
STUBBORN_CHILD = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "print('ready', flush=True); time.sleep(120)")
POLITE_CHILD = "import time; print('ready', flush=True); time.sleep(120)"


def start_group(child: str) -> subprocess.Popen:
    leader = subprocess.Popen([sys.executable, "-c", LEADER.format(child=child)], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    assert leader.stdout.readline().strip() == "ready"  # the child's handlers are in place
    return leader


def wait_gone(pgid: int, bound: float = 10.0) -> bool:
    """The group is gone once its last members are reaped (by init, for orphans)."""
    deadline = time.monotonic() + bound
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not group_alive(pgid)


def test_a_child_that_ignores_sigterm_is_killed_once_the_grace_is_over():
    leader = start_group(STUBBORN_CHILD)
    try:
        stop_group(leader.pid, timeout=1.0, reap=leader.poll)
        assert leader.returncode == -signal.SIGTERM  # the leader went on SIGTERM...
        assert wait_gone(leader.pid)                   # ...and its child did not outlive it
    finally:
        if group_alive(leader.pid):
            os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()


def test_a_group_that_stops_on_sigterm_is_gone_with_its_leader():
    leader = start_group(POLITE_CHILD)
    stop_group(leader.pid, timeout=30.0, reap=leader.poll)
    assert leader.returncode == -signal.SIGTERM
    assert wait_gone(leader.pid)


def test_a_group_already_gone_is_fine():
    leader = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    leader.wait()
    assert not group_alive(leader.pid)
    stop_group(leader.pid, timeout=1.0)
