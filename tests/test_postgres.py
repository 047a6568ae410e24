"""PostgresStore and PostgresLockManager against a real PostgreSQL (see tests/pg.py).

No mocks and no sleeps: servers are real (in-process Controllers, or
``python -m tests.pg serve`` child processes killed with SIGKILL by PID),
clients are poplib or raw sockets on 127.0.0.1, and every wait for
something another process does is a blocking wait on a pipe or inside
PostgreSQL (a lock taken with a ``lock_timeout``).
"""
from __future__ import annotations

import hashlib
import io
import logging
import poplib
import re
import subprocess
import sys
import threading
import time
import tracemalloc

import psycopg
import pytest

from pop3frame import TemporaryFailure
from pop3frame.config import ServerConfig
from pop3frame.extras import install_hint
from pop3frame.adapters.postgres import (
    _VERSION_TABLE,
    CHUNK,
    MIGRATIONS,
    SCHEMA_VERSION,
    PostgresLockManager,
    PostgresStore,
    UnknownUser,
    lock_key,
)
from pop3frame.protocol import wire_size
from pop3frame.testing import Controller
from tests.helpers import RawClient, assert_new_mail_records_dot_lines, expected_failure_logged_once, retr_lines_to_bytes
from tests.pg import ServerProcess, pg_db, pg_dsn, sql, wait_until_unlocked  # noqa: F401  (fixtures)

LOGGER = "pop3frame.adapters.postgres"


@pytest.fixture
def store(pg_db):
    s = PostgresStore(pg_db, pool_size=4)
    yield s
    s.close()


def dbname(dsn):
    return psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]


def terminate(admin_dsn, pid):
    """pg_terminate_backend, waiting (inside PostgreSQL) until the backend has exited."""
    assert sql(admin_dsn, "SELECT pg_terminate_backend(%s, 30000)", (pid,)) == [(True,)]


def pop(address, user="alice", password="alice-pw"):
    client = poplib.POP3(*address, timeout=30)
    client.user(user)
    client.pass_(password)
    return client


# -- driver, schema -------------------------------------------------------------------


def test_missing_driver_names_the_extra(monkeypatch):
    """The module imports without psycopg; using it says what to install."""
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(ImportError, match=re.escape(install_hint("postgres")) + "$"):
        PostgresStore("dbname=none")
    with pytest.raises(ImportError, match=re.escape(install_hint("postgres")) + "$"):
        PostgresLockManager("dbname=none")


def test_schema_created_once_by_concurrent_instances(pg_db):
    """Instances starting together on an empty database migrate it exactly once."""
    stores, errors = [], []

    def start():
        try:
            stores.append(PostgresStore(pg_db, pool_size=1, pool_min_size=0))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(stores) == 6
    assert [v for v, in sql(pg_db, "SELECT version FROM pop3frame_schema_version ORDER BY version")] == list(
        range(1, SCHEMA_VERSION + 1))  # each migration once
    assert sql(pg_db, "SELECT count(*) FROM pop3frame_meta WHERE key = 'store_id'") == [(1,)]
    stores[0].add_user("alice", "pw", scheme="PLAIN")
    # Every instance numbers UIDs with the one database-wide prefix.
    uids = [s.deliver("alice", b"x\n") for s in stores]
    assert len({u.split(".")[0] for u in uids}) == 1 and len(set(uids)) == 6
    assert stores[3].schema_version() == SCHEMA_VERSION
    for s in stores:
        s.close()


def test_dot_lines_kept_from_delivery_and_unknown_for_mail_from_before_migration_2(pg_db):
    """Migration 2 keeps, with each message, whether a line starts with "." (RETR then
    need not look); mail delivered under version 1 gets NULL, not known, and is stuffed
    as ever (RFC 1939 section 3)."""
    version_1 = MIGRATIONS[0]
    sql(pg_db, _VERSION_TABLE)
    sql(pg_db, version_1[2])
    sql(pg_db, "INSERT INTO pop3frame_schema_version (version, description) VALUES (1, %s)", (version_1[1],))
    sql(pg_db, "INSERT INTO pop3frame_meta VALUES ('store_id', 'a1b2c3d4')")
    sql(pg_db, "INSERT INTO pop3frame_users (name, password) VALUES ('alice', '{PLAIN}pw')")
    old = b"Subject: old\r\n\r\n.dotted\r\n"
    (message_id,), = sql(pg_db, "INSERT INTO pop3frame_messages (user_id, uid, size, chunks)"
                         " SELECT id, 'old.1', %s, 1 FROM pop3frame_users RETURNING id", (len(old),))
    sql(pg_db, "INSERT INTO pop3frame_chunks VALUES (%s, 0, %s)", (message_id, old))
    store = PostgresStore(pg_db)
    try:
        assert store.schema_version() == SCHEMA_VERSION == 2
        assert_new_mail_records_dot_lines(store)
    finally:
        store.close()


