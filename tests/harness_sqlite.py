"""Conformance harness for the SQLite store."""
import sqlite3

from pop3frame.adapters.sqlite import SQLiteStore


class Harness:
    name = "sqlite"
    #: Stored messages are never changed, by the store or any tool: new
    #: content is a new message with a new id.
    replace = None

    def __init__(self, tmp_path):
        self.store = SQLiteStore(str(tmp_path / "mail.db"))

    def make_adapter(self):
        return self.store

    def add_user(self, user, password):
        # PLAIN keeps the suite fast; hashing schemes have tests of their own.
        self.store.add_user(user, password, scheme="PLAIN")

    def deliver(self, user, data):
        return self.store.deliver(user, data)

    def remove(self, user, uid):
        """Delete from another connection, as ``pop3frame user del`` or a second server does."""
        conn = sqlite3.connect(self.store.path, timeout=30)
        with conn:
            conn.execute("PRAGMA foreign_keys = ON")
            assert conn.execute("DELETE FROM messages WHERE uid = ?", (uid,)).rowcount == 1
        conn.close()

    def close(self):
        pass
