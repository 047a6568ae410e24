"""IMAP upstream adapter against a real Dovecot (beyond the conformance suite).

RFC 3501 (IMAP4rev1: UIDVALIDITY, RFC822.SIZE, partial BODY.PEEK[]
fetches), RFC 4315 (UIDPLUS: UID EXPUNGE) and RFC 6851 (MOVE) on the
upstream side; RFC 1939 on the POP3 side.
"""
from __future__ import annotations

import base64
import gc
import imaplib
import logging
import poplib
import socket
import warnings

import pytest

from pop3frame import TemporaryFailure
from pop3frame.adapters import imap
from pop3frame.adapters.imap import PARK_SECONDS, IMAPUpstreamAdapter, _body_sections, _uid_set
from pop3frame.testing import Controller, ManualClock
from tests.dovecot import Dovecot, require as require_dovecot
from tests.helpers import RawClient, expected_failure_logged_once, refused_login, retr_lines_to_bytes


@pytest.fixture
def dovecot():
    require_dovecot()
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


def test_sizes_count_the_line_end_pop3_adds(dovecot, monkeypatch):
    """RFC 1939 section 11: LIST counts the octets RETR sends, so a message
    without a final line end counts the CRLF the server appends (and a
    final lone CR the LF); later sessions ask IMAP only about new UIDs."""
    dovecot.append("alice", b"Subject: no newline\r\n\r\nlast line")
    dovecot.append("alice", b"Subject: ends\r\n\r\nfine\r\n")
    dovecot.append("alice", b"x")
    dovecot.drop("alice", b"Subject: cr\n\nlone cr\r")
    asked = []
    real = imap._pipelined_tails
    monkeypatch.setattr(imap, "_pipelined_tails", lambda conn, wanted: asked.append(wanted) or real(conn, wanted))
    monkeypatch.setattr(imap, "PIPELINE_DEPTH", 3)  # more messages than one pipeline window

    def sizes_and_bodies():
        client = login(server)
        try:
            sizes = [int(l.split()[1]) for l in client.list()[1]]
            return sizes, [retr_lines_to_bytes(client.retr(i)[1]) for i in range(1, len(sizes) + 1)]
        finally:
            client.quit()

    with Controller(IMAPUpstreamAdapter("127.0.0.1", dovecot.port)) as server:
        sizes, bodies = sizes_and_bodies()
        assert bodies == [
            b"Subject: no newline\r\n\r\nlast line\r\n",
            b"Subject: ends\r\n\r\nfine\r\n",
            b"x\r\n",
            b"Subject: cr\r\n\r\nlone cr\r\n",
        ]
        assert sizes == [len(b) for b in bodies] == [34, 23, 3, 24]
        assert [uid for uid, _ in asked[0]] == [1, 2, 3, 4]
        dovecot.append("alice", b"Subject: new\r\n\r\nno end")
        asked.clear()
        sizes, bodies = sizes_and_bodies()
        assert sizes == [len(b) for b in bodies] and len(sizes) == 5
        assert [[uid for uid, _ in wanted] for wanted in asked] == [[5]]  # 1-4 came from the cache


def test_line_end_cache_is_dropped_when_uidvalidity_changes(dovecot):
    """RFC 3501 section 2.3.1.1: a new UIDVALIDITY means UIDs name other
    messages; what was learnt about the old UID 1 must not size the new one."""
    def recreate_reports(data):
        conn = dovecot.imap("alice")
        conn.delete("Reports")
        assert conn.create("Reports")[0] == "OK"
        conn.logout()
        dovecot.append("alice", data, folder="Reports")

    conn = dovecot.imap("alice")
    conn.create("Reports")
    conn.logout()
    dovecot.append("alice", b"Subject: old\r\n\r\nno end", folder="Reports")
    with Controller(IMAPUpstreamAdapter("127.0.0.1", dovecot.port, folder="Reports")) as server:
        for data in (None, b"Subject: new one\r\n\r\nends\r\n"):
            if data:
                recreate_reports(data)
            client = login(server)
            (uid,) = [l.split()[1] for l in client.uidl()[1]]
            assert uid.endswith(b".1")
            assert int(client.list()[1][0].split()[1]) == len(retr_lines_to_bytes(client.retr(1)[1]))
            client.quit()