def test_newer_schema_is_refused(pg_db):
    PostgresStore(pg_db).close()
    sql(pg_db, "INSERT INTO pop3frame_schema_version (version, description) VALUES (%s, 'future')",
        (SCHEMA_VERSION + 1,))
    with pytest.raises(RuntimeError, match="upgrade pop3frame"):
        PostgresStore(pg_db)


def test_migrate_false_never_touches_the_schema(pg_db):
    with pytest.raises(RuntimeError, match="migrate=True"):
        PostgresStore(pg_db, migrate=False)
    assert sql(pg_db, "SELECT to_regclass('pop3frame_schema_version')") == [(None,)]
    PostgresStore(pg_db).close()
    PostgresStore(pg_db, migrate=False).close()


# -- management API ---------------------------------------------------------------------


def test_management_api(store, pg_db):
    store.add_user("alice", "s3cret")
    stored = sql(pg_db, "SELECT password FROM pop3frame_users WHERE name = 'alice'")[0][0]
    assert stored.startswith("{") and "s3cret" not in stored  # a hash, never the password
    assert store.authenticate("alice", "s3cret") and not store.authenticate("alice", "wrong")
    assert not store.authenticate("nobody", "s3cret")
    with pytest.raises(ValueError, match="exists"):
        store.add_user("alice", "again")
    with pytest.raises(ValueError):
        store.add_user("bad\nname", "x")
    store.set_password("alice", "new-pw", scheme="PLAIN")
    assert store.authenticate("alice", "new-pw") and not store.authenticate("alice", "s3cret")
    with pytest.raises(UnknownUser):
        store.set_password("nobody", "x")
    assert issubclass(UnknownUser, LookupError)  # what the CLI catches

    first = b"Subject: a\n\nLF body\n"
    second = b"Subject: b\r\n\r\nCRLF body\r\n"
    u1 = store.deliver("alice", first)
    u2 = store.deliver("alice", io.BytesIO(second))  # file objects are read in chunks
    u3 = store.deliver("alice", b"kept id", uid="imported-42")
    assert u3 == "imported-42" and len({u1, u2, u3}) == 3
    with pytest.raises(ValueError, match="already used"):
        store.deliver("alice", b"x", uid="imported-42")
    with pytest.raises(ValueError, match="invalid"):
        store.deliver("alice", b"x", uid="has space")
    with pytest.raises(UnknownUser):
        store.deliver("nobody", b"x")
    store.add_user("bob", "b", scheme="PLAIN")
    store.deliver("bob", b"")  # an empty message is a message too
    octets = wire_size(first) + wire_size(second) + wire_size(b"kept id")
    assert store.list_users() == [("alice", 3, octets), ("bob", 1, 0)]
    assert [m.uid for m in store.list_messages("alice")] == [u1, u2, u3]
    bob = store.list_messages("bob")
    assert bob[0].size == 0 and store.open_message("bob", bob[0]).read() == b""

    store.delete_user("alice")
    with pytest.raises(UnknownUser):
        store.delete_user("alice")
    assert store.list_users() == [("bob", 1, 0)]
    assert sql(pg_db, "SELECT count(*) FROM pop3frame_chunks") == [(0,)]  # bodies went with the user


