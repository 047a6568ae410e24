"""What an unauthenticated client can cost the server, and the bound on each (issue 14).

docs/security.rst lists every resource with its bound and the test here that
proves it.  Everything talks to 127.0.0.0/8 only, every wait has a timeout,
time-dependent limits run on an injected clock.
"""
from __future__ import annotations

import base64
import logging
import os
import re
import select
import socket
import ssl
import threading

import trustme

from pop3frame.adapters.memory import MemoryAdapter
from pop3frame.auth import FailureThrottle
from pop3frame.clientlog import LogBudget, quoted
from pop3frame.server import ConnectionTracker
from pop3frame.testing import Controller, ManualClock
from tests.helpers import RawClient, tls_files
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
        self.names: list = []
        self.opened = False

    def authenticate(self, username, password):
        with self.cond:
            self.calls += 1
            self.names.append(username)
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
            # One whose check has not started (under load, any two may run first).
            leaving = next(c for i, c in enumerate(clients) if "nobody%d" % i not in store.names)
            clients.remove(leaving)
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


# -- defect 9: time before login, refused commands, connections per address -------------


def test_login_timeout_counts_from_connect_not_from_the_last_line():
    """Defect 9: a command every 45 s once kept a connection for ever (the 60 s idle
    timeout restarted on each line).  login_timeout (injected clock) closes it 120 s
    after connect, without a reply (RFC 1939 section 3: autologout), whatever it sends."""
    clock = ManualClock()
    with Controller(MemoryAdapter({"alice": "pw"}), clock=clock, poll_interval=0.01) as server:
        with RawClient(server.address) as c:
            for _ in range(2):
                clock.advance(45)
                c.send(b"CAPA\r\n")
                assert c.line().startswith(b"+OK") and c.multiline().endswith(b".\r\n")
            clock.advance(30)
            assert c.read_all() == b""
        assert server.wait_for_connections(0)


def test_pipelined_commands_after_the_login_deadline_are_not_answered():
    """Lines already buffered when the login deadline passes are not executed: here
    a check that started in time ends after it, and the pipelined CAPA gets no reply."""
    clock = ManualClock()
    with Controller(Gate(), clock=clock, poll_interval=0.01) as server, RawClient(server.address) as c:
        store = server.context.adapter
        c.send(b"USER alice\r\nPASS wrong\r\nCAPA\r\n")
        assert store.wait_running(1)
        clock.advance(120)
        store.open()
        assert c.line() == b"+OK send PASS\r\n"
        assert c.line() == WRONG  # the answer to a command read in time
        assert c.read_all() == b""


def test_a_withheld_reply_past_the_login_deadline_closes_the_connection_at_the_deadline(caplog):
    """A failed login's -ERR withheld beyond the login deadline is never sent: the
    connection closes at the deadline, not sooner (an early close would tell a wrong
    guess before the right one's reply could come)."""
    caplog.set_level(logging.DEBUG, logger="pop3frame")  # per-event lines are DEBUG
    clock = ManualClock()
    # auth_timeout: the client idles 119.5 s before its first command.
    options = dict(clock=clock, poll_interval=0.01, free_auth_failures=0, max_auth_failure_delay=60,
                   auth_timeout=300)
    with Controller(MemoryAdapter({"alice": "pw"}), **options) as server, RawClient(server.address) as c:
        clock.advance(119.5)
        c.send(b"USER alice\r\nPASS wrong\r\n")
        assert c.line() == b"+OK send PASS\r\n"
        assert eventually(lambda: "reply withheld for 1 s" in caplog.text)
        assert not select.select([c.sock], [], [], 0)[0]  # nothing yet, not even the close
        clock.advance(0.5)
        assert c.read_all() == b""
        assert "autologout: no login within 120 s of connecting" in caplog.text