def test_body_sections_parses_literals_quoted_strings_and_late_uids():
    """RFC 3501 section 7.4.2: BODY[]<origin> may be a literal or a quoted
    string, and UID may follow the body; NIL and flag updates are no body."""
    data = [
        (b"1 (UID 7 BODY[]<10> {2}", b"\r\n"), b")",
        (b"2 (BODY[]<3> {2}", b"ab"), b" UID 8)",
        b'3 (UID 9 BODY[]<0> "x\\"")',
        b"4 (UID 10 BODY[]<0> NIL)",
        b"5 (FLAGS (\\Seen))",
        None,
    ]
    assert _body_sections(data) == {7: b"\r\n", 8: b"ab", 9: b'x"'}


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


def test_a_message_expunged_part_way_raises_instead_of_ending(dovecot):
    """Another client expunges the message between two partial fetches: Dovecot answers
    NIL, and the reader raises TemporaryFailure rather than report an early end (the server
    then closes without RFC 1939 section 3's terminator)."""
    uid = dovecot.append("alice", b"Subject: big\r\n\r\n" + b"x" * 998 * 100 + b"\r\n")
    adapter = IMAPUpstreamAdapter("127.0.0.1", dovecot.port, chunk_size=4096)
    assert adapter.authenticate("alice", "alice-pw")
    try:
        stream = adapter.open_message("alice", adapter.list_messages("alice")[0])
        assert len(stream.read(4096)) == 4096
        other = dovecot.imap("alice")
        other.select("INBOX")
        other.uid("STORE", str(uid), "+FLAGS.SILENT", r"(\Deleted)")
        other.expunge()
        other.logout()
        with pytest.raises(TemporaryFailure, match="expunged"):
            while stream.read(4096):  # ends: 25 chunks at most
                pass
    finally:
        adapter.close_mailbox("alice")


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


@pytest.mark.parametrize("command", ["PASS", "AUTH PLAIN"])
def test_unreachable_server_is_sys_temp_and_one_log_line(caplog, command):
    """Connection refused upstream: -ERR [SYS/TEMP], never [AUTH]; the log
    says so in one WARNING line with the cause, no traceback (and none
    chained to the SASL exchange's StopIteration)."""
    caplog.set_level(logging.INFO)
    with socket.socket() as s:  # a port the OS picked and nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Controller(IMAPUpstreamAdapter("127.0.0.1", port, timeout=5)) as server:
        with RawClient(server.address) as client:
            if command == "PASS":
                assert client.cmd("USER alice").startswith(b"+OK")
                reply = client.cmd("PASS alice-pw")
            else:
                reply = client.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice\0alice-pw").decode())
            assert reply == b"-ERR [SYS/TEMP] upstream mail server unavailable\r\n"
            client.cmd("QUIT")
        assert server.wait_for_connections(0)
    line = expected_failure_logged_once(caplog.records, "Connection refused")
    assert line.getMessage() == "cannot connect to IMAP server 127.0.0.1:%d: Connection refused" % port
    assert "Traceback" not in caplog.text and "StopIteration" not in caplog.text


def test_failed_starttls_is_sys_temp_and_closes_the_socket(dovecot):
    """RFC 3501 section 6.2.1: a server without STARTTLS (this Dovecot has
    ssl = no) cannot secure the link: no login is tried, the client gets
    -ERR [SYS/TEMP] and the half-made connection is closed, not left to
    the garbage collector (which would warn about an unclosed socket)."""
    adapter = IMAPUpstreamAdapter("127.0.0.1", dovecot.port, security="starttls")
    gc.collect()  # what earlier tests left is found now, not counted below
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TemporaryFailure):
            adapter.connect()
        gc.collect()
    # The recording is process-wide: only a socket to this Dovecot is ours.
    ours = "raddr=('127.0.0.1', %d)" % dovecot.port
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning) and ours in str(w.message)] == []
    for w in caught:  # anything else goes where it would have gone (an error, for ResourceWarning)
        if ours not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    with Controller(adapter) as server:
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


