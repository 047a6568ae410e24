"""The state pre-forked workers share (pop3frame.hostwide), in this process and forked children.

Each child is a real forked process, as a worker is; time is an injected
clock that parent and children set to the same values, so delays are
checked to the second without waiting for them.
"""
from __future__ import annotations

import errno
import fcntl
import os
import pickle
import random
import select
import signal
import socket
import threading
import time
from typing import List

import pytest

from pop3frame.auth import FailureThrottle
from pop3frame.config import ServerConfig
from pop3frame.hostwide import HostState, SharedMemory, SharedRecords, SharedTable, table_key
from pop3frame.locks import FileLockManager
from pop3frame.session import SessionContext
from pop3frame.adapters.memory import MemoryAdapter
from pop3frame.testing import ManualClock


def in_child(work, timeout: float = 20.0):
    """Run ``work()`` in a forked child and return what it returned (pickled through a pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.close(r)
        code = 0
        try:
            os.write(w, pickle.dumps(work()))
        except BaseException as exc:  # report it to the parent, never run the parent's pytest
            os.write(w, pickle.dumps(exc))
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    try:
        while True:
            ready, _, _ = select.select([r], [], [], timeout)
            assert ready, "child %d gave no answer in %s s" % (pid, timeout)
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    result = pickle.loads(data)
    if isinstance(result, BaseException):
        raise result
    return result


class Held:
    """A forked child that runs ``work()`` and then waits (holding what it took) until killed."""

    def __init__(self, work) -> None:
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover (the child)
            os.close(r)
            try:
                signal.alarm(60)  # never outlive a test that failed before kill()
                os.write(w, pickle.dumps(work()))
                signal.pause()
            finally:
                os._exit(0)
        os.close(w)
        ready, _, _ = select.select([r], [], [], 20)
        assert ready, "child %d did not report" % self.pid
        self.result = pickle.loads(os.read(r, 65536))
        os.close(r)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def test_table_keys_store_the_text_and_hash_only_what_does_not_fit():
    assert table_key("127.0.0.1") != table_key("127.0.0.10")
    assert table_key("") != table_key("\0")
    assert len({table_key(t) for t in ("a" * 62, "a" * 63, "a" * 64, "a" * 65, "a" * 63 + "b")}) == 5
    assert table_key("x" * 100)[0] == 0xFF and table_key("x" * 63)[0] == 64


def test_shared_table_behaves_like_a_dict_through_collisions_and_deletions():
    """Random puts and deletes on a small table (long probe runs, wrap-around) against a dict."""
    memory = SharedMemory(SharedTable.size(64, "q"))
    table = SharedTable(memory, 0, 64, "q")
    model = {}
    rng = random.Random(1939)
    keys = [table_key("10.0.0.%d" % i) for i in range(80)]
    with table.lock:
        for step in range(5000):
            key = rng.choice(keys)
            if rng.random() < 0.55 and (key in model or len(model) < table.limit):
                assert table.put(key, (step,))
                model[key] = (step,)
            else:
                table.delete(key)
                model.pop(key, None)
            assert len(table) == len(model)
            probe = rng.choice(keys)
            assert table.get(probe) == model.get(probe)
        assert dict(table.items()) == model


def test_a_full_table_refuses_or_drops_the_record_that_expires_first():
    memory = SharedMemory(SharedTable.size(8, "d"))
    table = SharedTable(memory, 0, 8, "d")
    with table.lock:
        for i in range(table.limit):
            assert table.put(table_key(str(i)), (100.0 + i,))
        assert not table.put(table_key("new"), (1.0,))  # no expiry given: refused
        assert table.put(table_key("new"), (500.0,), expires=lambda values: values[0])
        assert len(table) == table.limit
        assert table.get(table_key("new")) == (500.0,)
        survivors = {k for k, _ in table.items()}
        gone = [str(i) for i in range(table.limit) if table_key(str(i)) not in survivors]
        assert len(gone) == 1


def test_failure_records_are_bounded_whatever_the_number_of_addresses():
    """An attacker controls the addresses: the table never grows past its limit."""
    memory = SharedMemory(SharedTable.size(64, "4d"))
    table = SharedTable(memory, 0, 64, "4d")
    clock = ManualClock()
    throttle = FailureThrottle(0, 60.0, clock, records=SharedRecords(table))
    for i in range(500):
        throttle.failure("198.51.%d.%d" % (i // 256, i % 256))
        clock.advance(0.01)
    assert len(table) == table.limit
    # The newest address is remembered: its next answer waits.
    assert throttle.not_before("198.51.1.243") > clock()


#: Every HostState a test made, closed after it: each holds a lock directory in /tmp.
_made: List[HostState] = []


@pytest.fixture(autouse=True)
def _close_host_states():
    yield
    while _made:
        _made.pop().close()


def host(**options) -> HostState:
    state = HostState(ServerConfig(**options), 2)
    _made.append(state)
    return state


def context(**options) -> SessionContext:
    return SessionContext(MemoryAdapter({}), ServerConfig(**options))


def test_failed_login_delay_and_lockout_count_across_processes():
    """Failures in one worker delay and lock out the address in another (injected clock)."""
    clock = ManualClock(5000.0)
    state = host(free_auth_failures=2, max_auth_failure_delay=60.0, auth_lockout_failures=4,
                 auth_lockout_duration=100.0, clock=clock)
    throttles = lambda: state.share(SessionContext(MemoryAdapter({}), ServerConfig(
        free_auth_failures=2, max_auth_failure_delay=60.0, auth_lockout_failures=4,
        auth_lockout_duration=100.0, clock=clock))).failures

    # Worker 0 spends the two free failures; worker 1's next one waits 1 s.
    assert in_child(lambda: [throttles().failure("192.0.2.7") for _ in range(2)]) == [5000.0, 5000.0]
    assert in_child(lambda: throttles().failure("192.0.2.7")) == 5001.0
    assert in_child(lambda: throttles().failure("192.0.2.8")) == 5000.0  # another address: free
    # This process sees both, and a right password waits for the pending answer.
    assert throttles().not_before("192.0.2.7") == 5001.0
    assert in_child(lambda: throttles().locked_for("192.0.2.7")) == 0.0
    assert in_child(lambda: throttles().failure("192.0.2.7")) == 5002.0  # 4th: 2 s, and locked out
    assert throttles().locked_for("192.0.2.7") == 100.0
    assert len(throttles()) == 2  # addresses remembered, by every worker (a TypeError on shared records)
    clock.advance(100.0)
    assert in_child(lambda: throttles().locked_for("192.0.2.7")) == 0.0


def test_login_delay_counts_across_processes():
    """RFC 2449 section 8.1.1 LOGIN-DELAY: a login in one worker delays the next in another."""
    clock = ManualClock(100.0)
    state = host(login_delay=60, clock=clock)
    context = lambda: state.share(SessionContext(MemoryAdapter({}), ServerConfig(login_delay=60, clock=clock)))
    assert in_child(lambda: context().login_delays.check_and_record("alice")) is True
    assert in_child(lambda: context().login_delays.check_and_record("alice")) is False
    assert context().login_delays.check_and_record("bob") is True
    clock.advance(60.0)
    assert in_child(lambda: context().login_delays.check_and_record("alice")) is True


def test_connection_limits_count_every_worker_and_a_dead_workers_are_released():
    state = host(max_connections=3, max_connections_per_ip=2)
    config = context(max_connections=3, max_connections_per_ip=2)
    sockets = [socket.socket() for _ in range(6)]
    try:
        def admit_two():
            tracker = state.tracker(0, config)
            return [tracker.admit(s, "198.51.100.1", None) for s in sockets[:2]]

        worker0 = Held(admit_two)
        assert worker0.result == [None, None]
        tracker1 = state.tracker(1, config)
        assert tracker1.count_ip("198.51.100.1") == 2
        assert tracker1.admit(sockets[2], "198.51.100.1", None) == "too many connections from your address"
        assert tracker1.admit(sockets[3], "198.51.100.2", None) is None
        assert tracker1.admit(sockets[4], "198.51.100.3", None) == "too many connections"
        assert state.stats(None).snapshot()["sessions_active"] == 3
        # Worker 0 dies holding two connections; the supervisor clears them.
        worker0.kill()
        state.release(0)
        assert tracker1.count_ip("198.51.100.1") == 0
        assert tracker1.admit(sockets[4], "198.51.100.1", None) is None
        tracker1.release(sockets[3])
        tracker1.release(sockets[4])
        assert len(state.connections) == 0 and state.stats(None).snapshot()["sessions_active"] == 0
    finally:
        for s in sockets:
            s.close()


def test_a_reload_cannot_raise_the_total_beyond_what_the_table_holds(caplog):
    """max_connections 4 at start: a table of 16 slots, 12 addresses.  A SIGHUP
    that asks for 100 got 100 on paper and refused the 13th address anyway
    ('too many connections', as the table was full); the limit is now 12, and
    a WARNING says why."""
    state = host(max_connections=4)
    tracker = state.tracker(0, context(max_connections=4))
    tracker.set_limits(100, 0)
    assert tracker.max_total == state.connections.limit == 12
    assert "max_connections 100: the table the workers share holds 12 connections until a restart" in caplog.text
    sockets = [socket.socket() for _ in range(13)]
    try:
        assert [tracker.admit(s, "198.51.100.%d" % i, None) for i, s in enumerate(sockets)] == [None] * 12 + [
            "too many connections"]
        tracker.set_limits(8, 0)  # lower: taken as it is
        assert tracker.max_total == 8
    finally:
        for s in sockets:
            tracker.release(s)
            s.close()
    assert len(state.connections) == 0


def test_proxy_connections_count_their_address_when_the_header_names_it():
    state = host(max_connections_per_ip=1)
    config = context(max_connections_per_ip=1)
    a, b = socket.socket(), socket.socket()
    try:
        tracker0, tracker1 = state.tracker(0, config), state.tracker(1, config)
        assert tracker0.admit(a, None, None) is None and tracker1.admit(b, None, None) is None
        assert tracker0.assign_ip(a, "203.0.113.9") is None
        assert tracker1.assign_ip(b, "203.0.113.9") == "too many connections from your address"
    finally:
        a.close()
        b.close()


def test_trusted_addresses_have_no_per_address_limit_and_ipv6_counts_by_64():
    state = host(max_connections_per_ip=1)
    trusted, other = state.tracker(0, context(max_connections_per_ip=1)), state.tracker(1, context(max_connections_per_ip=1))
    sockets = [socket.socket() for _ in range(4)]
    try:
        assert trusted.admit(sockets[0], "127.0.0.1", None) is None
        assert other.admit(sockets[1], "127.0.0.1", None) is None  # loopback is trusted
        assert trusted.admit(sockets[2], "2001:db8:1:2::1", None) is None
        assert other.admit(sockets[3], "2001:db8:1:2::99", None) == "too many connections from your address"
        assert other.count_ip("2001:db8:1:2:ffff::") == 1
    finally:
        for s in sockets:
            s.close()


def test_password_check_places_are_host_wide_and_freed_by_a_dead_worker():
    """max_password_checks holds for all workers: places taken in one are missing in the
    others, and a worker killed mid-check frees its place (the kernel drops its lock)."""
    clock = ManualClock()
    state = host(max_password_checks=2, clock=clock)
    checks = lambda: state.share(context(max_password_checks=2, clock=clock)).password_checks
    holder = Held(lambda: [checks().acquire(clock()) for _ in range(2)])
    assert holder.result == [True, True]
    here = checks()
    assert not here.acquire(clock())  # deadline now: one try, and every place is taken
    holder.kill()
    assert here.acquire(clock()) and here.acquire(clock()) and not here.acquire(clock())
    assert here.running == 2
    here.release()
    assert in_child(lambda: checks().acquire(clock())) is True  # freed here, taken there
    here.release()


def test_a_waiting_check_gets_a_place_freed_in_another_worker():
    clock = ManualClock()
    state = host(max_password_checks=1, clock=clock)
    checks = lambda: state.share(context(max_password_checks=1, clock=clock)).password_checks
    go, holding = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            mine = checks()
            mine.acquire(clock())
            os.write(holding[1], b"h")
            os.read(go[0], 1)
            mine.release()
        finally:
            os._exit(0)
    try:
        assert select.select([holding[0]], [], [], 20)[0] and os.read(holding[0], 1) == b"h"
        waiting = checks()
        assert not waiting.acquire(clock())  # the child holds the only place
        os.write(go[1], b"x")
        # Waits for the child to let go (bounded by gone(): a failure, not a hang).
        started = time.monotonic()
        assert waiting.acquire(clock() + 60, gone=lambda: time.monotonic() - started > 20)
        waiting.release()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for fd in go + holding:
            os.close(fd)


def _waits_for_a_record_lock(pid: int) -> bool:
    """Whether process ``pid`` has a request for an fcntl record lock blocked in the kernel."""
    with open("/proc/locks") as f:
        return any(line.split()[1:3] == ["->", "POSIX"] and line.split()[5] == str(pid) for line in f)


def test_two_workers_waiting_for_each_others_tables_wait_instead_of_failing():
    """Record locks belong to a process, so the kernel's deadlock check saw a cycle
    where there is none: this process's threads hold the connections table and
    wait for the failures table, the child holds the failures table and asks
    for the connections table.  That request failed with EDEADLK (seen as
    '-ERR [SYS/TEMP]' after PASS and dropped connections under
    'serve --workers 2' with 16 clients); it must wait for the table instead."""
    state = host()
    connections, failures = state.connections.lock, state.failure_records.mutex
    go, report = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            signal.alarm(60)  # never outlive a test that failed
            with failures:
                os.write(report[1], b"h")
                os.read(go[0], 1)  # this process's thread waits for the failures table now
                lockf, told = fcntl.lockf, []

                def observed(*args):  # the real call, reporting the kernel's first EDEADLK
                    try:
                        return lockf(*args)
                    except OSError as exc:
                        if exc.errno == errno.EDEADLK and not told:
                            told.append(os.write(report[1], b"d"))
                        raise

                fcntl.lockf = observed

                def ask() -> None:
                    try:
                        with connections:
                            os.write(report[1], b"ok")
                    except OSError as exc:
                        os.write(report[1], errno.errorcode[exc.errno].encode())

                asking = threading.Thread(target=ask)
                asking.start()
                asking.join(50)
        finally:
            os._exit(0)
    waiter = None
    try:
        assert select.select([report[0]], [], [], 20)[0] and os.read(report[0], 1) == b"h"
        got = []
        with connections:
            waiter = threading.Thread(target=lambda: got.append(failures.__enter__()))
            waiter.start()
            deadline = time.monotonic() + 20
            while not _waits_for_a_record_lock(os.getpid()):
                assert time.monotonic() < deadline, "the thread never waited for the failures table"
                select.select([], [], [], 0.01)
            os.write(go[1], b"x")
            # The kernel has answered the child's request for the connections table with EDEADLK.
            assert select.select([report[0]], [], [], 20)[0] and os.read(report[0], 1) == b"d"
        assert select.select([report[0]], [], [], 20)[0] and os.read(report[0], 64) == b"ok"
        waiter.join(20)
        assert got == [failures]
        failures.__exit__(None, None, None)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for fd in go + report:
            os.close(fd)


def test_counters_are_summed_over_workers_and_never_go_down():
    state = host()
    in_child(lambda: state.stats(0).add("sessions", 5))
    in_child(lambda: state.stats(1).add("sessions", 2))
    in_child(lambda: state.stats(0).add("sessions"))  # a worker forked again adds to its row
    state.stats(None).add("errors")
    snapshot = state.stats(1).snapshot()
    assert snapshot["sessions"] == 8 and snapshot["errors"] == 1


def test_mailbox_locks_exclude_across_processes_and_die_with_their_holder():
    state = host()
    try:
        holder = Held(lambda: state.locks().try_acquire("alice") is not None)
        assert holder.result is True
        assert in_child(lambda: state.locks().try_acquire("alice") is None)
        holder.kill()  # the kernel drops a dead process's flock
        assert in_child(lambda: state.locks().try_acquire("alice") is not None)
        assert isinstance(state.locks(), FileLockManager)
        assert oct(os.stat(state.lock_dir).st_mode & 0o777) == "0o700"
    finally:
        state.close()
    assert not os.path.exists(state.lock_dir)


def test_a_process_killed_holding_the_shared_lock_blocks_nobody():
    state = host()
    holder = Held(lambda: state.connections.lock.__enter__() is state.connections.lock)
    assert holder.result is True
    holder.kill()
    assert in_child(lambda: state.tracker(1, context()).count_ip("192.0.2.1")) == 0


def test_clearing_a_dead_workers_counts_never_waits_for_the_table():
    """The supervisor calls release(): with the table's lock held elsewhere (a worker
    stopped mid-admission) it says so instead of waiting, and clears once it is free."""
    state = host(max_connections_per_ip=2)
    sock = socket.socket()
    try:
        counted = Held(lambda: state.tracker(0, context(max_connections_per_ip=2)).admit(sock, "198.51.100.1", None))
        assert counted.result is None
        counted.kill()
        holder = Held(lambda: state.connections.lock.__enter__() is state.connections.lock)
        assert state.release(0) is False
        assert state.tracker(1, context()).count_host() == 1  # nothing changed meanwhile
        holder.kill()
        assert state.release(0) is True
        assert state.tracker(1, context()).count_ip("198.51.100.1") == 0 and len(state.connections) == 0
    finally:
        sock.close()


@pytest.mark.parametrize("runtime", [True, False])
def test_the_lock_directory_is_private_and_under_the_runtime_directory(tmp_path, monkeypatch, runtime):
    if runtime:
        monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    else:
        monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    state = host()
    try:
        assert (os.path.dirname(state.lock_dir) == str(tmp_path)) is runtime
    finally:
        state.close()
