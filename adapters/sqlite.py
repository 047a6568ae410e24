"""SQLite store: pop3frame's embedded default (``pop3frame serve`` with no store flag).

One file holds users (with ``{SCHEME}`` password hashes) and their mail.
Scripts drop mail in while the server runs, from any process::

    from pop3frame.adapters.sqlite import SQLiteStore
    SQLiteStore("pop3frame.db").deliver("ops", b"Subject: backup done\\r\\n\\r\\nok\\r\\n")

Bodies are stored in 256 KiB chunks, so RETR streams a message without
loading it whole.  Concurrency: WAL mode (readers never block the writer),
a busy timeout for writers, and a connection per session (opened at login,
closed at logout; sqlite3 connections stay in their thread).  Management
calls (``deliver``, ``add_user`` ...) open a short-lived connection each, so
one store object may be used from any thread.
"""
from __future__ import annotations

import io
import logging
import os
import secrets
import sqlite3
import threading
import time
from typing import Dict, List, Sequence, Tuple

from pop3frame import AdapterBase, MessageInfo, TemporaryFailure
from pop3frame.ownership import refuse_shared
from pop3frame.passwords import SAMPLE_SIZE, PasswordCheck, hash_password
from pop3frame.protocol import has_dot_lines, wire_size

__all__ = ["SQLiteStore", "UnknownUser"]

logger = logging.getLogger("pop3frame.adapters.sqlite")

CHUNK = 256 * 1024
#: 1: the first release.  2: message ids AUTOINCREMENT, so the id of a
#: deleted message is never handed out again (and so its unique-id).
#: 3: messages.dot_lines, whether a line starts with "." (MessageInfo.dot_lines).
SCHEMA_VERSION = 3

_MESSAGES = """CREATE TABLE {name} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    uid TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    delivered REAL NOT NULL
)"""
_MESSAGES_INDEX = "CREATE INDEX messages_by_user ON messages(user_id, id)"

#: Statement by statement: executescript() would commit the transaction
#: that makes creating (or migrating) a store safe against a second process.
_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, password TEXT NOT NULL)",
    _MESSAGES.format(name="messages"),
    _MESSAGES_INDEX,
    """CREATE TABLE chunks (
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (message_id, seq)
) WITHOUT ROWID""",
)

#: Version 1 to 2: rebuild ``messages`` with AUTOINCREMENT, the way SQLite
#: documents for changes ALTER TABLE cannot make (foreign keys off, so
#: dropping the old table cascades to no chunk).  Ids and unique-ids stay.
#: New ids start a million above the highest left: version 1 may have issued
#: higher ones before deleting them, and a version 1 process still running
#: makes unique-ids from ids alone (this version also changes the prefix).
_MIGRATE_1_TO_2 = (
    _MESSAGES.format(name="messages_v2"),
    "INSERT INTO messages_v2 (id, user_id, uid, size, delivered)"
    " SELECT id, user_id, uid, size, delivered FROM messages",
    "DELETE FROM sqlite_sequence WHERE name = 'messages_v2'",
    "INSERT INTO sqlite_sequence (name, seq) SELECT 'messages_v2', COALESCE(MAX(id), 0) + 1000000 FROM messages_v2",
    "DROP TABLE messages",
    "ALTER TABLE messages_v2 RENAME TO messages",
    _MESSAGES_INDEX,
)


#: Later changes, in order: (version they start from, statements).  Never
#: edit one that was released; append.  A new store is made at version 2
#: and brought up by these too.
_MIGRATIONS = (
    # NULL: not known (delivered before); RETR then looks for dot lines.
    (2, ("ALTER TABLE messages ADD COLUMN dot_lines INTEGER",)),
)


class UnknownUser(LookupError):
    """Raised by the management API for a user that does not exist."""


def _check_name(name: str) -> str:
    if not name or any(ord(c) < 32 or c == "\x7f" for c in name) or len(name) > 255:
        raise ValueError("invalid user name %r" % (name,))
    return name


class _ChunkReader(io.RawIOBase):
    """A message body read one stored chunk at a time.

    Each chunk is its own read, so a slow client holds no transaction open
    (which would keep the WAL from being checkpointed).  A chunk missing
    before the count taken at open means the message was deleted meanwhile
    (``pop3frame user del``, another server process): that raises, and the
    server closes the connection instead of ending a truncated message.
    """

    def __init__(self, conn: sqlite3.Connection, message_id: int, chunks: int) -> None:
        self._conn = conn
        self._id = message_id
        self._chunks = chunks
        self._seq = 0
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if not self._buf:
            if self._seq >= self._chunks:
                return 0
            row = self._conn.execute(
                "SELECT data FROM chunks WHERE message_id = ? AND seq = ?", (self._id, self._seq)
            ).fetchone()
            if row is None:
                raise OSError("message %d lost chunk %d while being read" % (self._id, self._seq))
            self._seq += 1
            self._buf = memoryview(row[0])
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