def test_chunking_and_sizes_across_boundaries(store, pg_db):
    """Rows are exactly CHUNK bytes but the last, even from a reader that returns
    short reads; a CRLF split over two rows is counted once."""
    body = b"Subject: split\r\n\r\n" + b"a" * (CHUNK - 19) + b"\r\n" + b"b\nc\r\n" + b"d" * CHUNK + b"\n"
    assert body[CHUNK - 1:CHUNK + 1] == b"\r\n"

    class Dribble(io.RawIOBase):
        def __init__(self, data):
            self.data = memoryview(data)

        def readable(self):
            return True

        def readinto(self, b):
            n = min(len(b), 1000, len(self.data))
            b[:n] = self.data[:n]
            self.data = self.data[n:]
            return n

    store.add_user("alice", "pw", scheme="PLAIN")
    store.deliver("alice", Dribble(body))
    rows = sql(pg_db, "SELECT seq, length(data) FROM pop3frame_chunks ORDER BY seq")
    assert rows == [(0, CHUNK), (1, CHUNK), (2, len(body) - 2 * CHUNK)]
    (info,) = store.list_messages("alice")
    assert info.size == wire_size(body)
    with store.open_message("alice", info) as f:
        assert f.read() == body


# -- locks ------------------------------------------------------------------------------


def test_advisory_locks_exclude_across_managers(pg_db):
    a = PostgresLockManager(pg_db, health_check_interval=0)
    b = PostgresLockManager(pg_db, health_check_interval=0)
    try:
        held = a.try_acquire("alice")
        assert held is not None
        assert a.try_acquire("alice") is None  # advisory locks are reentrant: refused locally
        assert b.try_acquire("alice") is None
        assert b.is_locked("alice") and not b.is_locked("bob")
        # The lock really is PostgreSQL's, on the key documented by lock_key().
        rows = sql(pg_db, "SELECT (classid::bigint << 32) | objid::bigint FROM pg_locks"
                          " WHERE locktype = 'advisory' AND objsubid = 1 AND pid = %s", (a.backend_pid,))
        assert rows == [(lock_key("alice") & 0xFFFFFFFFFFFFFFFF,)]
        assert a.held_names() == ["alice"]
        held.release()
        held.release()  # idempotent
        assert a.held_names() == []
        other = b.try_acquire("alice")
        assert other is not None and a.try_acquire("alice") is None
        b.close()  # releases everything it held before returning
        assert a.try_acquire("alice") is not None
        with pytest.raises(TemporaryFailure):
            b.try_acquire("carol")
    finally:
        a.close()
        b.close()


def test_lock_connection_drop_is_noticed_and_locks_retaken(pg_db, pg_dsn, caplog):
    a = PostgresLockManager(pg_db, health_check_interval=0, retry_interval=0)
    b = PostgresLockManager(pg_db, health_check_interval=0)
    try:
        held = a.try_acquire("alice")
        old = a.backend_pid
        terminate(pg_dsn, old)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert a.check()
        assert a.backend_pid != old
        assert any(r.levelno == logging.CRITICAL and "lock connection lost" in r.getMessage() for r in caplog.records)
        assert "1 lock(s) re-taken, 0 lost" in caplog.text
        assert b.try_acquire("alice") is None  # protected again
        held.release()  # released on the new connection
        assert b.try_acquire("alice") is not None
    finally:
        a.close()
        b.close()


def test_lock_taken_elsewhere_while_disconnected_is_reported(pg_db, pg_dsn, caplog):
    a = PostgresLockManager(pg_db, health_check_interval=0, retry_interval=0)
    b = PostgresLockManager(pg_db, health_check_interval=0)
    c = PostgresLockManager(pg_db, health_check_interval=0)
    try:
        held_by_a = a.try_acquire("alice")
        terminate(pg_dsn, a.backend_pid)
        held_by_b = b.try_acquire("alice")  # PostgreSQL dropped a's lock with its connection
        assert held_by_b is not None
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert a.try_acquire("bob") is not None  # reconnects on the way
        assert any(r.levelno == logging.CRITICAL and "'alice'" in r.getMessage() for r in caplog.records)
        assert "0 lock(s) re-taken, 1 lost" in caplog.text
        held_by_a.release()  # must not release b's lock
        assert c.try_acquire("alice") is None
        held_by_b.release()
        assert c.try_acquire("alice") is not None
    finally:
        for m in (a, b, c):
            m.close()


