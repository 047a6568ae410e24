"""Counters from real sessions, the Prometheus text format and the HTTP endpoint."""
from __future__ import annotations

import gc
import logging
import socket
import threading
import urllib.error
import urllib.request
import weakref

import pytest

from pop3frame import ServerConfig
from pop3frame.server import ServerGroup
from pop3frame.session import Session, SessionContext
from pop3frame.stats import MAX_REQUEST_HEAD, ErrorCounter, Stats, StatsServer, render_prometheus
from pop3frame.testing import ManualClock
from tests.helpers import RawClient


def run_sessions(adapter, stats):
    group = ServerGroup(adapter, ServerConfig(hostname="localhost"), stats=stats)
    address = group.add_listener(("127.0.0.1", 0)).server_address[:2]
    group.start(poll_interval=0.05)
    try:
        with RawClient(address) as c:
            assert c.login("alice", "wrong").startswith(b"-ERR")
            assert c.login("alice", "alice-pw").startswith(b"+OK")
            c.send(b"RETR 1\r\n")
            c.multiline()
            c.cmd("DELE 2")
            c.cmd("QUIT")
        assert group.tracker.wait_until_at_most(0, 10)
    finally:
        group.shutdown()


def test_counters_follow_sessions(adapter):
    stats = Stats()
    run_sessions(adapter, stats)
    snap = stats.snapshot()
    assert snap["sessions"] == 1
    assert snap["logins_ok"] == 1 and snap["logins_failed"] == 1
    assert snap["messages_retrieved"] == 1 and snap["messages_deleted"] == 1
    assert snap["bytes_out"] > 100
    assert snap["sessions_active"] == 0



def test_an_ended_session_is_freed_without_the_cycle_collector(adapter):
    """No reference cycle through a session, its log or its counting (stats on):
    an ended session's objects go when its thread drops them, not when the
    cyclic garbage collector next runs (whose passes cost every thread time
    under the GIL, and more the longer garbage waits)."""
    class Watched(Session):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sessions.append(weakref.ref(self))

    sessions = []
    gc.collect()
    gc.disable()
    try:
        context = SessionContext(adapter, ServerConfig(hostname="localhost"), session_class=Watched)
        group = ServerGroup(context, stats=Stats())
        address = group.add_listener(("127.0.0.1", 0)).server_address[:2]
        group.start(poll_interval=0.05)
        try:
            for _ in range(3):
                with RawClient(address) as c:
                    assert c.login("alice", "alice-pw").startswith(b"+OK")
                    c.cmd("QUIT")
                assert group.tracker.wait_until_at_most(0, 10)
        finally:
            group.shutdown()
        assert len(sessions) == 3 and [ref() for ref in sessions] == [None] * 3
    finally:
        gc.enable()

def test_summary_log_line_has_counts_and_no_secrets(adapter, caplog):
    caplog.set_level(logging.INFO)
    run_sessions(adapter, Stats())
    ends = [r for r in caplog.records if "session end" in r.getMessage()]
    assert len(ends) == 1
    record = ends[0]
    assert record.user == "alice" and record.retrieved == 1 and record.deleted == 1 and record.peer == "127.0.0.1"
    assert record.ended == "quit" and record.failed_logins == 1 and record.tls is None
    assert "user 'alice', 1 retrieved, 1 deleted" in record.getMessage()
    assert record.getMessage().endswith(" s, quit, 1 failed login")
    # The summary and the refused login are the session's only INFO lines.
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(info) == 2 and "login failed for 'alice'" in info[0]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "alice-pw" not in text and "wrong" not in text and "first" not in text  # no passwords, no bodies


def test_prometheus_text_and_http_endpoint():
    stats = Stats(active=lambda: 7)
    stats.add("logins_ok", 3)
    stats.add("bytes_out", 1234)
    text = render_prometheus(stats)
    assert 'pop3frame_logins_total{result="ok"} 3\n' in text
    assert 'pop3frame_logins_total{result="failed"} 0\n' in text
    assert text.count("# TYPE pop3frame_logins_total counter") == 1
    assert "pop3frame_bytes_sent_total 1234\n" in text
    assert "pop3frame_sessions_active 7\n" in text
    server = StatsServer(stats, ("127.0.0.1", 0)).start()
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % server.port, timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert r.read().decode() == render_prometheus(stats)
    finally:
        server.stop()


