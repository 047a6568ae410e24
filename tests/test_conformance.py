"""The shared adapter conformance suite.

Every ``tests/harness_<name>.py`` module defines ``Harness(tmp_path)`` with
``make_adapter()``, ``add_user(user, password)``, ``deliver(user, bytes)``
and ``close()``; each test below runs once per harness, through a real
server on 127.0.0.1 and real clients (poplib and raw sockets).  A harness
may set ``skip_reason`` (a string) when its back end cannot run here;
``.ci/run`` fails the build if anything is skipped under CI.
"""
from __future__ import annotations

import importlib
import pathlib
import poplib
import threading

import pytest

from pop3frame.testing import Controller
from tests.helpers import RawClient, drop, retr_lines_to_bytes

HARNESSES = sorted(p.stem[len("harness_"):] for p in pathlib.Path(__file__).parent.glob("harness_*.py"))

MSG1 = b"From: a@example.org\r\nSubject: one\r\n\r\nHello\r\n"
DOTS = b"Subject: dots\r\n\r\n.starts with a dot\r\n.\r\n..two dots\r\nend\r\n"
LF_ONLY = b"Subject: lf\n\nbare LF line endings\nsecond line\n"
BINARY = b"Subject: =?iso-8859-1?q?caf=E9?=\r\n\r\nLatin-1 body: caf\xe9 \xff\xfe\r\n"


def _crlf(data: bytes) -> bytes:
    """The message as RETR transmits it, before stuffing: CRLF, final line end."""
    out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return out if out.endswith(b"\r\n") else out + b"\r\n"


@pytest.fixture(params=HARNESSES)
def harness(request, tmp_path):
    module = importlib.import_module("tests.harness_" + request.param)
    h = module.Harness(tmp_path)
    reason = getattr(h, "skip_reason", None)
    if reason:
        pytest.skip(reason)
    h.add_user("alice", "alice-pw")
    h.add_user("bob", "bob-pw")
    yield h
    h.close()


@pytest.fixture
def server(harness):
    with Controller(harness.make_adapter()) as controller:
        yield controller


def login(server, user="alice", password="alice-pw") -> poplib.POP3:
    client = server.pop3()
    client.user(user)
    client.pass_(password)
    return client


def fetch_all(server, user="alice", password="alice-pw"):
    client = login(server, user, password)
    try:
        count = client.stat()[0]
        return [retr_lines_to_bytes(client.retr(i)[1]) for i in range(1, count + 1)]
    finally:
        client.quit()


def test_login_and_wrong_password(harness, server):
    """RFC 1939 section 7 (PASS) and RFC 3206 section 5 ([AUTH] on bad credentials)."""
    client = server.pop3()
    client.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.pass_("wrong")
    client.user("nobody")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.pass_("alice-pw")
    client.user("alice")
    assert client.pass_("alice-pw").startswith(b"+OK")
    client.quit()


def test_messages_round_trip_exactly(harness, server):
    """RFC 1939 sections 3 and 11: CRLF on the wire, sizes count CRLF, content intact."""
    for body in (MSG1, DOTS, LF_ONLY, BINARY):
        harness.deliver("alice", body)
    expected = [_crlf(b) for b in (MSG1, DOTS, LF_ONLY, BINARY)]
    client = login(server)
    count, total = client.stat()
    assert count == 4
    sizes = [int(line.split()[1]) for line in client.list()[1]]
    assert sizes == [len(e) for e in expected]
    assert total == sum(sizes)
    got = [retr_lines_to_bytes(client.retr(i)[1]) for i in range(1, 5)]
    assert got == expected
    client.quit()


def test_retr_exact_wire_bytes(harness, server):
    """RFC 1939 section 3: byte-stuffing and the terminating '.CRLF', checked on raw bytes."""
    harness.deliver("alice", DOTS)
    with RawClient(server.address) as raw:
        assert raw.login("alice", "alice-pw").startswith(b"+OK")
        raw.send(b"RETR 1\r\n")
        assert raw.line() == b"+OK %d octets\r\n" % len(_crlf(DOTS))
        assert raw.multiline() == (
            b"Subject: dots\r\n\r\n..starts with a dot\r\n..\r\n...two dots\r\nend\r\n.\r\n"
        )
        raw.cmd("QUIT")


