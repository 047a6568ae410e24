"""POP3 wire format as pure functions: no sockets, no threads, no clock.

Everything here is testable with plain bytes, in the spirit of h11: the
session decides *what* to say, this module decides *how it looks on the wire*.
"""
from __future__ import annotations

import os
import re
import stat
from typing import BinaryIO, Iterator, List, NamedTuple, Optional, Tuple, Union

#: RFC 2449 section 4: a command line is at most 255 octets including CRLF.
MAX_COMMAND_LINE = 255
#: RFC 2449 section 4: a response line is at most 512 octets including CRLF.
MAX_RESPONSE_LINE = 512
#: Chunk size for streaming message bodies: large enough that per-chunk
#: Python overhead vanishes next to memcpy, small enough to bound memory.
CHUNK_SIZE = 256 * 1024

CRLF = b"\r\n"
TERMINATOR = b".\r\n"

# RFC 2449 section 8 / RFC 3206 extended response codes.
IN_USE = "IN-USE"
LOGIN_DELAY = "LOGIN-DELAY"
SYS_TEMP = "SYS/TEMP"
SYS_PERM = "SYS/PERM"
AUTH = "AUTH"
UTF8 = "UTF8"


class ProtocolError(Exception):
    """A command line that cannot be parsed; the text goes into ``-ERR``."""


class Command(NamedTuple):
    """One parsed command line: upper-cased keyword and its arguments.

    ``rest`` is everything after the keyword's separating space, verbatim:
    RFC 1939 section 7 lets PASS take a password that contains spaces.
    """

    name: str
    args: List[str]
    rest: str


#: RFC 2449 section 3: keyword = 3*4VCHAR (so UTF8 is a keyword too).
_KEYWORD = re.compile(r"[\x21-\x7e]{3,4}\Z")


def parse_command(line: bytes, *, utf8: bool = False) -> Command:
    """Parse one command line (with or without its CRLF).

    RFC 1939 section 3: keywords are case-insensitive, three or four
    characters, separated from arguments by a single space.  We accept runs
    of spaces between arguments, as most servers do, but refuse control
    characters, NUL and (unless ``utf8`` was negotiated, RFC 6856) any
    non-ASCII octet.
    """
    if line.endswith(b"\n"):
        line = line[:-2] if line.endswith(CRLF) else line[:-1]
    if not line:
        raise ProtocolError("empty command")
    # NUL, CR and LF are refused below with the other control characters
    # (str.isprintable); ``bytes in bytes`` would cost CPython 3.11 a
    # TypeError raised and cleared per call.
    try:
        text = line.decode("utf-8" if utf8 else "ascii")
    except UnicodeDecodeError:
        raise ProtocolError("non-ASCII octets in command" if not utf8 else "invalid UTF-8 in command") from None
    if not text.isprintable():
        raise ProtocolError("invalid characters in command")
    keyword, _, rest = text.partition(" ")
    if not _KEYWORD.match(keyword):
        raise ProtocolError("invalid command")
    return Command(keyword.upper(), rest.split(), rest)


def _clean(text: str) -> str:
    # Adapter-supplied texts end up here; a CR or LF in them would let the
    # adapter (or whoever controls its data) inject a second response line.
    return " ".join(text.replace("\0", " ").split())


def status_line(ok: bool, text: str = "", code: Optional[str] = None) -> bytes:
    """Format a ``+OK``/``-ERR`` line, clipped to the RFC 2449 limit."""
    parts = ["+OK" if ok else "-ERR"]
    if code:
        parts.append("[%s]" % code)
    text = _clean(text)
    if text:
        parts.append(text)
    raw = " ".join(parts).encode("utf-8")
    if len(raw) > MAX_RESPONSE_LINE - 2:
        raw = raw[: MAX_RESPONSE_LINE - 2].decode("utf-8", "ignore").encode("utf-8")
    return raw + CRLF


def ok(text: str = "", code: Optional[str] = None) -> bytes:
    return status_line(True, text, code)


def err(text: str = "", code: Optional[str] = None) -> bytes:
    return status_line(False, text, code)


def multiline(first: bytes, lines: List[str]) -> bytes:
    """A complete multi-line response made of short text lines (LIST, UIDL, CAPA).

    The lines are ours (numbers, uids, capability names), never message
    content, but they still get byte-stuffed so the framing can't break.
    """
    body = "".join(
        ("." + line if line.startswith(".") else line) + "\r\n" for line in lines
    )
    return first + body.encode("utf-8") + TERMINATOR