def login_then_in_use(server):
    """alice logged in, and a second login of hers refused with [IN-USE] (it parks
    an upstream connection); both POP3 clients, still open."""
    first = login(server)
    second = server.pop3()
    second.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_("alice-pw")
    return first, second


def test_in_use_login_leaves_no_connection_behind(dovecot, caplog):
    """A login refused with [IN-USE] parks an IMAP connection; the next
    session logs it out, so upstream connections do not pile up."""
    adapter = IMAPUpstreamAdapter("127.0.0.1", dovecot.port)
    with Controller(adapter) as server:
        first, second = login_then_in_use(server)
        assert "alice" in adapter._parked
        first.quit()
        assert server.wait_for_connections(1)
        second.user("alice")
        second.pass_("alice-pw")
        assert "alice" not in adapter._parked
        second.quit()


def test_stale_parked_logins_expire_on_the_injected_clock(dovecot):
    """A connection parked by a login refused [IN-USE] is logged out once it
    is older than PARK_SECONDS on the adapter's clock, by whichever login
    or session end comes next, not only by that user's next login."""
    dovecot.add_user("bob", "bob-pw")
    clock = ManualClock()
    adapter = IMAPUpstreamAdapter("127.0.0.1", dovecot.port, clock=clock)

    def refused_login():
        client = server.pop3()
        client.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            client.pass_("alice-pw")
        client.quit()
        return adapter._parked["alice"].conn

    with Controller(adapter) as server:
        first = login(server)
        stale = refused_login()
        clock.advance(PARK_SECONDS - 1)
        login(server, "bob", "bob-pw").quit()
        assert stale.state == "AUTH"  # not old enough yet
        clock.advance(2)
        login(server, "bob", "bob-pw").quit()  # another user's login reaps it
        assert stale.state == "LOGOUT" and "alice" not in adapter._parked
        stale = refused_login()
        clock.advance(PARK_SECONDS + 1)
        first.quit()  # the end of a session reaps too
        assert server.wait_for_connections(0)
        assert stale.state == "LOGOUT" and "alice" not in adapter._parked


def test_close_logs_out_every_upstream_connection(dovecot):
    """AdapterBase.close() at shutdown: parked logins and live sessions."""
    dovecot.append("alice", b"Subject: a\r\n\r\na\r\n")
    adapter = IMAPUpstreamAdapter("127.0.0.1", dovecot.port)
    with Controller(adapter) as server:
        first, second = login_then_in_use(server)
        conns = [adapter._parked["alice"].conn, adapter._sessions["alice"].conn]
        adapter.close()
        assert [c.state for c in conns] == ["LOGOUT", "LOGOUT"]
        assert not adapter._parked and not adapter._sessions
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            first.retr(1)
        first.quit()
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


# -- user names upstream, and the logins parked after [IN-USE] ---------------------


@pytest.mark.parametrize("other", ['"alice"', "ALICE"])
def test_another_spelling_of_a_logged_in_account_gets_in_use(dovecot, other):
    """Issue 14 defect 8: USER "alice" went upstream unquoted, as the quoted
    string alice, and logged in while alice held the lock: two sessions on one
    mailbox.  Now the name is sent quoted (Dovecot knows no user "alice" with
    quotes), and the lock is on the account case-folded (Dovecot folds case,
    so ALICE is alice): either way no second session."""
    adapter = IMAPUpstreamAdapter("127.0.0.1", dovecot.port)
    with Controller(adapter) as server:
        first = login(server)
        assert refused_login(server, other, "alice-pw").startswith(
            b"-ERR [IN-USE]" if other == "ALICE" else b"-ERR [AUTH]")
        first.quit()
    adapter.close()  # logs out the login parked after [IN-USE]


def test_credentials_mapping_two_names_to_one_account_share_its_lock(dovecot):
    accounts = {"al": ("alice", "alice-pw"), "alias": ("alice", "alice-pw")}
    adapter = IMAPUpstreamAdapter("127.0.0.1", dovecot.port, credentials=lambda u, p: accounts.get(u))
    with Controller(adapter) as server:
        first = login(server, "al", "x")
        assert refused_login(server, "alias", "x").startswith(b"-ERR [IN-USE]")
        first.quit()
    adapter.close()  # logs out the login parked after [IN-USE]