def test_logins_refused_while_lock_database_unreachable(pg_db, pg_dsn, caplog):
    """No lock connection: logins get [SYS/TEMP] (not [IN-USE]), until it is back."""
    store = PostgresStore(pg_db, pool_size=2)
    store.add_user("alice", "alice-pw", scheme="PLAIN")
    locks = PostgresLockManager(pg_db, health_check_interval=0, retry_interval=0)
    name = dbname(pg_db)
    try:
        with Controller(store, locks=locks) as server:
            sql(pg_dsn, 'ALTER DATABASE "%s" ALLOW_CONNECTIONS false' % name)
            try:
                terminate(pg_dsn, locks.backend_pid)
                with caplog.at_level(logging.WARNING, logger=LOGGER):
                    client = server.pop3()
                    client.user("alice")
                    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
                        client.pass_("alice-pw")
                    client.quit()
                    assert not locks.check()
                assert any(r.levelno == logging.CRITICAL and "cannot reconnect" in r.getMessage()
                           for r in caplog.records)
            finally:
                sql(pg_dsn, 'ALTER DATABASE "%s" ALLOW_CONNECTIONS true' % name)
            client = pop(server.address)
            assert client.stat() == (0, 0)
            client.quit()
            assert locks.held_names() == []
    finally:
        locks.close()
        store.close()


# -- store failures ----------------------------------------------------------------------


def test_database_restart_and_outage(pg_db, pg_dsn, caplog):
    """Dead pooled connections are replaced (retry once); an unreachable database is
    [SYS/TEMP] for the client and a log line without the password."""
    store = PostgresStore(pg_db, pool_size=2, pool_min_size=2, pool_timeout=2)
    store.add_user("alice", "pw-SECRET-1", scheme="PLAIN")
    store.deliver("alice", b"Subject: kept\r\n\r\nbody-SECRET-2\r\n")
    name = dbname(pg_db)
    kill_pool = ("SELECT pg_terminate_backend(pid, 30000) FROM pg_stat_activity"
                 " WHERE datname = %s AND application_name = 'pop3frame'")
    try:
        with caplog.at_level(logging.DEBUG), Controller(store) as server:
            sql(pg_dsn, kill_pool, (name,))  # as a database restart would
            client = pop(server.address, password="pw-SECRET-1")
            assert retr_lines_to_bytes(client.retr(1)[1]) == b"Subject: kept\r\n\r\nbody-SECRET-2\r\n"
            client.quit()
            assert "retrying once" in caplog.text

            sql(pg_dsn, 'ALTER DATABASE "%s" ALLOW_CONNECTIONS false' % name)
            try:
                sql(pg_dsn, kill_pool, (name,))
                client = server.pop3()
                client.user("alice")
                with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
                    client.pass_("pw-SECRET-1")
                client.quit()
            finally:
                sql(pg_dsn, 'ALTER DATABASE "%s" ALLOW_CONNECTIONS true' % name)
        assert "pw-SECRET-1" not in caplog.text and "body-SECRET-2" not in caplog.text
    finally:
        store.close()
    with PostgresStore(pg_db) as again:
        assert again.authenticate("alice", "pw-SECRET-1")


def test_unreachable_database_is_one_line_with_the_cause(pg_db, pg_dsn, caplog):
    """Issue 13, quiet logs: a database that refuses connections is an
    expected failure.  Each login during the outage is -ERR [SYS/TEMP] "mail
    store unavailable" and one ERROR line that names the database's reason.
    It used to be "no database connection free within 2.0 s (pool_size=2)"
    and "mail store busy": a full pool, the wrong cause and the wrong fix."""
    store = PostgresStore(pg_db, pool_size=2, pool_min_size=2, pool_timeout=1)
    store.add_user("alice", "pw", scheme="PLAIN")
    name = dbname(pg_db)
    try:
        with caplog.at_level(logging.INFO), Controller(store) as server:
            sql(pg_dsn, 'ALTER DATABASE "%s" ALLOW_CONNECTIONS false' % name)
            try:
                sql(pg_dsn, "SELECT pg_terminate_backend(pid, 30000) FROM pg_stat_activity WHERE datname = %s"
                            " AND application_name = 'pop3frame'", (name,))
                for attempt in range(2):  # the first finds the pool's dead connections
                    caplog.clear()
                    with RawClient(server.address, timeout=30) as client:
                        assert client.cmd("USER alice").startswith(b"+OK")
                        assert client.cmd("PASS pw") == b"-ERR [SYS/TEMP] mail store unavailable, try again later\r\n"
                        client.cmd("QUIT")
            finally:
                sql(pg_dsn, 'ALTER DATABASE "%s" ALLOW_CONNECTIONS true' % name)
        ours = [r for r in caplog.records if r.name.startswith("pop3frame")]
        line = expected_failure_logged_once(ours, "is not currently accepting connections")
        assert line.getMessage().startswith("database unavailable: connection failed: ")
        assert [r.getMessage() for r in caplog.records if r.exc_info] == []  # psycopg.pool's lines too
    finally:
        store.close()


