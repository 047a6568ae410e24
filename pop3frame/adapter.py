"""The interface between the POP3 server and wherever the mail lives.

Write one subclass of :class:`AdapterBase`.  The server calls it from many
threads at once (one per connection), always synchronously; a call may block
as long as it needs to (disk, database, HTTP), it only holds up its own
session.

The call sequence for one session is::

    authenticate(user, password)      # or apop_secret(user) for APOP
    # -- the server takes the mailbox lock for mailbox_id(user) here --
    messages = list_messages(user)    # the session's snapshot, once
    open_message(user, msg)           # any number of times: RETR / TOP
    message_retrieved(user, msg)      # after each complete RETR (not TOP)
    delete_messages(user, [msgs])     # only after QUIT, only if any were marked
    close_mailbox(user)               # always, on every path, exactly once

Between ``list_messages`` and ``close_mailbox`` the server holds an exclusive
lock on ``mailbox_id(user)``, so per-mailbox state kept by the adapter is
touched by one thread at a time.  Anything shared *between* mailboxes (a
connection pool, a cache, a user table) must be thread-safe.

Errors: raise a :class:`POP3Error` subclass to send the client a chosen
``-ERR`` line with its RFC 2449/3206 response code.  Any other exception is
logged with its traceback and the client sees only
``-ERR [SYS/TEMP] internal server error``: no exception text ever reaches the
wire.
"""
from __future__ import annotations

from typing import Any, BinaryIO, Optional, Sequence, Union

from . import protocol

__all__ = [
    "AdapterBase",
    "MessageInfo",
    "POP3Error",
    "AuthenticationFailed",
    "MailboxInUse",
    "LoginDelayed",
    "TemporaryFailure",
    "PermanentFailure",
]


class MessageInfo:
    """What the server needs to know about one message without reading it.

    ``uid``: the RFC 1939 unique-id; stable across sessions, 1 to 70
    characters in 0x21..0x7E.  ``size``: octets as sent on the wire with CRLF
    line endings, before byte-stuffing (:func:`pop3frame.protocol.wire_size`
    computes it from bytes).  ``key``: anything the adapter wants back in
    ``open_message``/``delete_messages`` (a path, a row id); the server never
    looks at it.

    ``dot_lines`` (optional, keyword): whether a line of the stored message
    starts with "." (:func:`pop3frame.protocol.has_dot_lines`), for adapters
    that keep it with the size.  False lets RETR skip looking for lines to
    byte-stuff, most of its work on prose; and a message stored exactly as
    sent (CRLF line ends, a final CRLF: then ``size`` equals its stored
    length) goes out unchanged, from a file with ``sendfile()``.  None (the
    default) means unknown: RETR looks.  It is a promise about the bytes
    ``open_message`` returns, so a False that may have gone stale (the
    message changed since it was measured) must not be given:
    ``open_message`` may set it to None when it finds the message changed.
    Nor may a stream return bytes written after it was opened with False
    in force: the first line starting with "." among them would go out
    unstuffed and end the reply early, in a terminator the client believes.
    A regular file is checked after every read for that (see
    :meth:`AdapterBase.open_message`); another stream must check itself.
    Not part of the message's identity (equality, hash).
    """

    __slots__ = ("uid", "size", "key", "dot_lines")

    def __init__(self, uid: str, size: int, key: Any = None, *, dot_lines: Optional[bool] = None) -> None:
        if not protocol.valid_uid(uid):
            raise ValueError("invalid POP3 unique-id %r: need 1-70 chars in 0x21-0x7E" % (uid,))
        if size < 0:
            raise ValueError("negative message size")
        self.uid = uid
        self.size = int(size)
        self.key = key
        self.dot_lines = dot_lines

    def __repr__(self) -> str:
        dots = "" if self.dot_lines is None else ", dot_lines=%r" % self.dot_lines
        return "MessageInfo(uid=%r, size=%d, key=%r%s)" % (self.uid, self.size, self.key, dots)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MessageInfo):
            return NotImplemented
        return (self.uid, self.size, self.key) == (other.uid, other.size, other.key)

    def __hash__(self) -> int:
        return hash(self.uid)


