"""``pop3frame client HOST:PORT``: talk to a POP3 server by hand, or check it after a deploy.

Where telnet stops -- TLS -- this goes on: ``--tls`` for POP3S (RFC 8314),
``--starttls`` to send STLS first (RFC 2595); certificates are verified
against the system's CAs (or ``--cafile``) and the host name unless
``--insecure``, and shown after the handshake either way.

Without ``--check`` it is a line client: at a terminal with a prompt and
readline history, in a pipeline reading commands from standard input.
Standard output carries exactly the bytes the server sent -- greeting,
replies, multi-line replies as they arrive, byte-stuffed as on the wire
and with their final ``.`` -- because a person testing a server wants to
see what it sent, stuffing included.  Only on a terminal are control
characters and bytes that are not UTF-8 shown as ``\\xNN``: a server must
not drive the terminal.  The client's own notes go to standard error as
``* ...`` lines.

``--check USER`` is the smoke test after a deploy: CAPA, (STLS, CAPA,)
login, STAT, UIDL, QUIT, then one line, ``OK: ...`` on standard output or
``FAIL: ...`` on standard error.  The password comes from ``POP3_PASSWORD``,
a prompt, or standard input -- never from the command line, where every
user of the machine can read it.

Every reply must arrive whole within ``--timeout`` seconds and is read in
bounded memory, so no server -- silent, endless or hostile -- holds the
client.  Exit status: :data:`EXIT_OK`, :data:`EXIT_REFUSED` (a ``-ERR`` or
a wrong answer), :data:`EXIT_FAILED` (no usable conversation).
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import getpass
import math
import os
import re
import socket
import ssl
import sys
import time
from typing import BinaryIO, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

from . import x509
from .configfile import format_address
from .handler import TIMEOUTS, Connection
from .protocol import CRLF, valid_uid

__all__ = [
    "ClientConnection", "ClientError", "CheckFailed", "Output", "TLSInfo",
    "add_parser", "check", "converse", "multiline", "tls_context", "visible",
]

EXIT_OK, EXIT_REFUSED, EXIT_FAILED = 0, 1, 2
DEFAULT_TIMEOUT = 30.0
#: Longest status line accepted, and the piece size in which longer lines
#: of a multi-line reply are passed on: memory stays bounded by it.
MAX_LINE = 64 * 1024
RECV_SIZE = 64 * 1024
PASSWORD_VARIABLE = "POP3_PASSWORD"
PROMPT = "pop3> "
HISTORY_LENGTH = 1000

#: Commands whose ``+OK`` reply is multi-line whatever their arguments:
#: RFC 1939 sections 5 and 7 (RETR, TOP), RFC 2449 section 5 (CAPA).
MULTILINE_ALWAYS = frozenset({b"RETR", b"TOP", b"CAPA"})
#: ... and those whose reply is multi-line only without an argument: RFC 1939
#: sections 5 and 7 (LIST, UIDL), RFC 6856 section 3 (LANG); AUTH without a
#: mechanism lists the mechanisms in Dovecot, Exchange and pop3frame (no RFC
#: defines it; RFC 5034 section 4 requires the mechanism).
MULTILINE_BARE = frozenset({b"LIST", b"UIDL", b"LANG", b"AUTH"})


class ClientError(Exception):
    """No usable conversation: connection, timeout, TLS, a reply that breaks POP3 (exit 2)."""

    exit_status = EXIT_FAILED


class CheckFailed(ClientError):
    """The server answered, but with ``-ERR`` or not as a working server must (exit 1)."""

    exit_status = EXIT_REFUSED


def multiline(command: bytes) -> bool:
    """Whether a ``+OK`` reply to the command line ``command`` is multi-line."""
    words = command.split()
    if not words:
        return False
    name = words[0].upper()
    return name in MULTILINE_ALWAYS or (name in MULTILINE_BARE and len(words) == 1)


def _kind(status: bytes) -> str:
    """``+OK``, ``-ERR`` or ``+`` (a SASL continuation, RFC 5034 section 4)."""
    if status.startswith(b"+OK"):
        return "+OK"
    if status.startswith(b"-ERR"):
        return "-ERR"
    if status.rstrip(b"\r\n") == b"+" or status.startswith(b"+ "):
        return "+"
    raise ClientError("not a POP3 reply (neither +OK nor -ERR): %s" % _text(status))


def _text(line: bytes, limit: int = 200) -> str:
    """A server line for a one-line message: decoded, shortened, harmless."""
    text = visible(line.rstrip(b"\r\n")).decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "..."


def _plural(n: int, noun: str) -> str:
    return "%s %s%s" % (format(n, ","), noun, "" if n == 1 else "s")


# -- TLS --------------------------------------------------------------------------


def tls_context(cafile: Optional[str] = None, insecure: bool = False) -> ssl.SSLContext:
    """The client context: the chain checked against the system's CAs (or
    ``cafile``'s) and the host name against the certificate (RFC 7817, which
    replaced RFC 2595 section 2.4), TLS 1.2 or newer; ``insecure`` accepts
    any certificate.

    Raises :class:`ClientError` if ``cafile`` cannot be loaded.
    """
    try:
        context = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ClientError("cannot load --cafile %s: %s" % (cafile, _reason(exc))) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__


class TLSInfo(NamedTuple):
    """What a handshake established."""

    #: ``TLS 1.3``
    version: str
    cipher: str
    #: The chain and the host name were checked (not ``--insecure``).
    verified: bool
    #: None if the server's certificate could not be decoded.
    certificate: Optional[x509.Certificate]

    def expiry(self, now: float) -> str:
        """``2027-01-01 (in 31 days)``, ``2020-01-01 (EXPIRED)``."""
        if self.certificate is None:
            return "unknown"
        not_after = self.certificate.not_after
        left = not_after.timestamp() - now
        when = "in %s" % _plural(math.floor(left / 86400), "day") if left >= 0 else "EXPIRED"
        return "%s (%s)" % (not_after.strftime("%Y-%m-%d"), when)

    def notes(self, name: str, now: float) -> List[str]:
        """The lines shown after a handshake."""
        trust = "certificate verified for %s" % name if self.verified else "certificate NOT verified (--insecure)"
        out = ["%s (%s), %s" % (self.version, self.cipher, trust)]
        cert = self.certificate
        if cert is None:
            return out + ["certificate: not readable"]
        # A certificate may carry thousands of names or a 60 KB subject: shown shortened.
        out.append("subject: %s" % (_text(cert.subject.encode("utf-8")) or "(empty)"))
        if cert.names:
            names = _text(", ".join(cert.names).encode("utf-8"))
            cut = names.endswith("...") and len(cert.names) > 1
            out.append("names: %s" % ("%s (%s)" % (names, _plural(len(cert.names), "name")) if cut else names))
        out.append("issuer: %s" % _text(cert.issuer.encode("utf-8")))
        out.append("expires: %s" % self.expiry(now))
        return out

    def verdict(self, now: float) -> str:
        """``TLS 1.3, certificate expires 2027-01-01 (in 31 days)``."""
        out = "%s, certificate expires %s" % (self.version, self.expiry(now))
        return out if self.verified else out + ", certificate NOT verified (--insecure)"


# -- the connection ----------------------------------------------------------------


class ClientConnection(Connection):
    """The client's end of one POP3 connection, every reply bounded in time and memory.

    The greeting, and the reply to each command sent, must arrive whole
    within ``timeout`` seconds by ``clock`` (a silent server and an endless
    one alike end with :class:`ClientError`); a line longer than
    :data:`MAX_LINE` is passed on in pieces, a status line that long is
    refused.  Every failure is a :class:`ClientError` with a one-line
    reason; the socket is closed by :meth:`close` (or ``with``).  Not
    thread-safe.
    """

    def __init__(
        self,
        address: Tuple[str, int],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        tls: Optional[ssl.SSLContext] = None,
        clock: Callable[[], float] = time.monotonic,
        poll_interval: float = 1.0,
    ) -> None:
        self.address = address
        self.name = format_address(address)
        self.timeout = timeout
        #: Set once TLS is on (implicit, or after STLS).
        self.tls: Optional[TLSInfo] = None
        self._received = False
        try:
            sock = socket.create_connection(address, timeout=timeout)
        except socket.timeout:
            raise ClientError("cannot connect to %s: no answer within %g s" % (self.name, timeout)) from None
        except OSError as exc:
            raise ClientError("cannot connect to %s: %s" % (self.name, _reason(exc))) from None
        super().__init__(sock, clock, poll_interval, send_timeout=timeout)
        try:
            if tls is not None:
                self._handshake(tls)
        except BaseException:
            self.close()
            raise
        self.deadline = clock() + timeout

    def __enter__(self) -> "ClientConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # -- TLS

    def _handshake(self, context: ssl.SSLContext) -> None:
        host = self.address[0]
        tls = context.wrap_socket(self.sock, server_hostname=host, do_handshake_on_connect=False)
        self.use_socket(tls)  # so that close() closes it, whatever happens next
        try:
            self.handshake(tls, self.timeout)
        except ssl.SSLCertVerificationError as exc:
            raise ClientError("the certificate of %s is not accepted: %s (--cafile FILE trusts a private CA,"
                              " --insecure any certificate)" % (self.name, exc.verify_message)) from None
        except ssl.SSLError as exc:
            # After STLS the server said +OK and then sent something else: no hint fits.
            hint = (" (no TLS on this port? a plain POP3 port takes --starttls)"
                    if exc.reason == "WRONG_VERSION_NUMBER" and not self._received else "")
            raise ClientError("TLS handshake with %s failed: %s%s" % (self.name, _reason(exc), hint)) from None
        except socket.timeout:
            raise ClientError("TLS handshake with %s did not finish within %g s" % (self.name, self.timeout)) from None
        except OSError as exc:
            raise ClientError("connection to %s lost in the TLS handshake: %s" % (self.name, _reason(exc))) from None
        der = tls.getpeercert(binary_form=True)
        try:
            certificate = x509.decode(der) if der else None
        except ValueError:
            certificate = None
        version = (tls.version() or "TLS").replace("TLSv", "TLS ")
        self.tls = TLSInfo(version, tls.cipher()[0], context.verify_mode == ssl.CERT_REQUIRED, certificate)

    def starttls(self, context: ssl.SSLContext) -> None:
        """Go on inside TLS after the server's ``+OK`` to STLS (RFC 2595 section 4)."""
        if self._in:
            # What arrived after the +OK came in clear text, so anyone on the
            # path could have put it there to be read as if it came through
            # TLS (the STARTTLS response injection of CVE-2011-0411's family).
            raise ClientError("%s sent data after its STLS reply, before TLS: refusing it" % self.name)
        self._handshake(context)

    # -- lines out, replies in

    def send(self, line: bytes) -> None:
        """Send one command line (CRLF added); its reply is due ``timeout`` seconds from now."""
        self.deadline = self.clock() + self.timeout
        try:
            self.write(line + CRLF)
            self.flush()
        except socket.timeout:
            raise ClientError("%s stopped reading: a command could not be sent within %g s"
                              % (self.name, self.timeout)) from None
        except OSError as exc:
            raise ClientError("connection to %s lost: %s" % (self.name, _reason(exc))) from None

    def reply_line(self) -> bytes:
        """The next status line (greeting, ``+OK``, ``-ERR``, ``+ ``), with its line end."""
        while True:
            end = self._in.find(b"\n")
            if end >= 0:
                line, self._in = self._in[: end + 1], self._in[end + 1:]
                return line
            if len(self._in) > MAX_LINE:
                raise ClientError("%s sent a reply line longer than %d octets" % (self.name, MAX_LINE))
            self._fill()

    def body(self) -> Iterator[bytes]:
        """The rest of a multi-line reply, as it arrives, verbatim up to and
        including the terminating ``.CRLF`` (RFC 1939 section 3).

        Yields blocks of whole lines; a line longer than :data:`MAX_LINE` comes
        in pieces of about that size.
        """
        # RFC 1939 section 3: lines end with CRLF, so a "." after a bare LF
        # ends nothing, whether the bytes before it came in the same read.
        passed = b"\r\n"  # the last two octets passed on (the status line's end)
        while True:
            data = self._in
            end = 3 if passed == b"\r\n" and data.startswith(b".\r\n") else -1
            if end < 0:
                found = data.find(b"\r\n.\r\n")
                end = found + 5 if found >= 0 else -1
            if end >= 0:
                self._in = data[end:]
                yield data[:end]
                return
            cut = data.rfind(b"\n") + 1
            if not cut and len(data) > MAX_LINE:
                # A huge line: pass it on, but keep what may begin "\r\n.\r\n".
                cut = len(data) - 4
            if cut:
                self._in = data[cut:]
                passed = (passed + data[max(cut - 2, 0):cut])[-2:]
                yield data[:cut]
            self._fill()

    def _fill(self) -> None:
        """Receive more of the current reply, by its deadline."""
        for wait in self.tries(self.deadline):
            self._set_timeout(wait)
            try:
                data = self.sock.recv(RECV_SIZE)
            except TIMEOUTS:
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""
            except ssl.SSLError as exc:
                raise ClientError("TLS error on the connection to %s: %s" % (self.name, _reason(exc))) from None
            except OSError as exc:
                raise ClientError("connection to %s lost: %s" % (self.name, _reason(exc))) from None
            if not data:
                raise ClientError("%s closed the connection%s"
                                  % (self.name, " in the middle of a reply" if self._in else ""))
            self._received = True
            self._in += data
            return
        hint = " (a POP3S port? then use --tls)" if self.tls is None and not self._received else ""
        raise ClientError("no complete reply from %s within %g s%s" % (self.name, self.timeout, hint))


