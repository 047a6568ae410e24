"""Conformance harness for the SQL query adapter (sqlite3, with a delete statement).

The table holds whole messages in a ``raw`` column, so the suite's
byte-exact round trips apply; building messages from ordinary columns is
tested in tests/test_sqlquery.py.  Users live in a table too and are
checked by a callable, the way a real deployment would do it.

The table reuses ids on purpose (``INTEGER PRIMARY KEY`` without
``AUTOINCREMENT``: a deleted newest row's id comes back) and has a
timestamp column, so the suite's unique-id tests exercise what the adapter
documents for such tables: the timestamp keeps unique-ids apart, and the
DELETE names it too.
"""
import sqlite3
import threading
import time

from pop3frame.adapters.sqlquery import SQLQueryAdapter
from pop3frame.passwords import verify_password


class Harness:
    name = "sqlquery"

    def __init__(self, tmp_path):
        self.path = str(tmp_path / "rows.db")
        with self._conn() as conn:
            conn.executescript(
                "CREATE TABLE users (name TEXT PRIMARY KEY, password TEXT NOT NULL);"
                "CREATE TABLE mail (id INTEGER PRIMARY KEY, owner TEXT NOT NULL, delivered REAL NOT NULL,"
                " raw BLOB NOT NULL);"
            )
        conn.close()
        self._clock = threading.Lock()
        self._last = 0.0

    def _conn(self):
        return sqlite3.connect(self.path, timeout=30)

    def _check(self, user, password):
        conn = self._conn()
        try:
            row = conn.execute("SELECT password FROM users WHERE name = ?", (user,)).fetchone()
        finally:
            conn.close()
        return row is not None and verify_password(row[0], password)

    def make_adapter(self):
        return SQLQueryAdapter(
            self._conn,
            "SELECT id, delivered AS date, raw FROM mail WHERE owner = ? ORDER BY id",
            users=self._check,
            delete="DELETE FROM mail WHERE id = :id AND delivered = :date",
        )

    def add_user(self, user, password):
        conn = self._conn()
        with conn:
            conn.execute("INSERT INTO users VALUES (?, ?)", (user, "{PLAIN}" + password))
        conn.close()

    def deliver(self, user, data):
        # Strictly increasing: the timestamp is what tells apart rows that share a reused id.
        with self._clock:
            self._last = max(time.time(), self._last + 1e-6)
            delivered = self._last
        conn = self._conn()
        with conn:
            row_id = conn.execute("INSERT INTO mail (owner, delivered, raw) VALUES (?, ?, ?)",
                                  (user, delivered, data)).lastrowid
        conn.close()
        return row_id

    def _change(self, sql, *params):
        conn = self._conn()
        with conn:
            assert conn.execute(sql, params).rowcount == 1
        conn.close()

    def remove(self, user, row_id):
        self._change("DELETE FROM mail WHERE id = ?", row_id)

    def replace(self, user, row_id, data):
        self._change("UPDATE mail SET raw = ? WHERE id = ?", data, row_id)

    def close(self):
        pass
