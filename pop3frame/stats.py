"""Counters for a running server, readable from Python or over HTTP (Prometheus text format).

::

    stats = Stats()
    group = ServerGroup(adapter, config, stats=stats)
    ...
    stats.snapshot()["logins_ok"]
    StatsServer(stats, ("127.0.0.1", 9110)).start()   # GET /metrics

Counters only ever grow (until the process restarts); ``sessions_active``
is a gauge read from the connection tracker.  Nothing here sees passwords
or message bodies: only counts.
"""
from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from typing import Callable, Dict, Optional, Tuple

from .handler import Connection, LineTooLong, TimedOut

__all__ = ["Stats", "StatsServer", "ErrorCounter", "render_prometheus"]

logger = logging.getLogger("pop3frame.stats")

#: name -> (Prometheus metric name, help text, labels)
COUNTERS: Dict[str, Tuple[str, str, str]] = {
    "sessions": ("pop3frame_sessions_total", "Connections accepted and served.", ""),
    "refused": ("pop3frame_connections_refused_total", "Connections refused by a limit or a bad PROXY header.", ""),
    "logins_ok": ("pop3frame_logins_total", "Successful and failed logins.", 'result="ok"'),
    "logins_failed": ("pop3frame_logins_total", "Successful and failed logins.", 'result="failed"'),
    "messages_retrieved": ("pop3frame_messages_retrieved_total", "Messages sent with RETR.", ""),
    "messages_deleted": ("pop3frame_messages_deleted_total", "Messages deleted at QUIT.", ""),
    "bytes_out": ("pop3frame_bytes_sent_total", "Octets sent to clients.", ""),
    "errors": ("pop3frame_errors_total", "Log records at ERROR level or above.", ""),
}


class Stats:
    """Thread-safe counters.  ``active`` is a callable giving the live session count."""

    def __init__(self, active: Optional[Callable[[], int]] = None) -> None:
        self._mutex = threading.Lock()
        self._values: Dict[str, int] = {name: 0 for name in COUNTERS}
        self.active = active

    def add(self, name: str, n: int = 1) -> None:
        if name not in self._values:
            raise KeyError(name)
        with self._mutex:
            self._values[name] += n

    def get(self, name: str) -> int:
        return self.counters()[name]

    def counters(self) -> Dict[str, int]:
        """Every counter (of every worker, for :class:`pop3frame.hostwide.SharedStats`)."""
        with self._mutex:
            return dict(self._values)

    def snapshot(self) -> Dict[str, int]:
        """Every counter, plus ``sessions_active``."""
        values = self.counters()
        values["sessions_active"] = self.active() if self.active is not None else 0
        return values


def render_prometheus(stats: Stats) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    values = stats.snapshot()
    lines = []
    seen = set()
    for name, (metric, text, labels) in COUNTERS.items():
        if metric not in seen:
            seen.add(metric)
            lines.append("# HELP %s %s" % (metric, text))
            lines.append("# TYPE %s counter" % metric)
        lines.append("%s%s %d" % (metric, "{%s}" % labels if labels else "", values[name]))
    lines.append("# HELP pop3frame_sessions_active Connections open now.")
    lines.append("# TYPE pop3frame_sessions_active gauge")
    lines.append("pop3frame_sessions_active %d" % values["sessions_active"])
    return "\n".join(lines) + "\n"


class ErrorCounter(logging.Handler):
    """A logging handler that counts records at ERROR or above into ``stats``."""

    def __init__(self, stats: Stats) -> None:
        super().__init__(logging.ERROR)
        self.stats = stats

    def emit(self, record: logging.LogRecord) -> None:
        self.stats.add("errors")