def test_uidl_unique_and_stable(harness, server):
    """RFC 1939 section 7 (UIDL): unique-ids are unique, 1-70 chars 0x21-0x7E, stable across sessions."""
    for i in range(5):
        harness.deliver("alice", b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i))
    client = login(server)
    first = [line.split()[1] for line in client.uidl()[1]]
    client.quit()
    assert len(set(first)) == 5
    assert all(1 <= len(u) <= 70 and all(0x21 <= c <= 0x7E for c in u) for u in first)
    client = login(server)
    assert [line.split()[1] for line in client.uidl()[1]] == first
    client.dele(2)
    client.quit()
    client = login(server)
    assert [line.split()[1] for line in client.uidl()[1]] == first[:1] + first[2:]
    client.quit()


def test_dele_quit_deletes_rset_and_disconnect_do_not(harness, server):
    """RFC 1939 sections 5-6: deletions happen only in UPDATE, after QUIT."""
    for i in range(3):
        harness.deliver("alice", b"Subject: %d\r\n\r\nx\r\n" % i)
    client = login(server)
    client.dele(1)
    client.rset()
    client.quit()
    assert len(fetch_all(server)) == 3

    client = login(server)
    client.dele(1)
    drop(client)  # dropped connection: no UPDATE state
    assert server.wait_for_connections(0)
    assert len(fetch_all(server)) == 3

    client = login(server)
    client.dele(1)
    client.dele(3)
    assert client.quit().startswith(b"+OK")
    assert fetch_all(server) == [b"Subject: 1\r\n\r\nx\r\n"]


def test_second_login_in_use(harness, server):
    """RFC 1939 section 8 / RFC 2449 section 8.1.1: exclusive maildrop lock, [IN-USE]."""
    first = login(server)
    second = server.pop3()
    second.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_("alice-pw")
    first.quit()
    assert server.wait_for_connections(1)
    second.user("alice")
    assert second.pass_("alice-pw").startswith(b"+OK")
    second.quit()


def test_delivery_during_session_is_invisible_and_kept(harness, server):
    """RFC 1939 section 8: the session works on a snapshot; new mail waits for the next one."""
    harness.deliver("alice", MSG1)
    client = login(server)
    harness.deliver("alice", b"Subject: late\r\n\r\nlate\r\n")
    assert client.stat()[0] == 1
    client.dele(1)
    client.quit()
    assert fetch_all(server) == [b"Subject: late\r\n\r\nlate\r\n"]


def test_users_are_separate_and_parallel(harness, server):
    """Two users' sessions run at the same time and see only their own mail."""
    harness.deliver("alice", b"Subject: for alice\r\n\r\na\r\n")
    harness.deliver("bob", b"Subject: for bob\r\n\r\nb\r\n")
    a, b = login(server), login(server, "bob", "bob-pw")
    assert a.retr(1)[1][0] == b"Subject: for alice"
    assert b.retr(1)[1][0] == b"Subject: for bob"
    a.quit()
    b.quit()


def test_large_message_streams_intact(harness, server):
    """A 3 MB message with long lines and a dot at many line starts arrives byte-exact."""
    line = b"." + b"x" * 998 + b"\n"
    body = b"Subject: big\n\n" + line * 3000
    harness.deliver("alice", body)
    client = login(server)
    assert client.list(1).split()[2] == str(len(_crlf(body))).encode()
    assert retr_lines_to_bytes(client.retr(1)[1]) == _crlf(body)
    client.quit()


def test_concurrent_sessions_many_users(harness, server):
    """Ten users fetching at once: every session gets its own mail, no errors."""
    users = ["u%d" % i for i in range(10)]
    for u in users:
        harness.add_user(u, "pw-" + u)
        harness.deliver(u, b"Subject: " + u.encode() + b"\r\n\r\nhi\r\n")
    results = {}

    def run(u):
        results[u] = fetch_all(server, u, "pw-" + u)

    threads = [threading.Thread(target=run, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {u: [b"Subject: " + u.encode() + b"\r\n\r\nhi\r\n"] for u in users}
