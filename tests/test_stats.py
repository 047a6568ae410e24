"""Counters from real sessions, the Prometheus text format and the HTTP endpoint."""
from __future__ import annotations

import logging
import urllib.request

from pop3frame import ServerConfig
from pop3frame.server import ServerGroup
from pop3frame.stats import ErrorCounter, Stats, StatsServer, render_prometheus
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


def test_summary_log_line_has_counts_and_no_secrets(adapter, caplog):
    caplog.set_level(logging.INFO)
    run_sessions(adapter, Stats())
    ends = [r for r in caplog.records if "session end" in r.getMessage()]
    assert len(ends) == 1
    record = ends[0]
    assert record.user == "alice" and record.retrieved == 1 and record.deleted == 1 and record.peer == "127.0.0.1"
    assert "user 'alice', 1 retrieved, 1 deleted" in record.getMessage()
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


def test_silent_stats_client_is_dropped_and_others_are_served():
    """A client that connects to the stats port and never sends a request is
    disconnected after request_timeout, and does not hold up others meanwhile."""
    import socket

    server = StatsServer(Stats(), ("127.0.0.1", 0), request_timeout=0.2).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as silent:
            with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % server.port, timeout=10) as r:
                assert r.status == 200
            assert silent.recv(1) == b""  # closed by the server, well before our 10 s
    finally:
        server.stop()