#: The request line and headers together, in octets; a scrape sends a few hundred.
MAX_REQUEST_HEAD = 8192

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def _response(status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (
        status, _REASONS[status], content_type, len(body))
    return head.encode("ascii") + body


class _Handler(socketserver.BaseRequestHandler):
    """One request per connection: read a bounded head within the deadline, answer, close."""

    server: "StatsServer"

    def handle(self) -> None:
        server = self.server
        conn = Connection(self.request, server.clock, server.poll_interval, server.request_timeout)
        deadline = server.deadline_of(self.request)
        try:
            status, body = self._answer(conn, deadline)
        except TimedOut:
            status, body = 408, b""
        except LineTooLong:
            status, body = 431, b""
        except OSError:
            return
        if status != 200:
            logger.debug("stats %s: %d", self.client_address[0], status)
            body = b""
        try:
            conn.write(_response(status, body, "text/plain; version=0.0.4; charset=utf-8"))
            conn.flush()
        except OSError:
            pass

    def _answer(self, conn: Connection, deadline: float) -> Tuple[int, bytes]:
        """The status and body for the request read from ``conn``.

        The whole head (request line and headers) must arrive by
        ``deadline`` and fit in MAX_REQUEST_HEAD octets: the time a client
        can hold a thread and the memory it can fill are bounded, however
        it trickles its bytes.
        """
        timeout = self.server.request_timeout
        request_line = conn.read_line(MAX_REQUEST_HEAD, timeout, deadline)
        size = len(request_line or b"")
        line = request_line
        while line not in (None, b"\r\n", b"\n"):
            line = conn.read_line(MAX_REQUEST_HEAD - size, timeout, deadline)
            size += len(line or b"")
        if request_line is None or line is None:
            raise OSError("client closed before the end of the request")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return 400, b""
        if parts[0] != b"GET":
            return 405, b""
        if parts[1].split(b"?", 1)[0] not in (b"/metrics", b"/"):
            return 404, b""
        return 200, render_prometheus(self.server.stats).encode("utf-8")


class StatsServer(socketserver.ThreadingTCPServer):
    """``GET /metrics`` on a separate listener (keep it on 127.0.0.1: no authentication).

    Bounded for whoever can reach it: at most ``max_connections`` at once
    (one thread each; more are answered 503 and closed by the accepting
    thread), a request head of at most MAX_REQUEST_HEAD octets, and
    ``request_timeout`` seconds (on ``clock``) in total to send it.

    ``sock``: a listening socket bound earlier to serve instead of binding
    ``address`` (the workers of ``serve --workers`` share one).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, stats: Stats, address: Tuple[str, int] = ("127.0.0.1", 9110),
                 request_timeout: float = 5.0, max_connections: int = 4,
                 clock: Callable[[], float] = time.monotonic, poll_interval: float = 1.0,
                 *, sock: Optional[socket.socket] = None) -> None:
        self.stats = stats
        #: Seconds a client gets to send its whole request.
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.clock = clock
        self.poll_interval = min(poll_interval, request_timeout)
        self._mutex = threading.Lock()
        self._active = 0
        self._deadlines: Dict[socket.socket, float] = {}
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler, bind_and_activate=sock is None)
        if sock is not None:
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def active(self) -> int:
        """Connections being served now."""
        with self._mutex:
            return self._active

    def process_request(self, request: socket.socket, client_address) -> None:
        with self._mutex:
            full = self._active >= self.max_connections
            if not full:
                self._active += 1
                # The time limit counts from the accept, not from whenever
                # the connection's thread gets to run.
                self._deadlines[request] = self.clock() + self.request_timeout
        if full:
            logger.debug("stats %s: refused, %d connections open", client_address[0], self.max_connections)
            try:
                # A fresh socket's send buffer takes this without blocking.
                request.setblocking(False)
                request.send(_response(503))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def deadline_of(self, request: socket.socket) -> float:
        """When the request on this accepted connection must have arrived."""
        with self._mutex:
            return self._deadlines[request]

    def _release(self, request: socket.socket) -> None:
        with self._mutex:
            self._active -= 1
            del self._deadlines[request]

    def start(self) -> "StatsServer":
        self._thread = threading.Thread(target=self.serve_forever, args=(0.2,), name="pop3-stats", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()
