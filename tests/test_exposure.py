"""What an unauthenticated client can cost the server, and the bound on each (issue 14).

docs/security.rst lists every resource with its bound and the test here that
proves it.  Everything talks to 127.0.0.0/8 only, every wait has a timeout,
time-dependent limits run on an injected clock.
"""
from __future__ import annotations

import socket
import threading

from pop3frame.adapters.memory import MemoryAdapter
from pop3frame.testing import Controller, ManualClock
from tests.helpers import RawClient
from tests.processes import Daemon, write_config

WRONG = b"-ERR [AUTH] invalid user name or password\r\n"


def eventually(predicate, timeout: float = 10.0) -> bool:
    """Wait (bounded) until ``predicate()`` holds for server-side state with no event to wait on."""
    pause = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        pause.wait(0.01)
    return predicate()


class Gate(MemoryAdapter):
    """authenticate() waits until the gate opens, and counts the calls running at once."""

    def __init__(self) -> None:
        super().__init__({"alice": "pw"}, apop=False)
        self.cond = threading.Condition()
        self.running = self.peak = self.calls = 0
        self.opened = False

    def authenticate(self, username, password):
        with self.cond:
            self.calls += 1
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.opened, 30)
            self.running -= 1
        return super().authenticate(username, password)

    def wait_running(self, n: int) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.running == n, 10)

    def open(self) -> None:
        with self.cond:
            self.opened = True
            self.cond.notify_all()


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident set size (VmHWM), in KiB."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM for process %d" % pid)


def bad_logins(port: int, names, timeout: float = 120.0) -> list:
    """USER/PASS for each name on its own connection, all at once; the replies to PASS."""
    replies = [b""] * len(names)
    barrier = threading.Barrier(len(names), timeout=timeout)

    def run(i: int, name: str) -> None:
        with RawClient(("127.0.0.1", port), timeout=timeout) as c:
            assert c.cmd("USER " + name).startswith(b"+OK")
            barrier.wait()
            replies[i] = c.cmd("PASS x")

    threads = [threading.Thread(target=run, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return replies


def test_concurrent_bad_logins_on_the_default_store_keep_memory_bounded(tmp_path):
    """Defect 1: the default SQLite store hashes with ARGON2ID (64 MiB per check);
    48 concurrent logins for unknown names once took the server from 28 MB to 2.7 GB.
    Password checks run a few at a time, so the peak grows by well under 512 MB."""
    config = write_config(tmp_path, """
        [[listener]]
        address = "127.0.0.1:0"
        [server]
        max_auth_failure_delay = 0
    """)
    with Daemon("--config", config, cwd=str(tmp_path)) as d:
        # One check first: the store makes its dummy hash and sizes its caches.
        assert bad_logins(d.port, ["nobody"]) == [b"-ERR [AUTH] invalid user name or password\r\n"]
        before = peak_rss_kib(d.proc.pid)
        replies = bad_logins(d.port, ["nobody%d" % i for i in range(48)])
        grown = peak_rss_kib(d.proc.pid) - before
        assert replies == [b"-ERR [AUTH] invalid user name or password\r\n"] * 48
        assert grown < 256 * 1024, "peak RSS grew by %d MiB" % (grown // 1024)
        assert d.stop() == 0


def test_password_checks_run_a_few_at_a_time_and_a_client_that_leaves_frees_its_place():
    """Defect 1, in process: with max_password_checks = 2, ten logins at once run two
    checks and queue eight; a queued client that hangs up leaves the line (its check
    never runs); the others are answered once checks finish."""
    store = Gate()
    with Controller(store, max_password_checks=2, max_auth_failure_delay=0, poll_interval=0.05) as server:
        checks = server.context.password_checks
        clients = [RawClient(server.address) for _ in range(10)]
        try:
            for i, c in enumerate(clients):
                c.send(b"USER nobody%d\r\nPASS x\r\n" % i)
            assert store.wait_running(2)
            assert eventually(lambda: checks.waiting == 8)
            leaving = clients.pop()
            leaving.close()
            assert eventually(lambda: checks.waiting == 7)
            assert server.wait_for_connections(9)
            store.open()
            for c in clients:
                assert c.line() == b"+OK send PASS\r\n" and c.line() == WRONG
        finally:
            for c in clients:
                c.close()
        assert store.peak == 2 and store.calls == 9
        assert (checks.running, checks.waiting) == (0, 0)


def test_waiting_for_a_password_check_ends_at_the_login_deadline():
    """The wait for a check counts against login_timeout (injected clock): past it the
    connection closes without a reply, as an autologout does."""
    store = Gate()
    clock = ManualClock()
    with Controller(store, max_password_checks=1, login_timeout=120, clock=clock, poll_interval=0.05) as server:
        with RawClient(server.address) as first, RawClient(server.address) as second:
            first.send(b"USER alice\r\nPASS pw\r\n")
            assert store.wait_running(1)
            second.send(b"USER nobody\r\nPASS x\r\n")
            assert eventually(lambda: server.context.password_checks.waiting == 1)
            clock.advance(120)
            assert second.line() == b"+OK send PASS\r\n"
            assert second.read_all() == b""
            assert server.context.password_checks.waiting == 0
            store.open()
            assert first.line() == b"+OK send PASS\r\n"
            # A check that had started in time completes the login.
            assert first.line().startswith(b"+OK alice's maildrop")
        assert store.calls == 1
