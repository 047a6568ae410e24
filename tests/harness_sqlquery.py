"""Conformance harness for the SQL query adapter (sqlite3, with a delete statement).

The table holds whole messages in a ``raw`` column, so the suite's
byte-exact round trips apply; building messages from ordinary columns is
tested in tests/test_sqlquery.py.  Users live in a table too and are
checked by a callable, the way a real deployment would do it.
"""
import sqlite3

from pop3frame.adapters.sqlquery import SQLQueryAdapter
from pop3frame.passwords import verify_password


class Harness:
    name = "sqlquery"

    def __init__(self, tmp_path):
        self.path = str(tmp_path / "rows.db")
        with self._conn() as conn:
            conn.executescript(
                "CREATE TABLE users (name TEXT PRIMARY KEY, password TEXT NOT NULL);"
                "CREATE TABLE mail (id INTEGER PRIMARY KEY, owner TEXT NOT NULL, raw BLOB NOT NULL);"
            )
        conn.close()

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
            "SELECT id, raw FROM mail WHERE owner = ? ORDER BY id",
            users=self._check,
            delete="DELETE FROM mail WHERE id = ?",
        )

    def add_user(self, user, password):
        conn = self._conn()
        with conn:
            conn.execute("INSERT INTO users VALUES (?, ?)", (user, "{PLAIN}" + password))
        conn.close()

    def deliver(self, user, data):
        conn = self._conn()
        with conn:
            conn.execute("INSERT INTO mail (owner, raw) VALUES (?, ?)", (user, data))
        conn.close()

    def close(self):
        pass
