"""Ends the servers a test process started when it dies without ending them.

A test that fails stops its servers in a ``finally`` or a fixture's
teardown, and the PostgreSQL cluster is stopped at exit; none of that runs
when the test process itself is killed (SIGKILL, or SIGTERM, which Python
does not turn into an exception).  So every long-running child (postgres,
dovecot, ``pop3frame serve``) is also given to a reaper: one process per
test process, started with the first child, which reads ``PID START SIGNAL``
and ``DIR PATH`` lines on its standard input until that ends, which is when
the test process has exited, however.  Then each listed process still
running gets its signal, and SIGKILL if it has not exited 30 s later;
listed directories are removed.  A process is recognised by its PID and
start time (field 22 of ``/proc/PID/stat``), so one the test process ended
itself, whose PID another process may have taken since, is left alone; it
is then signalled and waited for through a pidfd, which names it for good.

The reaper runs in a session of its own and ignores SIGINT, SIGTERM and
SIGHUP: a signal for the test process's group must not end it before it has
done its work.
"""
from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import threading
import time
from typing import List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_mutex = threading.Lock()
_pipe: Optional[int] = None  # the write end, in the test process
_pid: Optional[int] = None


def start_time(pid: int) -> Optional[str]:
    """When ``pid`` started (clock ticks since boot), or None if no such process is running."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _tell(line: str) -> None:
    global _pipe, _pid
    with _mutex:
        if _pipe is None:
            read, _pipe = os.pipe()  # both close-on-exec: no other child holds the write end
            try:
                env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
                # posix_spawn, not Popen: nothing here waits for the reaper, which
                # outlives this process by design.
                _pid = os.posix_spawn(sys.executable, [sys.executable, "-m", "tests.reaper"], env,
                               file_actions=[(os.POSIX_SPAWN_DUP2, read, 0),  # stdout: no one's pipe
                                             (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)],
                               setsid=True)
            finally:
                os.close(read)
        os.write(_pipe, line.encode() + b"\n")


def reaper_pid() -> Optional[int]:
    """The reaper's PID, once one was started."""
    return _pid


def reap(pid: int, signum: int = signal.SIGTERM) -> None:
    """Have ``pid`` (a child just started) sent ``signum`` if it outlives this process."""
    started = start_time(pid)
    if started is not None:
        _tell("%d %s %d" % (pid, started, signum))


def remove(path: str) -> None:
    """Have the directory ``path`` removed if this process dies before removing it."""
    _tell("DIR " + path)


def _run() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    processes: List[Tuple[int, str, int]] = []
    directories: List[str] = []
    for line in sys.stdin:
        kind, rest = line.rstrip("\n").split(" ", 1)
        if kind == "DIR":
            directories.append(rest)
        else:
            started, signum = rest.split()
            processes.append((int(kind), started, int(signum)))
    # The test process is gone: end what it left running.  A pidfd names one
    # process for good; the start time says it is still the one listed.
    running = {}
    for pid, started, signum in processes:
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # exited long ago
            continue
        if start_time(pid) == started:
            running[fd] = signum
        else:
            os.close(fd)
    waiting = select.poll()
    for fd, signum in running.items():
        _signal(fd, signum)
        waiting.register(fd, select.POLLIN)  # readable once the process has exited
    deadline = time.monotonic() + 30
    while running and time.monotonic() < deadline:
        for fd, _ in waiting.poll(max(0, deadline - time.monotonic()) * 1000):
            waiting.unregister(fd)
            os.close(fd)
            del running[fd]
    for fd in running:
        _signal(fd, signal.SIGKILL)
    for path in directories:
        shutil.rmtree(path, ignore_errors=True)


def _signal(pidfd: int, signum: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signum)
    except OSError:  # exited meanwhile
        pass


if __name__ == "__main__":
    _run()
