"""Fixtures shared by the core tests."""
from __future__ import annotations

import os
import signal

import pytest
from freezegun import freeze_time

from pop3frame.adapters.memory import MemoryAdapter


@pytest.fixture
def frozen():
    """freezegun's frozen time.  Pass ``clock=lambda: frozen().timestamp()``
    to the server: freezegun leaves server threads on real time, so the
    server reads the frozen clock through this function instead (see
    shared/PITFALLS.md); ``frozen.tick(seconds)`` moves it."""
    with freeze_time("2026-11-25 12:00:00") as factory:
        yield factory


@pytest.fixture
def adapter():
    a = MemoryAdapter({"alice": "alice-pw", "bob": "bob-pw"}, apop=True)
    a.deliver("alice", b"Subject: one\r\n\r\nfirst\r\n", uid="uid-one")
    a.deliver("alice", b"Subject: two\r\n\r\n.dotted\r\nsecond\r\n", uid="uid-two")
    a.deliver("alice", b"Subject: three\n\nthird\n", uid="uid-three")
    return a


def pytest_configure(config):
    # A shell that starts a command in the background without job control
    # (`.ci/run &`, nohup in a script) hands it SIGINT ignored, and an
    # ignored signal stays ignored across exec: every Python started by a
    # test would then ignore the Ctrl-C the tests send it.  A handler (not
    # SIG_IGN) is reset to the default at exec, where Python installs its own.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


_skipped = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_collectreport(report):
    # A module-level importorskip skips at collection, not at run time.
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    """Under CI=true a skipped test is a failure: CI installs every back end."""
    if os.environ.get("CI") == "true" and _skipped:
        print("\nCI=true but %d test(s) were skipped:\n  %s" % (len(_skipped), "\n  ".join(_skipped)))
        session.exitstatus = 1
