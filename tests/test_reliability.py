"""Reliability under hostile and faulty conditions (issue 6).

Bounded and self-stopping: every loop has a fixed count, every wait a timeout.
"""
from __future__ import annotations

import base64
import contextlib
import logging
import os
import socket
import threading
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pop3frame import protocol
from pop3frame.adapters.memory import MemoryAdapter
from pop3frame.testing import Controller, ManualClock
from tests.helpers import KEEP_THREADS, FileSpanServer, RawClient, open_fds, settled_workers, tick_until_closed


# -- property-based protocol fuzzing --------------------------------------------

INITIAL = [b"Subject: %d\r\n\r\n%s\r\n" % (i, b".dot\r\nline" * i) for i in range(1, 6)]

junk = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
base64_text = st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode())
mechanism = st.sampled_from(["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256", "plain", "XOAUTH2", "GSSAPI", "*"])

#: Commands for any state: each is valid somewhere, invalid somewhere else.
anywhere = st.one_of(
    st.sampled_from(["CAPA", "NOOP", "USER alice", "PASS x", "UTF8", "STLS", "LANG", "LANG en", "LANG *",
                     "LANG fr", "AUTH", "*", "="]),
    st.tuples(mechanism, st.one_of(st.just(""), st.just(" ="), base64_text.map(" ".__add__))).map("AUTH %s%s".__mod__),
    st.tuples(st.sampled_from(["alice", "bob", "\u00e4"]), st.text("0123456789abcdef", max_size=32)).map(
        "APOP %s %s".__mod__),
    base64_text,
).map(str.encode)

#: Commands for the TRANSACTION state, with message numbers in and out of range.
transaction = st.one_of(
    st.sampled_from(["STAT", "LIST", "UIDL", "RSET"]),
    st.tuples(st.sampled_from(["LIST", "UIDL", "RETR", "DELE", "TOP"]), st.integers(-2, 8)).map(
        lambda t: "%s %d" % t + (" 1" if t[0] == "TOP" else "")),
).map(str.encode)

#: The server under fuzzing offers APOP, CRAM-MD5 and SCRAM; the failed-login
#: delay (tested with a frozen clock elsewhere) is off so guesses cost no time;
#: a connection's thread ends with it (no reuse), so any thread left is a leak.
FUZZ_OPTIONS = dict(max_auth_failure_delay=0, thread_keepalive=0)


@pytest.fixture(scope="module")
def fuzz_server():
    """(server, store, (threads, open descriptors) once the server runs)."""
    store = MemoryAdapter({"alice": "pw"}, apop=True)
    with Controller(store, **FUZZ_OPTIONS) as server:
        yield server, store, (set(threading.enumerate()), open_fds())


def refill(store) -> None:
    """Give alice the INITIAL messages again, whatever the last example did."""
    with store._mutex:
        store._boxes["alice"] = [("u%d" % i, m) for i, m in enumerate(INITIAL)]


def parsed(line: bytes):
    """The command the server sees in ``line``, or None if it cannot parse it."""
    try:
        return protocol.parse_command(line, utf8=True)
    except protocol.ProtocolError:
        return None


FAILED_LOGIN = b"-ERR [AUTH] invalid user name or password\r\n"
MULTILINE_ALWAYS = {"CAPA", "RETR", "TOP"}
MULTILINE_WITHOUT_ARGS = {"LIST", "UIDL", "LANG", "AUTH"}


def converse(c: RawClient, line: bytes, in_sasl: bool) -> bytes:
    """Send one line and read its whole reply; return the status line (b"" if the
    server closed the connection).  Inside a SASL exchange every line is a
    response to a challenge, answered by a single line."""
    try:
        c.send(line + b"\r\n")
        status = c.line()
    except OSError:  # the server closed first and the stack answered with RST
        return b""
    assert status == b"" or status.startswith((b"+OK", b"-ERR", b"+ ")), status
    cmd = None if in_sasl else parsed(line)
    if status.startswith(b"+OK") and cmd is not None and (
            cmd.name in MULTILINE_ALWAYS or (cmd.name in MULTILINE_WITHOUT_ARGS and not cmd.args)):
        c.multiline()
    return status