def test_client_text_in_log_lines_is_quoted_and_clipped(caplog):
    """A user name reaches the log escaped and clipped (pop3frame.clientlog.quoted):
    a "login failed" line once carried the whole 6 KB name of an AUTH PLAIN response,
    line breaks and terminal escapes included (repr escaped those, but kept them all)."""
    caplog.set_level(logging.DEBUG, logger="pop3frame")
    forged = "A" * 6000 + "\n2026-01-01 INFO pop3frame.session forged\x1b[2K\u2028"
    long_name = "b" * 200
    with Controller(MemoryAdapter({long_name: "pw"}), max_auth_failure_delay=0) as server:
        with RawClient(server.address) as c:
            response = base64.b64encode(b"\0" + forged.encode() + b"\0pw").decode()
            assert c.cmd("AUTH PLAIN") == b"+ \r\n"
            assert c.cmd(response) == WRONG  # RFC 5034 section 4: a response may exceed 255 octets
            assert c.login(long_name, "pw").startswith(b"+OK")
            assert c.cmd("QUIT").startswith(b"+OK")
        assert server.wait_for_connections(0)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("pop3frame")]
    assert any("login failed for 'AAAA" in line for line in lines)
    assert any("user '%s'..." % ("b" * 64) in line for line in lines)  # the session summary
    for line in lines:
        assert len(line) < 400 and line.isprintable(), line[:200]
        assert "forged" not in line and "b" * 65 not in line
    summary = next(r for r in caplog.records if "session end" in r.getMessage() and r.user)
    assert summary.user == "b" * 64 + "..."  # the JSON log's field, clipped too
    assert quoted("\udcff\x00\u202e" * 100) == repr("\udcff\x00\u202e" * 21 + "\udcff") + "..."


def test_log_lines_per_address_are_bounded_and_summarized(caplog):
    """One address outside the trusted networks once wrote 5,300 refusal lines and
    2,900 session summaries a second.  With max_log_lines_per_ip = 5, it writes 5
    lines a minute (on the injected clock), then one line saying how many were
    dropped; a session in the next minute gets its summary again, and a trusted
    address is never counted."""
    caplog.set_level(logging.INFO, logger="pop3frame")
    clock = ManualClock()
    options = dict(clock=clock, poll_interval=0.01, max_connections_per_ip=1, max_log_lines_per_ip=5,
                   trusted_networks=("127.0.0.1/32",))
    with Controller(MemoryAdapter({"alice": "pw"}), host="0.0.0.0", **options) as server:
        port = server.port

        def lines_about(address):
            return [r.getMessage() for r in caplog.records if address in r.getMessage()]

        with RawClient(("127.0.0.2", port), source="127.0.0.2") as held:
            assert held.greeting.startswith(b"+OK")
            for _ in range(30):
                with RawClient(("127.0.0.2", port), source="127.0.0.2") as refused:
                    assert refused.greeting == b"-ERR [SYS/TEMP] too many connections from your address\r\n"
        assert server.wait_for_connections(0)
        for _ in range(30):
            with RawClient(("127.0.0.2", port), source="127.0.0.2") as c:
                assert c.cmd("QUIT").startswith(b"+OK")
            assert server.wait_for_connections(0)
        for _ in range(10):  # trusted: every line
            with RawClient(("127.0.0.1", port), source="127.0.0.1") as c:
                assert c.cmd("QUIT").startswith(b"+OK")
            assert server.wait_for_connections(0)
        assert len(lines_about("peer 127.0.0.1 ")) == 10
        assert len(lines_about("127.0.0.2")) == 5  # 5 refusals, then nothing
        clock.advance(60)  # the accepting thread reports the minute that is over
        assert eventually(lambda: any("suppressed" in line for line in lines_about("127.0.0.2")))
        assert lines_about("127.0.0.2")[5:] == ["56 more log lines about 127.0.0.2 suppressed in the last 60 s"
                                                " (max_log_lines_per_ip)"]
        with RawClient(("127.0.0.2", port), source="127.0.0.2") as c:
            assert c.cmd("QUIT").startswith(b"+OK")
        assert server.wait_for_connections(0)
        assert "session end: peer 127.0.0.2" in lines_about("127.0.0.2")[-1]


