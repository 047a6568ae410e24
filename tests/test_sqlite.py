"""SQLite store: the embedded default."""
from __future__ import annotations

import os
import poplib
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import tracemalloc

import pytest

from pop3frame.adapters.sqlite import CHUNK, SCHEMA_VERSION, SQLiteStore, UnknownUser
from pop3frame.passwords import split_scheme
from pop3frame.protocol import iter_message
from pop3frame.testing import Controller
from tests.helpers import RawClient, assert_new_mail_records_dot_lines, retr_interrupted, retr_lines_to_bytes
from tests.processes import Daemon, pop3frame


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(str(tmp_path / "mail.db"))
    s.add_user("alice", "pw", scheme="PLAIN")
    return s


def test_user_management_and_default_hash(tmp_path):
    s = SQLiteStore(str(tmp_path / "m.db"))
    s.add_user("carol", "secret")
    with sqlite3.connect(s.path) as c:
        stored = c.execute("SELECT password FROM users").fetchone()[0]
    assert split_scheme(stored)[0] in ("ARGON2ID", "SCRYPT") and "secret" not in stored
    assert s.authenticate("carol", "secret") and not s.authenticate("carol", "nope")
    assert not s.authenticate("nobody", "secret")
    with pytest.raises(ValueError):
        s.add_user("carol", "x")
    s.set_password("carol", "new", scheme="PLAIN")
    assert s.authenticate("carol", "new")
    s.deliver("carol", b"Subject: x\r\n\r\ny\r\n")
    assert s.list_users() == [("carol", 1, 17)]
    s.delete_user("carol")
    assert s.list_users() == []
    with pytest.raises(UnknownUser):
        s.deliver("carol", b"x")
    with pytest.raises(ValueError):
        s.add_user("bad\nname", "x")


def test_uids_stable_and_not_reused_by_a_new_database(tmp_path):
    a = SQLiteStore(str(tmp_path / "a.db"))
    b = SQLiteStore(str(tmp_path / "b.db"))
    for s in (a, b):
        s.add_user("u", "p", scheme="PLAIN")
    assert a.deliver("u", b"x") != b.deliver("u", b"x")
    again = SQLiteStore(a.path)
    assert [m.uid for m in again.list_messages("u")] == [m.uid for m in a.list_messages("u")]


def test_stat_list_never_read_bodies(store):
    with sqlite3.connect(store.path) as c:
        uid = c.execute("SELECT id FROM users WHERE name='alice'").fetchone()[0]
        c.executemany("INSERT INTO messages (user_id, uid, size, delivered) VALUES (?, ?, ?, 0)",
                      [(uid, "bulk.%d" % i, 1000 + i, ) for i in range(10_000)])
    # No chunk rows exist at all: sizes can only come from the index.
    with Controller(store) as server:
        client = server.pop3()
        client.user("alice")
        client.pass_("pw")
        start = time.perf_counter()
        assert client.stat() == (10_000, sum(1000 + i for i in range(10_000)))
        assert len(client.list()[1]) == 10_000
        elapsed = time.perf_counter() - start
        client.quit()
    assert elapsed < 5  # generous bound: a body read per message would not matter here, absence does


def test_20mb_message_streams_in_chunks(store):
    body = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 20_000
    store.deliver("alice", body)
    with Controller(store) as server:
        with RawClient(server.address) as c:
            c.login("alice", "pw")
            c.send(b"RETR 1\r\n")
            assert c.line() == b"+OK %d octets\r\n" % len(body)
            assert c.multiline()[:-3] == body
    # The server side of RETR (adapter stream + wire conversion) in bounded memory.
    message = store.list_messages("alice")[0]
    stream = store.open_message("alice", message)
    tracemalloc.start()
    try:
        total = sum(len(chunk) for chunk in iter_message(stream))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        stream.close()
        store.close_mailbox("alice")
    assert total == len(body) + 3
    assert peak < 2 * 1024 * 1024, peak  # a few 256 KiB chunks, never the 20 MB message


