"""Turn data that is not mail yet (rows, feed items, values) into RFC 5322 messages.

Shared by the SQL query, feed and function adapters.  Everything here is a
pure function of its arguments, so a message built twice from the same data
is the same bytes: that is what keeps sizes, unique-ids and Message-IDs
stable across sessions.

Messages are built with :class:`email.message.EmailMessage` and serialised
with ``email.policy.SMTP`` (CRLF line endings, RFC 2047 encoded words for
non-ASCII header text).  Non-ASCII bodies are sent quoted-printable, so the
result is 7-bit clean and any client decodes it.

Data is not trusted to be well formed: an address that does not parse
cleanly becomes the display name of a placeholder address (and is logged),
a date that cannot be read becomes the Unix epoch.  So every message
parses without defects under ``email.policy.default``.
"""
from __future__ import annotations

import datetime
import email.parser
import email.policy
import email.utils
import hashlib
import logging
import mimetypes
import re
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any, Iterable, Optional, Sequence, Tuple

from pop3frame import protocol

__all__ = [
    "build_message",
    "stable_uid",
    "message_id",
    "to_datetime",
    "one_line",
    "Attachment",
]

logger = logging.getLogger("pop3frame.adapters.build")

#: (file name, content bytes, MIME type or None to guess from the name).
Attachment = Tuple[str, bytes, Optional[str]]

#: The address a From or To made of unusable text gets (the text stays as its name).
FALLBACK_ADDRESS = "pop3frame@localhost"

_SAFE_UID = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_DOT_ATOM = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*\Z")
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def _digest(value: Any) -> str:
    return hashlib.sha256(str(value).encode("utf-8", "surrogatepass")).hexdigest()


def stable_uid(value: Any) -> str:
    """An RFC 1939 unique-id (1-70 chars in 0x21..0x7E) derived from ``value``.

    Short ids made of letters, digits, ``.``, ``_`` and ``-`` are used as
    they are, so a row with id 42 has unique-id ``42`` (readable in logs).
    Anything else becomes ``~`` plus 40 hex digits of its SHA-256; ``~`` is
    never in a plain id, so the two forms cannot collide.
    """
    text = str(value)
    if _SAFE_UID.match(text):
        return text
    uid = "~" + _digest(text)[:40]
    assert protocol.valid_uid(uid)
    return uid


def message_id(value: Any, namespace: str = "pop3frame", domain: str = "pop3frame.invalid") -> str:
    """A stable ``<local@domain>`` Message-ID for ``value`` within ``namespace``.

    The same row or item always gets the same Message-ID, so clients that
    thread or de-duplicate by Message-ID see one message, not copies.
    """
    text = str(value)
    local = text if _DOT_ATOM.match(text) and len(text) <= 64 else _digest(text)[:32]
    ns = namespace if _DOT_ATOM.match(namespace) else _digest(namespace)[:12]
    return "<%s.%s@%s>" % (local, ns, domain)


def to_datetime(value: Any, naive_tz: datetime.tzinfo = datetime.timezone.utc) -> datetime.datetime:
    """A timezone-aware datetime from what databases and feeds hand out.

    Accepts datetime/date objects, Unix timestamps (int/float, or digits in
    a string), ISO 8601 text (``2026-11-25 09:00:00``, with or without an
    offset, as SQLite stores it), RFC 5322 date text, and
    ``time.struct_time`` (feedparser's ``*_parsed``, always UTC).  Naive
    values are taken to be in ``naive_tz``.  None or anything unparseable
    gives the Unix epoch: a Date header is mandatory and must not change
    between sessions, so "now" would be wrong.
    """
    dt: Optional[datetime.datetime] = None
    if value is None:
        return _EPOCH
    if isinstance(value, datetime.datetime):
        dt = value
    elif isinstance(value, datetime.date):
        dt = datetime.datetime(value.year, value.month, value.day)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return _from_timestamp(value)
    elif hasattr(value, "tm_year"):  # time.struct_time
        try:
            return datetime.datetime(*tuple(value)[:6], tzinfo=datetime.timezone.utc)
        except (TypeError, ValueError):
            return _EPOCH
    else:
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = bytes(value).decode("ascii", "replace")
        text = str(value).strip()
        if re.fullmatch(r"-?\d+(\.\d+)?", text):
            return _from_timestamp(float(text))
        try:
            dt = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            try:
                dt = email.utils.parsedate_to_datetime(text)
            except (TypeError, ValueError, IndexError):
                return _EPOCH
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=naive_tz)
    return dt


def _from_timestamp(seconds: float) -> datetime.datetime:
    try:
        return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):  # beyond year 9999, NaN, inf
        return _EPOCH


