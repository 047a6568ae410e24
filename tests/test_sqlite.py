"""SQLite store: the embedded default."""
from __future__ import annotations

import poplib
import sqlite3
import subprocess
import sys
import threading
import time
import tracemalloc

import pytest

from pop3frame.adapters.sqlite import SQLiteStore, UnknownUser
from pop3frame.passwords import split_scheme
from pop3frame.protocol import iter_message
from pop3frame.testing import Controller
from tests.helpers import RawClient, retr_lines_to_bytes


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
