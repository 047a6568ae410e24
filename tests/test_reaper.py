"""tests.reaper: what a killed test process started does not outlive it."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap

from tests import reaper

#: A stand-in test process: starts two server-like children, gives one and a
#: directory to the reaper, and the other under a start time that is not its
#: own (as if its PID had been reused), says the PIDs and dies by SIGKILL,
#: the death that runs no finally, fixture teardown or atexit.
KILLED = textwrap.dedent("""
    import os, signal, subprocess, sys
    from tests import reaper
    server, other = (subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in "12")
    reaper.reap(server.pid, signal.SIGINT)
    reaper.remove(sys.argv[1])
    reaper._tell("%d 1 %d" % (other.pid, signal.SIGKILL))
    print(server.pid, other.pid, reaper.reaper_pid(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def exited(pid: int, timeout: float = 60.0) -> bool:
    """Wait (bounded) until ``pid``, not necessarily our child, has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def test_a_killed_test_process_leaves_no_server_or_directory(tmp_path):
    left = tmp_path / "cluster"
    left.mkdir()
    killed = subprocess.run([sys.executable, "-c", KILLED, str(left)], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, PYTHONPATH=reaper.ROOT))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    server, other, reaping = map(int, killed.stdout.split())
    try:
        assert exited(server)  # SIGINT, by the reaper, as the test process had asked
        assert exited(reaping)  # then it ended
        assert not left.exists()
        assert reaper.start_time(other) is not None  # not the process listed: left alone
    finally:
        os.kill(other, signal.SIGKILL)
    assert exited(other)
