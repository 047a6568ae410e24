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

import http.server
import logging
import socket
import threading
from typing import Callable, Dict, Optional, Tuple

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
        with self._mutex:
            return self._values[name]

    def snapshot(self) -> Dict[str, int]:
        """Every counter, plus ``sessions_active``."""
        with self._mutex:
            values = dict(self._values)
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


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "StatsServer"

    def setup(self) -> None:
        # A client that connects and says nothing must not pin a thread.
        self.timeout = self.server.request_timeout
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        body = render_prometheus(self.server.stats).encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        logger.debug("stats %s: " + format, self.client_address[0], *args)


class StatsServer(http.server.ThreadingHTTPServer):
    """``GET /metrics`` on a separate listener (keep it on 127.0.0.1: no authentication)."""

    daemon_threads = True

    def __init__(self, stats: Stats, address: Tuple[str, int] = ("127.0.0.1", 9110),
                 request_timeout: float = 10.0) -> None:
        self.stats = stats
        #: Seconds a client gets to send its request.
        self.request_timeout = request_timeout
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        return self.server_address[1]

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