def test_failed_update_leaves_every_message(pg_db):
    """An error inside the deletion transaction rolls all of it back."""

    class Failing(PostgresStore):
        def _before_commit(self, conn, username, messages):
            raise RuntimeError("disk on fire")

    store = Failing(pg_db, pool_size=2)
    try:
        store.add_user("alice", "alice-pw", scheme="PLAIN")
        for i in range(3):
            store.deliver("alice", b"Subject: %d\r\n\r\nx\r\n" % i)
        with Controller(store) as server:
            client = pop(server.address)
            client.dele(1)
            client.dele(3)
            with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
                client.quit()
            client.close()
        assert len(store.list_messages("alice")) == 3
    finally:
        store.close()


def test_a_store_restored_from_a_dump_never_reissues_a_uid(pg_db, tmp_path):
    """RFC 1939 section 7 (UIDL): the database restored from a pg_dump taken before
    the newest delivery (pg_restore --clean, pop3frame stopped).  The id sequence
    goes back with it, so the next delivery gets the id of mail a client that keeps
    mail on the server already saw: its unique-id must still be new."""
    dump = str(tmp_path / "mail.dump")
    with PostgresStore(pg_db) as store:
        store.add_user("alice", "alice-pw", scheme="PLAIN")
        issued = [store.deliver("alice", b"Subject: %d\r\n\r\nx\r\n" % i) for i in (1, 2)]
        subprocess.run(["pg_dump", "--format=custom", "--file", dump, pg_db], check=True, timeout=60)
        issued.append(store.deliver("alice", b"Subject: after the dump\r\n\r\nx\r\n"))
        with Controller(store) as server:
            client = pop(server.address)
            assert [line.split()[1].decode() for line in client.uidl()[1]] == issued
            client.quit()
    subprocess.run(["pg_restore", "--clean", "--if-exists", "--dbname", pg_db, dump], check=True, timeout=60)
    with PostgresStore(pg_db) as store:
        new = store.deliver("alice", b"Subject: after the restore\r\n\r\nx\r\n")
        with Controller(store) as server:
            client = pop(server.address)
            assert [line.split()[1].decode() for line in client.uidl()[1]] == issued[:2] + [new]
            client.quit()
    assert new not in issued


# -- several instances, in separate processes -------------------------------------------


def test_two_processes_share_mailbox_locks(pg_db):
    """[IN-USE] on the second instance while the first holds the mailbox; free
    again after QUIT, and after the holder is killed with SIGKILL."""
    with PostgresStore(pg_db) as store:
        store.add_user("alice", "alice-pw", scheme="PLAIN")
        store.deliver("alice", b"Subject: one\r\n\r\n1\r\n")
    with ServerProcess(pg_db) as first, ServerProcess(pg_db) as second:
        a = pop(first.address)
        b = poplib.POP3(*second.address, timeout=30)
        b.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            b.pass_("alice-pw")
        a.quit()  # the lock is released before the QUIT reply is sent
        b.user("alice")
        assert b.pass_("alice-pw").startswith(b"+OK")
        assert b.stat()[0] == 1
        b.quit()

        a = pop(first.address)
        held = sql(pg_db, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s",
                   (first.lock_backend_pid,))
        assert held == [(1,)]
        first.kill()  # SIGKILL by PID: no QUIT, no cleanup, no unlock
        a.close()
        wait_until_unlocked(pg_db, "alice")
        b = pop(second.address)
        assert b.stat()[0] == 1
        b.quit()