def test_deletion_is_all_or_nothing(store):
    for i in range(3):
        store.deliver("alice", b"Subject: %d\r\n\r\nx\r\n" % i)
    with sqlite3.connect(store.path) as c:
        c.execute("CREATE TRIGGER fail_second BEFORE DELETE ON messages WHEN OLD.id = "
                  "(SELECT MAX(id) FROM messages) BEGIN SELECT RAISE(ABORT, 'injected'); END")
    with Controller(store) as server, RawClient(server.address) as c:
        c.login("alice", "pw")
        c.cmd("DELE 1")
        c.cmd("DELE 3")
        assert c.cmd("QUIT") == b"-ERR [SYS/TEMP] some deleted messages not removed\r\n"
    assert store.list_users() == [("alice", 3, 51)]


def test_twenty_threads_deliver_and_fetch_at_once(store):
    for i in range(10):
        store.add_user("t%d" % i, "pw", scheme="PLAIN")
    errors = []
    fetched = {}

    def deliverer(i):
        try:
            for j in range(20):
                store.deliver("t%d" % i, b"Subject: %d-%d\r\n\r\nx\r\n" % (i, j))
        except Exception as exc:
            errors.append(exc)

    def fetcher(i):
        try:
            got = 0
            for _ in range(5):
                client = poplib.POP3("127.0.0.1", server.port, timeout=30)
                client.user("t%d" % i)
                client.pass_("pw")
                n = client.stat()[0]
                for k in range(1, n + 1):
                    client.retr(k)
                    client.dele(k)
                client.quit()
                got += n
            fetched[i] = got
        except Exception as exc:
            errors.append(exc)

    with Controller(store) as server:
        threads = [threading.Thread(target=f, args=(i,)) for i in range(10) for f in (deliverer, fetcher)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert errors == []
    remaining = {name: count for name, count, _ in store.list_users()}
    # Every delivered message was either fetched-and-deleted or is still there: none lost.
    assert all(fetched[i] + remaining["t%d" % i] == 20 for i in range(10))


def test_delivery_from_another_process_while_serving(store):
    with Controller(store) as server:
        code = ("import sys; from pop3frame.adapters.sqlite import SQLiteStore;"
                "SQLiteStore(sys.argv[1]).deliver('alice', b'Subject: from a script\\r\\n\\r\\nlog line\\r\\n')")
        subprocess.run([sys.executable, "-c", code, store.path], check=True, timeout=60)
        client = server.pop3()
        client.user("alice")
        client.pass_("pw")
        assert retr_lines_to_bytes(client.retr(1)[1]) == b"Subject: from a script\r\n\r\nlog line\r\n"
        client.quit()


def test_demo_seeding_only_into_empty_store(tmp_path):
    s = SQLiteStore(str(tmp_path / "d.db"))
    assert s.ensure_demo() is True
    assert s.ensure_demo() is False
    assert s.list_users() == [("demo", 3, 683)]


#: 16 MB: far more than the server can have sent to a slow client (its
#: send buffer, at most 4 MB here) when the message is deleted.
HUGE = b"Subject: huge\r\n\r\n" + (b"x" * 998 + b"\r\n") * 16_000


def test_reader_raises_when_the_message_vanishes_part_way(store):
    """The adapter itself, not only the server's length check: a chunk gone before the
    last one read is an OSError, never an early end of the message."""
    store.deliver("alice", HUGE)
    stream = store.open_message("alice", store.list_messages("alice")[0])
    try:
        assert len(stream.read(CHUNK)) == CHUNK
        store.delete_user("alice")
        with pytest.raises(OSError, match="lost chunk"):
            while stream.read(CHUNK):  # ends: at most the message's 64 chunks
                pass
    finally:
        stream.close()
        store.close_mailbox("alice")


def _deleted_mid_retr(store, delete):
    store.deliver("alice", HUGE)
    with Controller(store) as server:
        status, body, complete = retr_interrupted(server.address, "alice", "pw", 1, delete)
        assert server.wait_for_connections(0)
    assert status == b"+OK %d octets\r\n" % len(HUGE)
    # Not a short message ending in ".": the connection closed without the terminator.
    assert not complete and len(body) < len(HUGE) and HUGE.startswith(body)


def test_message_deleted_by_user_del_mid_retr_is_not_ended_cleanly(store):
    """Issue 11 defect 3: ``pop3frame user del`` while a slow client reads a 16 MB
    message; the SQLite store raises at the missing chunk (as PostgreSQL's does),
    so RFC 1939 section 3's terminator never follows a truncated message."""
    _deleted_mid_retr(store, lambda: pop3frame("user", "--sqlite", store.path, "del", "alice").check_returncode())


def test_message_deleted_by_a_second_server_mid_retr_is_not_ended_cleanly(store):
    """The same, with the message deleted through a second server process on the same
    database file (DELE and QUIT there: RFC 1939 section 6)."""
    def delete_elsewhere():
        with Daemon("--sqlite", store.path, "--listen", "127.0.0.1:0") as other:
            client = poplib.POP3("127.0.0.1", other.port, timeout=30)
            client.user("alice")
            client.pass_("pw")
            client.dele(1)
            assert client.quit().startswith(b"+OK")
            other.stop()
    _deleted_mid_retr(store, delete_elsewhere)


def test_delivery_during_a_slow_retr_leaves_it_whole(store):
    """Mail delivered (from another process) while a slow client reads a 16 MB message
    neither cuts nor changes it: RETR ends with the whole message and the terminator."""
    store.deliver("alice", HUGE)
    code = ("import sys; from pop3frame.adapters.sqlite import SQLiteStore;"
            "SQLiteStore(sys.argv[1]).deliver('alice', b'Subject: meanwhile\\r\\n\\r\\nx\\r\\n')")
    with Controller(store) as server:
        status, body, complete = retr_interrupted(
            server.address, "alice", "pw", 1,
            lambda: subprocess.run([sys.executable, "-c", code, store.path], check=True, timeout=60))
    assert status == b"+OK %d octets\r\n" % len(HUGE)
    assert complete and body == HUGE + b".\r\n"
    assert [name for name, count, _ in store.list_users() if count == 2] == ["alice"]


def _uids_seen(server, user="alice", password="pw"):
    client = server.pop3()
    client.user(user)
    client.pass_(password)
    uids = [line.split()[1].decode() for line in client.uidl()[1]]
    client.quit()
    return uids


def test_uid_of_a_deleted_newest_message_is_never_reissued(store):
    """Issue 11 defect 1, RFC 1939 section 7 (UIDL: a unique-id is never reused for
    another message): deliver two, RETR and DELE the newest, QUIT, deliver a third: its
    unique-id is new (SQLite handed out the freed highest rowid again before)."""
    issued = [store.deliver("alice", b"Subject: %d\r\n\r\nx\r\n" % i) for i in (1, 2)]
    with Controller(store) as server:
        client = server.pop3()
        client.user("alice")
        client.pass_("pw")
        client.retr(2)
        client.dele(2)
        client.quit()
        third = store.deliver("alice", b"Subject: 3\r\n\r\nx\r\n")
        assert _uids_seen(server) == [issued[0], third]
    assert third not in issued


def test_a_store_restored_from_a_backup_never_reissues_a_uid(store, tmp_path):
    """RFC 1939 section 7 (UIDL): an operator restores the store from last night's
    backup (sqlite3's online backup, copied back while pop3frame is stopped).  Its ids
    and AUTOINCREMENT sequence go back with it, so the next delivery gets the id of
    mail delivered after the backup, which a client that keeps mail on the server
    already saw: its unique-id must still be new, or that client never fetches it."""
    issued = [store.deliver("alice", b"Subject: %d\r\n\r\nx\r\n" % i) for i in (1, 2)]
    backup = str(tmp_path / "backup.db")
    with sqlite3.connect(store.path) as live, sqlite3.connect(backup) as copy:
        live.backup(copy)
    live.close()
    copy.close()
    issued.append(store.deliver("alice", b"Subject: after the backup\r\n\r\nx\r\n"))
    with Controller(store) as server:
        assert _uids_seen(server) == issued  # the client has all three
    for suffix in ("-wal", "-shm"):
        if os.path.exists(store.path + suffix):
            os.unlink(store.path + suffix)
    shutil.copyfile(backup, store.path)
    restored = SQLiteStore(store.path)
    new = restored.deliver("alice", b"Subject: after the restore\r\n\r\nx\r\n")
    with Controller(restored) as server:
        assert _uids_seen(server) == issued[:2] + [new]
    assert new not in issued


#: The schema and delivery SQL of schema version 1 (pop3frame before issue 11), verbatim.
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    password TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    uid TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    delivered REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_user ON messages(user_id, id);
CREATE TABLE IF NOT EXISTS chunks (
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (message_id, seq)
) WITHOUT ROWID;
"""


def _v1_deliver(conn, message):
    """What version 1's deliver() ran for alice (user 1); returns the unique-id."""
    message_id = conn.execute("INSERT INTO messages (user_id, uid, size, delivered) VALUES (1, '', ?, ?)",
                              (len(message), time.time())).lastrowid
    uid = "%s.%d" % ("a1b2c3d4", message_id)
    conn.execute("UPDATE messages SET uid = ? WHERE id = ?", (uid, message_id))
    conn.executemany("INSERT INTO chunks (message_id, seq, data) VALUES (?, ?, ?)",
                     ((message_id, i, message[o:o + CHUNK]) for i, o in enumerate(range(0, len(message), CHUNK))))
    return uid


def _v1_store(path, messages, delete_newest):
    """A store as version 1 left it: ``messages`` delivered to alice (PLAIN "pw") with
    version 1's SQL, then the newest deleted if asked; returns the unique-ids issued."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.executescript(V1_SCHEMA)
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', 'a1b2c3d4')")
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO users (name, password) VALUES ('alice', '{PLAIN}pw')")
    issued = [_v1_deliver(conn, message) for message in messages]
    if delete_newest:
        conn.execute("DELETE FROM messages WHERE id = (SELECT MAX(id) FROM messages)")
    conn.close()
    return issued


#: 1, 2 and 3 chunks long.
V1_MAIL = [b"Subject: old %d\r\n\r\n" % i + b"line\r\n" * (CHUNK * i // 6 + 2) for i in range(3)]


def test_version_1_store_is_migrated_in_place_and_never_reissues_a_uid(tmp_path):
    """A store made by schema version 1 whose newest message (a1b2c3d4.3) was already
    deleted, so the file no longer shows that id 3 was issued: opened by this version it
    is migrated (schema version 2, AUTOINCREMENT), its messages keep their unique-ids and
    bytes, and no unique-id ever issued comes back, before or after another deletion."""
    path = str(tmp_path / "v1.db")
    issued = _v1_store(path, V1_MAIL, delete_newest=True)
    store = SQLiteStore(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert "AUTOINCREMENT" in conn.execute("SELECT sql FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
    with Controller(store) as server:
        client = server.pop3()
        client.user("alice")
        client.pass_("pw")
        assert [l.split()[1].decode() for l in client.uidl()[1]] == issued[:2]
        assert [retr_lines_to_bytes(client.retr(i)[1]) for i in (1, 2)] == V1_MAIL[:2]
        client.quit()
        new = store.deliver("alice", V1_MAIL[2])
        assert new not in issued
        issued.append(new)
        client = server.pop3()
        client.user("alice")
        client.pass_("pw")
        client.dele(3)
        client.quit()
        newer = store.deliver("alice", b"Subject: newer\r\n\r\nz\r\n")
        assert newer not in issued
        assert _uids_seen(server) == issued[:2] + [newer]
    # Reopening neither migrates again nor changes what deliver hands out.
    again = SQLiteStore(path)
    assert again.deliver("alice", b"x") not in issued + [newer]
    # The foreign keys survived the rebuild: deleting the user takes the chunks along.
    again.delete_user("alice")
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] == 0


def test_a_version_1_process_still_running_after_the_migration_reissues_no_unique_id(tmp_path):
    """An older pop3frame refuses a migrated store, but one already running (a script's
    long-lived store object) still delivers with version 1's SQL: unique-ids from ids
    alone.  Ids after the migration start far above those version 1 may have issued."""
    path = str(tmp_path / "v1.db")
    issued = _v1_store(path, V1_MAIL, delete_newest=True)
    SQLiteStore(path)
    conn = sqlite3.connect(path, isolation_level=None)
    assert _v1_deliver(conn, b"Subject: from an old process\r\n\r\nx\r\n") not in issued
    conn.close()


def test_two_processes_opening_a_version_1_store_migrate_it_once(tmp_path):
    """Migration runs under BEGIN IMMEDIATE: processes that open the old store at the
    same moment wait for one another, and exactly one of them migrates it."""
    path = str(tmp_path / "v1.db")
    issued = _v1_store(path, V1_MAIL, delete_newest=False)
    code = ("import sys; from pop3frame.adapters.sqlite import SQLiteStore;"
            "print('opening', flush=True); print(SQLiteStore(sys.argv[1]).deliver('alice', b'x'))")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # both must wait for it, then for each other
    procs = [subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    try:
        for proc in procs:
            assert proc.stdout.readline() == "opening\n"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    delivered = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        delivered.append(out.strip())
    prefixes = {uid.split(".")[0] for uid in delivered}
    assert len(prefixes) == 1 and prefixes != {"a1b2c3d4"}
    assert len(set(delivered) | set(issued)) == 6
    store = SQLiteStore(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'uid_prefix'").fetchall() == [(prefixes.pop(),)]
    assert [m.uid for m in store.list_messages("alice")] == issued + sorted(delivered, key=lambda u: int(u.split(".")[1]))
    store.close_mailbox("alice")


def test_dot_lines_are_kept_from_delivery_and_unknown_for_mail_older_than_schema_3(tmp_path):
    """Schema 3 keeps, with each message, whether a line starts with "." (RETR then
    need not look).  Messages of a version 1 (or 2) store get NULL, not known, and
    are stuffed as ever; new deliveries record it.  RFC 1939 section 3 either way."""
    path = str(tmp_path / "old.db")
    _v1_store(path, [b"Subject: old\r\n\r\n.dotted\r\n"], delete_newest=False)
    store = SQLiteStore(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert_new_mail_records_dot_lines(store)


def test_a_store_of_a_newer_version_or_another_programs_database_is_refused(tmp_path):
    path = str(tmp_path / "future.db")
    SQLiteStore(path)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = %d" % (SCHEMA_VERSION + 1))
    with pytest.raises(RuntimeError, match="schema version %d" % (SCHEMA_VERSION + 1)):
        SQLiteStore(path)
    other = str(tmp_path / "app.db")
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, text TEXT)")
    conn.close()
    with open(other, "rb") as f:
        before = f.read()
    with pytest.raises(RuntimeError, match="not a pop3frame store"):
        SQLiteStore(other)
    # Refused as found: its journal mode was switched to WAL first, for good (header bytes 18-19).
    with open(other, "rb") as f:
        assert f.read() == before
    with sqlite3.connect(other) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["messages"]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()


@pytest.mark.parametrize("mode", [0o1777, 0o775])
def test_a_store_in_a_directory_others_may_write_is_refused(tmp_path, mode):
    """SQLite opens ``<store>-wal`` and ``<store>-shm`` by name, following what is
    there: in a directory others may write (``/tmp``, a quick start run there),
    uid 1234 created them mode 0666 before the server's first start, and the
    server (as nobody) wrote the whole store, password hashes and mail, into that
    user's WAL, which the user could also rewrite."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    for name in ("store.db-wal", "store.db-shm"):
        (shared / name).write_bytes(b"")
        (shared / name).chmod(0o666)
    with pytest.raises(PermissionError, match="others may write in it"):
        SQLiteStore(str(shared / "store.db"))
    assert sorted(p.name for p in shared.iterdir()) == ["store.db-shm", "store.db-wal"]
    assert (shared / "store.db-wal").read_bytes() == b""
    out = pop3frame("serve", "--sqlite", str(shared / "store.db"), "--listen", "127.0.0.1:0")
    assert out.returncode == 2
    assert out.stderr.decode().splitlines()[-1] == (
        "pop3frame: sqlite: cannot open %s: %s: others may write in it (chmod go-w, or a directory of its own)"
        % (shared / "store.db", shared))