@contextlib.contextmanager
def nothing_left_behind(server, baseline):
    """After the block: the server still answers, and every connection thread,
    socket and lock is gone, back to ``baseline`` (threads, open descriptors)
    taken when the server started.  Waits are bounded, never fixed."""
    threads, fds = baseline
    yield
    with RawClient(server.address) as probe:
        assert probe.greeting.startswith(b"+OK")
        assert probe.cmd("QUIT").startswith(b"+OK")
    assert server.wait_for_connections(0)
    for thread in set(threading.enumerate()) - threads:
        thread.join(10)  # it has released its connection; now let it end
    assert set(threading.enumerate()) - threads == set()
    assert open_fds() - fds == set()
    assert server.context.locks.held_names() == []


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(commands=st.lists(st.one_of(transaction, anywhere, junk), max_size=25), ending=st.sampled_from(["QUIT", "drop"]))
def test_random_sessions_keep_invariants(fuzz_server, commands, ending):
    """RFC 1939 sections 5 and 6 under random TRANSACTION-state traffic: the server
    keeps answering, leaks no thread, descriptor or lock, and a message disappears
    only when DELE was followed by a successful QUIT."""
    server, store, baseline = fuzz_server
    refill(store)
    deleted = set()
    quit_ok = False
    with nothing_left_behind(server, baseline):
        with RawClient(server.address) as c:
            assert c.login("alice", "pw").startswith(b"+OK")
            lines = commands + ([b"QUIT"] if ending == "QUIT" else [])
            for line in lines:
                status = converse(c, line, in_sasl=False)
                assert status, "the server hung up in TRANSACTION after %r" % line
                cmd = parsed(line)
                if cmd is None or not status.startswith(b"+OK"):
                    continue
                if cmd.name == "DELE":
                    deleted.add(int(cmd.args[0]))
                elif cmd.name == "RSET":
                    deleted.clear()
                elif cmd.name == "QUIT":
                    quit_ok = True
                    assert c.read_all() == b""
                    break
            if not quit_ok:
                c.sock.shutdown(socket.SHUT_RDWR)
    expected = [m for i, m in enumerate(INITIAL, 1) if not (quit_ok and i in deleted)]
    assert store.messages("alice") == expected


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(commands=st.lists(st.one_of(anywhere, junk), max_size=25), ending=st.sampled_from(["QUIT", "drop"]))
def test_random_authorization_state_keeps_invariants(fuzz_server, commands, ending):
    """RFC 1939 section 4, RFC 5034 (AUTH), RFC 2595 (STLS without TLS), RFC 6856
    (UTF8, LANG) under random AUTHORIZATION-state traffic and bytes: every line gets
    a well-formed reply, no lock is ever taken without the password, the server
    hangs up exactly at max_auth_failures failed logins or at max_bad_commands other
    refusals (issue 14), nothing leaks."""
    server, store, baseline = fuzz_server
    refill(store)
    config = server.context.config
    failures = bad = 0
    with nothing_left_behind(server, baseline):
        with RawClient(server.address) as c:
            in_sasl = ended = False
            for line in commands:
                status = converse(c, line, in_sasl)
                assert status, "the server hung up after %r with %d failed logins" % (line, failures)
                assert b"maildrop" not in status, "logged in without the password"
                assert server.context.locks.held_names() == []
                in_sasl = status.startswith(b"+ ")
                failures += status == FAILED_LOGIN
                bad += status.startswith(b"-ERR") and status != FAILED_LOGIN
                if bad == config.max_bad_commands:
                    assert status == b"-ERR too many invalid commands, closing connection\r\n"
                quit_ok = not in_sasl and status.startswith(b"+OK") and parsed(line).name == "QUIT"
                if quit_ok or failures == config.max_auth_failures or bad == config.max_bad_commands:
                    assert c.read_all() == b""  # the server closed the connection
                    ended = True
                    break
            if not ended and ending == "QUIT" and in_sasl and bad + 1 == config.max_bad_commands:
                # Aborting is one more refusal, the last one allowed.
                assert c.cmd("*") == b"-ERR too many invalid commands, closing connection\r\n"
                assert c.read_all() == b""
            elif not ended and ending == "QUIT":
                if in_sasl:
                    assert c.cmd("*") == b"-ERR authentication aborted\r\n"
                assert c.cmd("QUIT").startswith(b"+OK")
                assert c.read_all() == b""
            elif not ended:
                c.sock.shutdown(socket.SHUT_RDWR)
    assert store.messages("alice") == INITIAL


