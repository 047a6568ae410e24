"""A POP3 front for a folder of an IMAP account (for devices that only speak POP3).

::

    from pop3frame.adapters.imap import IMAPUpstreamAdapter
    adapter = IMAPUpstreamAdapter("imap.example.org", security="ssl", folder="INBOX")

Login: the POP3 user name and password are passed through to the IMAP
server (``LOGIN`` with both as quoted strings, so a space or a quote in a
name is part of it, not another argument or another name;
``AUTHENTICATE PLAIN`` when either is not ASCII, which ``LOGIN`` cannot
carry), or a ``credentials(user, password)`` callable checks the POP3
login itself and returns the IMAP ``(user, password)`` to use (a fixed
mapping: each POP3 name one account), or None to refuse.  A name or
password with NUL, CR or LF is refused without asking the server: no IMAP
string carries them, and sent raw they would end the command.

The mailbox lock is taken on the IMAP account the login used, case-folded
(:meth:`IMAPUpstreamAdapter.mailbox_id`): IMAP servers commonly fold case
(Dovecot's default ``auth_username_format = %Lu``), so ``ALICE`` and
``alice`` are one mailbox, and so are two POP3 names that ``credentials``
maps to one account.

Mapping:

- unique-id = ``"<UIDVALIDITY>.<UID>"``: stable for as long as the IMAP
  server keeps the folder's UIDVALIDITY; if it changes, every message gets a
  new unique-id and clients fetch them again, which is exactly right;
- sizes = ``RFC822.SIZE``, which IMAP defines on the CRLF form of the
  message, the same octets POP3 counts, plus the line end the POP3 server
  adds when a message does not end in one (RFC 1939 section 11: LIST
  counts exactly what RETR sends).  To know which messages need it,
  ``list_messages`` fetches each message's last two octets
  (``BODY.PEEK[]<size-2.2>``, pipelined, so a big folder costs a few round
  trips, not one per message) and remembers the answer per account,
  UIDVALIDITY and UID: IMAP messages never change, so later sessions only
  ask about new UIDs and STAT/LIST read no body;
- RETR/TOP stream the message with partial fetches
  ``UID FETCH n (BODY.PEEK[]<offset.length>)`` of ``chunk_size`` octets
  each (imaplib returns every literal whole, so one ``BODY[]`` fetch of a
  1 GB message would sit in memory whole; partial fetches bound it).
  ``PEEK`` leaves the ``\\Seen`` flag alone.  A message another client
  expunges part-way raises (the server then closes the connection without
  the terminator) rather than end early;
- DELE, applied after QUIT: ``UID STORE +FLAGS.SILENT (\\Deleted)`` then
  ``UID EXPUNGE`` of exactly those UIDs when the server has UIDPLUS (RFC
  4315).  Without UIDPLUS a plain ``EXPUNGE`` also removes messages that
  other clients had flagged ``\\Deleted``.  With ``on_delete="trash"``
  messages are moved to ``trash_folder`` instead (``UID MOVE``, RFC 6851,
  or COPY + delete).  ``on_delete="none"`` makes the adapter read-only and
  opens the folder with EXAMINE.  IMAP has no transactions: if the expunge
  fails, the adapter removes the ``\\Deleted`` flags again so that no
  message is left half-deleted, and the client gets ``-ERR [SYS/TEMP]``.

One IMAP connection per POP3 session.  ``authenticate`` opens it and logs
in (so a wrong password is known before any lock is taken); the logged-in
connection is parked for the user, picked up by ``list_messages`` (which
selects the folder) and logged out in ``close_mailbox``.  The server holds
the mailbox lock between those two, so one session per user uses the
connection at a time.  A connection stays parked only when the login then
failed with ``[IN-USE]`` (or its client went away), and these are bounded:
one per user (a newer login of the user logs the older out; either serves
the session that gets the lock), ``max_parked`` in all (the oldest logged
out first), and ``park_seconds`` each on the adapter's ``clock`` (any login
or session end logs out older ones).  ``close()`` logs out every
connection still open.  The POP3 password is never stored.

Thread-safety: the parked and per-session connection tables and the
final-line-end cache are guarded by one mutex; each connection is used by
one session's thread only.

Errors: the IMAP server refusing the credentials is ``-ERR [AUTH]`` (unless
it says ``[UNAVAILABLE]``); connection failures, timeouts and protocol
aborts are ``-ERR [SYS/TEMP]``; a missing folder is ``-ERR [SYS/PERM]``.
Passwords and message contents are never logged.
"""
from __future__ import annotations

