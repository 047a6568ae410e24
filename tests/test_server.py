"""Listeners, limits, timeouts and shutdown, through real sockets."""
from __future__ import annotations

import logging
import poplib
import queue
import socket
import subprocess
import sys
import threading

import pytest

from pop3frame import ServerConfig
from pop3frame.adapters.memory import MemoryAdapter
from pop3frame.locks import FileLockManager, InProcessLockManager
from pop3frame.handler import kernel_timeval
from pop3frame.server import POP3Server, ServerGroup, SessionHandler, Workers, bind_socket
from pop3frame.testing import Controller
from tests.helpers import KEEP_THREADS, RawClient, open_fds, settled_workers


def frozen_clock(frozen):
    return lambda: frozen().timestamp()


# -- timeouts (RFC 1939 section 3) -----------------------------------------------


def test_autologout_below_ten_minutes_is_refused():
    """RFC 1939 section 3: the autologout timer MUST be at least 10 minutes."""
    with pytest.raises(ValueError, match="RFC 1939"):
        ServerConfig(timeout=300)
    assert ServerConfig().timeout >= 600


def test_transaction_autologout_closes_silently_and_deletes_nothing(adapter, frozen, caplog):
    """RFC 1939 section 3: on autologout the server closes without a response and without UPDATE."""
    caplog.set_level(logging.INFO, logger="pop3frame")
    with Controller(adapter, clock=frozen_clock(frozen), poll_interval=0.01) as server:
        with RawClient(server.address) as c:
            c.login("alice", "alice-pw")
            assert c.cmd("DELE 1") == b"+OK message 1 deleted\r\n"
            frozen.tick(599)
            assert c.cmd("NOOP") == b"+OK\r\n"  # activity resets the timer
            frozen.tick(599)
            assert c.cmd("NOOP") == b"+OK\r\n"
            frozen.tick(601)
            assert c.read_all() == b""
        assert server.wait_for_connections(0)
        assert not server.context.locks.held_names()
    assert len(adapter.messages("alice")) == 3
    end, = [r for r in caplog.records if "session end" in r.getMessage()]
    assert end.ended == "autologout" and end.getMessage().endswith(", autologout")


def test_preauth_timeout_is_shorter_and_counts_whole_lines(adapter, frozen):
    """A client trickling bytes without finishing a line (slowloris) is still timed out."""
    with Controller(adapter, clock=frozen_clock(frozen), poll_interval=0.01, auth_timeout=30) as server:
        with RawClient(server.address) as c:
            c.send(b"US")
            frozen.tick(20)
            c.send(b"ER")
            frozen.tick(11)
            assert c.read_all() == b""
        assert server.wait_for_connections(0)


def test_lock_released_after_timeout(adapter, frozen):
    with Controller(adapter, clock=frozen_clock(frozen), poll_interval=0.01) as server:
        first = server.pop3()
        first.user("alice")
        first.pass_("alice-pw")
        frozen.tick(601)
        assert server.wait_for_connections(0)
        first.close()
        second = server.pop3()
        second.user("alice")
        assert second.pass_("alice-pw").startswith(b"+OK")
        second.quit()


def test_login_delay_enforced_per_mailbox(adapter, frozen):
    """RFC 2449 section 6.5 / 8.1.1: LOGIN-DELAY advertised and enforced with [LOGIN-DELAY]."""
    with Controller(adapter, clock=frozen_clock(frozen), login_delay=300) as server:
        client = server.pop3()
        assert client.capa()["LOGIN-DELAY"] == ["300"]
        client.user("alice")
        client.pass_("alice-pw")
        client.quit()
        again = server.pop3()
        again.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[LOGIN-DELAY\]"):
            again.pass_("alice-pw")
        bob = server.pop3()
        bob.user("bob")
        assert bob.pass_("bob-pw").startswith(b"+OK")  # another mailbox is unaffected
        bob.quit()
        frozen.tick(301)
        again = server.pop3()  # the first one passed its login_timeout meanwhile
        again.user("alice")
        assert again.pass_("alice-pw").startswith(b"+OK")
        again.quit()


# -- limits -------------------------------------------------------------------------