# -- showing the conversation ------------------------------------------------------

#: What a server must not send to a terminal: the C0 controls but tab and line
#: ends, a CR that ends no line, DEL, the C1 controls (U+009B is a CSI to many
#: terminals), and the bidirectional controls of Unicode's UAX #9 (marks,
#: embeddings, overrides, isolates), which reorder the text shown around them.
_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
                       "|\r(?!\n)")


def visible(data: bytes) -> bytes:
    """``data`` made safe for a terminal: the bytes of each control character,
    and bytes that are not UTF-8 (a lone 0x9B is a CSI to an 8-bit terminal),
    shown as ``\\xNN``."""
    text = data.decode("utf-8", "backslashreplace")
    return _CONTROLS.sub(lambda m: "".join("\\x%02x" % c for c in m.group().encode("utf-8")), text).encode("utf-8")


class Output:
    """Where a conversation is shown: the server's bytes on ``stdout`` -- verbatim,
    or through :func:`visible` when it is a terminal -- and notes on ``stderr``."""

    def __init__(self, stdout: BinaryIO, stderr: BinaryIO, terminal: bool) -> None:
        self.stdout, self.stderr, self.terminal = stdout, stderr, terminal

    def server(self, data: bytes) -> None:
        self.stdout.write(visible(data) if self.terminal else data)
        self.stdout.flush()

    def note(self, text: str) -> None:
        self.stderr.write(visible(("* %s\n" % text).encode("utf-8", "replace")))
        self.stderr.flush()