import imaplib
import io
import logging
import re
import ssl
import threading
import time
from collections import OrderedDict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from pop3frame import AdapterBase, MessageInfo, PermanentFailure, TemporaryFailure
from pop3frame.clientlog import quoted
from pop3frame.failures import log_failure

__all__ = ["IMAPUpstreamAdapter"]

logger = logging.getLogger("pop3frame.adapters.imap")

Credentials = Callable[[str, str], Optional[Tuple[str, str]]]

#: What counts as "the upstream server is unreachable or broke the protocol"
#: (timeouts are socket.timeout, an OSError).
_CONNECTION_ERRORS = (OSError, imaplib.IMAP4.abort, ssl.SSLError, EOFError)
#: Parked logins older than this (a login refused [IN-USE], a client gone
#: before the lock) are logged out by the next login or session end; the
#: session that gets the lock takes its login within milliseconds.
PARK_SECONDS = 10.0
#: Parked logins at most, over all users (one each); the oldest go first.
MAX_PARKED = 64
#: Tail fetches sent before their replies are read: few enough that the
#: commands and replies in flight fit in the socket buffers (no deadlock).
PIPELINE_DEPTH = 64
#: Accounts whose final-line-end checks are remembered (least recently used
#: dropped); each entry is a few integers plus the odd message without one.
TAIL_CACHE_ACCOUNTS = 4096
_TEMPORARY_CODES = (b"[UNAVAILABLE]", b"[SERVERBUG]", b"[INUSE]", b"[LIMIT]")


def _quote(name: str) -> str:
    """An IMAP quoted string (imaplib sends arguments as they are)."""
    return '"%s"' % name.replace("\\", "\\\\").replace('"', '\\"')


def _sendable(text: str) -> bool:
    """Whether an IMAP string (quoted, or a SASL PLAIN field) can carry ``text``."""
    return not any(c in text for c in "\0\r\n")