@pytest.mark.parametrize("hold, kept", [("before-commit", [0, 1, 2]), ("after-commit", [2])])
def test_sigkill_during_update_is_all_or_none(pg_db, hold, kept):
    """kill -9 inside UPDATE (after the DELETE, before or after COMMIT): the
    session's deletions are all applied or none, never some."""
    with PostgresStore(pg_db) as store:
        store.add_user("alice", "alice-pw", scheme="PLAIN")
        uids = [store.deliver("alice", b"Subject: %d\r\n\r\nbody\r\n" % i) for i in range(3)]
    with ServerProcess(pg_db, "--hold", hold) as victim, ServerProcess(pg_db) as other:
        raw = RawClient(victim.address, timeout=30)
        assert raw.login("alice", "alice-pw").startswith(b"+OK")
        assert raw.cmd("DELE 1").startswith(b"+OK")
        assert raw.cmd("DELE 2").startswith(b"+OK")
        raw.send(b"QUIT\r\n")
        victim.expect("HOLD " + hold)
        if hold == "before-commit":
            # The DELETE ran but is uncommitted: nobody else sees it yet.
            assert len(sql(pg_db, "SELECT id FROM pop3frame_messages")) == 3
        victim.kill()
        raw.close()
        # Row locks taken by the DELETE block this until PostgreSQL has
        # rolled back the dead backend's transaction: no timing guesses.
        with psycopg.connect(pg_db) as conn:
            conn.execute("SET lock_timeout = '30s'")
            left = [u for u, in conn.execute("SELECT uid FROM pop3frame_messages ORDER BY id FOR UPDATE")]
        assert left == [uids[i] for i in kept]
        wait_until_unlocked(pg_db, "alice")
        client = pop(other.address)
        assert [line.split()[1].decode() for line in client.uidl()[1]] == left
        client.quit()


# -- concurrency and size -----------------------------------------------------------------


class Gate(PostgresStore):
    """Every deletion transaction stops before COMMIT, holding its pooled
    connection, until ``opened`` is set; ``inside`` counts arrivals."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inside = threading.Semaphore(0)
        self.opened = threading.Event()
        # The pool opens its minimum of connections in the background; on a
        # loaded machine opening one can take longer than a short pool_timeout.
        self._pool.wait(timeout=60)

    def _before_commit(self, conn, username, messages):
        self.inside.release()
        if not self.opened.wait(60):
            raise RuntimeError("the test never opened the gate")


def quit_inside_gate(server, gate, user):
    """Log ``user`` in, DELE 1 and send QUIT; return once the session is
    stopped in the deletion transaction, holding one pooled connection."""
    client = RawClient(server.address, timeout=30)
    assert client.login(user, "pw").startswith(b"+OK")
    assert client.cmd("DELE 1").startswith(b"+OK")
    client.send(b"QUIT\r\n")
    assert gate.inside.acquire(timeout=30), "the session never reached the deletion transaction"
    return client


def test_pool_grows_to_the_thread_count_and_follows_it(pg_db):
    """``threads`` is the pool's maximum: as many sessions as threads hold a
    connection at once, one more call finds none; set_threads() raises the
    maximum at once.  An explicit pool_size wins over the thread count."""
    # Room to open a connection on a loaded machine; the call that finds the
    # pool at its maximum waits it out.
    store = Gate(pg_db, threads=3, pool_timeout=5)
    clients = []
    try:
        assert store.pool_size == 3
        for n in range(3):
            store.add_user("u%d" % n, "pw", scheme="PLAIN")
            store.deliver("u%d" % n, b"Subject: %d\r\n\r\nx\r\n" % n)
        with Controller(store) as server:
            try:
                clients = [quit_inside_gate(server, store, "u%d" % n) for n in range(3)]
                with pytest.raises(TemporaryFailure):
                    store.list_users()  # a fourth thread: the pool is at its maximum
                store.set_threads(4)
                assert store.pool_size == 4
                assert [name for name, _, _ in store.list_users()] == ["u0", "u1", "u2"]
                opened = sql(pg_db, "SELECT count(*) FROM pg_stat_activity"
                                    " WHERE datname = %s AND application_name = 'pop3frame'", (dbname(pg_db),))
                assert opened == [(4,)]
            finally:
                store.opened.set()
            for c in clients:
                assert c.line().startswith(b"+OK")
                c.close()
        assert store.list_users() == [("u0", 0, 0), ("u1", 0, 0), ("u2", 0, 0)]
    finally:
        store.opened.set()
        store.close()
    with PostgresStore(pg_db, threads=50, pool_size=2) as fixed:
        fixed.set_threads(10)
        assert fixed.pool_size == 2 and not fixed.pool_follows_threads
    with PostgresStore(pg_db, pool_min_size=0) as default:
        assert default.pool_size == ServerConfig.max_connections
    with pytest.raises(ValueError, match="threads must be at least 1"):
        PostgresStore(pg_db, threads=0)


def test_exhausted_pool_is_sys_temp_promptly_and_loses_nothing(pg_db, caplog):
    """pool_size=1 with one session inside the store: a second session's PASS
    waits pool_timeout, then gets -ERR [SYS/TEMP] (RFC 3206 section 4: a
    temporary condition, retry later); the held deletion still commits and
    the refused user's mail is all there when they retry."""
    store = Gate(pg_db, pool_size=1, pool_timeout=0.3)
    for user in ("alice", "bob"):
        store.add_user(user, "pw", scheme="PLAIN")
        for i in range(2):
            store.deliver(user, b"Subject: %s %d\r\n\r\nx\r\n" % (user.encode(), i))
    kept_uid = store.list_messages("alice")[1].uid
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER), Controller(store) as server:
            try:
                alice = quit_inside_gate(server, store, "alice")
                with RawClient(server.address, timeout=30) as bob:
                    assert bob.cmd("USER bob").startswith(b"+OK")
                    began = time.monotonic()
                    reply = bob.cmd("PASS pw")
                    waited = time.monotonic() - began
                    assert reply.startswith(b"-ERR [SYS/TEMP] "), reply
                    assert 0.3 <= waited < 5, waited
                    assert "no database connection free within 0.3 s (pool_size=1)" in caplog.text
                    store.opened.set()
                    assert alice.line().startswith(b"+OK")
                    alice.close()
                    assert bob.login("bob", "pw") == b"+OK bob's maildrop has 2 messages (42 octets)\r\n"
                    assert bob.cmd("QUIT").startswith(b"+OK")
            finally:
                store.opened.set()
        assert [m.uid for m in store.list_messages("alice")] == [kept_uid]
        assert store.list_users() == [("alice", 1, 23), ("bob", 2, 42)]
    finally:
        store.close()