def _ask_password(prompt: str) -> str:
    """Asked without echo; Ctrl-D gives an empty answer, not a traceback."""
    try:
        return getpass.getpass(prompt)
    except EOFError:
        return ""


class Terminal:
    """Commands typed at a terminal: a prompt, line editing and a history
    file, when this Python has ``readline`` (without it, plain ``input()``).
    ``PASS`` alone asks for the password without echo."""

    def __init__(self, history: str, prompt: str = PROMPT) -> None:
        try:
            import readline
        except ImportError:
            readline = None  # type: ignore[assignment]
        self._readline = readline
        self._history = history
        self._prompt = prompt
        if readline is not None:
            with contextlib.suppress(OSError):
                readline.read_history_file(history)

    def read(self) -> Optional[bytes]:
        try:
            line = input(self._prompt)
        except EOFError:
            if self._prompt:
                sys.stdout.write("\n")  # the shell's prompt starts on a line of its own
            return None
        if line.strip().upper() == "PASS":
            line = "PASS " + _ask_password("Password: ")
        return line.encode("utf-8", "surrogateescape")

    def forget(self) -> None:
        """Drop the line just read from the history: it carried a secret."""
        if self._readline is not None:
            length = self._readline.get_current_history_length()
            if length:
                self._readline.remove_history_item(length - 1)

    def close(self) -> None:
        """Save the history; a home that cannot take it costs the history only."""
        if self._readline is None:
            return
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(self._history), mode=0o700, exist_ok=True)
            os.close(os.open(self._history, os.O_WRONLY | os.O_CREAT, 0o600))
            self._readline.set_history_length(HISTORY_LENGTH)
            self._readline.write_history_file(self._history)