class SQLiteStore(AdapterBase):
    """Users and mail in one SQLite file; an adapter and a management API.

    Thread-safety: any method may be called from any thread.  Session
    methods (``list_messages`` ... ``close_mailbox``) use a connection owned
    by that session, which the server's mailbox lock keeps to one thread.
    """

    def __init__(self, path: str = "pop3frame.db", *, busy_timeout: float = 10.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._sessions: Dict[str, sqlite3.Connection] = {}
        self._mutex = threading.Lock()
        # An unknown name costs what a wrong password costs: see PasswordCheck.
        self._passwords = PasswordCheck(sample=self._stored_passwords)
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        # SQLite opens <path>-wal and <path>-shm by name: nobody else may plant them.
        refuse_shared(parent)
        # Before _connect(), whose journal_mode = WAL is written into the
        # file: another program's database is refused as it was found.
        probe = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
        try:
            self._refuse_foreign(probe)
        finally:
            probe.close()
        with self._connect() as conn:
            # Versions only go up, so a current store needs no write lock
            # (a CLI command must not wait for a big delivery to finish).
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                # Off for this connection only: migrating drops a parent table.
                conn.execute("PRAGMA foreign_keys = OFF")
                # Taken before the version is read again: a second process
                # opening the store waits here, then finds it created or migrated.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    self._prepare_schema(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            self._uid_prefix = conn.execute("SELECT value FROM meta WHERE key = 'uid_prefix'").fetchone()[0]

    def _prepare_schema(self, conn: sqlite3.Connection) -> None:
        """Create or migrate the schema, in the caller's write transaction.

        Unique-ids are ``<prefix>.<message id>.<random>``.  The prefix
        starts as the store's random id, so a recreated database never hands
        out a unique-id a client remembers from the old one; the random part
        (32 bits, drawn at delivery) does the same for a store restored from
        a backup, whose ids and sequence go back to where the backup left
        them, so it hands out again ids it gave since.  Migrating from
        version 1 gives it a new random value: ids there were reused, and
        once the newest message was deleted nothing in the file tells how
        high they went, so "<store id>.<next id>" may have been issued
        already.  Messages keep the unique-ids they have.
        """
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError("%s has schema version %d; this pop3frame knows %d" % (
                self.path, version, SCHEMA_VERSION))
        if version == 0:
            self._refuse_foreign(conn)  # again: another process may have written meanwhile
            for statement in _SCHEMA:
                conn.execute(statement)
            store_id = secrets.token_hex(4)
            conn.executemany("INSERT INTO meta VALUES (?, ?)", (("store_id", store_id), ("uid_prefix", store_id)))
            version = 2
        elif version == 1:
            for statement in _MIGRATE_1_TO_2:
                conn.execute(statement)
            broken = conn.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError("%s: %d rows with dangling references; not migrated" % (self.path, len(broken)))
            store_id = conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0]
            prefix = store_id
            while prefix == store_id:
                prefix = secrets.token_hex(4)
            conn.execute("INSERT INTO meta VALUES ('uid_prefix', ?)", (prefix,))
            logger.info("%s: migrated from schema version 1 to 2", self.path)
            version = 2
        for start, statements in _MIGRATIONS:
            if version == start:
                for statement in statements:
                    conn.execute(statement)
                if conn.execute("SELECT 1 FROM messages LIMIT 1").fetchone():
                    logger.info("%s: migrated from schema version %d to %d", self.path, start, start + 1)
                version = start + 1
        conn.execute("PRAGMA user_version = %d" % SCHEMA_VERSION)

    def _refuse_foreign(self, conn: sqlite3.Connection) -> None:
        """RuntimeError for a database with tables but no schema version:
        another program's, or a store whose creation was cut short -- nothing
        there says what it holds."""
        if (conn.execute("PRAGMA user_version").fetchone()[0] == 0
                and conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone()):
            raise RuntimeError("%s has tables but no pop3frame schema version; not a pop3frame store" % self.path)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = NORMAL")
        return _Closing(conn)

    # -- management API -------------------------------------------------------

    def add_user(self, name: str, password: str, scheme: str = "") -> None:
        """Create a user; ValueError if the name is taken or invalid."""
        hashed = hash_password(password, scheme)
        with self._connect() as conn:
            try:
                conn.execute("INSERT INTO users (name, password) VALUES (?, ?)", (_check_name(name), hashed))
            except sqlite3.IntegrityError:
                raise ValueError("user %r already exists" % name) from None

    def set_password(self, name: str, password: str, scheme: str = "") -> None:
        hashed = hash_password(password, scheme)
        with self._connect() as conn:
            if conn.execute("UPDATE users SET password = ? WHERE name = ?", (hashed, name)).rowcount == 0:
                raise UnknownUser(name)

    def delete_user(self, name: str) -> None:
        """Remove a user and all of their mail."""
        with self._connect() as conn:
            if conn.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount == 0:
                raise UnknownUser(name)

    def list_users(self) -> List[Tuple[str, int, int]]:
        """(name, message count, octets) for every user, by name."""
        with self._connect() as conn:
            return conn.execute(
                "SELECT u.name, COUNT(m.id), COALESCE(SUM(m.size), 0) FROM users u"
                " LEFT JOIN messages m ON m.user_id = u.id GROUP BY u.id ORDER BY u.name"
            ).fetchall()

    def deliver(self, name: str, message: bytes) -> str:
        """Append a message to a user's mailbox; returns its unique-id."""
        message = bytes(message)
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT id FROM users WHERE name = ?", (name,)).fetchone()
                if row is None:
                    raise UnknownUser(name)
                cur = conn.execute(
                    "INSERT INTO messages (user_id, uid, size, delivered, dot_lines) VALUES (?, '', ?, ?, ?)",
                    (row[0], wire_size(message), time.time(), has_dot_lines(message)),
                )
                message_id = cur.lastrowid
                uid = "%s.%d.%s" % (self._uid_prefix, message_id, secrets.token_hex(4))
                conn.execute("UPDATE messages SET uid = ? WHERE id = ?", (uid, message_id))
                conn.executemany(
                    "INSERT INTO chunks (message_id, seq, data) VALUES (?, ?, ?)",
                    ((message_id, i, message[off:off + CHUNK]) for i, off in enumerate(range(0, len(message), CHUNK))),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return uid

    def ensure_demo(self) -> bool:
        """Seed user ``demo`` (password ``demo``) and sample mail into an empty store."""
        from .memory import DEMO_MESSAGES

        with self._connect() as conn:
            if conn.execute("SELECT 1 FROM users LIMIT 1").fetchone():
                return False
        self.add_user("demo", "demo")
        for message in DEMO_MESSAGES:
            self.deliver("demo", message)
        return True

    # -- adapter --------------------------------------------------------------

    def authenticate(self, username: str, password: str) -> bool:
        with self._connect() as conn:
            row = conn.execute("SELECT password FROM users WHERE name = ?", (username,)).fetchone()
        return self._passwords.check(row[0] if row else None, password)

    def _stored_passwords(self) -> List[str]:
        with self._connect() as conn:
            return [r[0] for r in conn.execute("SELECT password FROM users LIMIT ?", (SAMPLE_SIZE,))]

    def list_messages(self, username: str) -> Sequence[MessageInfo]:
        conn = self._connect()
        try:
            rows = conn.execute(
                "SELECT m.id, m.uid, m.size, m.dot_lines FROM messages m JOIN users u ON u.id = m.user_id"
                " WHERE u.name = ? ORDER BY m.id",
                (username,),
            ).fetchall()
        except BaseException:
            conn.close()
            raise
        with self._mutex:
            self._sessions[username] = conn
        # Stored bodies never change, so dot_lines holds until the row is gone.
        return [MessageInfo(uid, size, key=message_id, dot_lines=None if dots is None else bool(dots))
                for message_id, uid, size, dots in rows]

    def _session(self, username: str) -> sqlite3.Connection:
        with self._mutex:
            return self._sessions[username]

    def open_message(self, username: str, message: MessageInfo):
        conn = self._session(username)
        row = conn.execute(
            "SELECT (SELECT COUNT(*) FROM chunks WHERE message_id = m.id) FROM messages m WHERE m.id = ?",
            (message.key,),
        ).fetchone()
        if row is None:
            raise TemporaryFailure("message no longer exists")
        return io.BufferedReader(_ChunkReader(conn, message.key, row[0]), CHUNK)

    def delete_messages(self, username: str, messages: Sequence[MessageInfo]) -> None:
        conn = self._session(username)
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("DELETE FROM messages WHERE id = ?", [(m.key,) for m in messages])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close_mailbox(self, username: str) -> None:
        with self._mutex:
            conn = self._sessions.pop(username, None)
        if conn is not None:
            conn.close()


class _Closing:
    """A sqlite3 connection whose ``with`` block closes it (sqlite3's only commits)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def __enter__(self) -> sqlite3.Connection:
        return self._conn

    def __exit__(self, *exc) -> None:
        self._conn.close()