def test_log_budget_memory_and_windows_are_bounded(caplog):
    """The budget keeps a window per address for a minute at most, and at most
    max_addresses of them (the oldest ends early, its drops reported); an IPv6
    client is its /64; no address (a session without a socket) is never counted."""
    caplog.set_level(logging.INFO, logger="pop3frame")
    clock = ManualClock()
    budget = LogBudget(2, clock, exempt=lambda ip: ip == "192.0.2.99", max_addresses=100)
    assert [budget.allow("2001:db8:0:1::%x" % i) for i in range(4)] == [True, True, False, False]
    assert all(budget.allow("192.0.2.99") for _ in range(10)) and all(budget.allow("") for _ in range(10))
    for i in range(5000):
        budget.allow("198.51.%d.%d" % (i // 256, i % 256))
        assert len(budget) <= 100
    assert caplog.messages == ["2 more log lines about 2001:db8:0:1::/64 suppressed in the last 1 s"
                               " (max_log_lines_per_ip)"]
    clock.advance(60)
    budget.sweep()
    assert len(budget) == 0
    assert budget.allow("2001:db8:0:1::1")


TOO_MANY = b"-ERR too many invalid commands, closing connection\r\n"


def test_a_few_refused_commands_before_login_close_the_connection():
    """Defect 9: invalid commands before login were unlimited.  The third -ERR that no
    password check gave (unknown, wrong state, bad syntax, refused) closes the
    connection, as Dovecot's pop3-login does (RFC 1939 section 3 allows closing);
    failed logins have their own limit, and good commands in between do not reset it."""
    with Controller(MemoryAdapter({"alice": "pw"}), max_auth_failure_delay=0) as server:
        with RawClient(server.address) as c:
            assert c.cmd("XYZ") == b"-ERR unknown command\r\n"
            assert c.login("alice", "wrong") == WRONG  # a failed login: not counted here
            c.send(b"CAPA\r\n")
            assert c.line().startswith(b"+OK") and c.multiline()
            assert c.cmd("STAT") == b"-ERR STAT not valid in the AUTHORIZATION state\r\n"
            assert c.cmd("PASS x") == TOO_MANY
            assert c.read_all() == b""
        with RawClient(server.address) as c:
            c.send(b"X" * 300 + b"\r\nNOOP\r\n\xff\r\n")
            assert c.line() == b"-ERR line too long\r\n"
            assert c.line() == b"-ERR NOOP not valid in the AUTHORIZATION state\r\n"
            assert c.line() == TOO_MANY
            assert c.read_all() == b""


def test_refused_commands_after_login_are_not_limited():
    """The limit is for unauthenticated clients: a logged-in one may err as it likes."""
    with Controller(MemoryAdapter({"alice": "pw"})) as server, RawClient(server.address) as c:
        assert c.login("alice", "pw").startswith(b"+OK")
        for _ in range(10):
            assert c.cmd("XYZ") == b"-ERR unknown command\r\n"
        assert c.cmd("QUIT").startswith(b"+OK")


def test_connections_per_address_are_limited_outside_trusted_networks():
    """Defect 9: 1,000 connections from one address once locked everyone else out.  By
    default an address outside the trusted networks gets max_connections_per_ip = 10;
    a trusted one (here 127.0.0.1) has no such limit."""
    with Controller(MemoryAdapter({"alice": "pw"}), host="0.0.0.0", trusted_networks=("127.0.0.1/32",)) as server:
        port = server.port
        assert server.context.config.max_connections_per_ip == 10
        clients = []
        try:
            for _ in range(10):
                clients.append(RawClient(("127.0.0.2", port), source="127.0.0.2"))
                assert clients[-1].greeting.startswith(b"+OK")
            with RawClient(("127.0.0.2", port), source="127.0.0.2") as refused:
                assert refused.greeting == b"-ERR [SYS/TEMP] too many connections from your address\r\n"
            for _ in range(12):
                clients.append(RawClient(("127.0.0.1", port), source="127.0.0.1"))
                assert clients[-1].greeting.startswith(b"+OK")
        finally:
            for c in clients:
                c.close()


# -- the rest of the class ---------------------------------------------------------------


def test_an_ipv6_client_counts_as_its_slash_64():
    """One IPv6 subscriber holds at least a /64 (RFC 6177): per-address limits count the
    /64, or a client could pose as 2**64 clients.  IPv4-mapped addresses are IPv4."""
    tracker = ConnectionTracker(max_total=100, max_per_ip=2)
    server = object()
    assert tracker.admit(object(), "2001:db8:1:2::1", server) is None
    assert tracker.admit(object(), "2001:db8:1:2:ffff::9", server) is None
    assert tracker.admit(object(), "2001:db8:1:2::3", server) == "too many connections from your address"
    assert tracker.admit(object(), "2001:db8:1:3::1", server) is None  # the next /64
    assert tracker.admit(object(), "::ffff:192.0.2.1", server) is None
    assert tracker.count_ip("192.0.2.1") == 1 and tracker.count_ip("2001:db8:1:2::77") == 2


def test_failure_records_are_bounded_by_count_and_ipv6_prefix():
    """The failed-login table holds at most max_records addresses, whatever the number of
    addresses guessing (the newest kept; O(1) per failure on average), and an IPv6 /64
    is one record."""
    clock = ManualClock()
    throttle = FailureThrottle(free=0, max_delay=60, clock=clock, max_records=100)
    for i in range(5000):
        throttle.failure("198.51.%d.%d" % (i // 256, i % 256))
        clock.advance(0.001)
        assert len(throttle) <= 100
    assert throttle.not_before("198.51.19.135") > clock()  # the newest are remembered
    ipv6 = FailureThrottle(free=0, max_delay=60, clock=clock)
    for i in range(1000):
        ipv6.failure("2001:db8:0:1:%x::1" % i)
    assert len(ipv6) == 1 and ipv6.delay(1000) == 60
    assert ipv6.not_before("2001:db8:0:1::abcd") == clock() + 60


def test_stls_late_before_login_has_until_the_login_deadline_to_finish(tmp_path):
    """A TLS handshake started by STLS shortly before the login deadline ends with it,
    not tls_handshake_timeout later."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    clock = ManualClock()
    with Controller(MemoryAdapter({"alice": "pw"}), tls=context, clock=clock, poll_interval=0.01) as server:
        with RawClient(server.address) as c:
            clock.advance(50)
            c.send(b"CAPA\r\n")
            assert c.line().startswith(b"+OK") and b"STLS" in c.multiline()
            clock.advance(50)
            assert c.cmd("STLS") == b"+OK Begin TLS negotiation\r\n"  # and no handshake follows
            assert not server.wait_for_connections(0, timeout=0.2)
            clock.advance(20)
            assert server.wait_for_connections(0)
            assert c.read_all() == b""


def test_input_while_a_reply_is_withheld_is_bounded(caplog):
    """Bytes a client sends while its reply is withheld are kept for later, up to 64 KiB;
    past that the connection closes."""
    caplog.set_level(logging.DEBUG, logger="pop3frame")  # per-event lines are DEBUG
    clock = ManualClock()
    with Controller(MemoryAdapter({"alice": "pw"}), clock=clock, poll_interval=0.01,
                    free_auth_failures=0) as server, RawClient(server.address) as c:
        c.send(b"USER alice\r\nPASS wrong\r\n")
        assert c.line() == b"+OK send PASS\r\n"
        assert eventually(lambda: "reply withheld" in caplog.text)
        try:
            c.send(b"CAPA\r\n" * 20000)  # 120 KB of pipelined commands
        except OSError:
            pass
        assert server.wait_for_connections(0)
        assert "connection ended while a reply was withheld" in caplog.text


def test_security_doc_names_tests_that_exist():
    """docs/security.rst gives each bound its test as ``tests/file.py::name``; every
    one named exists (a renamed or deleted test fails here, not silently in the doc)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "security.rst"), encoding="utf-8") as f:
        named = re.findall(r"``(tests/\w+\.py)::(\w+)``", f.read())
    assert len(named) >= 30
    for path, name in named:
        with open(os.path.join(root, path), encoding="utf-8") as f:
            assert re.search(r"^def %s\(" % name, f.read(), re.M), "%s::%s" % (path, name)


def test_commands_before_login_are_bounded_in_number():
    """A stream of cheap valid commands (CAPA: 25,000 a second on one connection) once
    took a CPU for as long as the connection lived; max_login_commands (50) ends it."""
    with Controller(MemoryAdapter({"alice": "pw"})) as server, RawClient(server.address) as c:
        c.send(b"CAPA\r\n" * 60)
        for _ in range(50):
            assert c.line().startswith(b"+OK") and c.multiline().endswith(b".\r\n")
        assert c.line() == b"-ERR too many commands without a login, closing connection\r\n"
        assert c.read_all() == b""
    with Controller(MemoryAdapter({"alice": "pw"})) as server, RawClient(server.address) as c:
        c.send(b"CAPA\r\n" * 49)
        for _ in range(49):
            assert c.line().startswith(b"+OK") and c.multiline().endswith(b".\r\n")
        assert c.login("alice", "pw") == b"-ERR too many commands without a login, closing connection\r\n"


def test_unauthenticated_connections_cannot_take_the_descriptors_logged_in_users_need(tmp_path):
    """Each TLS connection holds two descriptors (its socket and the duplicate the
    handshake wraps).  Under the usual soft open-files limit of 1024, 510 TLS
    connections from 51 addresses (within every per-address limit, half of
    max_connections) took them all: TLS handshakes failed ("Too many open files")
    and a logged-in user's RETR got -ERR [SYS/TEMP].  serve raises the soft limit
    to what max_connections needs (here from 64)."""
    cert, key, client = tls_files(tmp_path)
    with Daemon("--listen", "127.0.0.1:0", "--tls-listen", "127.0.0.1:0", "--cert", cert, "--key", key,
                cwd=str(tmp_path), listeners=2, ulimit="-Sn 64") as d:
        held = []
        try:
            for _ in range(40):
                sock = client.wrap_socket(socket.create_connection(("127.0.0.1", d.ports[1]), timeout=10),
                                          server_hostname="localhost")
                held.append(sock)
                assert sock.recv(100).startswith(b"+OK POP3 server ready")
            with RawClient(("127.0.0.1", d.port)) as c:
                assert c.login("demo", "demo").startswith(b"+OK demo's maildrop")
                assert c.cmd("RETR 1").startswith(b"+OK") and c.multiline().endswith(b"\r\n.\r\n")
        finally:
            for sock in held:
                sock.close()
        assert d.stop() == 0
    assert "Too many open files" not in "".join(d.seen) + d.rest()


def test_max_connections_fits_a_hard_open_files_limit(tmp_path):
    """Where the hard limit leaves no room for max_connections, serve says so and
    serves as many as fit (6 descriptors each, 64 kept for itself), so the next
    connection is refused with -ERR [SYS/TEMP] before descriptors run out."""
    with Daemon("--demo", "--listen", "127.0.0.1:0", ulimit="-n 128") as d:
        assert d.saw(r"WARNING .*open files limit 128 .* max_connections 10 instead of 1000")
        clients = []
        try:
            for _ in range(10):
                clients.append(RawClient(("127.0.0.1", d.port)))
            assert clients[0].login("demo", "demo").startswith(b"+OK")
            with RawClient(("127.0.0.1", d.port)) as extra:
                assert extra.greeting == b"-ERR [SYS/TEMP] too many connections\r\n"
        finally:
            for c in clients:
                c.close()
        assert d.stop() == 0