class Lines:
    """Commands from a stream (a pipeline): no prompt, no history."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def read(self) -> Optional[bytes]:
        line = self._stream.readline()
        return line.rstrip(b"\r\n") if line else None

    def forget(self) -> None:
        pass

    def close(self) -> None:
        pass


def history_path() -> str:
    """``$XDG_STATE_HOME/pop3frame/client_history`` (default ``~/.local/state``)."""
    state = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state):  # the XDG spec: a relative path is to be ignored
        state = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "pop3frame", "client_history")


def _starttls(conn: ClientConnection, context: ssl.SSLContext, show: Callable[[bytes], None]) -> None:
    conn.send(b"STLS")
    status = conn.reply_line()
    show(status)
    if _kind(status) != "+OK":
        raise CheckFailed("%s refused STLS: %s" % (conn.name, _text(status)))
    conn.starttls(context)


def converse(conn: ClientConnection, commands: Union[Terminal, Lines], out: Output, *, context: ssl.SSLContext,
             starttls: bool = False, clock: Callable[[], float] = time.time) -> int:
    """Show the greeting, then send each command line and show its reply as it arrives.

    ``commands`` is a :class:`Terminal` or :class:`Lines`.  Ends after QUIT,
    or at the end of the input without QUIT (so the server deletes
    nothing).  STLS, from ``starttls`` or typed, continues inside TLS with
    ``context``.  Returns :data:`EXIT_OK`, or :data:`EXIT_REFUSED` if a reply
    was ``-ERR``; raises :class:`ClientError`.
    """
    def show_tls() -> None:
        for note in conn.tls.notes(conn.address[0], clock()):
            out.note(note)

    if conn.tls is not None:
        show_tls()
    greeting = conn.reply_line()
    out.server(greeting)
    if _kind(greeting) != "+OK":
        return EXIT_REFUSED
    if starttls:
        _starttls(conn, context, out.server)
        show_tls()
    refused = False
    challenged = False  # the last reply was a SASL challenge: the next line answers it
    while True:
        line = commands.read()
        if line is None:
            return EXIT_REFUSED if refused else EXIT_OK
        words = line.split()
        if not words:
            continue
        name = b"" if challenged else words[0].upper()
        if challenged or name == b"PASS" or (name == b"AUTH" and len(words) > 2):
            commands.forget()  # a password, or SASL credentials: not for the history file
        conn.send(line)
        status = conn.reply_line()
        out.server(status)
        kind = _kind(status)
        if kind == "+OK" and not challenged and multiline(line):
            for block in conn.body():
                out.server(block)
        refused = refused or kind == "-ERR"
        challenged = kind == "+"
        if name == b"STLS" and kind == "+OK":
            conn.starttls(context)
            show_tls()
        elif name == b"QUIT" and kind != "+":
            return EXIT_REFUSED if refused else EXIT_OK


# -- --check -----------------------------------------------------------------------


#: A count or size in a reply: ASCII digits only, and few enough that int()
#: takes them (Python refuses strings of over 4,300 digits) in no time.
_NUMBER = re.compile(rb"[0-9]{1,18}")


def _command(conn: ClientConnection, line: bytes, what: str) -> bytes:
    """Send ``line``; its ``+OK`` status line, or :class:`CheckFailed` naming ``what``."""
    conn.send(line)
    status = conn.reply_line()
    if _kind(status) != "+OK":
        raise CheckFailed("%s refused: %s" % (what, _text(status)))
    return status


def _listing(conn: ClientConnection, what: str) -> Iterator[bytes]:
    """The lines of a multi-line reply without line ends and terminator."""
    for block in conn.body():
        if not block.endswith(b"\n"):
            raise CheckFailed("%s: a line longer than %d octets" % (what, MAX_LINE))
        for line in block.split(b"\n")[:-1]:
            line = line.rstrip(b"\r")
            if line != b".":
                yield line


def _capabilities(conn: ClientConnection) -> Optional[Dict[str, List[str]]]:
    """CAPA as {NAME: arguments}, or None from a server without CAPA (RFC 1939 only)."""
    conn.send(b"CAPA")
    if _kind(conn.reply_line()) != "+OK":
        return None
    caps = {}
    for line in _listing(conn, "CAPA"):
        words = line.decode("utf-8", "replace").split()
        if words:
            # RFC 2449 section 5: capability names are case-insensitive.
            caps[words[0].upper()] = [w.upper() for w in words[1:]]
    return caps


def _login(conn: ClientConnection, caps: Optional[Dict[str, List[str]]], user: str, password: str) -> None:
    what = "login as %s" % user
    if caps is not None and "UTF8" in caps and not (user + password).isascii():
        # RFC 6856 section 2: UTF-8 user names and passwords after UTF8.
        _command(conn, b"UTF8", "UTF8")
    if caps is None or "USER" in caps:
        _command(conn, b"USER " + user.encode("utf-8"), what)
        _command(conn, b"PASS " + password.encode("utf-8"), what)
    elif "PLAIN" in caps.get("SASL", []):
        # RFC 5034 section 4 with RFC 4616: the credentials answer the empty challenge.
        conn.send(b"AUTH PLAIN")
        status = conn.reply_line()
        if _kind(status) != "+":
            raise CheckFailed("AUTH PLAIN refused: %s" % _text(status))
        conn.send(base64.b64encode(("\0%s\0%s" % (user, password)).encode("utf-8")))
        status = conn.reply_line()
        if _kind(status) != "+OK":
            raise CheckFailed("%s refused: %s" % (what, _text(status)))
    else:
        hint = "; passwords may need TLS: try --starttls or --tls" if conn.tls is None else ""
        raise CheckFailed("%s offers no password login (neither USER nor SASL PLAIN in CAPA)%s" % (conn.name, hint))


def check(conn: ClientConnection, user: str, password: str, *, starttls: Optional[ssl.SSLContext] = None,
          clock: Callable[[], float] = time.time, warn: Callable[[str], None] = lambda text: None) -> str:
    """Greeting, CAPA, (STLS and CAPA again,) login, STAT, UIDL, QUIT.

    Returns the verdict, ``OK: logged in as alice, 3 messages, 1,234
    octets, TLS 1.3, certificate expires 2027-01-01 (in 31 days)``; raises
    :class:`CheckFailed` (exit 1) or :class:`ClientError` (exit 2) with the
    reason.  Nothing is deleted.  ``warn`` is told, before the login, when
    the password goes unencrypted to a server that offers STLS.
    """
    greeting = conn.reply_line()
    if _kind(greeting) != "+OK":
        raise CheckFailed("%s refused service: %s" % (conn.name, _text(greeting)))
    caps = _capabilities(conn)
    if starttls is not None:
        if caps is not None and "STLS" not in caps:
            raise CheckFailed("%s does not offer STLS (not in CAPA)" % conn.name)
        _starttls(conn, starttls, lambda status: None)
        # RFC 2595 section 4: what came before TLS may have been forged; ask again.
        caps = _capabilities(conn)
    elif conn.tls is None and caps is not None and "STLS" in caps:
        # Without TLS asked for, the password goes as the user said; but a
        # forgotten --starttls must not pass unnoticed.
        warn("warning: %s offers STLS, yet the password goes unencrypted (--starttls sends it inside TLS)"
             % conn.name)
    _login(conn, caps, user, password)
    stat = _command(conn, b"STAT", "STAT").split()
    if len(stat) < 3 or not _NUMBER.fullmatch(stat[1]) or not _NUMBER.fullmatch(stat[2]):
        raise CheckFailed("STAT reply is not '+OK count size' (RFC 1939 section 5): %s" % _text(b" ".join(stat)))
    count, size = int(stat[1]), int(stat[2])
    _command(conn, b"UIDL", "UIDL")
    listed = 0
    for line in _listing(conn, "UIDL"):
        listed += 1
        fields = line.split(b" ")
        # RFC 1939 section 7: "n uid", the uid 1 to 70 characters 0x21..0x7E.
        if (listed > count or len(fields) != 2 or not fields[0].isdigit()
                or not valid_uid(fields[1].decode("latin-1"))):
            raise CheckFailed("UIDL line %d is wrong (STAT said %s): %s"
                              % (listed, _plural(count, "message"), _text(line)))
    if listed != count:
        raise CheckFailed("UIDL lists %s, STAT said %d" % (_plural(listed, "message"), count))
    _command(conn, b"QUIT", "QUIT")
    security = conn.tls.verdict(clock()) if conn.tls is not None else "no TLS"
    return "OK: logged in as %s, %s, %s octets, %s" % (
        _text(user.encode("utf-8")), _plural(count, "message"), format(size, ","), security)


# -- the command -------------------------------------------------------------------

EPILOG = """\
Without --check, the greeting is shown, then each line typed (at a
terminal: readline history in $XDG_STATE_HOME/pop3frame/client_history;
PASS alone asks for the password) or read from standard input is sent as a
command, and the reply shown as it arrives.  Standard output carries
exactly what the server sent: multi-line replies byte-stuffed as on the
wire, with their final "."; on a terminal, control characters (bidi ones
too) and bytes that are not UTF-8 are shown as \\xNN.  Notes on TLS and the
certificate go to standard error.  Input that ends without QUIT closes the
connection: the server deletes nothing.

