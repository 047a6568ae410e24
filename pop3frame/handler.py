"""Socket I/O for one connection: read bounded lines, write buffered replies.

The handler knows nothing of POP3 beyond "a command is a line"; it feeds
lines to a :class:`~pop3frame.session.Session` and writes back what the
session returns.  It owns every resource of the connection and releases
them on every path: the session's lock through ``Session.finish()``, open
message streams through generator ``close()``, the socket through
socketserver's ``shutdown_request``.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import socketserver
import ssl
import struct
from typing import TYPE_CHECKING, Callable, Iterator, Optional

from .protocol import CHUNK_SIZE, FileSpan
from .session import Reply, Session

if TYPE_CHECKING:
    from .server import POP3Server

__all__ = ["POP3Handler", "Connection", "LineTooLong", "TimedOut", "ReplyFailed"]

logger = logging.getLogger("pop3frame.handler")

#: A line longer than this, with no LF in sight, ends the connection: bytes
#: are discarded while a too-long line is skipped, but not forever.
MAX_DISCARD = 64 * 1024
#: recv() size: plenty for a pipelined burst of commands.
RECV_SIZE = 16 * 1024
#: What a recv() or send() that waited its timeout out raises: socket.timeout
#: on TLS sockets, BlockingIOError (EAGAIN) on plain ones (kernel timeouts).
TIMEOUTS = (socket.timeout, BlockingIOError)
#: Replies smaller than this are gathered before a send; bigger ones go out.
WRITE_BUFFER = 64 * 1024
#: send() flag: more data follows at once, so no packet for this part alone (Linux).
_MSG_MORE = getattr(socket, "MSG_MORE", 0)
#: Most buffers one sendmsg() takes (Linux's UIO_MAXIOV); more are joined.
_IOV_MAX = 1024


def kernel_timeval(seconds: float) -> bytes:
    """``seconds`` as the struct timeval SO_RCVTIMEO and SO_SNDTIMEO take."""
    whole = int(seconds)
    micro = int((seconds - whole) * 1e6)
    # A zero timeval means "never time out": round up, not down.
    return struct.pack("@ll", whole, micro if whole or micro else 1)


class LineTooLong(Exception):
    """The client sent a line over the limit (its bytes were discarded)."""

    def __init__(self, fatal: bool) -> None:
        super().__init__("line too long")
        self.fatal = fatal


class TimedOut(Exception):
    """No complete line arrived before the session's deadline."""


class ReplyFailed(Exception):
    """Producing a reply failed part-way (e.g. the adapter's stream broke).

    Kept apart from OSError so a failing disk is not logged as a client
    hanging up.  After a partial multi-line reply the only honest signal
    left is closing the connection: the client sees no terminating dot.
    """