def test_connection_cap(adapter):
    with Controller(adapter, max_connections=2) as server:
        a, b = RawClient(server.address), RawClient(server.address)
        with RawClient(server.address) as c:
            assert c.greeting == b"-ERR [SYS/TEMP] too many connections\r\n"
            assert c.read_all() == b""
        a.cmd("QUIT")
        a.close()
        assert server.wait_for_connections(1)
        with RawClient(server.address) as d:
            assert d.greeting.startswith(b"+OK")
        b.close()


def test_per_ip_cap_uses_two_loopback_addresses(adapter):
    # Loopback is a trusted network by default, which has no per-address limit.
    with Controller(adapter, host="0.0.0.0", max_connections_per_ip=1, trusted_networks=()) as server:
        port = server.port
        a = RawClient(("127.0.0.1", port), source="127.0.0.1")
        with RawClient(("127.0.0.1", port), source="127.0.0.1") as refused:
            assert refused.greeting == b"-ERR [SYS/TEMP] too many connections from your address\r\n"
        with RawClient(("127.0.0.2", port), source="127.0.0.2") as other:
            assert other.greeting.startswith(b"+OK")
        a.close()


def test_fifty_concurrent_full_sessions():
    store = MemoryAdapter(apop=False)
    users = ["user%02d" % i for i in range(50)]
    for u in users:
        store.add_user(u, "pw")
        for j in range(3):
            store.deliver(u, b"Subject: %s %d\r\n\r\nhello\r\n" % (u.encode(), j))
    errors = []

    def session(u):
        try:
            client = poplib.POP3("127.0.0.1", server.port, timeout=20)
            client.user(u)
            client.pass_("pw")
            assert client.stat()[0] == 3
            assert client.retr(2)[1][0] == b"Subject: %s 1" % u.encode()
            client.dele(1)
            client.quit()
        except Exception as exc:  # collected and asserted below
            errors.append((u, exc))

    with Controller(store) as server:
        threads = [threading.Thread(target=session, args=(u,)) for u in users]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert server.wait_for_connections(0)
    assert errors == []
    assert all(len(store.messages(u)) == 2 for u in users)


# -- listeners ----------------------------------------------------------------------


def test_ipv6_listener(adapter):
    if not socket.has_ipv6:
        pytest.fail("this machine has no IPv6 support")
    with Controller(adapter, host="::1") as server:
        with RawClient(("::1", server.port)) as c:
            assert c.greeting.startswith(b"+OK")
            assert c.login("alice", "alice-pw").startswith(b"+OK")


class ProbeHandler(SessionHandler):
    """Records the options an accepted socket has before and after the handler's setup()."""

    seen: "queue.Queue" = None

    def setup(self):
        before = _options(self.request)
        super().setup()
        self.seen.put((before, _options(self.request), self.server.inherits_options(self.request)))


class ProbeServer(POP3Server):
    handler_class = ProbeHandler


def _options(sock):
    return (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0,
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16),
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16))


@pytest.fixture
def probe():
    ProbeHandler.seen = queue.Queue()
    yield ProbeHandler.seen
    ProbeHandler.seen = None


def test_accepted_sockets_inherit_nodelay_and_kernel_timeouts_from_the_listener(adapter, probe):
    """TCP_NODELAY and the poll_interval kernel timeouts are set once on the
    listening socket; Linux copies them into every accepted socket, so a
    connection costs no setsockopt() of its own."""
    group = ServerGroup(adapter, ServerConfig(hostname="localhost", poll_interval=7.5))
    group.add_listener(("127.0.0.1", 0), server_class=ProbeServer)
    group.start(poll_interval=0.05)
    try:
        for _ in range(2):
            with RawClient(group.addresses[0]) as c:
                assert c.login("alice", "alice-pw").startswith(b"+OK")
                assert c.cmd("QUIT").startswith(b"+OK")
            before, after, inherited = probe.get(timeout=10)
            assert before == (True, kernel_timeval(7.5), kernel_timeval(7.5))
            assert after == before and inherited
    finally:
        group.shutdown()