--check USER logs in (the password from $POP3_PASSWORD, else asked at the
terminal, else the first line of standard input; never an argument), runs
CAPA, STAT, UIDL and QUIT, and prints one line: "OK: ..." or "FAIL: ...".
Without --tls or --starttls the password goes unencrypted; if the server
offers STLS, a warning on standard error says so first.

exit status:
  0    every reply +OK (--check: the check passed)
  1    the server answered -ERR, or wrongly (--check: a step failed)
  2    no conversation: bad arguments, connection refused, timeout,
       TLS or certificate failure, a reply that breaks POP3
  130  interrupted (Ctrl-C)
"""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError("expected seconds > 0, got %r" % text)
    return value


def add_parser(commands, address: Callable[[str], Tuple[str, int]]) -> None:
    """Add ``client`` to the CLI's subcommands; ``address`` parses HOST:PORT."""
    parser = commands.add_parser(
        "client", help="talk to a POP3 server by hand (telnet with TLS), or check it: --check USER",
        description="A POP3 line client for testing by hand, and a login check for after a deploy.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("address", type=address, metavar="HOST:PORT", help="the server ([IPV6]:PORT for IPv6)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tls", action="store_true", help="TLS from the first byte (POP3S, usually port 995; RFC 8314)")
    mode.add_argument("--starttls", action="store_true", help="send STLS first and go on inside TLS (RFC 2595)")
    trust = parser.add_mutually_exclusive_group()
    trust.add_argument("--cafile", metavar="FILE", help="trust the CA certificates in FILE (PEM), not the system's")
    trust.add_argument("--insecure", action="store_true",
                       help="accept any certificate (self-signed, other name); it is still shown")
    parser.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="for the connect, the TLS handshake and each whole reply (default %g)" % DEFAULT_TIMEOUT)
    parser.add_argument("--check", metavar="USER",
                        help="log in as USER, run CAPA, STAT, UIDL, QUIT and print a verdict")
    parser.set_defaults(func=run)