def test_error_counter_counts_error_records():
    stats = Stats()
    log = logging.getLogger("pop3frame.test-stats")
    handler = ErrorCounter(stats)
    log.addHandler(handler)
    try:
        log.warning("not counted")
        log.error("counted")
        log.critical("counted too")
    finally:
        log.removeHandler(handler)
    assert stats.get("errors") == 2


def test_silent_stats_client_is_dropped_and_others_are_served(stats_server):
    """A client that connects to the stats port and never sends a request is
    disconnected after request_timeout (on the injected clock: a real 0.2 s
    ran out for the other client too on a loaded machine), and does not hold
    up others meanwhile."""
    server, clock = stats_server
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as silent:
        assert wait_active(server, 1)  # its deadline is set
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % server.port, timeout=10) as r:
            assert r.status == 200
        clock.advance(server.request_timeout)
        # Answered 408 and closed by the server, well before our 10 s.
        with silent.makefile("rb") as answer:
            assert answer.read() == (b"HTTP/1.1 408 Request Timeout\r\n"
                                     b"Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                                     b"Content-Length: 0\r\nConnection: close\r\n\r\n")


# -- what an unauthenticated client can cost the stats endpoint (issue 14, defect 10) ----


def http_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        return sock.makefile("rb").read()


def wait_active(server: StatsServer, n: int) -> bool:
    """Wait (bounded) until ``n`` connections are being served (their deadlines set)."""
    for _ in range(1000):
        if server.active == n:
            return True
        threading.Event().wait(0.01)
    return False


@pytest.fixture
def stats_server():
    clock = ManualClock()
    server = StatsServer(Stats(), ("127.0.0.1", 0), request_timeout=5, max_connections=2, clock=clock,
                         poll_interval=0.01).start()
    yield server, clock
    server.stop()


def test_stats_connections_are_capped(stats_server):
    """Defect 10: a thread per connection, uncapped.  Past max_connections the accepting
    thread answers 503 and closes; no thread is started for it."""
    server, _ = stats_server
    threads = threading.active_count()
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(2)]
    try:
        for _ in range(20):
            assert http_exchange(server.port, b"GET /metrics HTTP/1.1\r\n\r\n").startswith(
                b"HTTP/1.1 503 Service Unavailable\r\n")
        assert server.active == 2 and threading.active_count() <= threads + 2
    finally:
        for s in silent:
            s.close()
    assert wait_active(server, 0)  # the two threads noticed their clients left
    assert http_exchange(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize("head", [
    b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * MAX_REQUEST_HEAD + b"\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\n" + b"X-Many: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n" * 300 + b"\r\n",
])
def test_stats_request_head_size_is_bounded(stats_server, head):
    """Defect 10: one long header line or many small ones: past MAX_REQUEST_HEAD octets
    the answer is 431 (RFC 6585 section 5).  (http.server took 100 lines of 64 KiB.)"""
    server, _ = stats_server
    assert http_exchange(server.port, head) == (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; version=0.0.4; "
             b"charset=utf-8\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def test_stats_request_time_is_bounded_in_total(stats_server):
    """Defect 10: the timeout was per read, so a header line every few seconds kept a
    thread for ever.  The whole request must arrive within request_timeout (on the
    injected clock), however the client trickles it."""
    server, clock = stats_server
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        assert wait_active(server, 1)
        for _ in range(2):
            clock.advance(2)
            sock.sendall(b"X-Slow: 1\r\n")
        clock.advance(1)
        assert sock.makefile("rb").read().startswith(b"HTTP/1.1 408 Request Timeout\r\n")


def test_stats_answers_only_get_of_the_metrics():
    server = StatsServer(Stats(), ("127.0.0.1", 0)).start()
    try:
        assert http_exchange(server.port, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
        assert http_exchange(server.port, b"GET /other HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
        assert http_exchange(server.port, b"hello\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen("http://127.0.0.1:%d/nothing" % server.port, timeout=10)
    finally:
        server.stop()
