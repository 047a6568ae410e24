"""SASL AUTH (RFC 5034): pure mechanisms against RFC vectors, then over the wire."""
from __future__ import annotations

import base64
import hashlib
import hmac
import subprocess

import pytest

from pop3frame import sasl
from pop3frame.adapters.memory import MemoryAdapter
from pop3frame.testing import Controller
from tests.helpers import RawClient, require_program


class Secrets:
    def __init__(self, **users):
        self.users = users

    def authenticate(self, user, password):
        return self.users.get(user) == password

    def apop_secret(self, user):
        return self.users.get(user)


def run(exchange, responses):
    """Drive a mechanism generator; returns (challenges, username, verify)."""
    challenges = []
    try:
        challenges.append(next(exchange))
        for r in responses:
            challenges.append(exchange.send(r))
    except StopIteration as done:
        return challenges, done.value[0], done.value[1]
    raise AssertionError("mechanism did not finish")


def test_plain_rfc4616_vectors():
    """RFC 4616 section 4 examples."""
    assert sasl.parse_plain(b"\0tim\0tanstaaftanstaaf") == ("tim", "tanstaaftanstaaf")
    # "Ursel" acting as "Kurt": proxy authorization is not supported, so refused.
    with pytest.raises(sasl.SASLError):
        sasl.parse_plain(b"Ursel\0Kurt\0xipj3plmq")
    assert sasl.parse_plain(b"tim\0tim\0pw") == ("tim", "pw")
    for bad in (b"", b"\0\0", b"a\0b", b"\0user\0", b"\0\xff\0pw"):
        with pytest.raises(sasl.SASLError):
            sasl.parse_plain(bad)


def test_plain_without_initial_response_sends_empty_challenge():
    challenges, user, verify = run(sasl.plain(None), [b"\0tim\0tanstaaftanstaaf"])
    assert challenges == [b""] and user == "tim"
    assert verify(Secrets(tim="tanstaaftanstaaf")) and not verify(Secrets(tim="other"))


def test_cram_md5_rfc2195_vector():
    """RFC 2195 section 2 example: tim / tanstaaftanstaaf."""
    challenge = "<1896.697170952@postoffice.reston.mci.net>"
    exchange = sasl.cram_md5(challenge)(None)
    assert next(exchange) == challenge.encode()
    try:
        exchange.send(b"tim b913a602c7eda7a495b4e6e7334d3890")
    except StopIteration as done:
        user, verify = done.value
    assert user == "tim"
    assert verify(Secrets(tim="tanstaaftanstaaf"))
    assert not verify(Secrets(tim="wrong"))
    assert not verify(Secrets())


def test_login_mechanism():
    challenges, user, verify = run(sasl.login(None), [b"tim", b"pw"])
    assert challenges == [b"Username:", b"Password:"] and user == "tim"
    challenges, user, verify = run(sasl.login(b"tim"), [b"pw"])
    assert challenges == [b"Password:"] and verify(Secrets(tim="pw"))


@pytest.fixture
def server():
    store = MemoryAdapter({"tim": "tanstaaftanstaaf"}, apop=True)
    store.deliver("tim", b"Subject: x\r\n\r\ny\r\n")
    with Controller(store) as controller:
        yield controller


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_auth_plain_with_initial_response(server):
    """RFC 5034 section 4: AUTH mechanism initial-response."""
    with RawClient(server.address) as c:
        assert c.cmd("AUTH PLAIN " + b64(b"\0tim\0tanstaaftanstaaf")) == (
            b"+OK tim's maildrop has 1 message (17 octets)\r\n")


def test_auth_plain_with_continuation(server):
    """RFC 5034 section 4: an empty challenge is '+ ', the response a base64 line."""
    with RawClient(server.address) as c:
        assert c.cmd("AUTH PLAIN") == b"+ \r\n"
        assert c.cmd(b64(b"\0tim\0tanstaaftanstaaf")).startswith(b"+OK tim's maildrop")


def test_auth_login_and_cram_md5_over_the_wire(server):
    with RawClient(server.address) as c:
        assert c.cmd("AUTH LOGIN") == b"+ " + base64.b64encode(b"Username:") + b"\r\n"
        assert c.cmd(b64(b"tim")) == b"+ " + base64.b64encode(b"Password:") + b"\r\n"
        assert c.cmd(b64(b"tanstaaftanstaaf")).startswith(b"+OK")
    with RawClient(server.address) as c:
        challenge = base64.b64decode(c.cmd("AUTH CRAM-MD5")[2:].strip())
        assert challenge.startswith(b"<") and challenge.endswith(b"@localhost>")
        digest = hmac.new(b"tanstaaftanstaaf", challenge, hashlib.md5).hexdigest()
        assert c.cmd(b64(b"tim " + digest.encode())).startswith(b"+OK")