# -- fault injection: the adapter fails at each step in turn --------------------------


class Faulty(MemoryAdapter):
    STEPS = ("authenticate", "list", "open", "read", "delete", "close")

    def __init__(self, step):
        super().__init__({"alice": "pw"}, apop=False)
        self.step = step
        self.deliver("alice", b"Subject: a\r\n\r\n" + b"a" * 600_000 + b"\r\n")
        self.deliver("alice", b"Subject: b\r\n\r\nb\r\n")

    def _fail(self, step):
        if self.step == step:
            raise RuntimeError("injected failure at " + step)

    def authenticate(self, u, p):
        self._fail("authenticate")
        return super().authenticate(u, p)

    def list_messages(self, u):
        self._fail("list")
        return super().list_messages(u)

    def open_message(self, u, m):
        self._fail("open")
        data = super().open_message(u, m)
        adapter = self

        class Stream:
            pos = 0

            def read(self, n):
                if self.pos > 0:
                    adapter._fail("read")
                chunk = data[self.pos:self.pos + n]
                self.pos += len(chunk)
                return chunk

            def close(self):
                adapter.closed_streams += 1

        return Stream()

    closed_streams = 0

    def delete_messages(self, u, ms):
        self._fail("delete")
        return super().delete_messages(u, ms)

    def close_mailbox(self, u):
        self._fail("close")


@pytest.mark.parametrize("step", Faulty.STEPS)
def test_adapter_failing_at_each_step(step):
    """Client gets -ERR [SYS/TEMP] or a closed connection; lock freed; nothing deleted;
    no exception text on the wire; the next client is served."""
    store = Faulty(step)
    with Controller(store) as server:
        with RawClient(server.address) as c:
            c.cmd("USER alice")
            reply = c.cmd("PASS pw")
            transcript = reply
            if reply.startswith(b"+OK"):
                c.send(b"DELE 2\r\nRETR 1\r\nQUIT\r\n")
                transcript += c.read_all()
        assert b"injected" not in transcript and b"RuntimeError" not in transcript
        if step in ("authenticate", "list"):
            assert reply == b"-ERR [SYS/TEMP] internal server error\r\n"
        if step == "open":
            assert b"-ERR [SYS/TEMP] internal server error\r\n" in transcript
        if step == "delete":
            assert transcript.endswith(b"-ERR [SYS/TEMP] some deleted messages not removed\r\n")
        assert server.wait_for_connections(0)
        assert server.context.locks.held_names() == []
        # The deletion applies only when QUIT completed UPDATE without failure.
        expect = 1 if step in ("open", "close") else 2
        assert len(store.messages("alice")) == expect
        store.step = None
        good = server.pop3()
        good.user("alice")
        assert good.pass_("pw").startswith(b"+OK")
        good.quit()
    assert store.closed_streams >= (1 if step not in ("authenticate", "list", "open") else 0)


# -- client faults -------------------------------------------------------------------

BIG = b"Subject: big\r\n\r\n" + (b"x" * 1000 + b"\r\n") * 20_000  # ~20 MB


@pytest.fixture
def big_store():
    store = MemoryAdapter({"alice": "pw"}, apop=False)
    store.deliver("alice", BIG)
    store.deliver("alice", b"Subject: small\r\n\r\nsmall\r\n")
    return store


def test_disconnect_mid_retr_of_20mb(big_store):
    with Controller(big_store) as server:
        with RawClient(server.address) as c:
            c.login("alice", "pw")
            c.cmd("DELE 2")
            c.send(b"RETR 1\r\n")
            got = 0
            while got < 1_000_000:
                got += len(c.sock.recv(65536))
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        assert server.wait_for_connections(0)
        assert server.context.locks.held_names() == []
    assert len(big_store.messages("alice")) == 2