def test_twenty_threads_with_deliveries_during_sessions(pg_db):
    """20 users in 20 threads at once through a 4-connection pool; mail delivered
    during a session is neither shown nor deleted by it."""
    store = PostgresStore(pg_db, pool_size=4)
    locks = PostgresLockManager(pg_db)
    users = ["user%02d" % i for i in range(20)]
    for u in users:
        store.add_user(u, "pw-" + u, scheme="PLAIN")
        store.deliver(u, b"Subject: first " + u.encode() + b"\r\n\r\n.dot\r\n")
    errors = []
    try:
        with Controller(store, locks=locks) as server:

            def run(u):
                try:
                    for rnd in range(3):
                        client = pop(server.address, u, "pw-" + u)
                        count, _ = client.stat()
                        assert count == 1, (u, rnd, count)
                        got = retr_lines_to_bytes(client.retr(1)[1])
                        expected = (b"Subject: first " + u.encode() + b"\r\n\r\n.dot\r\n" if rnd == 0
                                    else b"Subject: round %d\r\n\r\n%s\r\n" % (rnd - 1, u.encode()))
                        assert got == expected, (u, rnd, got)
                        store.deliver(u, b"Subject: round %d\r\n\r\n%s\r\n" % (rnd, u.encode()))
                        assert client.stat()[0] == 1  # the snapshot does not grow
                        client.dele(1)
                        client.quit()
                except Exception as exc:
                    errors.append((u, exc))

            threads = [threading.Thread(target=run, args=(u,)) for u in users]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert server.wait_for_connections(0)
        assert errors == []
        assert store.list_users() == [(u, 1, len(b"Subject: round 2\r\n\r\n\r\n") + len(u)) for u in users]
        assert locks.held_names() == []
    finally:
        locks.close()
        store.close()


