"""STAT+LIST on a 10,000-message mailbox, Maildir and SQLite.

Run by hand:  .venv/bin/python bench/bench_stores.py

For each store and for 1 KB and 50 KB messages, times the first login (the
Maildir builds its size cache then) and the second one, each followed by
STAT and LIST.  The second time must not grow with total message bytes:
no message is read for it.  Results go to bench/results/stores.csv.
"""
from __future__ import annotations

import csv
import os
import poplib
import sqlite3
import tempfile
import time

from pop3frame.adapters.maildir import MaildirAdapter
from pop3frame.adapters.passwdfile import PasswdFile, set_password
from pop3frame.adapters.sqlite import SQLiteStore
from pop3frame.testing import Controller

COUNT = 10_000


def body(size: int) -> bytes:
    line = b"x" * 76 + b"\n"
    return b"Subject: bench\n\n" + line * (size // len(line))


def make_maildir(tmp: str, size: int):
    passwd = os.path.join(tmp, "passwd")
    set_password(passwd, "u", "pw", scheme="PLAIN")
    new = os.path.join(tmp, "mail", "u", "new")
    os.makedirs(new)
    data = body(size)
    for i in range(COUNT):
        with open(os.path.join(new, "%d.M%d.bench" % (1600000000 + i, i)), "wb") as f:
            f.write(data)
    return MaildirAdapter(os.path.join(tmp, "mail"), PasswdFile(passwd))


def make_sqlite(tmp: str, size: int):
    store = SQLiteStore(os.path.join(tmp, "bench.db"))
    store.add_user("u", "pw", scheme="PLAIN")
    data = body(size)
    # Bulk insert through one connection: 10,000 deliver() calls would
    # measure the loading, not the serving.
    with sqlite3.connect(store.path) as c:
        uid = c.execute("SELECT id FROM users").fetchone()[0]
        for i in range(COUNT):
            mid = c.execute("INSERT INTO messages (user_id, uid, size, delivered) VALUES (?, ?, ?, 0)",
                            (uid, "b.%d" % i, len(data) + data.count(b"\n"))).lastrowid
            c.execute("INSERT INTO chunks VALUES (?, 0, ?)", (mid, data))
    return store


def session_time(server) -> float:
    start = time.perf_counter()
    client = poplib.POP3("127.0.0.1", server.port, timeout=120)
    client.user("u")
    client.pass_("pw")
    count, _ = client.stat()
    listing = client.list()[1]
    client.quit()
    assert count == COUNT and len(listing) == COUNT
    return time.perf_counter() - start


def main() -> None:
    rows = []
    for name, make in (("maildir", make_maildir), ("sqlite", make_sqlite)):
        for size in (1_000, 50_000):
            with tempfile.TemporaryDirectory() as tmp:
                adapter = make(tmp, size)
                with Controller(adapter) as server:
                    first = session_time(server)
                    second = session_time(server)
                total_mb = COUNT * size / 1e6
                rows.append((name, size, round(total_mb), round(first, 3), round(second, 3)))
                print("%-8s %6d B x %d (%4d MB): first login+STAT+LIST %.3f s, next %.3f s"
                      % (name, size, COUNT, total_mb, first, second))
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "stores.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("store", "message_bytes", "total_mb", "first_s", "next_s"), *rows])


if __name__ == "__main__":
    main()