class Connection:
    """A socket with a line reader and a write buffer, all timeouts by ``clock``.

    Timeouts are deadlines on an injectable clock rather than socket
    timeouts alone, so tests can move time; the socket wakes up at least
    every ``poll_interval`` seconds to look at the clock.
    """

    def __init__(self, sock: socket.socket, clock: Callable[[], float], poll_interval: float, send_timeout: float,
                 kernel_timeout: Optional[float] = None) -> None:
        self.sock = sock
        #: The TCP socket, also under TLS (which wraps a duplicate of it).
        self.raw = sock
        self.clock = clock
        self.poll_interval = poll_interval
        self.send_timeout = send_timeout
        self._in = b""
        self._out: list = []
        self._out_size = 0
        self.bytes_out = 0
        #: The socket's timeout as last set: settimeout() costs a system
        #: call, so it is only made when the value changes.  It starts as
        #: ``kernel_timeout``, the SO_RCVTIMEO/SO_SNDTIMEO a blocking socket
        #: already has (inherited from its listening socket), if any.
        self._timeout: Optional[float] = kernel_timeout
        #: When the last complete line arrived: idle time counts from here,
        #: so a client trickling bytes (slowloris) gains nothing, and a reply
        #: the client has already seen cannot postpone the deadline.
        self.last_line_at = clock()

    def has_line(self) -> bool:
        """A complete line is already buffered (the client is pipelining)."""
        return self._in.find(b"\n") >= 0  # not ``in``: see protocol.Stuffer.feed

    def discard_input(self) -> None:
        """Forget everything received but not yet read (STLS, RFC 2595 section 4)."""
        self._in = b""

    def read_line(self, max_len: int, timeout: float, deadline: Optional[float] = None) -> Optional[bytes]:
        """Return the next line including its LF, or None at end of stream.

        Raises :class:`LineTooLong` if the line exceeds ``max_len`` (its
        bytes are dropped as they arrive, so memory stays bounded) and
        :class:`TimedOut` if ``timeout`` seconds pass after the previous
        line without a new one, or once the clock reaches ``deadline``
        (even with lines already buffered).
        """
        end_by = self.last_line_at + timeout
        if deadline is not None:
            if self.clock() >= deadline:
                raise TimedOut()
            end_by = min(end_by, deadline)
        discarded = 0
        while True:
            end = self._in.find(b"\n")
            if end >= 0:
                self.last_line_at = self.clock()
                line, self._in = self._in[: end + 1], self._in[end + 1 :]
                if discarded or len(line) > max_len:
                    raise LineTooLong(fatal=False)
                return line
            if len(self._in) > max_len:
                discarded += len(self._in)
                self._in = b""
                if discarded > MAX_DISCARD:
                    raise LineTooLong(fatal=True)
            wait = self._wait(end_by)
            if wait is None:
                raise TimedOut()
            self._set_timeout(wait)
            try:
                data = self.sock.recv(RECV_SIZE)
            except TIMEOUTS:
                continue
            if not data:
                return None
            self._in += data

    def wait_until(self, when: float) -> bool:
        """Block until ``clock()`` reaches ``when``; False if the connection ends first.

        For replies that must be withheld (the failed-login delay).  Bytes
        the client sends meanwhile are kept for :meth:`read_line`: pipelined
        commands wait their turn.  The wait ends early, returning False, when
        the client closes, when the server shuts the socket down, or when the
        client sends more than ``MAX_DISCARD`` bytes meanwhile.  Idle time
        then counts from the end of the wait, during which the client could
        do nothing.
        """
        for wait in self.tries(when):
            self._set_timeout(wait)
            try:
                data = self.sock.recv(RECV_SIZE)
            except TIMEOUTS:
                continue
            if not data or len(self._in) + len(data) > MAX_DISCARD:
                return False
            self._in += data
        self.last_line_at = self.clock()
        return True

    def peer_closed(self) -> bool:
        """Whether the client has closed its side or the connection broke; never blocks.

        Looks at the TCP socket without reading from it, so input (even
        TLS records) stays for :meth:`read_line`.
        """
        poller = select.poll()
        poller.register(self.raw, select.POLLIN)
        if not poller.poll(0):
            return False
        try:
            return self.raw.recv(1, socket.MSG_PEEK) == b""
        except TIMEOUTS:
            return False
        except OSError:
            return True

    def use_socket(self, sock: socket.socket) -> None:
        """Go on over ``sock`` (the TLS socket after a handshake)."""
        self.sock = sock
        self._timeout = sock.gettimeout()

    def handshake(self, tls: ssl.SSLSocket, timeout: float) -> None:
        """Complete the handshake of ``tls`` (made with ``do_handshake_on_connect=False``)
        within ``timeout`` seconds by ``clock``, then go on over it.

        Raises ``ssl.SSLError`` or ``OSError``; ``socket.timeout`` when the
        time is up.  The caller closes ``tls`` on failure.
        """
        for wait in self.tries(self.clock() + timeout):
            tls.settimeout(wait)
            try:
                # A timed-out do_handshake() leaves OpenSSL waiting for more
                # bytes (SSL_ERROR_WANT_READ/WRITE); calling it again resumes
                # the same handshake.
                tls.do_handshake()
                break
            except socket.timeout:
                continue
        else:
            raise socket.timeout("handshake timed out")
        self.use_socket(tls)

    def _set_timeout(self, seconds: float) -> None:
        """Make a blocking recv() or send() give up after ``seconds``.

        Set only when the value changes: far from a deadline it is
        poll_interval every time.  A plain socket stays in blocking mode
        with kernel timeouts (SO_RCVTIMEO, SO_SNDTIMEO; a timeout is then
        BlockingIOError): Python's own socket timeouts poll() before every
        recv() and send(), a second system call and so a second hand-over of
        the GIL on a busy server (16 clients: 10-15 % more sessions/s
        without).  TLS sockets keep Python's timeouts, whose retries OpenSSL
        is known to accept.
        """
        if seconds == self._timeout:
            return
        if isinstance(self.sock, ssl.SSLSocket):
            self.sock.settimeout(seconds)
        else:
            timeval = kernel_timeval(seconds)
            if self.sock.gettimeout() is not None:  # settimeout() is an ioctl() even when nothing changes
                self.sock.settimeout(None)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self._timeout = seconds

    def write(self, data: bytes) -> None:
        self._out.append(data)
        self._out_size += len(data)
        if self._out_size >= WRITE_BUFFER:
            self.flush()

    def flush(self, more: bool = False) -> None:
        """Send what is buffered; ``more``: more follows at once (MSG_MORE, plain sockets only).

        Several pieces (a status line and a message chunk, pipelined
        replies) go out with one sendmsg(), not copied into one string
        first; through TLS, which has no sendmsg(), they are joined.
        """
        out = self._out
        if not out:
            return
        self._out = []
        self._out_size = 0
        flags = _MSG_MORE if more else 0
        if len(out) == 1:
            self._send(out[0], flags)
        elif isinstance(self.sock, ssl.SSLSocket) or len(out) > _IOV_MAX:
            self._send(b"".join(out), flags)
        else:
            self._send_parts(out, flags)

    def _send(self, data: bytes, flags: int = 0) -> None:
        """Send all of ``data`` within ``send_timeout`` seconds by ``clock``.

        A client that stops reading must not hold the thread forever; when
        the deadline passes, ``socket.timeout`` is raised and the connection
        is beyond repair.  ``send()`` reports partial writes, so no byte goes
        out twice.  On a TLS socket a timed-out ``send()`` has written
        nothing the caller can see, and OpenSSL requires the same buffer on
        the retry, which is what the loop passes.
        """
        deadline = self.clock() + self.send_timeout
        view = data
        while view:
            self._send_try(deadline)
            try:
                sent = self.sock.send(view, flags)
            except TIMEOUTS:
                continue
            self.bytes_out += sent
            # A memoryview only for the rest of a partial send: most replies go whole.
            view = memoryview(view)[sent:] if sent < len(view) else b""

    def _send_parts(self, parts: list, flags: int) -> None:
        """:meth:`_send` for several buffers, with sendmsg() on a plain socket."""
        deadline = self.clock() + self.send_timeout
        while parts:
            self._send_try(deadline)
            try:
                sent = self.sock.sendmsg(parts, (), flags)
            except TIMEOUTS:
                continue
            self.bytes_out += sent
            # Empty pieces (a chunk that was all held back) go too.
            while parts and sent >= len(parts[0]):
                sent -= len(parts[0])
                del parts[0]
            if sent:
                parts[0] = memoryview(parts[0])[sent:]

    def send_file(self, span: FileSpan) -> None:
        """Send what is buffered, then ``span`` from its file; sets ``span.sent``.

        On a plain socket with ``sendfile()``: the file's pages go to the
        socket without passing through Python, and the buffered status line
        goes ahead with MSG_MORE, in the same packet.  Each CHUNK_SIZE piece
        must go within ``send_timeout``, as each chunk of a streamed reply
        must: a client that stops reading gets ``socket.timeout``.  Through
        TLS the file is read and written in chunks.  Fewer octets than
        ``span.count`` go when the file ends first, or when it was written
        to (checked after each chunk read, and before each piece sendfile()
        sends).
        """
        fd = span.file.fileno()
        offset, end = span.offset, span.offset + span.count
        if isinstance(self.sock, ssl.SSLSocket):
            while offset < end:
                data = os.pread(fd, min(CHUNK_SIZE, end - offset), offset)
                if not data or span.file.changed():
                    break
                self.write(data)
                offset += len(data)
            span.sent = offset - span.offset
            return
        self.flush(more=True)
        out = self.sock.fileno()
        try:
            while offset < end:
                if offset > span.offset and span.file.changed():
                    return  # the piece sent last may hold new bytes; no more
                piece = min(end, offset + CHUNK_SIZE)
                deadline = self.clock() + self.send_timeout
                while offset < piece:
                    self._send_try(deadline)
                    try:
                        sent = os.sendfile(out, fd, offset, piece - offset)
                    except TIMEOUTS:
                        continue
                    if not sent:
                        return  # the file ended
                    offset += sent
                    self.bytes_out += sent
        finally:
            span.sent = offset - span.offset

    def _send_try(self, deadline: float) -> None:
        """Before each try of a send that must end by ``deadline`` (``send_timeout``
        after it began): set the socket's timeout, or raise ``socket.timeout``."""
        wait = self._wait(deadline)
        if wait is None:
            raise socket.timeout("send timed out: the client stopped reading")
        self._set_timeout(wait)

    def _wait(self, deadline: float) -> Optional[float]:
        """The socket timeout of the next try of a blocking call that must
        end by ``deadline``: at most ``poll_interval``, so the (injectable)
        clock is read again in between; None once the deadline passed.

        Not a generator in the paths every reply takes: one left suspended
        costs a GeneratorExit thrown into it when it is freed.
        """
        remaining = deadline - self.clock()
        return min(remaining, self.poll_interval) if remaining > 0 else None

    def tries(self, deadline: float) -> Iterator[float]:
        """The socket timeouts of :meth:`_wait`, one per try, until the deadline passed."""
        wait = self._wait(deadline)
        while wait is not None:
            yield wait
            wait = self._wait(deadline)