def test_twenty_threads_one_mailbox_two_instances(pg_db):
    """20 threads race for one mailbox through two instances (own stores and
    lock connections): every session deletes its first message; if two were
    ever inside together they would delete the same one."""
    stores = [PostgresStore(pg_db, pool_size=4) for _ in range(2)]
    locks = [PostgresLockManager(pg_db) for _ in range(2)]
    stores[0].add_user("shared", "pw", scheme="PLAIN")
    for i in range(40):
        stores[i % 2].deliver("shared", b"Subject: %d\r\n\r\nx\r\n" % i)
    taken, errors, in_use = [], [], []
    try:
        with Controller(stores[0], locks=locks[0]) as one, Controller(stores[1], locks=locks[1]) as two:

            def run(n):
                server = (one, two)[n % 2]
                done = attempts = 0
                try:
                    while done < 2:
                        attempts += 1
                        assert attempts < 5000, "starved"
                        client = server.pop3()
                        client.user("shared")
                        try:
                            client.pass_("pw")
                        except poplib.error_proto as exc:
                            assert b"[IN-USE]" in exc.args[0], exc
                            in_use.append(n)
                            client.quit()
                            continue
                        uid = client.uidl(1).split()[2]
                        client.retr(1)
                        client.dele(1)
                        client.quit()
                        taken.append(uid)
                        done += 1
                except Exception as exc:
                    errors.append((n, exc))

            threads = [threading.Thread(target=run, args=(n,)) for n in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
        assert errors == []
        assert len(taken) == 40 and len(set(taken)) == 40
        assert stores[0].list_users() == [("shared", 0, 0)]
        assert in_use  # the race really happened
    finally:
        for m in locks + stores:
            m.close()


LINE = 80  # octets per body line, CRLF included


def _big_message(lines: int):
    """A CRLF message of ``16 + 80 * lines`` octets, generated piece by piece (never whole)."""
    yield b"Subject: big\r\n\r\n"
    for start in range(0, lines, 1000):
        yield b"".join(b"%010d" % n + b"y" * (LINE - 12) + b"\r\n" for n in range(start, min(lines, start + 1000)))


class _Generated(io.RawIOBase):
    def __init__(self, pieces):
        self._pieces = pieces
        self._buf = b""

    def readable(self):
        return True

    def readinto(self, b):
        while not self._buf:
            self._buf = next(self._pieces, None)
            if self._buf is None:
                self._buf = b""
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def test_retr_of_20mb_message_is_streamed(store, pg_db):
    """Delivered from a stream and RETRieved byte-exact while the whole process
    (server, store, client) never holds more than a few chunks."""
    lines = 20 * 1024 * 1024 // LINE
    size = 16 + LINE * lines
    rows = -(-size // CHUNK)
    digest = hashlib.sha256()
    for piece in _big_message(lines):
        digest.update(piece)
    store.add_user("alice", "alice-pw", scheme="PLAIN")
    fetched = []
    tracemalloc.start()
    try:
        store.deliver("alice", _Generated(_big_message(lines)))
        assert sql(pg_db, "SELECT count(*), max(length(data)) FROM pop3frame_chunks") == [(rows, CHUNK)]
        original = store._fetch_chunk
        store._fetch_chunk = lambda mid, seq: fetched.append(seq) or original(mid, seq)
        with Controller(store) as server, RawClient(server.address, timeout=60) as raw:
            assert raw.login("alice", "alice-pw").startswith(b"+OK")
            assert raw.cmd("LIST 1") == b"+OK 1 %d\r\n" % size
            raw.send(b"RETR 1\r\n")
            assert raw.line() == b"+OK %d octets\r\n" % size
            got = hashlib.sha256()
            received = 0
            tail = raw.buf
            raw.buf = b""
            while received + len(tail) < size + 3:
                data = raw.sock.recv(1 << 16)
                assert data, "connection closed early"
                tail += data
                if received + len(tail) > size:
                    keep = received + len(tail) - size
                    got.update(tail[:-keep])
                    received += len(tail) - keep
                    tail = tail[-keep:]
                else:
                    got.update(tail)
                    received += len(tail)
                    tail = b""
            assert tail == b".\r\n"  # no line starts with a dot: no stuffing
            assert got.hexdigest() == digest.hexdigest()
            raw.cmd("QUIT")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fetched == list(range(rows))  # one row at a time, in order
    print("tracemalloc peak %d bytes for a %d-byte message" % (peak, size))
    assert peak < 6 * 1024 * 1024, "peak %d bytes for a %d-byte message" % (peak, size)


def test_top_reads_only_the_first_rows(store):
    store.add_user("alice", "alice-pw", scheme="PLAIN")
    store.deliver("alice", b"Subject: top\r\n\r\n" + (b"z" * 98 + b"\r\n") * 40000)  # 4 MB, 16 rows
    fetched = []
    original = store._fetch_chunk
    store._fetch_chunk = lambda mid, seq: fetched.append(seq) or original(mid, seq)
    with Controller(store) as server:
        client = pop(server.address)
        assert client.top(1, 2)[1] == [b"Subject: top", b"", b"z" * 98, b"z" * 98]
        client.quit()
    assert fetched == [0]