class Stuffer:
    """Streaming converter from stored message bytes to POP3 wire bytes.

    RFC 1939 section 3: lines end in CRLF and a line starting with "." gets
    an extra "." prepended.  Stored messages may use LF or CRLF line endings
    (mixed is fine); bare CR is passed through.  The state carried between
    chunks is exactly the two facts that span a boundary: a CR held back in
    case the next chunk starts with LF, and whether the output so far ends at
    a line start.  Work per chunk is a handful of ``bytes.replace`` calls,
    never a Python loop over lines.

    ``octets`` counts what went out before byte-stuffing, the measure of
    :attr:`pop3frame.MessageInfo.size` (:func:`wire_size` of the bytes fed):
    the length of each chunk once its line ends are CRLF, taken before the
    dots are doubled, plus the line end :meth:`finish` adds.  Counting here,
    where the converted chunk is at hand, costs one addition per chunk.

    ``dot_lines=False`` says no line of the message starts with "."
    (:attr:`pop3frame.MessageInfo.dot_lines`): the search for lines to
    stuff, two thirds of the work on prose that has a "." on most lines, is
    skipped.
    """

    __slots__ = ("_held_cr", "_at_line_start", "octets", "_dots")

    def __init__(self, dot_lines: Optional[bool] = None) -> None:
        self._held_cr = False
        self._at_line_start = True
        self.octets = 0
        self._dots = dot_lines is not False

    def feed(self, chunk: bytes) -> bytes:
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if not chunk:
            return b""
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
            if not chunk:
                return b""
        # Single-byte tests run at memchr speed; two-byte searches are several
        # times slower, so they only run when a cheap test says they must.
        # find(), not ``in``: CPython 3.11's bytes ``in`` first tries the
        # operand as an integer and raises and clears a TypeError.
        if chunk.find(b"\r") < 0:
            chunk = chunk.replace(b"\n", CRLF)  # LF-only storage (Maildir)
        elif chunk.count(b"\n") != chunk.count(CRLF):
            chunk = chunk.replace(CRLF, b"\n").replace(b"\n", CRLF)  # mixed
        # else: already CRLF throughout; send as is, no copy.
        self.octets += len(chunk)
        if self._dots:
            if chunk.find(b".") >= 0 and chunk.find(b"\n.") >= 0:
                chunk = chunk.replace(b"\n.", b"\n..")
            if self._at_line_start and chunk.startswith(b"."):
                chunk = b"." + chunk
        self._at_line_start = chunk.endswith(b"\n")
        return chunk

    def finish(self) -> bytes:
        """Close the message: end its last line if needed, then ``.CRLF``."""
        if self._at_line_start and not self._held_cr:
            return TERMINATOR
        # The last line has no end yet (or ends in a lone CR, which stands
        # for it): CRLF closes it.
        self._held_cr = False
        self._at_line_start = True
        self.octets += 2
        return CRLF + TERMINATOR


def stuff(data: bytes) -> bytes:
    """Whole-message form of :class:`Stuffer`: wire bytes including ``.CRLF``."""
    s = Stuffer()
    return s.feed(data) + s.finish()


def plural(n: int, noun: str) -> str:
    """``1 message``, ``2 messages``: a count and its noun, for replies and logs."""
    return "%d %s%s" % (n, noun, "" if n == 1 else "s")


def wire_size(data: bytes) -> int:
    """Size in octets of ``data`` as POP3 transmits it, before byte-stuffing.

    RFC 1939 section 11: sizes reported by STAT/LIST count CRLF line endings.
    A missing final line end counts as the CRLF the server adds.
    """
    n = len(data) + data.count(b"\n") - data.count(CRLF)
    if data and not data.endswith(b"\n"):
        n += 2 if not data.endswith(b"\r") else 1
    return n


def has_dot_lines(data: bytes) -> bool:
    """Whether a line of ``data`` starts with "." (RETR must byte-stuff it)."""
    return data[:1] == b"." or data.find(b"\n.") >= 0


class Measure:
    """:func:`wire_size` and :func:`has_dot_lines` of a message fed in pieces, split anywhere."""

    __slots__ = ("_octets", "_newlines", "_crlfs", "_last", "dot_lines")

    def __init__(self) -> None:
        self._octets = self._newlines = self._crlfs = 0
        self._last = b"\n"  # the first line starts at offset 0
        #: Whether a line fed so far starts with ".".
        self.dot_lines = False

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        last = self._last
        self._octets += len(chunk)
        self._newlines += chunk.count(b"\n")
        self._crlfs += chunk.count(CRLF) + (last == b"\r" and chunk[:1] == b"\n")
        if not self.dot_lines:
            self.dot_lines = (last == b"\n" and chunk[:1] == b".") or chunk.find(b"\n.") >= 0
        self._last = chunk[-1:]

    @property
    def size(self) -> int:
        """:func:`wire_size` of what was fed."""
        n = self._octets + self._newlines - self._crlfs
        if self._octets and self._last != b"\n":
            n += 1 if self._last == b"\r" else 2
        return n