def test_slow_reader_does_not_make_the_server_buffer(big_store, frozen):
    """A client that stops reading mid-RETR: the server holds at most a few chunks,
    and gives up once send_timeout has passed on ServerConfig.clock, freeing the
    lock and deleting nothing."""
    clock = lambda: frozen().timestamp()  # noqa: E731
    tracemalloc.start()
    try:
        with Controller(big_store, clock=clock, poll_interval=0.01, send_timeout=60) as server:
            with RawClient(server.address) as c:
                c.login("alice", "pw")
                c.cmd("DELE 2")
                tracemalloc.reset_peak()
                c.send(b"RETR 1\r\n")  # and never read
                # Real time alone ends nothing: the deadline is on the clock.
                assert not server.wait_for_connections(0, timeout=0.2)
                # The server may still be filling the socket buffers.
                assert tick_until_closed(server, frozen, 61)
                _, peak = tracemalloc.get_traced_memory()
            assert server.context.locks.held_names() == []
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, peak  # a few chunks, never the 20 MB message
    assert len(big_store.messages("alice")) == 2


@pytest.fixture
def stored_as_sent(tmp_path):
    """A 32 MB message in wire form in a Maildir: RETR sends it from the file
    (sendfile()); far more than the socket buffers hold."""
    from pop3frame.adapters.maildir import MaildirAdapter

    for sub in ("new", "cur", "tmp"):
        (tmp_path / "alice" / sub).mkdir(parents=True)
    path = tmp_path / "alice" / "new" / "1700000000.M1P1.host"
    line = b"Some prose. With dots, at the end too.\r\n"
    with open(path, "wb") as f:
        f.write(b"Subject: big\r\n\r\n")
        for _ in range(32):
            f.write(line * (1024 * 1024 // len(line)))
    return path, MaildirAdapter(str(tmp_path), lambda user, password: password == "pw")


def test_client_that_stops_reading_during_sendfile_is_cut_off_at_send_timeout(stored_as_sent, frozen):
    """sendfile() too gives up once send_timeout has passed on ServerConfig.clock
    (Python's socket.sendfile() would wait in poll() forever): the thread, the
    lock and the file are freed."""
    path, adapter = stored_as_sent
    clock = lambda: frozen().timestamp()  # noqa: E731
    with Controller(adapter, clock=clock, poll_interval=0.01, send_timeout=60,
                    server_class=FileSpanServer) as server:
        with RawClient(server.address, rcvbuf=65536) as c:
            c.login("alice", "pw")
            c.send(b"RETR 1\r\n")  # and never read
            assert not server.wait_for_connections(0, timeout=0.2)
            assert tick_until_closed(server, frozen, 61)
        assert server.context.locks.held_names() == []
        sent, = server.server.file_spans
        assert 0 < sent < os.path.getsize(path)


def test_file_that_shrinks_during_sendfile_ends_without_the_terminator(stored_as_sent):
    """RFC 1939 section 3: a message cut short while it is sent from its file
    (sendfile() reaches the end early, or it stops at the next piece, seeing the file
    changed) is not ended with "." but by closing the
    connection: the client keeps nothing it would take for the whole message."""
    path, adapter = stored_as_sent
    size = os.path.getsize(path)
    with Controller(adapter, server_class=FileSpanServer) as server:
        with RawClient(server.address, rcvbuf=65536) as c:
            c.login("alice", "pw")
            c.send(b"RETR 1\r\n")
            assert c.line() == b"+OK %d octets\r\n" % size
            got = len(c.buf)
            while got < 100_000:  # the server is in sendfile(), far from the end
                got += len(c.sock.recv(65536))
            os.truncate(path, size // 2)
            tail = b""
            while True:
                data = c.sock.recv(65536)
                if not data:
                    break
                got += len(data)
                tail = (tail + data)[-5:]
        # It stops at the first piece after the change: never past what the file holds.
        assert got <= size // 2 and tail != b"\r\n.\r\n"
        assert server.wait_for_connections(0)
        assert server.server.file_spans == [got]


@given(st.lists(st.integers(min_value=0, max_value=300_000), min_size=2, max_size=6))
@settings(max_examples=20, deadline=None)
def test_pieces_sent_together_arrive_whole_and_in_order(sizes):
    """Connection.flush sends buffered pieces with one sendmsg(); the kernel takes
    part of them when its buffer is small and the reader slow: every octet still
    arrives once, in order."""
    from pop3frame.handler import Connection

    server, client = socket.socketpair()
    with server, client:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        conn = Connection(server, time.monotonic, poll_interval=0.05, send_timeout=10)  # bounds a stuck send
        pieces = [bytes([65 + k % 26]) * n for k, n in enumerate(sizes)]
        received = bytearray()

        def read():
            while len(received) < sum(sizes):
                data = client.recv(1000)
                if not data:
                    break
                received.extend(data)

        reader = threading.Thread(target=read)
        reader.start()
        for piece in pieces:
            conn._out.append(piece)
            conn._out_size += len(piece)
        conn.flush()
        reader.join(30)
        assert bytes(received) == b"".join(pieces) and conn.bytes_out == sum(sizes)


def test_half_open_connections_do_not_block_others(big_store):
    with Controller(big_store) as server:
        silent = [socket.create_connection(server.address) for _ in range(20)]  # never read or write
        try:
            client = server.pop3()
            client.user("alice")
            assert client.pass_("pw").startswith(b"+OK")
            client.quit()
        finally:
            for s in silent:
                s.close()
        assert server.wait_for_connections(0)


# -- soak --------------------------------------------------------------------------------


def assert_back_to(threads, fds) -> None:
    """Once the server stopped, its threads end (bounded wait) and every
    descriptor it opened is closed."""
    for thread in set(threading.enumerate()) - threads:
        thread.join(10)
    assert set(threading.enumerate()) - threads == set()
    assert open_fds() - fds == set()


def test_soak_sequential_sessions_leave_no_threads_or_fds():
    """10,000 sessions one after another, each client reconnecting at once.
    The next client may be accepted before the last session's thread is back
    in the pool, so how many threads the pool grows to is the scheduler's
    doing (3 or 4 on an idle machine, 4 to 6 with two CPU hogs: "at most 3"
    failed).  Exact: once the sessions ended every one of them waits
    idle in the pool, a settled pool serves the next clients with no new
    thread, and after stop no thread, descriptor or lock is left."""
    store = MemoryAdapter({"alice": "pw"}, apop=False)
    store.deliver("alice", b"Subject: s\r\n\r\nsoak\r\n")
    script = b"USER alice\r\nPASS pw\r\nSTAT\r\nRETR 1\r\nQUIT\r\n"

    def session() -> None:
        s = socket.create_connection(server.address, timeout=60)
        s.sendall(script)
        data = b""
        while not data.endswith(b"signing off (1 message left)\r\n"):
            chunk = s.recv(4096)
            assert chunk, data
            data += chunk
        s.close()

    threads, fds = set(threading.enumerate()), open_fds()
    with Controller(store, thread_keepalive=KEEP_THREADS) as server:
        for _ in range(10_000):
            session()
        workers = settled_workers(server, threads)
        for _ in range(100):
            session()
            assert settled_workers(server, threads) == workers  # reused, not one per session
        assert server.context.locks.held_names() == []
    assert_back_to(threads, fds)


def test_soak_500_concurrent_sessions():
    store = MemoryAdapter(apop=False)
    for i in range(500):
        store.add_user("u%d" % i, "pw")
        store.deliver("u%d" % i, b"Subject: %d\r\n\r\nhi\r\n" % i)
    failures = []
    barrier = threading.Barrier(500, timeout=60)

    def run(i):
        try:
            s = socket.create_connection(server.address, timeout=60)
            f = s.makefile("rb")
            assert f.readline().startswith(b"+OK")
            barrier.wait()  # all 500 are connected at the same moment
            s.sendall(b"USER u%d\r\nPASS pw\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n" % i)
            rest = f.read()
            assert rest.endswith(b"signing off (maildrop empty)\r\n"), rest
            f.close()
            s.close()
        except threading.BrokenBarrierError:
            pass  # another client failed first; its error is the one recorded
        except Exception as exc:  # asserted below
            failures.append((i, repr(exc)))
            barrier.abort()

    threads0, fds0 = set(threading.enumerate()), open_fds()
    with Controller(store, max_connections=1000) as server:
        listening = threading.active_count()
        clients = [threading.Thread(target=run, args=(i,)) for i in range(500)]
        for w in clients:
            w.start()
        for w in clients:
            w.join(120)
        assert server.wait_for_connections(0, timeout=60)
        assert failures == []
        assert threading.active_count() - listening <= 500  # at most one per connection, kept for reuse
    assert_back_to(threads0, fds0)
    assert all(store.messages("u%d" % i) == [] for i in range(500))


# -- what unauthenticated clients can cost, under random traffic (issue 14) --------------


class Heavy(MemoryAdapter):
    """A password check that costs memory, like Argon2's 64 MiB (here 8 MiB), and holds
    it until a few more checks have started (at most 50 ms), so that checks overlap
    whenever the server lets them."""

    COST = 8 << 20

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.started = 0
        self.cond = threading.Condition()

    def authenticate(self, username, password):
        scratch = bytearray(self.COST)
        scratch[::4096] = b"x" * (self.COST // 4096)  # touched, as a hash would
        with self.cond:
            self.started += 1
            mine = self.started
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.started >= mine + 3, 0.05)
        return super().authenticate(username, password)


class PerSession(logging.Handler):
    """Counts the server's log records per session id."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts: dict = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("["):
            key = message[1:message.find("]")]
            self.counts[key] = self.counts.get(key, 0) + 1


PRELOGIN_LIMITS = dict(max_password_checks=2, max_connections=16, max_connections_per_ip=3,
                       trusted_networks=("127.0.0.1/32",), poll_interval=0.01, thread_keepalive=0)

guess = st.tuples(st.sampled_from(["alice", "nobody", "x" * 40]), st.text("abc", max_size=8)).map(
    lambda t: "USER %s\r\nPASS %s" % t).map(str.encode)


@pytest.fixture(scope="module")
def prelogin_server():
    clock = ManualClock()
    counter = PerSession()
    log = logging.getLogger("pop3frame")
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(counter)
    try:
        with Controller(Heavy({"alice": "pw"}), host="0.0.0.0", clock=clock, **PRELOGIN_LIMITS) as server:
            yield server, clock, counter, set(threading.enumerate())
    finally:
        log.removeHandler(counter)
        log.setLevel(level)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scripts=st.lists(st.tuples(st.integers(1, 4), guess, st.lists(st.one_of(anywhere, junk, guess), max_size=12)),
                        min_size=1, max_size=12))
def test_random_prelogin_traffic_from_many_connections_stays_bounded(prelogin_server, scripts):
    """Issue 14 as a class: random pre-login traffic (commands, junk, SASL, wrong
    passwords) from many connections and four loopback addresses at once.  Memory for
    password checks stays at max_password_checks of them, server threads at one per
    admitted connection (max_connections, max_connections_per_ip for untrusted
    addresses), log lines per connection at a constant, and every connection is gone
    once login_timeout has passed on the injected clock."""
    server, clock, counter, threads = prelogin_server
    sessions_before = set(counter.counts)
    tracemalloc.start()
    try:
        clients = []
        for host, first, lines in scripts:
            address = "127.0.0.%d" % host
            try:
                c = RawClient((address, server.port), source=address)
                c.send(b"".join(line + b"\r\n" for line in [first] + lines))
            except OSError:  # refused (limit) and closed before we wrote
                continue
            clients.append(c)
        server_threads = [t for t in set(threading.enumerate()) - threads if t.name.startswith("pop3-")]
        assert len(server_threads) <= server.context.config.max_connections
        for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            assert server.group.tracker.count_ip(ip) <= 3
        clock.advance(server.context.config.login_timeout)
        for c in clients:
            c.sock.settimeout(10)
            try:
                c.read_all()
            except OSError:
                pass
            c.close()
        assert server.wait_for_connections(0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < (2 + 1) * Heavy.COST, peak
    checks = server.context.password_checks
    assert (checks.running, checks.waiting) == (0, 0)
    for session in set(counter.counts) - sessions_before:
        assert counter.counts[session] <= 25, (session, counter.counts[session])
    for thread in set(threading.enumerate()) - threads:
        thread.join(10)
    assert set(threading.enumerate()) - threads == set()
