"""IMAP upstream adapter against a real Dovecot (beyond the conformance suite).

RFC 3501 (IMAP4rev1: UIDVALIDITY, RFC822.SIZE, partial BODY.PEEK[]
fetches), RFC 4315 (UIDPLUS: UID EXPUNGE) and RFC 6851 (MOVE) on the
upstream side; RFC 1939 on the POP3 side.
"""
from __future__ import annotations

import logging
import os
import poplib
import socket

import pytest

from pop3frame.adapters.imap import IMAPUpstreamAdapter, _uid_set
from pop3frame.testing import Controller
from tests.harness_imap import Dovecot, missing_reason
from tests.helpers import RawClient, retr_lines_to_bytes


@pytest.fixture
def dovecot():
    reason = missing_reason()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but " + reason)
        pytest.skip(reason)
    d = Dovecot().start()
    d.add_user("alice", "alice-pw")
    yield d
    d.cleanup()


def login(server, user="alice", password="alice-pw"):
    client = server.pop3()
    client.user(user)
    client.pass_(password)
    return client


def uidvalidity(dovecot, user="alice", folder="INBOX"):
    conn = dovecot.imap(user)
    try:
        conn.select(folder)
        return conn.response("UIDVALIDITY")[1][0].decode()
    finally:
        conn.logout()


def folder_messages(dovecot, folder, user="alice"):
    """(uid, flags line, bytes) of every message in an IMAP folder."""
    conn = dovecot.imap(user)
    try:
        typ, data = conn.select('"%s"' % folder)
        assert typ == "OK", data
        if int(data[0]) == 0:
            return []
        typ, data = conn.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[])")
        return [(item[0], item[1]) for item in data if isinstance(item, tuple)]
    finally:
        conn.logout()


def test_uidl_is_uidvalidity_dot_uid_and_sizes_are_rfc822_size(dovecot):
    """UIDL = "<UIDVALIDITY>.<UID>"; LIST sizes equal the CRLF octets RETR sends."""
    uids = [dovecot.append("alice", b"Subject: m%d\n\nbody %d\n" % (i, i)) for i in range(3)]
    validity = uidvalidity(dovecot)
    with Controller(IMAPUpstreamAdapter("127.0.0.1", dovecot.port)) as server:
        client = login(server)
        assert [l.split()[1].decode() for l in client.uidl()[1]] == ["%s.%d" % (validity, u) for u in uids]
        sizes = [int(l.split()[1]) for l in client.list()[1]]
        bodies = [retr_lines_to_bytes(client.retr(i)[1]) for i in (1, 2, 3)]
        assert bodies[0] == b"Subject: m0\r\n\r\nbody 0\r\n"
        assert sizes == [len(b) for b in bodies]
        client.quit()


def test_retr_streams_in_partial_fetches(dovecot, caplog):
    """A message much larger than chunk_size arrives byte-exact over many
    BODY.PEEK[]<offset.length> fetches; TOP reads only the beginning."""
    line = b"." + b"0123456789" * 9 + b"\n"
    body = b"Subject: chunked\nX-Pad: y\n\n" + line * 2000  # ~180 KB
    dovecot.append("alice", body)
    adapter = IMAPUpstreamAdapter("127.0.0.1", dovecot.port, chunk_size=4096)
    fetches = []
    real = adapter._fetch_part
    adapter._fetch_part = lambda *a: fetches.append(a[2:]) or real(*a)
    expected = body.replace(b"\n", b"\r\n")
    with Controller(adapter) as server:
        client = login(server)
        assert retr_lines_to_bytes(client.retr(1)[1]) == expected
        assert len(fetches) >= len(expected) // 4096
        assert all(length == 4096 for _, length in fetches)
        assert [offset for offset, _ in fetches] == [i * 4096 for i in range(len(fetches))]
        fetches.clear()
        top = client.top(1, 2)[1]
        assert top == [b"Subject: chunked", b"X-Pad: y", b"", line.rstrip(b"\n"), line.rstrip(b"\n")]
        assert len(fetches) == 1  # the first chunk covers the headers and two lines
        client.quit()


