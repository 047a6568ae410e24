"""Conformance harness for the PostgreSQL store, with PostgreSQL mailbox locks.

Each test gets a fresh database on the throwaway cluster of :mod:`tests.pg`
(started once per process).  ``make_adapter`` returns a
:class:`~pop3frame.session.SessionContext` rather than the bare store, so
the shared suite runs with :class:`PostgresLockManager` instead of the
in-process default: the [IN-USE] test then exercises advisory locks.
Without PostgreSQL the harness skips, or fails under ``CI=true``.
"""
from __future__ import annotations

import os

from pop3frame.config import ServerConfig
from pop3frame.session import SessionContext
from tests import pg


class Harness:
    name = "postgres"
    #: Stored messages are never changed, by the store or any tool: new
    #: content is a new message with a new id.
    replace = None

    def __init__(self, tmp_path):
        self.dsn = None
        self.store = self.locks = None
        try:
            self.dsn = pg.fresh_database()
        except pg.Unavailable as exc:
            if os.environ.get("CI") == "true":
                raise RuntimeError("CI=true but PostgreSQL is unavailable: %s" % exc) from None
            self.skip_reason = str(exc)
            return
        from pop3frame.adapters.postgres import PostgresLockManager, PostgresStore

        self.store = PostgresStore(self.dsn, pool_size=8)
        self.locks = PostgresLockManager(self.dsn)

    def make_adapter(self):
        return SessionContext(self.store, ServerConfig(hostname="localhost"), locks=self.locks)

    def add_user(self, user, password):
        # PLAIN keeps the suite fast; hashing schemes have tests of their own.
        self.store.add_user(user, password, scheme="PLAIN")

    def deliver(self, user, data):
        return self.store.deliver(user, data)

    def remove(self, user, uid):
        """Delete on a connection of its own, as an administrator or a second instance does."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            assert conn.execute("DELETE FROM pop3frame_messages WHERE uid = %s", (uid,)).rowcount == 1

    def close(self):
        if self.locks is not None:
            self.locks.close()
        if self.store is not None:
            self.store.close()
        if self.dsn is not None:
            pg.drop_database(self.dsn)
