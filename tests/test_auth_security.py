"""Failed-login defence and UTF-8 support."""
from __future__ import annotations

import poplib

import pytest

from pop3frame.adapters.memory import MemoryAdapter
from pop3frame.auth import FailureThrottle
from pop3frame.testing import Controller
from tests.helpers import RawClient


def test_throttle_grows_caps_and_survives_reconnects(frozen):
    clock = lambda: frozen().timestamp()  # noqa: E731
    throttle = FailureThrottle(free=3, max_delay=15, clock=clock)
    for _ in range(3):
        throttle.failure("198.51.100.7")
    assert throttle.blocked_for("198.51.100.7") == 0  # mistakes are free, at first
    delays = []
    for _ in range(6):
        throttle.failure("198.51.100.7")
        delays.append(throttle.blocked_for("198.51.100.7"))
    assert delays == [1, 2, 4, 8, 15, 15]
    assert throttle.blocked_for("198.51.100.8") == 0  # another address is unaffected
    frozen.tick(15)
    assert throttle.blocked_for("198.51.100.7") == 0
    throttle.success("198.51.100.7")
    throttle.failure("198.51.100.7")
    assert throttle.blocked_for("198.51.100.7") == 0  # success cleared the record


def test_brute_force_is_slowed_and_cut_off(frozen):
    """50 wrong passwords: refusals without checking, closed connections; others unaffected."""
    store = MemoryAdapter({"alice": "right"}, apop=False)
    clock = lambda: frozen().timestamp()  # noqa: E731
    with Controller(store, host="0.0.0.0", clock=clock, allow_plaintext_auth=True) as server:
        refused = closed = 0
        for attempt in range(50):
            with RawClient(("127.0.0.2", server.port), source="127.0.0.2") as c:
                c.cmd("USER alice")
                reply = c.cmd("PASS wrong%d" % attempt)
                assert reply.startswith(b"-ERR [AUTH]")
                refused += b"too many failed logins" in reply
                for _ in range(2):
                    c.cmd("USER alice")
                    c.cmd("PASS wrong")
                closed += c.read_all() == b""  # third failure on a connection closes it
        assert refused >= 45 and closed == 50
        # Even the right password is refused from that address while it is shut out...
        with RawClient(("127.0.0.2", server.port), source="127.0.0.2") as c:
            c.cmd("USER alice")
            assert b"too many failed logins" in c.cmd("PASS right")
        # ...but another client address logs in at once.
        client = poplib.POP3("127.0.0.1", server.port, timeout=10)
        client.user("alice")
        assert client.pass_("right").startswith(b"+OK")
        client.quit()
        frozen.tick(61)  # past the capped delay
        with RawClient(("127.0.0.2", server.port), source="127.0.0.2") as c:
            assert c.login("alice", "right").startswith(b"+OK")


def test_utf8_user_names_after_utf8_command():
    """RFC 6856 section 2: UTF8 enables UTF-8 in USER/PASS; CAPA lists UTF8."""
    store = MemoryAdapter({"jürgen": "grüße"}, apop=False)
    with Controller(store) as server, RawClient(server.address) as c:
        assert c.cmd("USER jürgen".replace("ü", "u")).startswith(b"+OK")  # ASCII is always fine
        c.send("USER jürgen\r\n".encode())
        assert c.line().startswith(b"-ERR")  # not before UTF8
        assert c.cmd("UTF8") == b"+OK UTF8 enabled\r\n"
        c.send("USER jürgen\r\n".encode())
        assert c.line() == b"+OK send PASS\r\n"
        c.send("PASS grüße\r\n".encode())
        assert c.line() == "+OK jürgen's maildrop has 0 messages (0 octets)\r\n".encode()


def test_lang(pop3_controller_factory):
    """RFC 6856 section 3: LANG lists, selects and resets the response language."""
    server = pop3_controller_factory(MemoryAdapter())
    with RawClient(server.address) as c:
        c.send(b"LANG\r\n")
        assert c.multiline() == b"+OK Language listing follows\r\nen English\r\n.\r\n"
        assert c.cmd("LANG en") == b"+OK Language changed\r\n"
        assert c.cmd("LANG *") == b"+OK en Language changed\r\n"
        assert c.cmd("LANG fr") == b"-ERR invalid language\r\n"


@pytest.mark.parametrize("command", ["UTF8", "STLS", "AUTH PLAIN"])
def test_authorization_only_commands_refused_in_transaction(command):
    store = MemoryAdapter({"a": "b"}, apop=False)
    with Controller(store) as server, RawClient(server.address) as c:
        c.login("a", "b")
        assert c.cmd(command).startswith(b"-ERR %s not valid in the TRANSACTION state" % command.split()[0].encode())