def test_auth_abort_bad_base64_unknown_and_wrong(server):
    """RFC 5034 section 4: '*' cancels; bad base64 and unknown mechanisms are -ERR."""
    with RawClient(server.address) as c:
        assert c.cmd("AUTH PLAIN") == b"+ \r\n"
        assert c.cmd("*") == b"-ERR authentication aborted\r\n"
        assert c.cmd("AUTH PLAIN !!!notbase64") == b"-ERR invalid base64 in initial response\r\n"
        assert c.cmd("AUTH PLAIN") == b"+ \r\n"
        assert c.cmd("%%%") == b"-ERR invalid base64 in response\r\n"
        assert c.cmd("AUTH KERBEROS_V4") == b"-ERR unsupported authentication mechanism\r\n"
        assert c.cmd("AUTH PLAIN " + b64(b"\0tim\0wrong")) == b"-ERR [AUTH] invalid user name or password\r\n"
        assert c.cmd("AUTH PLAIN =") == b"-ERR malformed PLAIN response\r\n"
        assert c.login("tim", "tanstaaftanstaaf").startswith(b"+OK")  # the session is still usable


def test_auth_without_mechanism_lists_them(server):
    with RawClient(server.address) as c:
        c.send(b"AUTH\r\n")
        assert c.multiline() == b"+OK\r\nPLAIN\r\nLOGIN\r\nCRAM-MD5\r\nSCRAM-SHA-256\r\n.\r\n"


def test_long_sasl_response_line_accepted(server):
    """RFC 5034 section 4: responses may exceed the 255-octet command limit."""
    with RawClient(server.address) as c:
        assert c.cmd("AUTH PLAIN") == b"+ \r\n"
        assert c.cmd(b64(b"\0tim\0" + b"x" * 600)) == b"-ERR [AUTH] invalid user name or password\r\n"


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_curl_sasl(server, mechanism):
    out = subprocess.run(
        [require_program("curl"), "-sS", "--max-time", "30", "-u", "tim:tanstaaftanstaaf",
         "--login-options", "AUTH=" + mechanism, "pop3://127.0.0.1:%d/1" % server.port],
        capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"Subject: x\r\n\r\ny\r\n"


def test_scram_sha_256_rfc7677_vector():
    """RFC 7677 section 3: the complete example exchange, byte for byte."""
    exchange = sasl.scram_sha_256(
        {"user": "pencil"}.get,
        nonce=lambda: "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        salt=lambda: base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="),
    )(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
    assert next(exchange) == (b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                              b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
    final = exchange.send(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                          b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    assert final == b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    with pytest.raises(StopIteration) as done:
        exchange.send(b"")
    user, verify = done.value.value
    assert user == "user" and verify(None)


def test_scram_wrong_proof_and_unknown_user_fail_at_the_end():
    for secrets_map in ({"user": "other"}, {}):
        exchange = sasl.scram_sha_256(secrets_map.get, nonce=lambda: "abc", salt=lambda: b"salt")(
            b"n,,n=user,r=xyz")
        next(exchange)
        with pytest.raises(StopIteration) as done:
            exchange.send(b"c=biws,r=xyzabc,p=" + base64.b64encode(b"x" * 32))
        assert done.value.value[1](None) is False


@pytest.mark.parametrize("first", [b"p=tls-unique,,n=user,r=x", b"n,,r=x", b"n,,n=us=er,r=x", b"garbage"])
def test_scram_malformed_client_first(first):
    exchange = sasl.scram_sha_256({}.get, nonce=lambda: "n", salt=lambda: b"s")(first)
    with pytest.raises(sasl.SASLError):
        next(exchange)


def scram_client(c, user, password):
    """A SCRAM-SHA-256 client written from RFC 5802 section 3, over a RawClient."""
    client_nonce = "clientnonce123"
    bare = "n=%s,r=%s" % (user, client_nonce)
    reply = c.cmd("AUTH SCRAM-SHA-256 " + b64(("n,," + bare).encode()))
    server_first = base64.b64decode(reply[2:].strip()).decode()
    attrs = dict(part.split("=", 1) for part in server_first.split(","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    without_proof = "c=biws,r=" + attrs["r"]
    auth_message = ",".join((bare, server_first, without_proof)).encode()
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    reply = c.cmd(b64((without_proof + ",p=" + base64.b64encode(proof).decode()).encode()))
    if reply.startswith(b"-ERR"):
        return reply, None
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    expected = b"v=" + base64.b64encode(hmac.new(server_key, auth_message, hashlib.sha256).digest())
    return c.cmd(""), base64.b64decode(reply[2:].strip()) == expected


def test_scram_sha_256_end_to_end(server):
    """RFC 7677 over RFC 5034: the server proves it knows the secret, then +OK."""
    with RawClient(server.address) as c:
        reply, server_verified = scram_client(c, "tim", "tanstaaftanstaaf")
        assert server_verified is True
        assert reply.startswith(b"+OK tim's maildrop has 1 message")
    with RawClient(server.address) as c:
        reply, _ = scram_client(c, "tim", "wrong")
        assert reply == b"-ERR [AUTH] invalid user name or password\r\n"
