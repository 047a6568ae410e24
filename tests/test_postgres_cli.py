"""The real ``pop3frame`` command against a real PostgreSQL (see tests/pg.py).

The shell example of docs/deployment-postgres.rst, end to end in
subprocesses: ``user add|passwd|list|del --postgres``, ``deliver
--postgres`` with the message on stdin, and two ``serve --postgres``
processes sharing mailbox locks through a config file with
``[locks] backend = "postgres"``.  Every wait is bounded and blocks on
something (a server's log line, a lock wait inside PostgreSQL, a process
exit); processes are signalled by the PID of the child the test started.
"""
from __future__ import annotations

import signal

from tests.helpers import RawClient
from tests.pg import pg_db, pg_dsn, sql, wait_until_unlocked  # noqa: F401  (fixtures)
from tests.processes import Daemon, pop3frame, write_config

FIRST = b"Subject: first\n\nhello\n"
SECOND = b"Subject: second\n\n.starts with a dot\n"


def run(*args, input=None):
    """``pop3frame ARGS``; asserts it succeeded and returns its stdout."""
    out = pop3frame(*args, input=input)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout


def advisory_locks(dsn):
    return sql(dsn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")[0][0]


def test_user_and_deliver_commands(pg_db):
    """user add/passwd/list/del and deliver act on the PostgreSQL store; the
    password is read from stdin and never appears in the database."""
    run("user", "add", "--postgres", pg_db, "alice", "--password-stdin", input=b"old-pw\n")
    run("user", "add", "--postgres", pg_db, "bob", "--password-stdin", input=b"bob-pw\n")
    run("deliver", "--postgres", pg_db, "alice", input=FIRST)
    run("deliver", "alice", "--postgres", pg_db, input=SECOND)
    run("user", "passwd", "--postgres", pg_db, "alice", "--password-stdin", input=b"alice-pw\n")
    # Octets as POP3 counts them: LF line ends become CRLF on the wire.
    assert run("user", "list", "--postgres", pg_db) == b"alice\t2 messages\t64 octets\nbob\t0 messages\t0 octets\n"
    stored = [p for p, in sql(pg_db, "SELECT password FROM pop3frame_users ORDER BY name")]
    # The passwords themselves, not "pw": two letters turn up in random salts.
    assert all(p.startswith("{") and not any(pw in p for pw in ("old-pw", "alice-pw", "bob-pw"))
               for p in stored), stored

    run("user", "del", "--postgres", pg_db, "bob")
    assert run("user", "list", "--postgres", pg_db) == b"alice\t2 messages\t64 octets\n"
    gone = pop3frame("user", "del", "--postgres", pg_db, "bob")
    assert gone.returncode == 2 and gone.stderr == b"pop3frame: no such user: bob\n"
    unknown = pop3frame("deliver", "--postgres", pg_db, "bob", input=FIRST)
    assert unknown.returncode == 2 and unknown.stderr == b"pop3frame: no such user: bob\n"
    assert sql(pg_db, "SELECT count(*) FROM pop3frame_messages") == [(2,)]


def test_two_serve_processes_share_locks(pg_db, tmp_path):
    """Two ``serve --postgres`` instances with ``[locks] backend = "postgres"``:
    a login on B while A holds the mailbox gets -ERR [IN-USE] (RFC 2449
    section 8.1.2, RFC 1939 section 8's exclusive lock); after A is killed
    with SIGKILL, B's login succeeds and A's pending DELE was not applied
    (RFC 1939 section 6: deletions happen only in the UPDATE state).  SIGTERM
    makes B exit 0 without applying the DELE of its live session, and with no
    advisory lock left behind."""
    run("user", "add", "--postgres", pg_db, "alice", "--password-stdin", input=b"alice-pw\n")
    run("deliver", "--postgres", pg_db, "alice", input=FIRST)
    run("deliver", "--postgres", pg_db, "alice", input=SECOND)
    config = write_config(tmp_path, """
        shutdown_grace = 0.2
        [[listener]]
        address = "127.0.0.1:0"
        [server]
        max_connections = 40
        [locks]
        backend = "postgres"
        dsn = "%s"
    """ % pg_db)
    with Daemon("--config", config, "--postgres", pg_db) as a, Daemon("--config", config, "--postgres", pg_db) as b:
        # The pool may grow to the thread count (max_connections), no further.
        assert a.saw(r"store: postgres .* \(pool up to 40 connections\)") and b.saw(r"store: postgres ")
        with RawClient(("127.0.0.1", a.port), timeout=30) as on_a:
            assert on_a.login("alice", "wrong").startswith(b"-ERR [AUTH]")
            assert on_a.login("alice", "alice-pw") == b"+OK alice's maildrop has 2 messages (64 octets)\r\n"
            on_a.send(b"RETR 2\r\n")
            assert on_a.multiline() == b"+OK 39 octets\r\nSubject: second\r\n\r\n..starts with a dot\r\n.\r\n"
            assert on_a.cmd("DELE 1") == b"+OK message 1 deleted\r\n"
            with RawClient(("127.0.0.1", b.port), timeout=30) as on_b:
                assert on_b.login("alice", "alice-pw").startswith(b"-ERR [IN-USE] ")
                a.proc.kill()  # SIGKILL, by the PID of the child this test started
                assert a.proc.wait(30) == -signal.SIGKILL
                assert on_a.read_all() == b""
                wait_until_unlocked(pg_db, "alice")  # PostgreSQL saw A's lock connection close
                assert on_b.login("alice", "alice-pw") == b"+OK alice's maildrop has 2 messages (64 octets)\r\n"
                assert on_b.cmd("DELE 2") == b"+OK message 2 deleted\r\n"
                b.signal(signal.SIGTERM)
                b.wait_for(r"closing 1 session\(s\) still open; their deletions are not applied")
                assert on_b.read_all() == b""
            assert b.stop() == 0
    assert run("user", "list", "--postgres", pg_db) == b"alice\t2 messages\t64 octets\n"
    assert advisory_locks(pg_db) == 0  # B released its locks before it exited


def test_serve_warns_when_the_pool_exceeds_the_servers_max_connections(pg_db):
    """The test cluster allows 300 connections; serve's default of 1,000
    connections means a pool of up to 1,000: one WARNING at start-up, before
    the listening line.  At 40 the pool fits and nothing is said."""
    with Daemon("--postgres", pg_db, "--listen", "127.0.0.1:0") as d:
        warning = d.saw(r"WARNING pop3frame\.adapters\.postgres the connection pool may grow to 1000, above "
                        r"the PostgreSQL server's max_connections = 300 ")
        assert warning, "".join(d.seen)
        assert d.saw(r"store: postgres .* \(pool up to 1000 connections\)")
        assert d.stop() == 0
    with Daemon("--postgres", pg_db, "--listen", "127.0.0.1:0", "--max-connections", "40") as d:
        assert d.saw(r"\(pool up to 40 connections\)") and not d.saw("WARNING")
        assert d.stop() == 0
