"""POP3 commands in every state, over real sockets (raw bytes and poplib)."""
from __future__ import annotations

import hashlib
import io
import poplib
import socket

import pytest
import trustme

from pop3frame import AdapterBase, MessageInfo, ServerConfig
from pop3frame.adapters.memory import MemoryAdapter
from pop3frame.session import Session, SessionContext
from pop3frame.testing import Controller
from pop3frame.tls import TLSCertificates
from tests.helpers import RawClient, drop


@pytest.fixture
def server(adapter):
    with Controller(adapter) as controller:
        yield controller


@pytest.fixture
def raw(server):
    with RawClient(server.address) as client:
        yield client


@pytest.fixture
def logged_in(raw):
    assert raw.login("alice", "alice-pw") == b"+OK alice's maildrop has 3 messages (81 octets)\r\n"
    return raw


# -- RFC 1939 section 10: the example session, byte for byte ---------------------

MSG_120 = b"From: a@dbc.mtview.ca.us\r\nSubject: one\r\n\r\n" + b"x" * 76 + b"\r\n"
MSG_200 = b"From: b@dbc.mtview.ca.us\r\nSubject: two\r\n\r\n" + b"y" * 156 + b"\r\n"


class FixedTimestamp(Session):
    def apop_timestamp(self) -> str:
        return "<1896.697170952@dbc.mtview.ca.us>"