class POP3Error(Exception):
    """An error whose text is meant for the client.

    The session answers ``-ERR [code] text``.  Keep the text short and free
    of secrets; it is also logged.
    """

    code: Optional[str] = protocol.SYS_TEMP
    default_text = "temporary failure, try again later"

    def __init__(self, text: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(text or self.default_text)
        self.text = text or self.default_text
        if code is not None:
            self.code = code


class AuthenticationFailed(POP3Error):
    """Wrong user name or password (``-ERR [AUTH]``, RFC 3206 section 5)."""

    code = protocol.AUTH
    default_text = "invalid user name or password"


class MailboxInUse(POP3Error):
    """The mailbox is busy (``-ERR [IN-USE]``, RFC 2449 section 8.1.2)."""

    code = protocol.IN_USE
    default_text = "mailbox in use by another session"


class LoginDelayed(POP3Error):
    """The user logged in too recently (``-ERR [LOGIN-DELAY]``, RFC 2449 section 8.1.1)."""

    code = protocol.LOGIN_DELAY
    default_text = "login too soon after the previous one"


class TemporaryFailure(POP3Error):
    """The store is unavailable now; retrying later may work (``[SYS/TEMP]``)."""

    code = protocol.SYS_TEMP


class PermanentFailure(POP3Error):
    """Retrying will not help without an administrator (``[SYS/PERM]``)."""

    code = protocol.SYS_PERM
    default_text = "permanent failure, contact the administrator"


MessageBody = Union[bytes, BinaryIO]


class AdapterBase:
    """Base class for the object that serves mail to the POP3 server.

    One instance serves every connection: see the module docstring for the
    threading contract and the order of calls.  Subclasses must implement
    :meth:`authenticate`, :meth:`list_messages` and :meth:`open_message`;
    :meth:`delete_messages` is needed unless the adapter is read-only.
    """

    #: When true, DELE answers ``-ERR [SYS/PERM]`` and nothing is deleted.
    read_only: bool = False

    def authenticate(self, username: str, password: str) -> bool:
        """Check a password.  Return False (or raise AuthenticationFailed) if wrong.

        Called before any lock is taken, possibly concurrently for the same
        user.  Compare secrets with :func:`hmac.compare_digest`.
        """
        raise NotImplementedError

    def apop_secret(self, username: str) -> Optional[str]:
        """Return the shared secret for APOP (RFC 1939 section 7), or None.

        APOP needs the plaintext secret on the server; adapters that store
        only password hashes return None, and APOP then fails for that user.
        The server offers APOP (a timestamp in the greeting) only if
        :meth:`offers_apop` says so.
        """
        return None

    def offers_apop(self) -> bool:
        """Whether to offer APOP at all; by default, if apop_secret is overridden.

        Clients such as curl prefer APOP when the greeting carries a
        timestamp, so an adapter that overrides ``apop_secret`` but has no
        secrets for this configuration must return False here.
        """
        return type(self).apop_secret is not AdapterBase.apop_secret

    def mailbox_id(self, username: str) -> str:
        """The name the mailbox lock is taken on; defaults to the user name.

        Override when several login names share one mailbox (aliases,
        case-insensitive names) so that they exclude each other.
        """
        return username

    def list_messages(self, username: str) -> Sequence[MessageInfo]:
        """Return the mailbox's messages, in order; message 1 comes first.

        Called once per session, right after the lock is taken: this is the
        session's snapshot (RFC 1939: the maildrop seen in a session does not
        change).  Mail that arrives later appears in the next session.
        Report sizes without reading message bodies if at all possible: STAT
        and LIST must not cost a read of every message.
        """
        raise NotImplementedError

    def open_message(self, username: str, message: MessageInfo) -> MessageBody:
        """Return the message's raw bytes, or a binary file object to read them from.

        A file object is read in chunks and closed by the server, so huge
        messages never sit in memory whole.  LF or CRLF line endings are both
        fine; the server converts to CRLF and byte-stuffs.  Raise
        TemporaryFailure if the message vanished.

        A multi-line reply that ends in ``.`` tells the client it has the
        whole message, so the server sends that terminator only when it can
        vouch for it.  It counts the octets of a RETR before byte-stuffing:
        if the stream ends short of ``message.size``, or runs past it (it
        stops at once, before sending the surplus), the server logs an error
        and closes the connection without the terminator, and does not call
        :meth:`message_retrieved`; the client fetches the message again
        later.  The same holds for an exception raised by ``read()``
        part-way, for RETR and TOP alike (TOP sends part of a message, so
        its length is not checked).  So a file object must raise, not
        return EOF early, when the message vanishes or changes while being
        read; and it must deliver exactly the bytes whose size was listed.

        A regular file (one with ``fileno()``) is read as a
        :class:`pop3frame.protocol.CheckedFile`: after each read that
        returned bytes an ``fstat()`` shows whether the file was written
        since RETR began (its size or mtime changed), and if so those bytes
        are not sent and the connection closes.  Return a CheckedFile made
        with the ``os.fstat()`` you checked the file against when opening it
        (so a write in between is seen too), with ``sendfile=False`` for
        files that are rewritten in place.
        """
        raise NotImplementedError

    def message_retrieved(self, username: str, message: MessageInfo) -> None:
        """RETR sent the whole of ``message``; the default does nothing.

        The place for a "seen" flag (Maildir's ``S``): TOP, and a RETR cut
        short by a vanished client, do not call it.  Called with the
        mailbox lock held; an exception is logged, the client unaffected.
        """

    def delete_messages(self, username: str, messages: Sequence[MessageInfo]) -> None:
        """Delete these messages, all or none (the RFC 1939 UPDATE state).

        Called only after QUIT, only with a non-empty list.  Return normally
        if all were deleted; raise to report failure, in which case the
        adapter must leave every message in place (the client sees
        ``-ERR`` and will fetch them again).
        """
        raise PermanentFailure("this mailbox is read-only")

    def close_mailbox(self, username: str) -> None:
        """Release per-session resources.  Called once on every path after
        ``list_messages`` succeeded, before the lock is released."""

    def close(self) -> None:
        """Release what the adapter holds for all sessions (pools, connections).

        Called once after the last session ended, when ``pop3frame serve``
        stops; the default does nothing.
        """
