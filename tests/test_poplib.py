"""Python's poplib against every capability pop3frame announces (issue 6).

Everything goes through ``poplib`` as an application would use it; where
poplib has no method for a command (AUTH, LANG) its generic ``_shortcmd`` /
``_longcmd`` send it, as its own ``utf8()`` and ``stls()`` do.
"""
from __future__ import annotations

import base64
import poplib
import ssl

import pytest
import trustme

from pop3frame.adapters.memory import MemoryAdapter
from pop3frame.testing import Controller
from pop3frame.tls import TLSCertificates
from tests.helpers import retr_lines_to_bytes

MESSAGES = [
    b"Subject: one\r\nFrom: a@example.org\r\n\r\nfirst\r\n",
    b"Subject: dots\r\n\r\n.leading dot\r\n.\r\n..two\r\nend\r\n",
    b"Subject: stored with LF\n\nbare LF\n",
]
WIRE = [m.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for m in MESSAGES]


@pytest.fixture(scope="module")
def tls():
    """A caller-made server context (TLSCertificates(context=...)) and a client context trusting it."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return TLSCertificates(context=server), client


@pytest.fixture
def store():
    s = MemoryAdapter({"alice": "pw", "jürgen": "grüße"}, apop=True)
    for i, m in enumerate(MESSAGES, 1):
        s.deliver("alice", m, uid="uid-%d" % i)
    return s


@pytest.fixture
def server(store, tls):
    with Controller(store, tls=tls[0]) as controller:
        yield controller


@pytest.fixture
def client(server):
    c = server.pop3()
    yield c
    c.close()


def logged_in(server) -> poplib.POP3:
    c = server.pop3()
    c.user("alice")
    c.pass_("pw")
    return c


def test_capa_lists_every_capability(client):
    """RFC 2449 section 5 (CAPA) and section 6 (TOP, USER, SASL, RESP-CODES, PIPELINING,
    EXPIRE, UIDL, IMPLEMENTATION), RFC 3206 section 6 (AUTH-RESP-CODE), RFC 2595
    section 4 (STLS), RFC 6856 section 2 (UTF8 USER) and section 3 (LANG).  After
    login, RFC 2449 section 5: what AUTHORIZATION offered is still announced."""
    capa = client.capa()
    for name in ("TOP", "USER", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "STLS", "LANG"):
        assert capa[name] == [], name
    assert capa["UTF8"] == ["USER"]
    assert capa["SASL"] == ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"]
    assert capa["EXPIRE"] == ["NEVER"]
    assert capa["IMPLEMENTATION"][0].startswith("pop3frame-")
    client.user("alice")
    client.pass_("pw")
    # STLS is the one exception: RFC 2595 section 4 permits it only before login.
    assert client.capa() == {name: args for name, args in capa.items() if name != "STLS"}
    client.quit()


def test_user_pass_and_every_transaction_command(server, store, client):
    """RFC 1939 section 7 (USER, PASS, TOP, UIDL), section 5 (STAT, LIST, RETR, DELE,
    NOOP, RSET) and section 6 (QUIT applies the deletions)."""
    assert client.user("alice") == b"+OK send PASS"
    total = sum(map(len, WIRE))
    assert client.pass_("pw") == b"+OK alice's maildrop has 3 messages (%d octets)" % total
    assert client.stat() == (3, total)
    resp, listing, _ = client.list()
    assert resp.startswith(b"+OK 3 messages")
    assert listing == [b"%d %d" % (i, len(w)) for i, w in enumerate(WIRE, 1)]
    assert client.list(2) == b"+OK 2 %d" % len(WIRE[1])
    for i, wire in enumerate(WIRE, 1):
        resp, lines, octets = client.retr(i)
        assert resp == b"+OK %d octets" % len(wire)
        assert retr_lines_to_bytes(lines) == wire  # poplib undid the byte-stuffing
    assert client.top(2, 1)[1] == [b"Subject: dots", b"", b".leading dot"]
    assert client.top(1, 0)[1] == [b"Subject: one", b"From: a@example.org", b""]
    assert client.uidl()[1] == [b"1 uid-1", b"2 uid-2", b"3 uid-3"]
    assert client.uidl(3) == b"+OK 3 uid-3"
    assert client.dele(1) == b"+OK message 1 deleted"
    assert client.stat() == (2, total - len(WIRE[0]))
    assert client.list()[1] == [b"2 %d" % len(WIRE[1]), b"3 %d" % len(WIRE[2])]
    assert client.rset() == b"+OK maildrop has 3 messages (%d octets)" % total
    client.dele(3)
    assert client.noop() == b"+OK"
    assert client.quit() == b"+OK localhost POP3 server signing off (2 messages left)"
    assert server.wait_for_connections(0)
    assert store.messages("alice") == MESSAGES[:2]


def test_apop(server, client):
    """RFC 1939 section 7: APOP with the digest of the greeting's timestamp and the secret."""
    assert client.timestamp.search(client.welcome) is not None
    assert client.apop("alice", "pw").startswith(b"+OK alice's maildrop has 3 messages")
    assert client.stat()[0] == 3
    client.quit()
    other = server.pop3()
    with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[AUTH\]"):
        other.apop("alice", "wrong")
    other.quit()