def read_password(user: str) -> str:
    """``$POP3_PASSWORD``, else asked at the terminal, else stdin's first line."""
    password = os.environ.get(PASSWORD_VARIABLE)
    if password is None:
        if sys.stdin.isatty():
            password = _ask_password("Password for %s: " % user)
        else:
            password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise ClientError("no password: set %s, or type it when asked" % PASSWORD_VARIABLE)
    return password


def run(args: argparse.Namespace) -> int:
    """``pop3frame client``: see :data:`EPILOG`."""
    terminal = sys.stdout.isatty()
    out = Output(sys.stdout.buffer, sys.stderr.buffer, terminal)
    try:
        context = tls_context(args.cafile, args.insecure)
        if args.check:
            password = read_password(args.check)
            with ClientConnection(args.address, timeout=args.timeout, tls=context if args.tls else None) as conn:
                print(check(conn, args.check, password, starttls=context if args.starttls else None,
                            warn=out.note), flush=True)
            return EXIT_OK
        commands = (Terminal(history_path(), PROMPT if terminal else "") if sys.stdin.isatty()
                    else Lines(sys.stdin.buffer))
        try:
            with ClientConnection(args.address, timeout=args.timeout, tls=context if args.tls else None) as conn:
                return converse(conn, commands, out, context=context, starttls=args.starttls)
        finally:
            commands.close()
    except ClientError as exc:
        with contextlib.suppress(OSError):
            sys.stdout.flush()
        print(("FAIL: %s" if args.check else "pop3frame: client: %s") % exc, file=sys.stderr)
        return exc.exit_status
    except BrokenPipeError:
        # The reader went away (| head): no traceback, and none at exit either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as exc:
        # Not the server: this side's own input or output failed (a full
        # disk, /dev/full, a terminal gone).  A traceback exited 1, which
        # says the server refused.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("pop3frame: client: cannot go on: %s" % _reason(exc), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        if terminal:
            sys.stdout.write("\n")
        return 130
