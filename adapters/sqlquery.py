"""Rows of any SQL query, served as mail: "my script logs into a table, I read it in Thunderbird".

Give it a DB-API 2.0 connection factory and a SELECT; each row becomes one
RFC 5322 message::

    import sqlite3
    from pop3frame.adapters.sqlquery import SQLQueryAdapter

    adapter = SQLQueryAdapter(
        lambda: sqlite3.connect("logs.db"),
        "SELECT id, ts AS date, level || ': ' || line AS subject, line AS body FROM logs ORDER BY id",
        users={"ops": "{SCRYPT}$scrypt$..."},
        delete="DELETE FROM logs WHERE id = ?",
    )

Columns are found by name (``id``, ``date``/``timestamp``/``ts``,
``subject``, ``body``, ``sender``/``from``, ``recipient``/``to``), or by an
explicit ``columns={"id": "log_id", ...}`` mapping.  A row needs an id; a
missing subject is taken from the body's first line.  A ``raw`` (or
``rfc822``) column holding a complete message is served unchanged (an
archive table of real mail).  Any other column
whose value is bytes (a BLOB), and every column named in ``attachments``,
becomes an attachment.  Messages get Date from the timestamp (naive values
are UTC unless ``timezone`` says otherwise), a Message-ID derived from the
unique-id and the adapter's ``name``, MIME-Version, From/To from the row or
the configuration, UTF-8 text quoted-printable and headers RFC 2047 encoded.

Unique-ids, and the requirement on the table: a client that leaves mail on
the server (POP3 "keep", Thunderbird's default) never downloads a message
whose unique-id it has seen, so a unique-id must never name a second row.
It is the row id (:func:`~._build.stable_uid`) followed, when the query has
a timestamp column, by a digest of the timestamp: ``42.3fa9c1d2e0``.  So a
row keeps its unique-id when its text changes (it is not fetched twice),
and the requirement is: **row ids are never reused**, or, where the table
may hand a deleted row's id to a new row, that new row's timestamp differs.
SQLite's ``INTEGER PRIMARY KEY`` without ``AUTOINCREMENT`` reuses the id of
a deleted newest row (and so does MySQL's InnoDB before 8.0 after a
restart); ``AUTOINCREMENT``, a PostgreSQL sequence or ``IDENTITY`` never
do.  A table that reuses ids and has no timestamp column (or timestamps
too coarse to tell such rows apart) hides new rows from those clients.

Parameters and drivers: placeholders are written in the driver's own
paramstyle (``?`` for sqlite3, ``%s`` for psycopg and PyMySQL, ``:name``
...).  The SELECT may contain one placeholder for the POP3 user name
(positional), or ``:user`` / ``%(user)s`` (named): the same query then
gives each user their own rows.  The DELETE (or UPDATE) statement takes the
row id: one positional placeholder, or named ``id`` (and optionally
``user``, and ``date``, the timestamp as the query returned it:
``... WHERE id = :id AND ts = :date`` never deletes a row that took over
the id of one deleted since the listing).  It is run with ``executemany`` for every deleted row **in one
transaction**, committed once: all rows go or none do.  The factory must
therefore return connections that are *not* in autocommit mode (the DB-API
default).  Without a delete statement the adapter is read-only (DELE
answers ``-ERR [SYS/PERM]``).

Sizes and the cache (the trade-off): POP3 needs exact sizes for STAT/LIST
before any RETR, and a message's size is known only once it is built.  So
``list_messages`` runs the query once and builds every message of the
session's snapshot, keeping the bytes until the session ends; RETR serves
them from memory.  This costs memory proportional to the mailbox for the
length of a session, and is right for what this adapter is for: small,
text-shaped rows (log lines, reports, alerts).  For large blobs or huge
tables use a real store (:mod:`~pop3frame.adapters.sqlite`) or a query
with a ``LIMIT``.  It also makes the snapshot exact: RETR returns what
LIST counted, even if the row changed meanwhile.

Thread-safety: one adapter serves every connection.  Each call opens its
own connection from the factory and closes it before returning (sqlite3
connections belong to their thread), so nothing database-side is shared.
The per-session cache is keyed by user and only touched under the server's
mailbox lock; a mutex guards the dict itself.

A row that cannot be turned into a message (a ``build`` override that
raises on it, say) does not take the mailbox down with it: it is logged
with its row id, and the session gets a short placeholder message in its
place ("row 42 could not be shown") so that the user knows something is
missing.  The placeholder has a unique-id and Message-ID of its own, so
once the row can be rendered it arrives as a new message, and deleting
the placeholder never deletes the row (which nobody has read): it only
hides that placeholder until the server restarts.  Rows of text that is
not UTF-8 make sqlite3 fail the whole query unless the connection decodes
leniently: ``conn.text_factory = lambda b: b.decode("utf-8", "replace")``
(examples/sql_logs.py does this).

Errors: a failing factory, query or delete is logged (with traceback, never
with row contents or passwords) and the client sees ``-ERR [SYS/TEMP]``;
a failed delete is rolled back, so every row stays.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import re
import sys
import threading
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

from pop3frame import AdapterBase, MessageInfo, PermanentFailure, POP3Error, TemporaryFailure
from pop3frame.clientlog import quoted
from pop3frame.failures import log_failure
from pop3frame.passwords import table_check
from pop3frame.protocol import wire_size

from ._build import build_message, message_id, one_line, stable_uid, to_datetime

__all__ = ["SQLQueryAdapter", "DEFAULT_COLUMNS"]

logger = logging.getLogger("pop3frame.adapters.sqlquery")

#: Column names tried, in order, for each role when no mapping is given.
DEFAULT_COLUMNS: Dict[str, Tuple[str, ...]] = {
    "id": ("id", "uid", "rowid", "message_id"),
    "date": ("date", "timestamp", "ts", "time", "created", "created_at", "logged_at"),
    "subject": ("subject", "title", "summary"),
    "body": ("body", "message", "text", "content", "line", "msg"),
    "sender": ("sender", "from", "from_addr", "author"),
    "recipient": ("recipient", "to", "to_addr"),
    # A column that already holds a whole RFC 5322 message: served as is.
    "raw": ("raw", "rfc822", "raw_message", "mime"),
}

Authenticator = Callable[[str, str], bool]


def _driver_paramstyle(conn: Any) -> str:
    """The DB-API ``paramstyle`` of the module that made ``conn``."""
    module = type(conn).__module__
    while module:
        mod = sys.modules.get(module)
        style = getattr(mod, "paramstyle", None)
        if isinstance(style, str):
            return style
        module = module.rpartition(".")[0]
    return "qmark"


# String literals and quoted identifiers are blanked out before looking for
# placeholders, so '?' or '%s' inside quotes is not mistaken for one.
_QUOTED = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"")


def _placeholders(sql: str, paramstyle: str) -> Tuple[int, List[str]]:
    """(number of positional placeholders, names of named ones) in ``sql``."""
    text = _QUOTED.sub("''", sql)
    named: List[str] = []
    positional = 0
    if paramstyle in ("qmark", "named", "numeric"):
        # sqlite3 accepts both ? and :name whatever it advertises.
        positional = text.count("?")
        named = re.findall(r"(?<![:\w]):([A-Za-z_]\w*)", text)
        numeric = re.findall(r"(?<![:\w]):(\d+)", text)
        if numeric:
            positional = max(positional, max(int(n) for n in numeric))
    else:  # format, pyformat
        text = text.replace("%%", "")
        positional = len(re.findall(r"%s", text))
        named = re.findall(r"%\((\w+)\)s", text)
    return positional, named


def _params(sql: str, paramstyle: str, values: Mapping[str, Any], positional_role: str) -> Any:
    """Parameters for ``sql`` in the driver's style: a dict for named
    placeholders, else a tuple repeating the ``positional_role`` value."""
    positional, named = _placeholders(sql, paramstyle)
    if named:
        unknown = set(named) - set(values)
        if unknown:
            raise ValueError("unknown placeholder(s) %s in %r; use %s" % (sorted(unknown), sql, sorted(values)))
        return {k: values[k] for k in set(named)}
    return (values[positional_role],) * positional


class SQLQueryAdapter(AdapterBase):
    """Serve the rows of a SELECT as messages; optionally delete rows on DELE.

    ``connect``: a zero-argument callable returning a new DB-API 2.0
    connection (``lambda: sqlite3.connect(path)``,
    ``lambda: psycopg.connect(dsn)``).  ``query``: the SELECT; see the
    module docstring for columns and the optional user placeholder.
    ``users``: ``{name: password}`` where each password is a
    ``{SCHEME}hash`` (:func:`pop3frame.passwords.hash_password`), a bare
    crypt hash or plain text (read by
    :func:`pop3frame.passwords.stored_password`: ``*``, ``!...`` and empty
    values never match), or a callable ``(user, password) -> bool``.  ``delete``: the
    DELETE/UPDATE statement (id placeholder), or None for read-only.
    ``columns``: ``{role: column name}`` overriding the name lookup.
    ``attachments``: column names always attached.  ``sender`` /
    ``recipient``: used when the row has no such column; ``recipient`` may
    contain ``{user}``.  ``name``: goes into every Message-ID (two adapters
    over different tables should differ).  ``domain``: Message-ID domain.
    ``timezone``: for naive timestamps.  ``paramstyle``: override the
    driver's.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        query: str,
        *,
        users: Union[Mapping[str, str], Authenticator],
        delete: Optional[str] = None,
        columns: Optional[Mapping[str, str]] = None,
        attachments: Sequence[str] = (),
        sender: str = "pop3frame <pop3frame@localhost>",
        recipient: str = "{user}",
        name: str = "sql",
        domain: str = "pop3frame.invalid",
        timezone: datetime.tzinfo = datetime.timezone.utc,
        paramstyle: Optional[str] = None,
    ) -> None:
        self._connect = connect
        self.query = query
        self.delete_statement = delete
        self.read_only = delete is None
        if callable(users):
            self._check: Authenticator = users
        else:
            self._check = table_check(users)
        unknown = set(columns or {}) - set(DEFAULT_COLUMNS)
        if unknown:
            raise ValueError("unknown column role(s) %s; roles are %s" % (sorted(unknown), sorted(DEFAULT_COLUMNS)))
        self.columns = dict(columns or {})
        self.attachments = tuple(attachments)
        self.sender = sender
        self.recipient = recipient
        self.name = name
        self.domain = domain
        self.timezone = timezone
        self.paramstyle = paramstyle
        self._mutex = threading.Lock()
        #: user -> {unique-id: message bytes} for the session in progress.
        self._sessions: Dict[str, Dict[str, bytes]] = {}
        #: user -> unique-ids of this session's placeholders for unrenderable rows.
        self._placeholders: Dict[str, Set[str]] = {}
        #: user -> placeholder unique-ids the user deleted: not listed again.
        self._dismissed: Dict[str, Set[str]] = {}

    # -- authentication ---------------------------------------------------------

    def authenticate(self, username: str, password: str) -> bool:
        return bool(self._check(username, password))

    # -- database access ----------------------------------------------------------

    def _open(self) -> Any:
        try:
            return self._connect()
        except Exception as exc:
            log_failure(logger, logging.ERROR, "%s: cannot connect to the database", self.name, exc=exc)
            raise TemporaryFailure("database unavailable") from None

    @staticmethod
    def _close(conn: Any) -> None:
        try:
            conn.close()
        except Exception:
            logger.warning("closing a database connection failed", exc_info=True)

    def _style(self, conn: Any) -> str:
        return self.paramstyle or _driver_paramstyle(conn)

    def _fetch(self, username: str) -> Tuple[List[str], List[Sequence[Any]]]:
        conn = self._open()
        try:
            cur = conn.cursor()
            params = _params(self.query, self._style(conn), {"user": username}, "user")
            cur.execute(self.query, params) if params else cur.execute(self.query)
            names = [d[0] for d in cur.description or ()]
            rows = cur.fetchall()
            cur.close()
            try:
                conn.rollback()  # end the read transaction some drivers opened
            except Exception:
                pass
            return names, rows
        except ValueError as exc:
            logger.error("%s: misconfigured query: %s", self.name, exc)
            raise PermanentFailure("misconfigured query") from None
        except Exception as exc:  # the driver's error: the database's state or the operator's SQL, not a bug here
            log_failure(logger, logging.ERROR, "%s: query failed for %s", self.name, quoted(username), exc=exc)
            raise TemporaryFailure("database query failed") from None
        finally:
            self._close(conn)

    # -- rows to messages ---------------------------------------------------------

    def _roles(self, names: Sequence[str]) -> Dict[str, int]:
        """Column index for each role present in the result."""
        lower = {n.lower(): i for i, n in enumerate(names)}
        roles: Dict[str, int] = {}
        for role, candidates in DEFAULT_COLUMNS.items():
            if role in self.columns:
                wanted = self.columns[role].lower()
                if wanted not in lower:
                    raise PermanentFailure("query has no column %r" % self.columns[role])
                roles[role] = lower[wanted]
                continue
            for candidate in candidates:
                if candidate in lower:
                    roles[role] = lower[candidate]
                    break
        if "id" not in roles:
            logger.error("%s: the query returns no id column (columns: %s)", self.name, list(names))
            raise PermanentFailure("misconfigured query: no id column")
        return roles

    def build(self, username: str, names: Sequence[str], row: Sequence[Any]) -> bytes:
        """The message for one row; override to shape messages differently."""
        roles = self._roles(names)
        get = lambda role: row[roles[role]] if role in roles else None  # noqa: E731
        raw = get("raw")
        if raw is not None:
            return bytes(raw) if isinstance(raw, (bytes, bytearray, memoryview)) else str(raw).encode("utf-8")
        body = get("body")
        if isinstance(body, (bytes, bytearray, memoryview)):
            body = bytes(body).decode("utf-8", "replace")
        body = "" if body is None else str(body)
        subject = get("subject")
        if subject is None or subject == "":
            first = body.strip().splitlines()[0] if body.strip() else ""
            subject = first or "row %s" % get("id")
        used = set(roles.values())
        attachments = []
        for i, (column, value) in enumerate(zip(names, row)):
            if i in used or value is None:
                continue
            if column in self.attachments or isinstance(value, (bytes, bytearray, memoryview)):
                data = value if isinstance(value, (bytes, bytearray, memoryview)) else str(value).encode("utf-8")
                attachments.append((column if "." in column else column + ".bin", bytes(data), None))
        return build_message(
            subject=one_line(subject),
            body=body,
            date=to_datetime(get("date"), self.timezone),
            # From the unique-id, not the row id alone: a row that took over
            # a deleted row's id must not look like that one to a client
            # that de-duplicates by Message-ID.
            msgid=message_id(self._unique_id(roles, row), self.name, self.domain),
            sender=get("sender") or self.sender,
            recipient=get("recipient") or self._default_recipient(username),
            attachments=attachments,
        )

    @staticmethod
    def _unique_id(roles: Mapping[str, int], row: Sequence[Any]) -> str:
        """The row's unique-id: its id, and a digest of its timestamp if any (module docstring)."""
        row_id = row[roles["id"]]
        if "date" not in roles:
            return stable_uid(row_id)
        stamp = hashlib.sha256(str(row[roles["date"]]).encode("utf-8", "surrogatepass")).hexdigest()[:10]
        return stable_uid("%s.%s" % (row_id, stamp))

    def _default_recipient(self, username: str) -> str:
        return self.recipient.replace("{user}", _address(username))

    def _placeholder(self, username: str, uid: str, row_id: Any, date: Any) -> bytes:
        """The short message served instead of a row that cannot be rendered."""
        return build_message(
            subject="Row %s could not be shown" % one_line(row_id, 60),
            body=(
                "The row with id %s could not be turned into a message; the server log says why.\n"
                "The row itself is unchanged and arrives as a message of its own once it can be read.\n"
                "Deleting this notice does not delete the row.\n" % one_line(row_id, 200)
            ),
            date=to_datetime(date, self.timezone),
            msgid=message_id(uid, self.name + ".unrenderable", self.domain),
            sender=self.sender,
            recipient=self._default_recipient(username),
        )

    # -- the adapter contract -------------------------------------------------------

    def list_messages(self, username: str) -> Sequence[MessageInfo]:
        names, rows = self._fetch(username)
        messages: List[MessageInfo] = []
        cache: Dict[str, bytes] = {}
        placeholders: Set[str] = set()
        seen = set()
        roles = self._roles(names) if rows else {}
        with self._mutex:
            dismissed = set(self._dismissed.get(username, ()))
        for row in rows:
            row_id = row[roles["id"]]
            date = row[roles["date"]] if "date" in roles else None
            uid = self._unique_id(roles, row)
            if uid in seen:
                # Two rows with one id would share a unique-id: keep the first.
                logger.warning("%s: duplicate row id %r skipped", self.name, row_id)
                continue
            seen.add(uid)
            try:
                data = self.build(username, names, row)
            except POP3Error:
                raise
            except Exception as exc:
                # One bad row must not make every other row unreadable.
                # Not the exception's text nor its traceback: both may quote
                # the row, and row contents are message bodies.
                logger.error(
                    "%s: row %r could not be turned into a message (%s); serving a placeholder",
                    self.name, row_id, type(exc).__name__,
                )
                # A unique-id of its own: the row, once readable, is new mail.
                uid = stable_uid("unrenderable %s" % uid)
                placeholders.add(uid)
                if uid in dismissed:
                    continue
                data = self._placeholder(username, uid, row_id, date)
            cache[uid] = data
            messages.append(MessageInfo(uid, wire_size(data), key=(row_id, date)))
        with self._mutex:
            self._sessions[username] = cache
            self._placeholders[username] = placeholders
            # Forget dismissals of rows that are gone or readable again.
            if dismissed:
                self._dismissed[username] = dismissed & placeholders
        return messages

    def open_message(self, username: str, message: MessageInfo) -> bytes:
        with self._mutex:
            data = self._sessions.get(username, {}).get(message.uid)
        if data is None:
            raise TemporaryFailure("message no longer available")
        return data

    def delete_messages(self, username: str, messages: Sequence[MessageInfo]) -> None:
        if self.delete_statement is None:
            raise PermanentFailure("this mailbox is read-only")
        with self._mutex:
            placeholders = self._placeholders.get(username, set())
        rows = [m for m in messages if m.uid not in placeholders]
        if rows:
            self._delete_rows(username, rows)
        notices = {m.uid for m in messages} & placeholders
        if notices:
            with self._mutex:
                self._dismissed.setdefault(username, set()).update(notices)

    def _delete_rows(self, username: str, messages: Sequence[MessageInfo]) -> None:
        conn = self._open()
        try:
            style = self._style(conn)
            params = [_params(self.delete_statement, style, {"id": m.key[0], "date": m.key[1], "user": username}, "id")
                      for m in messages]
            cur = conn.cursor()
            # One transaction for all rows: executemany then a single commit.
            cur.executemany(self.delete_statement, params)
            conn.commit()
            logger.info("%s: deleted %d row(s) for %s", self.name, len(messages), quoted(username))
        except Exception as exc:
            log_failure(logger, logging.ERROR, "%s: delete failed for %s; rolled back", self.name, quoted(username),
                        exc=exc)
            try:
                conn.rollback()
            except Exception:
                logger.warning("rollback failed", exc_info=True)
            raise TemporaryFailure("could not delete messages; nothing was deleted") from None
        finally:
            self._close(conn)

    def close_mailbox(self, username: str) -> None:
        with self._mutex:
            self._sessions.pop(username, None)
            self._placeholders.pop(username, None)


def _address(username: str) -> str:
    return username if "@" in username else username + "@localhost"
