"""Your script's log lines, read in Thunderbird: a SQLite table served over POP3.

Any program appends rows to a ``logs`` table; every row shows up as one
mail (subject "LEVEL: line", dated when it was logged).  Deleting it in the
mail client deletes the row.

Run::

    .venv/bin/python examples/sql_logs.py [PORT] [DB]      # default 1100 and ./logs.db; 0 = any free port

then point a mail client (or ``curl pop3://ops:ops@127.0.0.1:1100/1``) at
127.0.0.1, user ``ops``, password ``ops``.  Log from anywhere, any time::

    sqlite3 logs.db "INSERT INTO logs (level, line) VALUES ('ERROR', 'disk full')"
"""
import sqlite3
import sys

from pop3frame import POP3Server
from pop3frame.adapters.sqlquery import SQLQueryAdapter


def create_log_table(path):
    """The table a script writes to; logged_at is filled in by SQLite (UTC).

    AUTOINCREMENT: without it SQLite gives a new row the id of a deleted
    newest one, and the id is the message's unique-id, which a mail client
    that keeps mail on the server takes for one it already has.
    """
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS logs ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " logged_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,"
            " level TEXT NOT NULL,"
            " line TEXT NOT NULL)"
        )
    conn.close()


def log(path, level, line):
    """What your script does: one INSERT per log line."""
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO logs (level, line) VALUES (?, ?)", (level, line))
    conn.close()


def connect(path):
    conn = sqlite3.connect(path, timeout=30)
    # A script may log bytes that are not UTF-8; show them as U+FFFD
    # instead of failing the whole query (and so every login).
    conn.text_factory = lambda data: data.decode("utf-8", "replace")
    return conn


def build_adapter(path):
    return SQLQueryAdapter(
        # A new connection per call: sqlite3 connections stay in their thread.
        lambda: connect(path),
        # Column names pick the roles: id, date, subject, body.
        "SELECT id, logged_at AS date, level || ': ' || line AS subject, line AS body"
        " FROM logs ORDER BY id",
        users={"ops": "ops"},  # or "{SCRYPT}..." from pop3frame.passwords.hash_password
        delete="DELETE FROM logs WHERE id = ?",  # omit for a read-only mailbox
        name="logs",  # goes into the Message-IDs
    )


def main(argv):
    port = int(argv[1]) if len(argv) > 1 else 1100
    path = argv[2] if len(argv) > 2 else "logs.db"
    create_log_table(path)
    with sqlite3.connect(path) as conn:
        empty = conn.execute("SELECT COUNT(*) FROM logs").fetchone()[0] == 0
    conn.close()
    if empty:  # a few rows to look at on the first run
        log(path, "INFO", "nightly backup finished in 312 s")
        log(path, "WARNING", "disk /var is 91% full")
        log(path, "ERROR", "certificate for mail.example.org expires in 3 days")
    server = POP3Server(("127.0.0.1", port), build_adapter(path))
    print("serving %s on 127.0.0.1:%d (user ops, password ops)" % (path, server.port), flush=True)
    server.serve_forever()  # logs where it listens; Ctrl-C stops it


if __name__ == "__main__":
    main(sys.argv)