def test_rfc1939_section10_example_session_exact_bytes():
    """RFC 1939 section 10: the example session reproduced byte for byte."""
    assert (len(MSG_120), len(MSG_200)) == (120, 200)
    store = MemoryAdapter({"mrose": "tanstaaf"})
    store.deliver("mrose", MSG_120)
    store.deliver("mrose", MSG_200)
    config = ServerConfig(hostname="dbc.mtview.ca.us", server_name="dewey")
    context = SessionContext(store, config, session_class=FixedTimestamp)
    with Controller(context) as server, RawClient(server.address) as c:
        assert c.greeting == b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>\r\n"
        c.send(b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n")
        assert c.line() == b"+OK mrose's maildrop has 2 messages (320 octets)\r\n"
        assert c.cmd("STAT") == b"+OK 2 320\r\n"
        c.send(b"LIST\r\n")
        assert c.multiline() == b"+OK 2 messages (320 octets)\r\n1 120\r\n2 200\r\n.\r\n"
        c.send(b"RETR 1\r\n")
        assert c.multiline() == b"+OK 120 octets\r\n" + MSG_120 + b".\r\n"
        assert c.cmd("DELE 1") == b"+OK message 1 deleted\r\n"
        c.send(b"RETR 2\r\n")
        assert c.multiline() == b"+OK 200 octets\r\n" + MSG_200 + b".\r\n"
        assert c.cmd("DELE 2") == b"+OK message 2 deleted\r\n"
        assert c.cmd("QUIT") == b"+OK dewey POP3 server signing off (maildrop empty)\r\n"
        assert c.read_all() == b""
    assert store.messages("mrose") == []


# -- AUTHORIZATION state (RFC 1939 section 4 and 7) ---------------------------------


@pytest.mark.parametrize("command", ["STAT", "LIST", "RETR 1", "DELE 1", "NOOP", "RSET", "TOP 1 0", "UIDL"])
def test_transaction_commands_refused_before_login(raw, command):
    """RFC 1939 section 4: only USER/PASS/APOP/QUIT (and CAPA) before login."""
    assert raw.cmd(command).startswith(b"-ERR ")
    # The session is still usable afterwards.
    assert raw.login("alice", "alice-pw").startswith(b"+OK")


def test_pass_must_follow_user(raw):
    """RFC 1939 section 7 (PASS): only valid immediately after a successful USER."""
    assert raw.cmd("PASS alice-pw").startswith(b"-ERR")
    assert raw.cmd("USER alice") == b"+OK send PASS\r\n"
    assert raw.cmd("CAPA").startswith(b"+OK")
    raw.multiline()
    assert raw.cmd("PASS alice-pw").startswith(b"-ERR")


def test_overlong_line_between_user_and_pass(raw):
    """RFC 1939 section 7 (PASS): valid only "immediately after a successful USER"; an
    over-long line in between was a (failed) command, so PASS no longer follows USER."""
    assert raw.cmd("USER alice") == b"+OK send PASS\r\n"
    assert raw.cmd("X" * 300) == b"-ERR line too long\r\n"
    assert raw.cmd("PASS alice-pw") == b"-ERR PASS must follow USER\r\n"


def test_user_reply_does_not_reveal_existence(raw):
    """RFC 2449 section 8.1.1 note and RFC 3206 section 5 note: answers to USER must not
    reveal that a user exists, so USER answers every name alike."""
    assert raw.cmd("USER alice") == raw.cmd("USER nosuchuser")


def test_bad_password_gets_auth_code(raw):
    """RFC 3206 section 4 / RFC 2449 AUTH-RESP-CODE: [AUTH] on bad credentials."""
    raw.cmd("USER alice")
    assert raw.cmd("PASS nope") == b"-ERR [AUTH] invalid user name or password\r\n"


def test_password_with_spaces():
    """RFC 1939 section 7 (PASS): spaces may be part of the password."""
    store = MemoryAdapter({"carol": " two  words "})
    with Controller(store) as server, RawClient(server.address) as c:
        c.cmd("USER carol")
        assert c.cmd("PASS  two  words ").startswith(b"+OK")


def test_quit_in_authorization(raw):
    """RFC 1939 section 6: QUIT before login just signs off."""
    assert raw.cmd("QUIT") == b"+OK localhost POP3 server signing off\r\n"
    assert raw.read_all() == b""


def test_too_many_auth_failures_close_the_connection(raw):
    """No RFC rule: max_auth_failures (3) failed logins close the connection."""
    for _ in range(2):
        raw.cmd("USER alice")
        assert raw.cmd("PASS wrong").startswith(b"-ERR [AUTH]")
    raw.cmd("USER alice")
    assert raw.cmd("PASS wrong").startswith(b"-ERR [AUTH]")
    assert raw.read_all() == b""


def test_apop_good_and_bad(server):
    """RFC 1939 section 7 (APOP): MD5 of the banner timestamp and the shared secret."""
    with RawClient(server.address) as c:
        stamp = c.greeting.split()[-1].decode()
        assert stamp.startswith("<") and stamp.endswith("@localhost>")
        assert c.cmd("APOP alice " + "0" * 32).startswith(b"-ERR [AUTH]")
        digest = hashlib.md5((stamp + "alice-pw").encode()).hexdigest()
        assert c.cmd("APOP alice " + digest).startswith(b"+OK alice's maildrop")


def test_apop_timestamps_are_unique(server):
    """RFC 1939 section 7 (APOP): the timestamp "MUST be different each time the POP3
    server issues a banner greeting"."""
    with RawClient(server.address) as a, RawClient(server.address) as b:
        assert a.greeting != b.greeting


def test_apop_not_offered_without_secret():
    """RFC 2449 section 6: clients discover APOP by the timestamp in the greeting, so an
    adapter without shared secrets gets a greeting without one, and APOP is refused."""
    class NoApop(AdapterBase):
        def authenticate(self, username, password):
            return True

        def list_messages(self, username):
            return []

    with Controller(NoApop()) as server, RawClient(server.address) as c:
        assert c.greeting == b"+OK POP3 server ready\r\n"
        assert c.cmd("APOP alice " + "0" * 32) == b"-ERR APOP not supported\r\n"


# -- TRANSACTION state ------------------------------------------------------------


def test_stat_list_uidl(logged_in):
    """RFC 1939 sections 5 and 7: STAT, LIST, UIDL with and without argument."""
    assert logged_in.cmd("STAT") == b"+OK 3 81\r\n"
    logged_in.send(b"LIST\r\n")
    assert logged_in.multiline() == b"+OK 3 messages (81 octets)\r\n1 23\r\n2 33\r\n3 25\r\n.\r\n"
    assert logged_in.cmd("LIST 2") == b"+OK 2 33\r\n"
    logged_in.send(b"UIDL\r\n")
    assert logged_in.multiline() == b"+OK\r\n1 uid-one\r\n2 uid-two\r\n3 uid-three\r\n.\r\n"
    assert logged_in.cmd("UIDL 3") == b"+OK 3 uid-three\r\n"


def test_retr_and_top_exact_bytes(logged_in):
    """RFC 1939 section 7: RETR and TOP are byte-stuffed, CRLF, end in '.CRLF'."""
    logged_in.send(b"RETR 2\r\n")
    assert logged_in.multiline() == b"+OK 33 octets\r\nSubject: two\r\n\r\n..dotted\r\nsecond\r\n.\r\n"
    logged_in.send(b"TOP 3 0\r\n")
    assert logged_in.multiline() == b"+OK\r\nSubject: three\r\n\r\n.\r\n"
    logged_in.send(b"TOP 2 1\r\n")
    assert logged_in.multiline() == b"+OK\r\nSubject: two\r\n\r\n..dotted\r\n.\r\n"


@pytest.mark.parametrize(
    "command",
    ["DELE 0", "DELE -1", "DELE 99999999999999999999", "DELE 4", "DELE abc", "DELE 1 2", "DELE", "DELE +1",
     "DELE 1.0", "RETR 0", "LIST 0", "UIDL 0", "TOP 1", "TOP 1 -1", "TOP 1 x", "TOP 0 1", "STAT 1", "NOOP x",
     "RSET 1", "QUIT now"],
)
def test_bad_arguments_refused_and_nothing_deleted(server, adapter, logged_in, command):
    """RFC 1939 section 7: out-of-range, non-numeric, zero, negative, extra args all get -ERR."""
    reply = logged_in.cmd(command)
    assert reply.startswith(b"-ERR ")
    assert logged_in.cmd("STAT") == b"+OK 3 81\r\n"
    assert logged_in.cmd("QUIT").startswith(b"+OK")
    assert len(adapter.messages("alice")) == 3


def test_deleted_message_is_invisible(logged_in):
    """RFC 1939 section 7 (DELE): a deleted message may not be referenced further."""
    assert logged_in.cmd("DELE 2") == b"+OK message 2 deleted\r\n"
    for command in ("LIST 2", "UIDL 2", "TOP 2 0", "RETR 2", "DELE 2"):
        assert logged_in.cmd(command) == b"-ERR message 2 already deleted\r\n"
    assert logged_in.cmd("STAT") == b"+OK 2 48\r\n"
    logged_in.send(b"LIST\r\n")
    assert logged_in.multiline() == b"+OK 2 messages (48 octets)\r\n1 23\r\n3 25\r\n.\r\n"
    logged_in.send(b"UIDL\r\n")
    assert logged_in.multiline() == b"+OK\r\n1 uid-one\r\n3 uid-three\r\n.\r\n"
    assert logged_in.cmd("UIDL 3") == b"+OK 3 uid-three\r\n"


def test_rset_restores(adapter, logged_in):
    """RFC 1939 section 5 (RSET): unmarks every deleted message."""
    logged_in.cmd("DELE 1")
    logged_in.cmd("DELE 3")
    assert logged_in.cmd("RSET") == b"+OK maildrop has 3 messages (81 octets)\r\n"
    assert logged_in.cmd("QUIT") == b"+OK localhost POP3 server signing off (3 messages left)\r\n"
    assert len(adapter.messages("alice")) == 3


def test_dele_then_quit_deletes(adapter, logged_in):
    """RFC 1939 section 6: marked messages are removed in UPDATE after QUIT."""
    logged_in.cmd("DELE 1")
    logged_in.cmd("DELE 3")
    assert logged_in.cmd("QUIT") == b"+OK localhost POP3 server signing off (1 message left)\r\n"
    assert adapter.messages("alice") == [b"Subject: two\r\n\r\n.dotted\r\nsecond\r\n"]


def test_dele_then_disconnect_deletes_nothing(server, adapter, logged_in):
    """RFC 1939 section 6: without QUIT there is no UPDATE state."""
    logged_in.cmd("DELE 1")
    logged_in.sock.shutdown(socket.SHUT_RDWR)
    assert server.wait_for_connections(0)
    assert len(adapter.messages("alice")) == 3
    assert not server.context.locks.held_names()


def test_noop_and_auth_commands_in_transaction(logged_in):
    """RFC 1939 section 5: NOOP; USER/PASS/APOP are invalid once logged in."""
    assert logged_in.cmd("NOOP") == b"+OK\r\n"
    for command in ("USER alice", "PASS x", "APOP alice " + "0" * 32):
        assert logged_in.cmd(command).startswith(b"-ERR ")


def test_unknown_command_keeps_session(logged_in):
    assert logged_in.cmd("XYZZ") == b"-ERR unknown command\r\n"
    assert logged_in.cmd("STAT").startswith(b"+OK 3")


# -- CAPA (RFC 2449 section 5) ----------------------------------------------------

CAPS = [b"TOP", b"USER", b"SASL PLAIN LOGIN CRAM-MD5 SCRAM-SHA-256", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING",
        b"EXPIRE NEVER", b"UTF8 USER", b"LANG", b"IMPLEMENTATION pop3frame-0.1.0"]


def capa(client: RawClient) -> bytes:
    client.send(b"CAPA\r\n")
    return client.multiline()


def test_capa_in_both_states(raw):
    """RFC 2449 section 5: CAPA is valid in AUTHORIZATION and TRANSACTION, and every
    capability here is "both / no" (announced alike in both states): USER (6.2), SASL
    (RFC 5034 section 3, which adds that SASL MUST stay listed after a successful AUTH),
    UTF8 and LANG (RFC 6856 sections 2 and 3).  No LOGIN-DELAY: none is enforced."""
    expected = b"+OK Capability list follows\r\n" + b"".join(c + b"\r\n" for c in CAPS) + b".\r\n"
    assert capa(raw) == expected
    raw.login("alice", "alice-pw")
    assert capa(raw) == expected


def test_sasl_still_listed_after_auth(server):
    """RFC 5034 section 3: "implementations MUST continue to include the SASL capability
    even after a successful AUTH command has been completed"."""
    with RawClient(server.address) as c:
        assert c.cmd("AUTH PLAIN AGFsaWNlAGFsaWNlLXB3").startswith(b"+OK")  # \0alice\0alice-pw
        assert b"\r\nSASL PLAIN LOGIN CRAM-MD5 SCRAM-SHA-256\r\n" in capa(c)


def test_stls_listed_only_where_permitted(adapter, tmp_path):
    """RFC 2595 section 4: "The capability name "STLS" indicates this command is present
    and permitted in the current state", and STLS is "Only permitted in AUTHORIZATION
    state" (section 8: "Announced states/Valid states: AUTHORIZATION state only")."""
    issued = trustme.CA().issue_cert("localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    with Controller(adapter, tls=TLSCertificates(str(cert), str(key))) as server, RawClient(server.address) as c:
        before = capa(c)
        assert b"\r\nSTLS\r\n" in before
        c.login("alice", "alice-pw")
        after = capa(c)
        assert b"STLS" not in after and after == before.replace(b"STLS\r\n", b"")
        assert c.cmd("STLS") == b"-ERR STLS not valid in the TRANSACTION state\r\n"


def test_login_delay_announced_only_when_enforced(adapter):
    """RFC 2449 section 6.5: LOGIN-DELAY gives the seconds "before another authentication
    will be accepted"; announced ("both / yes": the same value here, not per user) only
    when the server enforces one."""
    with Controller(adapter, login_delay=300) as server, RawClient(server.address) as c:
        assert b"\r\nLOGIN-DELAY 300\r\n" in capa(c)
        c.login("alice", "alice-pw")
        assert b"\r\nLOGIN-DELAY 300\r\n" in capa(c)


def test_poplib_capa(server):
    """RFC 2449 section 5 through Python's poplib client."""
    client = server.pop3()
    caps = client.capa()
    assert set(caps) >= {"TOP", "USER", "UIDL", "RESP-CODES", "PIPELINING", "EXPIRE", "UTF8", "LANG"}
    assert caps["UTF8"] == ["USER"] and "LOGIN-DELAY" not in caps
    client.quit()


# -- PIPELINING (RFC 2449 section 6.6) ---------------------------------------------


def test_pipelining_100_commands_in_one_write(server, adapter):
    """RFC 2449 section 6.6: a client may send many commands at once; replies keep order."""
    with RawClient(server.address) as c:
        batch = b"USER alice\r\nPASS alice-pw\r\n"
        batch += b"".join(b"LIST %d\r\n" % (i % 3 + 1) for i in range(97))
        batch += b"QUIT\r\n"
        c.send(batch)
        data = c.read_all()
    lines = data.split(b"\r\n")[:-1]
    assert len(lines) == 100
    assert lines[0] == b"+OK send PASS"
    assert lines[1].startswith(b"+OK alice's maildrop")
    sizes = {1: 23, 2: 33, 3: 25}
    assert lines[2:99] == [b"+OK %d %d" % (i % 3 + 1, sizes[i % 3 + 1]) for i in range(97)]
    assert lines[99].startswith(b"+OK localhost POP3 server signing off")


def test_pipelined_retr_stream_in_order(logged_in):
    logged_in.send(b"RETR 1\r\nRETR 2\r\nNOOP\r\n")
    assert logged_in.multiline().startswith(b"+OK 23 octets\r\nSubject: one")
    assert logged_in.multiline().startswith(b"+OK 33 octets\r\nSubject: two")
    assert logged_in.line() == b"+OK\r\n"


# -- bad input (RFC 2449 section 4: 255-octet command lines) --------------------------


def test_overlong_line_is_refused_and_session_continues(logged_in):
    """RFC 2449 section 4: commands are at most 255 octets including CRLF."""
    logged_in.send(b"NOOP " + b"x" * 300 + b"\r\n")
    assert logged_in.line() == b"-ERR line too long\r\n"
    assert logged_in.cmd("NOOP") == b"+OK\r\n"
    logged_in.send(b"NOOP" + b" " * 249 + b"\r\n")  # exactly 255 octets
    assert logged_in.line() == b"+OK\r\n"


def test_megabyte_without_newline_closes_with_bounded_memory(server, adapter):
    with RawClient(server.address) as c:
        try:
            c.send(b"A" * (1 << 20))
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert c.read_all().startswith(b"-ERR line too long\r\n")
    assert server.wait_for_connections(0)
    client = server.pop3()
    client.user("alice")
    assert client.pass_("alice-pw").startswith(b"+OK")
    client.quit()


@pytest.mark.parametrize("line", [b"\r\n", b"NO\x00OP\r\n", b"NOOP \xff\xfe\r\n", b"\xc3\xa9\r\n", b"   \r\n"])
def test_garbage_lines_get_err(logged_in, line):
    logged_in.send(line)
    assert logged_in.line().startswith(b"-ERR ")
    assert logged_in.cmd("NOOP") == b"+OK\r\n"


# -- the mailbox lock (RFC 1939 section 8) ----------------------------------------------


def test_lock_taken_only_after_password(server, adapter):
    """PITFALLS: USER victim + disconnect must neither lock nor unlock the victim's mailbox."""
    alice = server.pop3()
    alice.user("alice")
    alice.pass_("alice-pw")
    for _ in range(3):
        intruder = server.pop3()
        intruder.user("alice")
        drop(intruder)
    assert server.wait_for_connections(1)
    assert server.context.locks.held_names() == ["alice"]
    assert alice.stat() == (3, 81)
    other = server.pop3()
    other.user("alice")
    with pytest.raises(poplib.error_proto, match=r"IN-USE"):
        other.pass_("alice-pw")
    alice.quit()
    other.quit()


def test_wrong_password_for_locked_mailbox_says_auth_not_in_use(server):
    """No [IN-USE] before the password is verified: it would reveal activity to anyone."""
    alice = server.pop3()
    alice.user("alice")
    alice.pass_("alice-pw")
    other = server.pop3()
    other.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        other.pass_("wrong")
    alice.quit()
    other.quit()


# -- adapter failures (PITFALLS: no exception text on the wire) ---------------------------


class Exploding(MemoryAdapter):
    def __init__(self, where):
        super().__init__({"alice": "pw"}, apop=False)
        self.where = where
        self.deliver("alice", b"Subject: a\r\n\r\n" + b"x" * 1000 + b"\r\n")
        self.deliver("alice", b"Subject: b\r\n\r\nb\r\n")

    def _boom(self, where):
        if self.where == where:
            raise RuntimeError("secret /var/lib/internal path")

    def authenticate(self, username, password):
        self._boom("authenticate")
        return super().authenticate(username, password)

    def list_messages(self, username):
        self._boom("list")
        return super().list_messages(username)

    def open_message(self, username, message):
        self._boom("open")
        return super().open_message(username, message)

    def delete_messages(self, username, messages):
        self._boom("delete")
        return super().delete_messages(username, messages)


@pytest.mark.parametrize("where,command", [("authenticate", "PASS pw"), ("list", "PASS pw")])
def test_adapter_exception_at_login(where, command):
    store = Exploding(where)
    with Controller(store) as server, RawClient(server.address) as c:
        c.cmd("USER alice")
        assert c.cmd(command) == b"-ERR [SYS/TEMP] internal server error\r\n"
        assert not server.context.locks.held_names()


def test_adapter_exception_on_retr():
    store = Exploding("open")
    with Controller(store) as server, RawClient(server.address) as c:
        c.login("alice", "pw")
        assert c.cmd("RETR 1") == b"-ERR [SYS/TEMP] internal server error\r\n"
        assert c.cmd("NOOP") == b"+OK\r\n"


def test_adapter_failure_in_update_deletes_nothing():
    """RFC 1939 section 6: QUIT answers -ERR if removal failed; the lock is still released."""
    store = Exploding("delete")
    with Controller(store) as server, RawClient(server.address) as c:
        c.login("alice", "pw")
        c.cmd("DELE 1")
        assert c.cmd("QUIT") == b"-ERR [SYS/TEMP] some deleted messages not removed\r\n"
        assert c.read_all() == b""
        assert server.wait_for_connections(0)
        assert not server.context.locks.held_names()
    assert len(store.messages("alice")) == 2


def test_stream_failing_mid_retr_closes_connection_and_frees_lock():
    class Broken:
        def __init__(self):
            self.calls = 0
            self.closed = False

        def read(self, n):
            self.calls += 1
            if self.calls > 1:
                raise OSError("disk gone")
            return b"Subject: x\r\n\r\npartial"

        def close(self):
            self.closed = True

    stream = Broken()

    class Flaky(MemoryAdapter):
        def open_message(self, username, message):
            return stream

    store = Flaky({"alice": "pw"}, apop=False)
    store.deliver("alice", b"Subject: x\r\n\r\nbody\r\n")
    store.deliver("alice", b"Subject: y\r\n\r\nbody\r\n")
    with Controller(store) as server, RawClient(server.address) as c:
        c.login("alice", "pw")
        c.cmd("DELE 2")
        c.send(b"RETR 1\r\n")
        # No terminating dot: the client can tell the message is incomplete.
        assert not c.read_all().endswith(b".\r\n")
        assert server.wait_for_connections(0)
        assert not server.context.locks.held_names()
    assert stream.closed
    assert len(store.messages("alice")) == 2


BIG = b"Subject: big\r\n\r\n" + b"0123456789" * 100_000 + b"\r\n"


class Misreported(MemoryAdapter):
    """Lists every message ``delta`` octets longer (or shorter) than its stream
    turns out to be, and records message_retrieved calls."""

    def __init__(self, delta):
        super().__init__({"alice": "pw"}, apop=False)
        self.delta = delta
        self.retrieved = []
        self.deliver("alice", BIG)

    def list_messages(self, username):
        return [MessageInfo(m.uid, m.size + self.delta, m.key) for m in super().list_messages(username)]

    def message_retrieved(self, username, message):
        self.retrieved.append(message.uid)


@pytest.mark.parametrize("delta", [1, 5000, -1, -5000])
def test_retr_of_the_wrong_length_never_ends_cleanly(delta, caplog):
    """RFC 1939 section 3: the terminator says the message is complete, so a RETR whose
    stream ends short of (delta > 0) or runs past (delta < 0) the size LIST announced
    ends with a closed connection instead, with at most the announced octets sent; the
    error is logged, message_retrieved is not called, pipelined commands get no reply."""
    store = Misreported(delta)
    size = len(BIG) + delta
    with Controller(store) as server, RawClient(server.address) as c:
        c.login("alice", "pw")
        c.send(b"RETR 1\r\nNOOP\r\n")
        assert c.line() == b"+OK %d octets\r\n" % size
        body = c.read_all()
        assert b"\r\n.\r\n" not in body and b"+OK" not in body
        assert len(body) <= min(size, len(BIG))
        assert server.wait_for_connections(0)
        assert not server.context.locks.held_names()
    assert store.retrieved == []
    assert "announced" in caplog.text and "closing without the terminator" in caplog.text


def test_runaway_stream_is_cut_at_the_announced_size():
    """An adapter stream that never ends is not streamed on and on: the server stops
    reading it as soon as it ran past the size, and closes the connection."""
    class Endless:
        reads = 0

        def read(self, n):
            Endless.reads += 1
            return b"y" * n

        def close(self):
            pass

    class Runaway(Misreported):
        def open_message(self, username, message):
            return Endless()

    store = Runaway(0)
    with Controller(store) as server, RawClient(server.address) as c:
        c.login("alice", "pw")
        c.send(b"RETR 1\r\n")
        assert c.line() == b"+OK %d octets\r\n" % len(BIG)
        received = 0
        while received <= len(BIG) and c._fill():  # bounded: a server that streams on fails here
            received, c.buf = received + len(c.buf), b""
        assert received <= len(BIG)
        assert c.read_all() == b""
    assert Endless.reads <= len(BIG) // (256 * 1024) + 2
    assert store.retrieved == []


def test_top_is_exempt_from_the_length_check_but_not_from_the_rule():
    """RFC 1939 section 7: TOP sends part of a message, so a stream shorter than LIST
    said still ends with '.CRLF'; an adapter error part-way still means no terminator."""
    store = Misreported(1000)
    with Controller(store) as server, RawClient(server.address) as c:
        c.login("alice", "pw")
        c.send(b"TOP 1 100000\r\n")
        assert c.line() == b"+OK\r\n"
        assert c.multiline() == BIG + b".\r\n"

    class Failing:
        def __init__(self):
            self.data = io.BytesIO(BIG)

        def readline(self, limit=-1):
            if self.data.tell() > 100_000:
                raise OSError("disk gone")
            return self.data.readline(limit)

        def close(self):
            pass

    class Broken(Misreported):
        def open_message(self, username, message):
            return Failing()

    with Controller(Broken(0)) as server, RawClient(server.address) as c:
        c.login("alice", "pw")
        c.send(b"TOP 1 100000\r\n")
        assert c.line() == b"+OK\r\n"
        assert not c.read_all().endswith(b".\r\n")


def test_read_only_refuses_dele(adapter):
    """RFC 3206 section 4: [SYS/PERM] when retrying cannot help; CAPA says X-READ-ONLY (RFC 2449 section 8)."""
    with Controller(adapter, read_only=True) as server, RawClient(server.address) as c:
        c.send(b"CAPA\r\n")
        assert b"\r\nX-READ-ONLY\r\n" in c.multiline()
        c.login("alice", "alice-pw")
        assert c.cmd("DELE 1") == b"-ERR [SYS/PERM] mailbox is read-only\r\n"
        c.send(b"CAPA\r\n")
        assert b"\r\nX-READ-ONLY\r\n" in c.multiline()


def test_invalid_uid_from_adapter_is_rejected_early():
    with pytest.raises(ValueError):
        MessageInfo("has space", 10)
