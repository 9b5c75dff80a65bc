"""Stopping what the host started in a session of its own (a job, our server, the SageMaker
serving stack with TorchServe's Java process and workers): the whole process group, not only
its leader, since a leader that exits on SIGTERM can leave children behind."""
from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is left (an unreaped child counts: reap it first)."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # there, but not ours to signal
        return True


def stop_group(pgid: int, timeout: float, reap: Callable[[], object] | None = None) -> None:
    """SIGTERM to the process group, SIGKILL to whatever of it is left after `timeout` seconds.
    reap: called while waiting, for a leader that is this process's child (Popen.poll), so
    that once it exits it is collected and stops counting as alive."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while True:
        if reap is not None:
            reap()
        if not group_alive(pgid) or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