def test_retr_leaves_seen_flag_alone_and_delete_expunges_only_those(dovecot):
    """BODY.PEEK keeps \\Seen unset; with UIDPLUS only the POP3-deleted UIDs
    are expunged, not a message another IMAP client flagged \\Deleted."""
    for i in range(3):
        dovecot.append("alice", b"Subject: %d\r\n\r\nx\r\n" % i)
    other = dovecot.imap("alice")
    other.select("INBOX")
    other.uid("STORE", "3", "+FLAGS", r"(\Deleted)")
    with Controller(IMAPUpstreamAdapter("127.0.0.1", dovecot.port)) as server:
        client = login(server)
        client.retr(1)
        client.dele(1)
        assert client.quit().startswith(b"+OK")
        assert server.wait_for_connections(0)
    other.logout()
    left = folder_messages(dovecot, "INBOX")
    assert [b"Subject: 1" in m for _, m in left] == [True, False]
    assert b"\\Seen" not in left[0][0]
    assert b"\\Deleted" in left[1][0]


def test_on_delete_trash_moves_messages(dovecot):
    dovecot.append("alice", b"Subject: keep\r\n\r\nk\r\n")
    dovecot.append("alice", b"Subject: trash me\r\n\r\nt\r\n")
    with Controller(IMAPUpstreamAdapter("127.0.0.1", dovecot.port, on_delete="trash")) as server:
        client = login(server)
        client.dele(2)
        assert client.quit().startswith(b"+OK")
        assert server.wait_for_connections(0)
    assert [b"Subject: keep" in m for _, m in folder_messages(dovecot, "INBOX")] == [True]
    assert [b"Subject: trash me" in m for _, m in folder_messages(dovecot, "Trash")] == [True]


def test_read_only_mode_refuses_dele(dovecot):
    dovecot.append("alice", b"Subject: ro\r\n\r\nx\r\n")
    with Controller(IMAPUpstreamAdapter("127.0.0.1", dovecot.port, on_delete="none")) as server:
        client = login(server)
        assert "X-READ-ONLY" in client.capa()
        with pytest.raises(poplib.error_proto, match=r"\[SYS/PERM\]"):
            client.dele(1)
        client.quit()
    assert len(folder_messages(dovecot, "INBOX")) == 1


def test_other_folder_and_missing_folder(dovecot):
    conn = dovecot.imap("alice")
    conn.create("Reports")
    conn.logout()
    dovecot.append("alice", b"Subject: report\r\n\r\nr\r\n", folder="Reports")
    dovecot.append("alice", b"Subject: inbox\r\n\r\ni\r\n")
    with Controller(IMAPUpstreamAdapter("127.0.0.1", dovecot.port, folder="Reports")) as server:
        client = login(server)
        assert client.retr(1)[1][0] == b"Subject: report"
        assert client.stat()[0] == 1
        client.quit()
    with Controller(IMAPUpstreamAdapter("127.0.0.1", dovecot.port, folder="No Such")) as server:
        client = server.pop3()
        client.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[SYS/PERM\]"):
            client.pass_("alice-pw")
        client.quit()


def test_message_expunged_by_another_client_mid_session(dovecot):
    """RETR of a message that vanished upstream: -ERR [SYS/TEMP], session goes on."""
    dovecot.append("alice", b"Subject: a\r\n\r\na\r\n")
    dovecot.append("alice", b"Subject: b\r\n\r\nb\r\n")
    with Controller(IMAPUpstreamAdapter("127.0.0.1", dovecot.port)) as server:
        client = login(server)
        other = dovecot.imap("alice")
        other.select("INBOX")
        other.uid("STORE", "1", "+FLAGS", r"(\Deleted)")
        other.expunge()
        other.logout()
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.retr(1)
        assert client.retr(2)[1][0] == b"Subject: b"
        client.quit()