def test_sockets_accepted_before_the_listener_had_its_options_get_them_from_the_handler(adapter, probe):
    """A listening socket handed over with a connection already waiting (socket
    activation, or a client early at start-up): that connection did not
    inherit, so the handler sets TCP_NODELAY and the timeouts itself; the
    next one, made once the listener had them, inherits them.  (Before, the
    handler set them up on every later connection of that listener too:
    three setsockopt() each, on each 'serve --workers' worker that accepted
    a connection queued while the workers were forked.)"""
    listener = bind_socket(("127.0.0.1", 0))
    early = RawClient.__new__(RawClient)
    early.sock, early.buf = socket.create_connection(listener.getsockname(), timeout=10), b""
    group = ServerGroup(adapter, ServerConfig(hostname="localhost"))
    group.add_listener(listener.getsockname(), server_class=ProbeServer, sock=listener)
    group.start(poll_interval=0.05)
    try:
        early.greeting = early.line()
        assert early.login("alice", "alice-pw").startswith(b"+OK")
        before, after, inherited = probe.get(timeout=10)
        assert before[0] is False and after[0] is True and not inherited
        with RawClient(group.addresses[0]) as c:
            assert c.login("bob", "bob-pw").startswith(b"+OK")
        before, after, inherited = probe.get(timeout=10)
        assert before[0] is True and after == before and inherited
        early.close()
    finally:
        group.shutdown()


def test_several_listeners_share_locks_and_budget(adapter):
    group = ServerGroup(adapter, ServerConfig(hostname="localhost"))
    a = group.add_listener(("127.0.0.1", 0))
    b = group.add_listener(("127.0.0.1", 0))
    group.start(poll_interval=0.05)
    try:
        first = poplib.POP3("127.0.0.1", a.port, timeout=10)
        first.user("alice")
        first.pass_("alice-pw")
        second = poplib.POP3("127.0.0.1", b.port, timeout=10)
        second.user("alice")
        with pytest.raises(poplib.error_proto, match="IN-USE"):
            second.pass_("alice-pw")
        assert group.tracker.count() == 2
        first.quit()
        second.quit()
    finally:
        group.shutdown()


def test_shutdown_ends_sessions_without_applying_deletions(adapter):
    server = Controller(adapter).start()
    client = RawClient(server.address)
    client.login("alice", "alice-pw")
    client.cmd("DELE 1")
    server.stop()
    assert client.read_all() == b""
    client.close()
    assert len(adapter.messages("alice")) == 3
    assert server.group.tracker.count() == 0
    with pytest.raises(OSError):
        socket.create_connection(server.address, timeout=2)


def test_bad_client_does_not_disturb_the_next(adapter):
    with Controller(adapter) as server:
        with RawClient(server.address) as bad:
            bad.send(b"\x00\xff" * 200 + b"\r\n" + b"\x16\x03\x01\x00\xa5")  # junk + a TLS hello
            assert bad.line().startswith(b"-ERR")
        good = server.pop3()
        good.user("alice")
        assert good.pass_("alice-pw").startswith(b"+OK")
        good.quit()


def test_threads_and_fds_return_to_baseline(adapter):
    before_threads, before_fds = set(threading.enumerate()), open_fds()
    with Controller(adapter, thread_keepalive=KEEP_THREADS) as server:
        workers = set()
        for _ in range(30):
            client = server.pop3()
            client.user("alice")
            client.pass_("alice-pw")
            client.retr(1)
            client.quit()
            # Once the session's thread is back in the pool, the next client gets it.
            workers |= settled_workers(server, before_threads)
        assert len(workers) == 1  # reused, not one per session
    for thread in set(threading.enumerate()) - before_threads:
        thread.join(10)
    assert set(threading.enumerate()) - before_threads == set()
    assert open_fds() - before_fds == set()