def _uid_set(uids: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1:3,7"``: keeps the command line short."""
    out: List[str] = []
    ordered = sorted(set(uids))
    start = prev = ordered[0]
    for uid in ordered[1:] + [None]:  # type: ignore[list-item]
        if uid is not None and uid == prev + 1:
            prev = uid
            continue
        out.append(str(start) if start == prev else "%d:%d" % (start, prev))
        if uid is not None:
            start = prev = uid
    return ",".join(out)


def _line_end_octets(tail: bytes) -> int:
    """Octets the POP3 server adds after a message ending in ``tail``
    (see :meth:`pop3frame.protocol.Stuffer.finish`)."""
    if not tail or tail.endswith(b"\n"):
        return 0
    return 1 if tail.endswith(b"\r") else 2


def _body_sections(data: Iterable) -> Dict[int, bytes]:
    """uid -> ``BODY[]<n>`` octets from the untagged FETCH replies in ``data``.

    imaplib gives a literal as ``(b'7 (UID 9 BODY[]<40> {2}', b'..')``
    followed by ``b')'`` (or ``b' UID 9)'`` when the server sends UID after
    the body); a short section may also come as a quoted string.  Replies
    without a body section (flag updates) and ``NIL`` bodies are left out.
    """
    out: Dict[int, bytes] = {}
    items = list(data)
    for i, item in enumerate(items):
        if isinstance(item, tuple):
            after = items[i + 1] if i + 1 < len(items) and isinstance(items[i + 1], bytes) else b""
            head, body = item[0] + b" " + after, item[1]
        elif isinstance(item, bytes):
            quoted = re.search(rb'BODY\[\](?:<\d+>)? "((?:[^"\\]|\\.)*)"', item)
            if not quoted:
                continue
            head, body = item, re.sub(rb"\\(.)", rb"\1", quoted.group(1))
        else:
            continue
        uid = re.search(rb"\bUID (\d+)", head)
        if uid and b"BODY[]" in head:
            out[int(uid.group(1))] = body
    return out


def _pipelined_tails(conn: imaplib.IMAP4, wanted: Sequence[Tuple[int, int]]) -> Dict[int, bytes]:
    """uid -> last two octets (fewer for tiny messages) for ``(uid, size)``.

    imaplib has no public pipelining (RFC 3501 section 5.5 allows it), so
    this sends with ``_command`` and collects with ``_command_complete``,
    the two halves of every imaplib command.  A message expunged meanwhile
    (``NO`` or no body) is simply missing from the result.
    """
    tails: Dict[int, bytes] = {}
    for start in range(0, len(wanted), PIPELINE_DEPTH):
        tags = [
            conn._command("UID", "FETCH", str(uid), "(BODY.PEEK[]<%d.%d>)" % (max(size - 2, 0), min(size, 2)))
            for uid, size in wanted[start : start + PIPELINE_DEPTH]
        ]
        for tag in tags:
            conn._command_complete("UID", tag)
        _, data = conn._untagged_response("OK", [None], "FETCH")
        tails.update(_body_sections(data))
    return tails


class _Parked:
    __slots__ = ("since", "conn", "account")

    def __init__(self, since: float, conn: imaplib.IMAP4, account: str) -> None:
        self.since = since
        self.conn = conn
        self.account = account


class _Session:
    __slots__ = ("conn", "caps", "uidvalidity")

    def __init__(self, conn: imaplib.IMAP4, caps: frozenset, uidvalidity: str) -> None:
        self.conn = conn
        self.caps = caps
        self.uidvalidity = uidvalidity


class _PartialFetchReader(io.RawIOBase):
    """A message body read with ``BODY.PEEK[]<offset.length>`` fetches."""

    def __init__(self, fetch: Callable[[int, int], Optional[bytes]], chunk_size: int, first: bytes) -> None:
        self._fetch = fetch
        self._chunk = chunk_size
        self._offset = len(first)
        self._buf = first
        self._eof = len(first) < chunk_size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if not self._buf and not self._eof:
            data = self._fetch(self._offset, self._chunk)
            if data is None:
                # Expunged by another client part-way: an error, not an early
                # end, so the server never ends the message as if complete.
                raise TemporaryFailure("message expunged while being read")
            self._offset += len(data)
            self._buf = data
            self._eof = len(data) < self._chunk
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


class IMAPUpstreamAdapter(AdapterBase):
    """Serve one folder of an IMAP account over POP3.

    ``host``/``port``: the IMAP server (port defaults to 143, or 993 with
    ``security="ssl"``).  ``security``: ``"plain"``, ``"starttls"`` or
    ``"ssl"``; ``ssl_context`` for the last two (default: verified
    :func:`ssl.create_default_context`).  ``folder``: the folder served
    (ASCII name).  ``credentials``: see the module docstring.
    ``on_delete``: ``"expunge"`` (default), ``"trash"`` or ``"none"``
    (read-only).  ``timeout``: seconds for connecting and for each IMAP
    reply.  ``chunk_size``: octets per partial fetch.  ``park_seconds`` and
    ``max_parked``: the bounds on parked logins (module docstring).
    ``clock``: monotonic seconds, for the age of parked logins (tests pass
    a :class:`pop3frame.testing.ManualClock`).
    """

    def __init__(
        self,
        host: str,
        port: Optional[int] = None,
        *,
        security: str = "plain",
        ssl_context: Optional[ssl.SSLContext] = None,
        folder: str = "INBOX",
        credentials: Optional[Credentials] = None,
        on_delete: str = "expunge",
        trash_folder: str = "Trash",
        timeout: float = 30.0,
        chunk_size: int = 1 << 20,
        park_seconds: float = PARK_SECONDS,
        max_parked: int = MAX_PARKED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if security not in ("plain", "starttls", "ssl"):
            raise ValueError("security must be 'plain', 'starttls' or 'ssl'")
        if on_delete not in ("expunge", "trash", "none"):
            raise ValueError("on_delete must be 'expunge', 'trash' or 'none'")
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        if max_parked < 1 or park_seconds <= 0:
            raise ValueError("max_parked and park_seconds must be positive")
        if not (_sendable(folder) and _sendable(trash_folder)):
            raise ValueError("folder names cannot contain NUL, CR or LF")
        self.host = host
        self.port = port or (993 if security == "ssl" else 143)
        self.security = security
        self.ssl_context = ssl_context
        self.folder = folder
        self.credentials = credentials
        self.on_delete = on_delete
        self.trash_folder = trash_folder
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.read_only = on_delete == "none"
        self.park_seconds = park_seconds
        self.max_parked = max_parked
        self.clock = clock
        self._mutex = threading.Lock()
        #: user -> the user's parked login, oldest first.
        self._parked: "OrderedDict[str, _Parked]" = OrderedDict()
        self._sessions: Dict[str, _Session] = {}
        #: account -> (UIDVALIDITY, every UID up to this one checked, {uid: octets to add}).
        self._tails: "OrderedDict[str, Tuple[str, int, Dict[int, int]]]" = OrderedDict()

    # -- connections ----------------------------------------------------------------

    def _context(self) -> ssl.SSLContext:
        return self.ssl_context or ssl.create_default_context()

    def connect(self) -> imaplib.IMAP4:
        """A new, not yet authenticated connection to the IMAP server."""
        try:
            if self.security == "ssl":
                conn: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                    self.host, self.port, ssl_context=self._context(), timeout=self.timeout
                )
            else:
                conn = imaplib.IMAP4(self.host, self.port, timeout=self.timeout)
        except (*_CONNECTION_ERRORS, imaplib.IMAP4.error) as exc:
            log_failure(logger, logging.WARNING, "cannot connect to IMAP server %s:%s", self.host, self.port, exc=exc)
            raise TemporaryFailure("upstream mail server unavailable") from None
        if self.security == "starttls":
            try:
                conn.starttls(self._context())
            except BaseException as exc:
                conn.shutdown()  # no LOGOUT over a connection that may be half in TLS
                if not isinstance(exc, (*_CONNECTION_ERRORS, imaplib.IMAP4.error)):
                    raise
                log_failure(logger, logging.WARNING, "STARTTLS with %s:%s failed", self.host, self.port, exc=exc)
                raise TemporaryFailure("upstream mail server unavailable") from None
        return conn

    @staticmethod
    def _logout(conn: imaplib.IMAP4) -> None:
        # LOGOUT, never CLOSE: CLOSE would expunge \Deleted messages.
        try:
            conn.logout()
        except Exception:
            try:
                conn.shutdown()
            except Exception:
                pass

    def _login(self, conn: imaplib.IMAP4, user: str, password: str) -> None:
        if password.isascii() and user.isascii() and "LOGINDISABLED" not in conn.capabilities:
            conn.login(_quote(user), password)  # imaplib quotes only the password
            return
        # imaplib's LOGIN sends ASCII only; SASL PLAIN carries UTF-8 (RFC 4616).
        token = ("\0%s\0%s" % (user, password)).encode("utf-8")
        conn.authenticate("PLAIN", lambda _challenge: token)

    # -- the adapter contract -------------------------------------------------------

    def authenticate(self, username: str, password: str) -> bool:
        if self.credentials is None:
            upstream: Optional[Tuple[str, str]] = (username, password)
        else:
            upstream = self.credentials(username, password)
        if upstream is None:
            return False
        if not all(map(_sendable, upstream)):
            logger.info("IMAP login for %s not tried: NUL, CR or LF in the name or password", quoted(username))
            return False
        conn = self.connect()
        try:
            self._login(conn, *upstream)
        except BaseException as exc:
            self._login_failed(conn, username, exc)
            return False
        self._park(username, _Parked(self.clock(), conn, upstream[0]))
        return True

    def mailbox_id(self, username: str) -> str:
        """The IMAP account of the user's login, case-folded: two names for one
        account (case, a credentials mapping) share one lock."""
        with self._mutex:
            parked = self._parked.get(username)
        return (parked.account if parked is not None else username).casefold()

    def _park(self, username: str, parked: _Parked) -> None:
        """Keep a logged-in connection for the user's session, within the bounds."""
        with self._mutex:
            gone = [p for p in (self._parked.pop(username, None),) if p is not None]
            self._parked[username] = parked
            while len(self._parked) > self.max_parked:
                gone.append(self._parked.popitem(last=False)[1])
        for p in gone:
            self._logout(p.conn)
        self._reap_parked()

    def _login_failed(self, conn: imaplib.IMAP4, username: str, exc: BaseException) -> None:
        """Log the connection out; return if the server refused the
        credentials, raise TemporaryFailure if it is unavailable."""
        self._logout(conn)
        if isinstance(exc, _CONNECTION_ERRORS):
            log_failure(logger, logging.WARNING, "IMAP login for %s: connection failed", quoted(username), exc=exc)
            raise TemporaryFailure("upstream mail server unavailable") from None
        if not isinstance(exc, imaplib.IMAP4.error):
            raise exc
        if any(code in str(exc).encode("utf-8", "replace") for code in _TEMPORARY_CODES):
            logger.warning("IMAP login for %s refused temporarily", quoted(username))
            raise TemporaryFailure("upstream mail server unavailable") from None
        logger.info("IMAP server refused the login of %s", quoted(username))

    def _reap_parked(self) -> None:
        """Log out the parked logins older than ``park_seconds`` (logins
        refused [IN-USE], clients gone before the lock was taken)."""
        limit = self.clock() - self.park_seconds
        stale: List[_Parked] = []
        with self._mutex:
            while self._parked and next(iter(self._parked.values())).since < limit:
                stale.append(self._parked.popitem(last=False)[1])
        for p in stale:
            self._logout(p.conn)

    def _take_parked(self, username: str) -> _Parked:
        with self._mutex:
            parked = self._parked.pop(username, None)
        if parked is None:
            raise TemporaryFailure("upstream login lost; log in again")
        return parked

    def _line_ends(
        self, conn: imaplib.IMAP4, account: str, uidvalidity: str, messages: Sequence[Tuple[int, int]]
    ) -> Dict[int, int]:
        """uid -> octets to add to RFC822.SIZE for the line end POP3 appends.

        Asks the server only about UIDs above the cached high-water mark:
        UIDs are assigned in ascending order and a message never changes,
        so anything at or below it was checked before (or is gone).
        """
        with self._mutex:
            cached = self._tails.get(account)
        if cached is not None and cached[0] == uidvalidity:
            _, checked, known = cached
        else:
            checked, known = 0, {}
        wanted = [(uid, size) for uid, size in messages if uid > checked and size > 0]
        tails = _pipelined_tails(conn, wanted) if wanted else {}
        missing = [uid for uid, _ in wanted if uid not in tails]
        if missing:  # expunged meanwhile, or an answer we did not understand: ask again next time
            logger.info("no final octets for %d message(s) of %s", len(missing), quoted(account))
        top = max((uid for uid, _ in messages), default=checked)
        checked = max(checked, min(missing) - 1 if missing else top)
        current = {uid for uid, _ in messages}
        extras = {uid: n for uid, n in known.items() if uid in current}
        extras.update((uid, _line_end_octets(tail)) for uid, tail in tails.items())
        extras = {uid: n for uid, n in extras.items() if n}
        with self._mutex:
            self._tails[account] = (uidvalidity, checked, extras)
            self._tails.move_to_end(account)
            while len(self._tails) > TAIL_CACHE_ACCOUNTS:
                self._tails.popitem(last=False)
        return extras

    def list_messages(self, username: str) -> Sequence[MessageInfo]:
        parked = self._take_parked(username)
        conn = parked.conn
        try:
            typ, data = conn.capability()
            caps = frozenset((data[0] or b"").decode("ascii", "replace").upper().split()) if typ == "OK" else frozenset()
            typ, data = conn.select(_quote(self.folder), readonly=self.read_only)
            if typ != "OK":
                logger.error("IMAP folder %r cannot be selected for %s: %s", self.folder, quoted(username), data)
                raise PermanentFailure("mail folder not available")
            exists = int(data[0] or 0)
            _, validity = conn.response("UIDVALIDITY")
            uidvalidity = (validity[0] or b"0").decode("ascii") if validity and validity[0] else "0"
            messages: List[Tuple[int, int]] = []
            if exists:
                typ, data = conn.uid("FETCH", "1:*", "(UID RFC822.SIZE)")
                if typ != "OK":
                    raise TemporaryFailure("upstream mail server refused to list messages")
                for item in data:
                    line = item[0] if isinstance(item, tuple) else item
                    if not line:
                        continue
                    uid = re.search(rb"\bUID (\d+)", line)
                    size = re.search(rb"\bRFC822\.SIZE (\d+)", line)
                    if uid and size:  # unsolicited FLAGS updates carry no size
                        messages.append((int(uid.group(1)), int(size.group(1))))
            messages = sorted(set(messages))
            extras = self._line_ends(conn, parked.account, uidvalidity, messages)
        except (TemporaryFailure, PermanentFailure):
            self._logout(conn)
            raise
        except (*_CONNECTION_ERRORS, imaplib.IMAP4.error, ValueError) as exc:
            self._logout(conn)
            log_failure(logger, logging.WARNING, "listing IMAP folder %r for %s failed", self.folder, quoted(username), exc=exc)
            raise TemporaryFailure("upstream mail server unavailable") from None
        except BaseException:
            self._logout(conn)
            raise
        with self._mutex:
            self._sessions[username] = _Session(conn, caps, uidvalidity)
        return [
            MessageInfo("%s.%d" % (uidvalidity, uid), size + extras.get(uid, 0), key=uid) for uid, size in messages
        ]

    def _session(self, username: str) -> _Session:
        with self._mutex:
            session = self._sessions.get(username)
        if session is None:
            raise TemporaryFailure("no upstream session")
        return session

    def _fetch_part(self, conn: imaplib.IMAP4, uid: int, offset: int, length: int) -> Optional[bytes]:
        """Octets ``offset`` .. ``offset+length`` of the message, or None if it is gone."""
        try:
            typ, data = conn.uid("FETCH", str(uid), "(BODY.PEEK[]<%d.%d>)" % (offset, length))
        except (*_CONNECTION_ERRORS, imaplib.IMAP4.error) as exc:
            log_failure(logger, logging.WARNING, "IMAP fetch of UID %d failed", uid, exc=exc)
            raise TemporaryFailure("upstream mail server unavailable") from None
        if typ != "OK":
            raise TemporaryFailure("upstream mail server refused the fetch")
        for item in data:
            # Only our fetch returns a body section, so the first BODY[] is ours;
            # the UID may come before or after the literal.
            if isinstance(item, tuple) and b"BODY[]" in item[0]:
                return item[1]
            if isinstance(item, bytes) and b"BODY[]" in item:
                # BODY[]<n> "" is past the end; NIL is Dovecot's answer for a
                # message expunged by another session that ours has not synced.
                return None if re.search(rb"BODY\[\](?:<\d+>)? NIL", item) else b""
        return None

    def open_message(self, username: str, message: MessageInfo) -> io.BufferedReader:
        session = self._session(username)
        uid = message.key
        fetch = lambda offset, length: self._fetch_part(session.conn, uid, offset, length)  # noqa: E731
        first = fetch(0, self.chunk_size)
        if first is None:
            raise TemporaryFailure("message no longer exists")
        # Buffered, so TOP's line reads do not turn into one fetch per byte.
        return io.BufferedReader(_PartialFetchReader(fetch, self.chunk_size, first), self.chunk_size)

    def delete_messages(self, username: str, messages: Sequence[MessageInfo]) -> None:
        if self.read_only:
            raise PermanentFailure("this mailbox is read-only")
        session = self._session(username)
        conn, uids = session.conn, _uid_set([m.key for m in messages])
        try:
            if self.on_delete == "trash":
                if "MOVE" in session.caps:
                    self._ok(conn.uid("MOVE", uids, _quote(self.trash_folder)), "move to trash")
                    logger.info("moved %d message(s) of %s to %s", len(messages), quoted(username), self.trash_folder)
                    return
                self._ok(conn.uid("COPY", uids, _quote(self.trash_folder)), "copy to trash")
            self._ok(conn.uid("STORE", uids, "+FLAGS.SILENT", r"(\Deleted)"), "flag as deleted")
            try:
                if "UIDPLUS" in session.caps:
                    self._ok(conn.uid("EXPUNGE", uids), "expunge")
                else:
                    self._ok(conn.expunge(), "expunge")
            except TemporaryFailure:
                # Leave no message flagged for someone else's EXPUNGE to take.
                try:
                    conn.uid("STORE", uids, "-FLAGS.SILENT", r"(\Deleted)")
                except Exception as exc:
                    log_failure(logger, logging.WARNING, "could not remove \\Deleted flags again", exc=exc)
                raise
        except (*_CONNECTION_ERRORS, imaplib.IMAP4.error) as exc:
            log_failure(logger, logging.WARNING, "IMAP delete for %s failed", quoted(username), exc=exc)
            raise TemporaryFailure("could not delete messages upstream") from None
        logger.info("deleted %d message(s) of %s upstream", len(messages), quoted(username))

    @staticmethod
    def _ok(reply: Tuple[str, list], what: str) -> None:
        typ, data = reply
        if typ != "OK":
            logger.warning("IMAP %s refused: %s %s", what, typ, data)
            raise TemporaryFailure("could not delete messages upstream")

    def close_mailbox(self, username: str) -> None:
        with self._mutex:
            session = self._sessions.pop(username, None)
        if session is not None:
            self._logout(session.conn)
        self._reap_parked()

    def close(self) -> None:
        """Log out every upstream connection, parked or in a session."""
        with self._mutex:
            conns = [p.conn for p in self._parked.values()]
            conns += [s.conn for s in self._sessions.values()]
            self._parked.clear()
            self._sessions.clear()
        for conn in conns:
            self._logout(conn)