class POP3Handler(socketserver.BaseRequestHandler):
    """Drives one connection: greeting, then line in, reply out, until done."""

    server: "POP3Server"
    #: How the connection ended, for the session's summary line: "quit",
    #: "client closed", "autologout", "connection lost (...)" ...
    ended = "closed by server"
    #: The negotiated TLS version ("TLSv1.3"), or None on a plain connection.
    tls_version: Optional[str] = None

    def setup(self) -> None:
        sock = self.request
        config = self.server.context.config
        kernel_timeout = None
        if self.server.inherits_options(sock):
            # TCP_NODELAY and the kernel timeouts came with the socket from
            # the listening one: no system call here.  A PROXY header read
            # with Python's timeouts left the socket non-blocking.
            if sock.gettimeout() is not None:
                sock.settimeout(None)
            kernel_timeout = config.poll_interval
        elif sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = Connection(sock, config.clock, config.poll_interval, config.send_timeout, kernel_timeout)
        context = self.server.context
        self.session: Session = context.session_class(context, self.client_address[:2], secure=self.server.secure)
        self.session.client_gone = self.conn.peer_closed

    def handle(self) -> None:
        session, conn = self.session, self.conn
        log = session.log
        # Per-event lines are DEBUG: by default a session logs one INFO line,
        # the summary (server.SessionHandler), which carries ``ended``.
        log.debug("connect from %s port %s", *self.client_address[:2])
        try:
            if self.server.secure and not self._start_tls():
                return
            conn.write(session.greeting())
            conn.flush()
            while not session.closing:
                try:
                    line = conn.read_line(session.max_line, session.timeout, session.deadline)
                except LineTooLong as exc:
                    log.warning("line too long%s", ", closing" if exc.fatal else "")
                    self._reply(session.line_too_long())
                    if exc.fatal:
                        self.ended = "line too long"
                        break
                else:
                    if line is None:
                        self.ended = "client closed"
                        break
                    deadline = session.deadline
                    reply = self.answer(line)
                    if session.closing:
                        self.ended = "quit" if line[:4].upper() == b"QUIT" else "closed by server"
                    if session.reply_not_before is not None and not self._withhold(session.reply_not_before,
                                                                                    deadline):
                        break
                    self._reply(reply)
                    if session.starttls:
                        conn.flush()
                        # RFC 2595 section 4 and CVE-2011-0411: anything the
                        # client sent after STLS was sent in clear text and is
                        # dropped, never executed inside the TLS session.
                        conn.discard_input()
                        if not self._start_tls():
                            break
                        session.tls_started()
                # Pipelined commands get their replies in one send.
                if not conn.has_line():
                    conn.flush()
            conn.flush()
        except ReplyFailed as exc:
            # Session._stream logged the details (and the adapter's traceback).
            self.ended = "error"
            log.error("reply failed part-way (%s); closing the connection without ending it",
                      type(exc.__cause__).__name__)
        except TimedOut:
            # RFC 1939 section 3: on autologout, close without a response
            # and without entering UPDATE.
            if session.deadline is not None and conn.clock() >= session.deadline:
                self.ended = "autologout (no login within %g s)" % session.config.login_timeout
                log.debug("autologout: no login within %g s of connecting", session.config.login_timeout)
                # Replies to commands read in time may wait behind pipelined ones.
                try:
                    conn.flush()
                except OSError:
                    pass
            else:
                self.ended = "autologout"
                log.debug("autologout after %d s idle in %s", session.timeout, session.state.value)
        except OSError as exc:
            self.ended = "connection lost (%s)" % (exc.strerror or exc)
            log.debug("connection lost: %s", exc)
        except Exception:
            self.ended = "error"
            log.exception("unexpected error; closing the connection")
        finally:
            session.finish()
            if conn.sock is not self.request:
                conn.sock.close()
            log.debug("disconnect: %d octets sent", conn.bytes_out)

    def answer(self, line: bytes) -> Reply:
        """The session's reply to one command line (a subclass may count it)."""
        return self.session.handle(line)

    def _start_tls(self) -> bool:
        """Handshake in this connection's thread, within the configured time.

        The TLS socket wraps a duplicate descriptor: the original socket
        stays valid, so the server's shutdown() can still cut the connection
        and socketserver closes it as usual.
        """
        context = self.server.context
        if context.tls is None:
            self.session.log.error("TLS listener without certificates")
            return False
        raw = socket.socket(self.request.family, self.request.type, self.request.proto,
                            fileno=os.dup(self.request.fileno()))
        tls = context.tls.context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        timeout = context.config.tls_handshake_timeout
        if self.session.deadline is not None:
            # STLS late before login: the handshake ends with the login time.
            timeout = min(timeout, self.session.deadline - self.conn.clock())
        try:
            self.conn.handshake(tls, timeout)
        except (ssl.SSLError, OSError) as exc:
            self.ended = "TLS handshake failed (%s)" % exc
            self.session.log.debug("TLS handshake failed: %s", exc)
            tls.close()
            return False
        self.session.secure = True
        self.tls_version = tls.version()
        self.session.log.debug("TLS established: %s %s", self.tls_version, tls.cipher()[0])
        return True

    def _withhold(self, until: float, deadline: Optional[float]) -> bool:
        """Send earlier replies, then hold this one until ``until`` on the clock.

        Returns False if the connection ended meanwhile (the reply is
        dropped), or if ``until`` is past ``deadline`` (the login deadline of
        the command): then the connection closes at the deadline, no sooner,
        so the close does not tell a wrong guess earlier than a reply would.
        """
        self.conn.flush()
        log = self.session.log
        log.debug("reply withheld for %g s (failed-login delay)", until - self.conn.clock())
        if deadline is not None and until > deadline:
            if self.conn.wait_until(deadline):
                self.ended = "autologout (no login within %g s)" % self.session.config.login_timeout
                log.debug("autologout: no login within %g s of connecting", self.session.config.login_timeout)
            else:
                self.ended = "closed while a reply was withheld"
            return False
        if self.conn.wait_until(until):
            return True
        self.ended = "closed while a reply was withheld"
        log.debug("connection ended while a reply was withheld")
        return False

    def _reply(self, reply) -> None:
        write = self.conn.write
        chunks = iter(reply)
        try:
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    break
                except Exception as exc:
                    raise ReplyFailed() from exc
                if isinstance(chunk, FileSpan):
                    self.conn.send_file(chunk)
                else:
                    write(chunk)
        finally:
            close = getattr(reply, "close", None)
            if close is not None:
                close()