def test_connection_threads_are_reused_and_end_when_idle(adapter):
    """A finished connection's thread serves the next one; with thread_keepalive=0
    each ends with its connection; Workers.close() ends the idle ones."""
    with Controller(adapter) as server:
        first = server.pop3()
        first.quit()
        workers = server.group.workers
        assert workers.wait_idle(1)
        idle = [t for t in threading.enumerate() if t.name.startswith("pop3-127.0.0.1")]
        client = server.pop3()
        assert client.user("alice").startswith(b"+OK")
        assert [t for t in threading.enumerate() if t.name.startswith("pop3-127.0.0.1")] == idle  # no new thread
        client.quit()
    assert workers.idle == 0
    for thread in idle:
        thread.join(10)
        assert not thread.is_alive()
    with Controller(adapter, thread_keepalive=0) as server:
        client = server.pop3()
        (serving,) = [t for t in threading.enumerate() if t.name.startswith("pop3-127.0.0.1")]
        client.quit()
        serving.join(10)
        assert not serving.is_alive() and server.group.workers.idle == 0


def test_the_thread_idle_the_shortest_gets_the_next_job():
    """Workers hands a job to the most recently idle thread (LIFO), so after a
    burst the surplus threads stay idle and end after their keepalive;
    close() ends the idle ones."""
    workers = Workers(keepalive=KEEP_THREADS)
    ran: "queue.Queue[threading.Thread]" = queue.Queue()
    release = [threading.Event() for _ in range(3)]

    def job(i):
        def run():
            ran.put(threading.current_thread())
            assert release[i].wait(10)
        return run

    for i in range(3):
        workers.submit(job(i), "job-%d" % i)
    threads = [ran.get(timeout=10) for _ in range(3)]
    assert len(set(threads)) == 3
    order = []
    for i in (2, 0, 1):  # idle in this order: the one of job 1 last
        release[i].set()
        assert workers.wait_idle(len(order) + 1)
        order.append(i)
    for _ in range(3):
        workers.submit(lambda: ran.put(threading.current_thread()), "next")
        assert ran.get(timeout=10) is threads[1]
        assert workers.wait_idle(3)
    workers.close()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert workers.idle == 0


# -- lock managers --------------------------------------------------------------------


def test_in_process_lock_manager():
    locks = InProcessLockManager()
    lock = locks.try_acquire("alice")
    assert lock is not None and locks.try_acquire("alice") is None
    assert locks.try_acquire("bob") is not None
    lock.release()
    lock.release()  # idempotent
    assert locks.try_acquire("alice") is not None


def test_file_lock_manager_across_processes(tmp_path):
    """Several server processes on one host exclude each other; a dead process frees its locks."""
    locks = FileLockManager(str(tmp_path))
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pop3frame.locks import FileLockManager;"
         "l = FileLockManager(sys.argv[1]).try_acquire('alice/../x');"
         "print('held' if l else 'busy', flush=True); sys.stdin.read()",
         str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert locks.try_acquire("alice/../x") is None
        assert locks.try_acquire("bob") is not None
    finally:
        holder.kill()
        holder.communicate(timeout=30)  # reaps it and closes both pipes
    lock = locks.try_acquire("alice/../x")
    assert lock is not None
    assert locks.try_acquire("alice/../x") is None  # also exclusive within one process
    lock.release()
    assert not locks.is_locked("alice/../x")


@pytest.mark.parametrize("mode", [0o1777, 0o777, 0o770])
def test_a_lock_directory_others_may_write_is_refused(tmp_path, mode):
    """Whoever may create files in the lock directory can take any mailbox's lock
    (lock names are a hash of the mailbox: a file it holds flock on is [IN-USE]
    for ever, one mode 000 an error at every login) or plant a symlink the server
    follows.  Before, --lock-dir /tmp/locks (1777) let uid 1234 lock alice out and
    make the server, as nobody, create a file in bob's Maildir new/."""
    shared = tmp_path / "locks"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(PermissionError, match="others may write in it"):
        FileLockManager(str(shared))
    assert list(shared.iterdir()) == []
    shared.chmod(0o755)
    assert FileLockManager(str(shared)).try_acquire("alice") is not None


def test_file_locks_serve_a_real_server(adapter, tmp_path):
    with Controller(adapter, locks=FileLockManager(str(tmp_path))) as server:
        a = server.pop3()
        a.user("alice")
        a.pass_("alice-pw")
        b = server.pop3()
        b.user("alice")
        with pytest.raises(poplib.error_proto, match="IN-USE"):
            b.pass_("alice-pw")
        a.quit()
        b.quit()