def measure_stream(stream: BinaryIO, chunk_size: int = CHUNK_SIZE) -> Tuple[int, bool]:
    """(:func:`wire_size`, :func:`has_dot_lines`) of a stream read in chunks (bounded memory)."""
    measure = Measure()
    read = stream.read
    while True:
        chunk = read(chunk_size)
        if not chunk:
            return measure.size, measure.dot_lines
        measure.feed(chunk)


def stream_wire_size(stream: BinaryIO, chunk_size: int = CHUNK_SIZE) -> int:
    """:func:`wire_size` of a stream read in chunks (bounded memory)."""
    return measure_stream(stream, chunk_size)[0]


class SizeMismatch(Exception):
    """A message stream was not as long as the size announced for it.

    Raised by :func:`iter_message` *instead of* the terminating ``.CRLF``:
    a client that saw ``+OK n octets`` and a terminator trusts it has the
    whole message, so a short or overlong one must end without it.
    """

    def __init__(self, announced: int, sent: int, ended: bool) -> None:
        super().__init__("the message %s after %d octets where %d were announced" % (
            "ended" if ended else "ran past its size", sent, announced))
        self.announced = announced
        self.sent = sent


class MessageChanged(Exception):
    """A message file was written while RETR read it (see :class:`CheckedFile`).

    Like :class:`SizeMismatch`, raised instead of the terminator: what went
    out may mix two versions of the message.
    """


def file_version(st: os.stat_result) -> Tuple[int, int, int, int]:
    """What a write to a file changes: (device, inode, size, mtime in ns).

    A write sets the mtime before it copies its data, so a read that got any
    of the new bytes is followed by an fstat() that shows the new mtime.
    """
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class CheckedFile:
    """A message file read only while it stays the version it was opened as.

    ``file``: a binary file object on a regular file; ``st``: its
    ``os.fstat()`` as checked by whoever opened it (by default, taken now).
    Every :meth:`read` that returns bytes is followed by an ``fstat()``
    (one system call per chunk): if a program wrote to the file meanwhile
    (mail readers and report generators rewrite files in place), it raises
    :class:`MessageChanged` before those bytes go anywhere, so neither a mix
    of two versions nor a line starting with "." that the store said was not
    there (:attr:`pop3frame.MessageInfo.dot_lines`) reaches the client.

    ``sendfile``: whether RETR may send the file with ``sendfile()`` (see
    :func:`iter_message`).  Those bytes leave unread, so a write during the
    send is noticed only after the piece (CHUNK_SIZE) being sent, whose
    changed bytes went out unstuffed: only for files nobody rewrites in
    place (Maildir's).  Through TLS the file is read, and checked, piece by
    piece.
    """

    __slots__ = ("file", "sendfile", "_version")

    def __init__(self, file: BinaryIO, st: Optional[os.stat_result] = None, *, sendfile: bool = True) -> None:
        self.file = file
        self.sendfile = sendfile
        self._version = file_version(st if st is not None else os.fstat(file.fileno()))

    def changed(self) -> bool:
        """Whether the file was written since it was opened."""
        return file_version(os.fstat(self.file.fileno())) != self._version

    def check(self) -> None:
        """Raise :class:`MessageChanged` if the file was written since it was opened."""
        if self.changed():
            raise MessageChanged("the message file was written to while it was sent")

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        if data:
            self.check()
        return data

    def fileno(self) -> int:
        return self.file.fileno()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "CheckedFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def checked(stream: BinaryIO) -> BinaryIO:
    """``stream`` as a :class:`CheckedFile` if it is a regular file, else as it is."""
    if isinstance(stream, CheckedFile):
        return stream
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return stream
    return CheckedFile(stream, st) if stat.S_ISREG(st.st_mode) else stream


class FileSpan:
    """A part of a reply that goes out straight from a file: ``count`` octets
    of ``file`` from ``offset``.

    Whoever sends it (the connection handler, with ``sendfile()`` where the
    socket allows) sets ``sent`` to the octets that went out: fewer than
    ``count`` when the file ended first, or was written to (it stops at the
    next piece).
    """

    __slots__ = ("file", "offset", "count", "sent")

    def __init__(self, file: CheckedFile, offset: int, count: int) -> None:
        self.file = file
        self.offset = offset
        self.count = count
        self.sent = 0


