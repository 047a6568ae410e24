"""The testing helpers users get: Controller and the pytest fixture."""
from __future__ import annotations

import socket
import warnings

import pytest

from pop3frame.adapters.memory import MemoryAdapter
from pop3frame.testing import Controller, ManualClock


def test_fixture_starts_and_stops_servers(pop3_controller_factory):
    store = MemoryAdapter({"u": "p"}, apop=False)
    store.deliver("u", b"Subject: s\r\n\r\nx\r\n")
    server = pop3_controller_factory(store)
    assert server.host == "127.0.0.1" and server.port > 0
    client = server.pop3()
    client.user("u")
    client.pass_("p")
    assert client.stat() == (1, 17)
    client.quit()


def test_controller_stop_closes_the_port():
    controller = Controller(MemoryAdapter()).start()
    address = controller.address
    controller.stop()
    try:
        socket.create_connection(address, timeout=2).close()
        refused = False
    except OSError:
        refused = True
    assert refused


def test_controller_stop_closes_the_clients_it_handed_out():
    """The README's test never closes its client: stopping the controller
    does, so no ResourceWarning reaches the garbage collector."""
    controller = Controller(MemoryAdapter({"u": "p"}, apop=False)).start()
    client, raw = controller.pop3(), controller.connect()
    quitted = controller.pop3()
    quitted.quit()
    controller.stop()
    assert client.sock is None and client.file is None and raw.fileno() == -1
    assert quitted.sock is None  # closed once by quit(), again by stop(): no error


def test_manual_clock():
    clock = ManualClock(start=5)
    clock.advance(2.5)
    assert clock() == 7.5


def test_every_test_runs_with_resource_warnings_as_errors(pytestconfig):
    """setup.cfg makes a ResourceWarning (an unclosed socket or file, also one
    the garbage collector finds) fail the test, for .ci/run and the README's
    test command alike."""
    assert {"error::ResourceWarning", "error::pytest.PytestUnraisableExceptionWarning"} <= set(
        pytestconfig.getini("filterwarnings"))
    with pytest.raises(ResourceWarning):
        warnings.warn("unclosed socket", ResourceWarning)