def test_sasl_plain_with_initial_response(client):
    """RFC 5034 section 4 (AUTH with an initial response), RFC 4616 (PLAIN)."""
    response = base64.b64encode(b"\0alice\0pw").decode()
    assert client._shortcmd("AUTH PLAIN " + response).startswith(b"+OK alice's maildrop")
    assert client.stat()[0] == 3
    client.quit()


def test_utf8_and_lang(store, client):
    """RFC 6856 section 2 (UTF8 enables UTF-8 user names and passwords) and section 3.2
    (LANG lists languages; selecting one names the tag selected)."""
    assert client.utf8() == b"+OK UTF8 enabled"
    client.user("jürgen")
    assert client.pass_("grüße") == "+OK jürgen's maildrop has 0 messages (0 octets)".encode()
    resp, languages, _ = client._longcmd("LANG")
    assert resp.startswith(b"+OK") and languages == [b"en English"]
    assert client._shortcmd("LANG en").startswith(b"+OK en ")  # the tag selected
    client.quit()


def test_stls(server, tls):
    """RFC 2595 section 4: STLS in AUTHORIZATION, then CAPA again (no STLS), then login."""
    _, context = tls
    client = server.pop3()
    assert client.stls(context) == b"+OK Begin TLS negotiation"
    assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
    assert "STLS" not in client.capa()
    client.user("alice")
    client.pass_("pw")
    assert client.stat()[0] == 3
    client.quit()


def test_pop3_ssl(store, tls):
    """RFC 8314 section 3.3: implicit TLS, through poplib.POP3_SSL."""
    certificates, context = tls
    with Controller(store, tls=certificates, secure=True) as server:
        client = poplib.POP3_SSL("127.0.0.1", server.port, context=context, timeout=10)
        assert "STLS" not in client.capa()
        client.user("alice")
        client.pass_("pw")
        assert retr_lines_to_bytes(client.retr(2)[1]) == WIRE[1]
        client.quit()


# -- errors: poplib.error_proto carries the -ERR line with its response code ----------


def test_wrong_password_has_auth_code(client):
    """RFC 3206 section 5: a credentials problem is -ERR [AUTH]."""
    client.user("alice")
    with pytest.raises(poplib.error_proto) as failed:
        client.pass_("wrong")
    assert failed.value.args[0].startswith(b"-ERR [AUTH] ")


def test_mailbox_in_use(server):
    """RFC 2449 section 8.1.2: a second login to a locked maildrop gets -ERR [IN-USE]."""
    first = logged_in(server)
    second = server.pop3()
    second.user("alice")
    with pytest.raises(poplib.error_proto) as busy:
        second.pass_("pw")
    assert busy.value.args[0].startswith(b"-ERR [IN-USE] ")
    second.quit()
    first.quit()


def test_vanished_message_is_sys_temp(server, store):
    """RFC 3206 section 4: a problem likely to pass is -ERR [SYS/TEMP]."""
    client = logged_in(server)
    with store._mutex:
        del store._boxes["alice"][0]  # removed behind the session's back
    with pytest.raises(poplib.error_proto) as failed:
        client.retr(1)
    assert failed.value.args[0] == b"-ERR [SYS/TEMP] message no longer exists"
    assert client.retr(2)[0].startswith(b"+OK")  # the session goes on
    client.quit()


def test_read_only_dele_is_sys_perm(store):
    """RFC 3206 section 4: a refusal that needs an administrator is -ERR [SYS/PERM]."""
    with Controller(store, read_only=True) as server:
        client = logged_in(server)
        with pytest.raises(poplib.error_proto) as refused:
            client.dele(1)
        assert refused.value.args[0] == b"-ERR [SYS/PERM] mailbox is read-only"
        client.quit()
    assert store.messages("alice") == MESSAGES


def test_bad_message_numbers_have_no_code(server):
    """RFC 1939 section 5: -ERR for a message that does not exist or is deleted;
    RFC 2449 section 8: no response code fits, so none is given."""
    client = logged_in(server)
    client.dele(2)
    for call in (lambda: client.retr(4), lambda: client.list(0), lambda: client.top(2, 0),
                 lambda: client.uidl(2), lambda: client.dele(2)):
        with pytest.raises(poplib.error_proto) as failed:
            call()
        assert failed.value.args[0].startswith(b"-ERR ") and b"[" not in failed.value.args[0]
    client.quit()