#: Below this a message stored in wire form is read and sent like any other:
#: one read() and one send() cost less than the fstat(), send() and
#: sendfile() around a FileSpan.
SENDFILE_MIN = 64 * 1024

Chunk = Union[bytes, FileSpan]


def iter_message(stream: BinaryIO, size: Optional[int] = None, chunk_size: int = CHUNK_SIZE,
                 dot_lines: Optional[bool] = None) -> Iterator[Chunk]:
    """Wire bytes of a whole message read from ``stream`` (RETR).

    With ``size`` (the octets announced, before byte-stuffing), raises
    :class:`SizeMismatch` as soon as the stream runs past it, before the
    chunk that does is yielded, or when it ends short of it, in place of
    the terminator.

    A regular file is read as a :class:`CheckedFile` (unless it is one
    already): a write to it while it is read raises :class:`MessageChanged`
    before the bytes read after it are sent.

    ``dot_lines=False`` (no line starts with ".") skips the search for lines
    to stuff; and when ``stream`` is a regular file whose stored length from
    here is ``size`` (so its line ends are CRLF already, the last included:
    then :func:`wire_size` adds nothing), what it holds is what goes out: the
    message is one :class:`FileSpan`, sent without passing through Python,
    then the terminator, if all of it went, a read at its end (where the
    stream may check the message did not change meanwhile) finds nothing
    more, and the file was not written meanwhile.
    """
    stream = checked(stream)
    if dot_lines is False and size is not None and size >= SENDFILE_MIN:
        span = _wire_form(stream, size)
        if span is not None:
            yield span
            if span.sent != size:
                stream.check()  # stopped early because it was written to?
                raise SizeMismatch(size, span.sent, ended=True)
            # The read to the end that sendfile() spared: a stream may check
            # there that the message did not change while it was sent (see
            # AdapterBase.open_message), and a longer file ran past its size.
            stream.seek(span.offset + span.count)
            if stream.read(1):
                raise SizeMismatch(size, size + 1, ended=False)
            stream.check()
            yield TERMINATOR
            return
    s = Stuffer(dot_lines)
    read = stream.read
    while True:
        chunk = read(chunk_size)
        if not chunk:
            break
        out = s.feed(chunk)
        if size is not None and s.octets > size:
            raise SizeMismatch(size, s.octets, ended=False)
        if out:
            yield out
    end = s.finish()
    if size is not None and s.octets != size:
        raise SizeMismatch(size, s.octets, ended=True)
    yield end


def _wire_form(stream: BinaryIO, size: int) -> Optional[FileSpan]:
    """The rest of ``stream`` as a FileSpan, if it is a regular file of ``size`` more octets
    that may be sent with ``sendfile()``."""
    if not isinstance(stream, CheckedFile) or not stream.sendfile:
        return None
    try:
        fd = stream.fileno()
        st = os.fstat(fd)
        offset = stream.tell()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size - offset != size:
        return None
    return FileSpan(stream, offset, size)


#: Longest line TOP keeps whole; a longer one is streamed in pieces.
_TOP_LINE_PIECE = 64 * 1024


def iter_top(stream: BinaryIO, body_lines: int) -> Iterator[bytes]:
    """Wire bytes of the header, the blank line and ``body_lines`` body lines (TOP).

    RFC 1939 section 7: TOP n 0 sends the headers and the separating blank
    line.  Reading stops as soon as enough lines went out, so TOP of a huge
    message reads only its beginning.  TOP is not a hot path, so a per-line
    loop is acceptable here.
    """
    s = Stuffer()
    in_headers = True
    remaining = body_lines
    line_start = True
    while in_headers or remaining > 0:
        piece = stream.readline(_TOP_LINE_PIECE)
        if not piece:
            break
        yield s.feed(piece)
        complete = piece.endswith(b"\n")
        if complete:
            if in_headers:
                in_headers = not (line_start and piece in (b"\n", b"\r\n"))
            else:
                remaining -= 1
        line_start = complete
    yield s.finish()


_UID_CHARS = re.compile(r"[\x21-\x7e]{1,70}\Z")


def valid_uid(uid: str) -> bool:
    """RFC 1939 section 7: a unique-id is 1 to 70 characters in 0x21..0x7E."""
    return bool(_UID_CHARS.match(uid))