def one_line(text: Any, limit: int = 200) -> str:
    """Header-safe text: whitespace runs (CR and LF included) become one space.

    A log line with an embedded newline must not be able to add a header.
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", "replace")
    out = " ".join(str(text).replace("\0", " ").split())
    if len(out) > limit:
        out = out[: limit - 3].rstrip() + "..."
    return out


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _set_text(part: EmailMessage, text: str, subtype: str = "plain") -> None:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    # Quoted-printable keeps non-ASCII text readable in the raw source and
    # 7-bit safe on the wire; ASCII goes as it is (set_content still picks
    # an encoding by itself for over-long lines).
    cte = None if text.isascii() else "quoted-printable"
    part.set_content(text, subtype=subtype, charset="utf-8", cte=cte)


def _clean_address(msg: EmailMessage, name: str) -> bool:
    """True if header ``name`` has no defects and survives being folded
    for the wire: the email package folds some long display names into
    text that parses as different addresses."""
    header = msg[name]
    if header.defects:
        return False
    folded = msg.policy.fold(name, header)
    again = email.parser.HeaderParser(policy=email.policy.default).parsestr(folded)[name]
    return not again.defects and again.addresses == header.addresses


def _set_address(msg: EmailMessage, name: str, text: str) -> None:
    """Set address header ``name`` to ``text`` if that is a clean address
    list, else to :data:`FALLBACK_ADDRESS` named after ``text``."""
    if text:
        try:
            msg[name] = text
            if _clean_address(msg, name):
                return
        except Exception:  # the email package raises IndexError and more on some input
            pass
        del msg[name]
        logger.warning("%s value %r is not a valid address list; using a placeholder", name, text[:200])
    # Short, and without the two characters that need escaping, the name
    # is never folded, so it cannot turn into addresses of its own.
    label = one_line(text.replace('"', "'").replace("\\", "/"), 40) or "pop3frame"
    msg[name] = Address(display_name=label, addr_spec=FALLBACK_ADDRESS)


def build_message(
    *,
    subject: Any,
    body: Any = "",
    date: Any = None,
    msgid: str,
    sender: Any,
    recipient: Any,
    html: Optional[str] = None,
    attachments: Iterable[Attachment] = (),
    headers: Sequence[Tuple[str, str]] = (),
) -> bytes:
    """One RFC 5322 message as CRLF bytes.

    Always has From, To, Subject, Date, Message-ID and MIME-Version.
    ``body`` is text (bytes are decoded as UTF-8, bad bytes replaced);
    with ``html`` the body is multipart/alternative; each attachment makes
    it multipart/mixed.  Header values are folded to one line, so data
    cannot inject headers.  A ``sender`` or ``recipient`` that is not a
    valid address list is logged and kept (shortened) as the display name
    of :data:`FALLBACK_ADDRESS`.
    """
    msg = EmailMessage(policy=email.policy.SMTP)
    _set_address(msg, "From", one_line(sender, 998))
    _set_address(msg, "To", one_line(recipient, 998) or "undisclosed-recipients:;")
    msg["Subject"] = one_line(subject) or "(no subject)"
    msg["Date"] = email.utils.format_datetime(to_datetime(date))
    msg["Message-ID"] = msgid
    for name, value in headers:
        msg[name] = one_line(value, 998)
    # EmailMessage adds MIME-Version with set_content; set it explicitly so a
    # message with no body part has it too.
    if "MIME-Version" not in msg:
        msg["MIME-Version"] = "1.0"
    text = _text(body)
    _set_text(msg, text)
    seed = hashlib.sha256((msgid + "\0" + text + "\0" + (html or "")).encode("utf-8", "surrogatepass"))
    if html:
        msg.add_alternative(html, subtype="html", charset="utf-8", cte="quoted-printable")
    for filename, content, ctype in attachments:
        ctype = ctype or mimetypes.guess_type(filename)[0] or "application/octet-stream"
        maintype, _, subtype = ctype.partition("/")
        msg.add_attachment(bytes(content), maintype=maintype, subtype=subtype or "octet-stream", filename=filename)
        seed.update(b"\0" + filename.encode("utf-8", "replace") + b"\0" + bytes(content))
    if msg.is_multipart():
        # The email package picks random boundaries; derive them from the
        # content instead, so the same data always gives the same bytes (and
        # size).  "=_" cannot occur in quoted-printable or base64 text.
        tag = seed.hexdigest()[:24]
        for i, part in enumerate(msg.walk()):
            if part.is_multipart():
                part.set_boundary("=_%s.%d" % (tag, i))
    return msg.as_bytes(policy=email.policy.SMTP)
