"""Conformance harness for the SQLite store."""
from pop3frame.adapters.sqlite import SQLiteStore


class Harness:
    name = "sqlite"

    def __init__(self, tmp_path):
        self.store = SQLiteStore(str(tmp_path / "mail.db"))

    def make_adapter(self):
        return self.store

    def add_user(self, user, password):
        # PLAIN keeps the suite fast; hashing schemes have tests of their own.
        self.store.add_user(user, password, scheme="PLAIN")

    def deliver(self, user, data):
        self.store.deliver(user, data)

    def close(self):
        pass