def test_credentials_mapping_and_non_ascii_password(dovecot):
    """A fixed mapping checks POP3 logins itself; a UTF-8 password goes
    upstream with AUTHENTICATE PLAIN (imaplib's LOGIN is ASCII-only)."""
    dovecot.add_user("real", "pässwörd")
    dovecot.append("real", b"Subject: mapped\r\n\r\nm\r\n")

    def credentials(user, password):
        return ("real", "pässwörd") if (user, password) == ("device", "device-pin") else None

    with Controller(IMAPUpstreamAdapter("127.0.0.1", dovecot.port, credentials=credentials)) as server:
        client = login(server, "device", "device-pin")
        assert client.retr(1)[1][0] == b"Subject: mapped"
        client.quit()
        client = server.pop3()
        client.user("device")
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            client.pass_("wrong-pin")
        client.quit()
    with Controller(IMAPUpstreamAdapter("127.0.0.1", dovecot.port)) as server:
        with RawClient(server.address) as raw:
            raw.send(b"UTF8\r\n")
            assert raw.line().startswith(b"+OK")
            raw.send("USER real\r\nPASS pässwörd\r\n".encode("utf-8"))
            assert raw.line().startswith(b"+OK")
            assert raw.line().startswith(b"+OK real's maildrop has 1 message")
            raw.cmd("QUIT")


def test_unreachable_server_is_sys_temp():
    """Connection refused upstream: -ERR [SYS/TEMP], never [AUTH]."""
    with socket.socket() as s:  # a port the OS picked and nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Controller(IMAPUpstreamAdapter("127.0.0.1", port, timeout=5)) as server:
        client = server.pop3()
        client.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.pass_("alice-pw")
        client.quit()


def test_upstream_connection_lost_mid_session_is_sys_temp(dovecot):
    """The IMAP connection dies after login: RETR and the UPDATE state answer
    -ERR [SYS/TEMP] and nothing is deleted."""
    dovecot.append("alice", b"Subject: a\r\n\r\na\r\n")
    adapter = IMAPUpstreamAdapter("127.0.0.1", dovecot.port, timeout=10)
    with Controller(adapter) as server:
        client = login(server)
        # What a network failure does to the adapter's real socket.
        adapter._sessions["alice"].conn.sock.shutdown(socket.SHUT_RDWR)
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.retr(1)
        client.dele(1)
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.quit()
    assert len(folder_messages(dovecot, "INBOX")) == 1


def test_in_use_login_leaves_no_connection_behind(dovecot, caplog):
    """A login refused with [IN-USE] parks an IMAP connection; the next
    session logs it out, so upstream connections do not pile up."""
    adapter = IMAPUpstreamAdapter("127.0.0.1", dovecot.port)
    with Controller(adapter) as server:
        first = login(server)
        second = server.pop3()
        second.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            second.pass_("alice-pw")
        assert len(adapter._parked["alice"]) == 1
        first.quit()
        assert server.wait_for_connections(1)
        second.user("alice")
        second.pass_("alice-pw")
        assert "alice" not in adapter._parked
        second.quit()


def test_passwords_never_logged(dovecot, caplog):
    caplog.set_level(logging.DEBUG)
    with Controller(IMAPUpstreamAdapter("127.0.0.1", dovecot.port)) as server:
        client = server.pop3()
        client.user("alice")
        with pytest.raises(poplib.error_proto):
            client.pass_("secret-wrong-pw")
        client.user("alice")
        client.pass_("alice-pw")
        client.quit()
    assert "secret-wrong-pw" not in caplog.text and "alice-pw" not in caplog.text


def test_uid_set_compression():
    assert _uid_set([5]) == "5"
    assert _uid_set([3, 1, 2, 7, 9, 10, 10]) == "1:3,7,9:10"


def test_constructor_validates():
    with pytest.raises(ValueError):
        IMAPUpstreamAdapter("h", security="tls")
    with pytest.raises(ValueError):
        IMAPUpstreamAdapter("h", on_delete="archive")
    assert IMAPUpstreamAdapter("h", security="ssl").port == 993