def test_a_name_with_spaces_is_one_quoted_argument_upstream(dovecot):
    """A name from AUTH PLAIN may hold spaces; unquoted they were more LOGIN
    arguments (Dovecot: BAD).  Quoted, it is one name that does not exist."""
    adapter = IMAPUpstreamAdapter("127.0.0.1", dovecot.port)
    conn = adapter.connect()
    try:
        with pytest.raises(imaplib.IMAP4.error, match=r"AUTHENTICATIONFAILED"):
            adapter._login(conn, "alice alice-pw", "x")
    finally:
        conn.shutdown()
    with Controller(adapter) as server, RawClient(server.address) as c:
        plain = base64.b64encode(b"\0alice alice-pw\0x").decode()
        assert c.cmd("AUTH PLAIN " + plain) == b"-ERR [AUTH] invalid user name or password\r\n"


@pytest.mark.parametrize("user,password", [
    ("alice alice-pw\r\nX1 CREATE Injected\r\nX2 LOGIN alice", "alice-pw"),
    ("alice", 'alice-pw\r\nX1 CREATE Injected'),
    ("alice\0", "alice-pw"),
])
def test_nul_cr_lf_never_reach_the_upstream_server(dovecot, user, password, caplog):
    """No IMAP string carries NUL, CR or LF; sent raw, a CRLF in the name ended
    LOGIN and ran what followed as alice's commands.  (POP3 clients cannot send
    them, SASLprep refuses them; a credentials mapping or a caller might.)"""
    caplog.set_level(logging.INFO, logger="pop3frame.adapters.imap")
    adapter = IMAPUpstreamAdapter("127.0.0.1", dovecot.port)
    assert adapter.authenticate(user, password) is False
    assert not adapter._parked
    assert "not tried: NUL, CR or LF" in caplog.text
    conn = dovecot.imap("alice")
    try:
        assert b"Injected" not in b"".join(conn.list()[1])
    finally:
        conn.logout()


def test_in_use_logins_park_one_connection_per_user(dovecot):
    """Each login refused [IN-USE] parked an upstream connection for 60 s,
    without limit: now a user has at most one parked, the newest."""
    adapter = IMAPUpstreamAdapter("127.0.0.1", dovecot.port)
    with Controller(adapter) as server:
        first = login(server)
        conns = []
        for _ in range(4):
            assert refused_login(server, "alice", "alice-pw").startswith(b"-ERR [IN-USE]")
            conns.append(adapter._parked["alice"].conn)
        assert len(adapter._parked) == 1
        assert [c.state for c in conns] == ["LOGOUT"] * 3 + ["AUTH"]
        first.quit()
    adapter.close()
    assert conns[-1].state == "LOGOUT"


def test_parked_logins_are_bounded_in_all(dovecot):
    """max_parked over all users: the oldest parked login is logged out first."""
    for user in ("bob", "carol"):
        dovecot.add_user(user, user + "-pw")
    adapter = IMAPUpstreamAdapter("127.0.0.1", dovecot.port, max_parked=2)
    try:
        with Controller(adapter) as server:
            sessions = [login(server, u, u + "-pw") for u in ("alice", "bob", "carol")]
            parked = []
            for user in ("alice", "bob", "carol"):
                assert refused_login(server, user, user + "-pw").startswith(b"-ERR [IN-USE]")
                parked.append(adapter._parked[user].conn)
            assert list(adapter._parked) == ["bob", "carol"]
            assert [c.state for c in parked] == ["LOGOUT", "AUTH", "AUTH"]
            for s in sessions:
                s.quit()
    finally:
        adapter.close()  # logs out the two still parked


def test_parked_login_bounds_are_validated():
    with pytest.raises(ValueError, match="max_parked"):
        IMAPUpstreamAdapter("127.0.0.1", max_parked=0)
    with pytest.raises(ValueError, match="NUL, CR or LF"):
        IMAPUpstreamAdapter("127.0.0.1", folder="INBOX\r\nX LOGOUT")
