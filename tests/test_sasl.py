"""SASL AUTH (RFC 5034): pure mechanisms against RFC vectors, then over the wire."""
from __future__ import annotations

import base64
import hashlib
import hmac
import stringprep
import subprocess
import unicodedata

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
    """RFC 5034 section 4: without an initial response the server "MUST proceed by
    issuing an empty challenge"; RFC 4616 section 2: the one message then follows."""
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


@pytest.mark.parametrize("digest", ["é" * 32, "g" * 32, "b913a602c7eda7a495b4e6e7334d389", "0x" + "0" * 30])
def test_cram_md5_digest_that_is_not_32_hex_digits_just_fails(digest):
    """RFC 2195 section 2: the digest is 16 octets as 32 lower-case hex digits; anything
    else is a wrong answer (verify is False), never an error.  Non-ASCII digits used to
    reach hmac.compare_digest(str, str), which raises TypeError."""
    exchange = sasl.cram_md5("<1896.697170952@postoffice.reston.mci.net>")(None)
    next(exchange)
    with pytest.raises(StopIteration) as done:
        exchange.send(("tim " + digest).encode())
    user, verify = done.value.value
    assert user == "tim" and verify(Secrets(tim="tanstaaftanstaaf")) is False


def test_apop_rfc1939_vector():
    """RFC 1939 section 7 (APOP) example: mrose, secret tanstaaf."""
    stamp = "<1896.697170952@dbc.mtview.ca.us>"
    user, verify = sasl.apop(stamp, "mrose", "c4c9334bac560ecc979e58001b3e22fb")
    assert user == "mrose" and verify(Secrets(mrose="tanstaaf"))
    assert sasl.apop(stamp, "mrose", "C4C9334BAC560ECC979E58001B3E22FB")[1](Secrets(mrose="tanstaaf"))
    for digest in ("0" * 32, "é" * 32, "c4c9334bac560ecc979e58001b3e22f"):
        assert not sasl.apop(stamp, "mrose", digest)[1](Secrets(mrose="tanstaaf"))
    assert not verify(Secrets())


@pytest.mark.parametrize(
    "given, prepared",
    [("I\u00adX", "IX"), ("user", "user"), ("USER", "USER"), ("\u00aa", "a"), ("\u2168", "IX")],
)
def test_saslprep_rfc4013_examples(given, prepared):
    """RFC 4013 section 3: the examples that prepare."""
    assert sasl.saslprep(given) == prepared


def test_saslprep_leaves_printable_ascii_alone():
    """RFC 4013 section 2: no step changes or refuses a printable ASCII character
    (saslprep returns such strings as they are, without looking them up): none
    is mapped (2.1, tables B.1 and C.1.2), form KC keeps it (2.2), none is
    prohibited (2.3) or right-to-left (2.4, table D.1), and all are
    assigned (2.5).  An ASCII control character still goes through the tables."""
    printable = [chr(c) for c in range(0x20, 0x7F)]
    for c in printable:
        assert not stringprep.in_table_b1(c) and not stringprep.in_table_c12(c)
        assert unicodedata.ucd_3_2_0.normalize("NFKC", c) == c
        assert not any(table(c) for table in sasl._PROHIBITED) and not stringprep.in_table_a1(c)
        assert not stringprep.in_table_d1(c)  # no RandALCat: the bidi rule never applies
    text = "".join(printable)
    assert sasl.saslprep(text) == text and sasl.saslprep(text, stored=True) == text
    for control in ("\x00", "\x1f", "\x7f", "bench\r\n"):
        with pytest.raises(sasl.SASLError):
            sasl.saslprep(control)


@pytest.mark.parametrize("given", ["\u0007", "\u0627\u0031", "\ufffd", "\u00ad"])
def test_saslprep_refusals(given):
    """RFC 4013 section 3: a prohibited character (U+0007) and a bidi violation
    (U+0627 U+0031) are errors; so are U+FFFD (table C.6) and a string that prepares to
    nothing (RFC 5034 section 4: "results in an empty string")."""
    with pytest.raises(sasl.SASLError):
        sasl.saslprep(given)


def test_saslprep_unassigned_code_points_only_in_queries():
    """RFC 4013 section 2.5 / RFC 3454 section 7: unassigned code points (U+0221 in
    Unicode 3.2) are allowed in queries and prohibited in stored strings."""
    assert sasl.saslprep("a\u0221") == "a\u0221"
    with pytest.raises(sasl.SASLError):
        sasl.saslprep("a\u0221", stored=True)


class Refusing:
    """An adapter that must not be asked: credentials SASLprep refuses fail before it."""

    def authenticate(self, user, password):
        raise AssertionError("the adapter was asked")


def test_credentials_are_prepared_before_the_adapter_sees_them():
    """RFC 4616 section 2 (SASLprep RECOMMENDED), RFC 6856 section 2.2 (USER/PASS):
    a decomposed name reaches the adapter composed; a refused password fails unasked."""
    user, verify = sasl.credentials("ju\u0308rgen", "gr\u00fc\u00dfe")
    assert user == "j\u00fcrgen" and verify(Secrets(**{"j\u00fcrgen": "gr\u00fc\u00dfe"}))
    user, verify = sasl.credentials("tim", "pw\ufffd")
    assert user == "tim" and verify(Refusing()) is False


def test_login_mechanism():
    """draft-murchison-sasl-login-00 section 2.2: "Username:" then "Password:" challenges
    (the variant widely deployed clients need); the user name may come as initial response."""
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
    """RFC 5034 section 4 challenges ("+ " and base64) for LOGIN (draft-murchison-sasl-login
    section 2.2) and CRAM-MD5, whose challenge is a unique "<...>" string (RFC 2195 section 2)."""
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
    """RFC 5034 section 4: '*' cancels; bad base64 and unknown mechanisms are -ERR.
    (Two such refusals per connection: the third closes it, see test_exposure.)"""
    with RawClient(server.address) as c:
        assert c.cmd("AUTH PLAIN") == b"+ \r\n"
        assert c.cmd("*") == b"-ERR authentication aborted\r\n"
        assert c.cmd("AUTH PLAIN !!!notbase64") == b"-ERR invalid base64 in initial response\r\n"
        assert c.login("tim", "tanstaaftanstaaf").startswith(b"+OK")  # the session is still usable
    with RawClient(server.address) as c:
        assert c.cmd("AUTH PLAIN") == b"+ \r\n"
        assert c.cmd("%%%") == b"-ERR invalid base64 in response\r\n"
        assert c.cmd("AUTH KERBEROS_V4") == b"-ERR unsupported authentication mechanism\r\n"
        assert c.cmd("AUTH PLAIN " + b64(b"\0tim\0wrong")) == b"-ERR [AUTH] invalid user name or password\r\n"
    with RawClient(server.address) as c:
        assert c.cmd("AUTH PLAIN =") == b"-ERR malformed PLAIN response\r\n"
        assert c.login("tim", "tanstaaftanstaaf").startswith(b"+OK")


class Broken(MemoryAdapter):
    def authenticate(self, username, password):
        raise RuntimeError("bug in the adapter")


@pytest.mark.parametrize("continued", [False, True])
def test_adapter_bug_during_auth_is_logged_without_the_exchanges_stop_iteration(caplog, continued):
    """RFC 5034 section 4: an adapter failure ends AUTH with -ERR; the traceback
    (a bug) is logged, and shows the bug alone: the mechanism's StopIteration
    is not chained to it as "During handling of the above exception"."""
    with Controller(Broken({"tim": "pw"})) as server, RawClient(server.address) as c:
        if continued:
            assert c.cmd("AUTH PLAIN") == b"+ \r\n"
            reply = c.cmd(b64(b"\0tim\0pw"))
        else:
            reply = c.cmd("AUTH PLAIN " + b64(b"\0tim\0pw"))
        assert reply == b"-ERR [SYS/TEMP] internal server error\r\n"
    (record,) = [r for r in caplog.records if r.exc_info]
    assert isinstance(record.exc_info[1], RuntimeError)
    assert record.exc_info[1].__context__ is None
    assert "StopIteration" not in caplog.text and "During handling" not in caplog.text


def test_auth_without_mechanism_lists_them(server):
    """No RFC rule: RFC 5034 has no listing form of AUTH.  Checks the RFC 1734-era
    listing (as Dovecot answers it) that some clients probe with."""
    with RawClient(server.address) as c:
        c.send(b"AUTH\r\n")
        assert c.multiline() == b"+OK\r\nPLAIN\r\nLOGIN\r\nCRAM-MD5\r\nSCRAM-SHA-256\r\n.\r\n"


def test_long_sasl_response_line_accepted(server):
    """RFC 5034 section 4: responses may exceed the 255-octet command limit."""
    with RawClient(server.address) as c:
        assert c.cmd("AUTH PLAIN") == b"+ \r\n"
        assert c.cmd(b64(b"\0tim\0" + b"x" * 600)) == b"-ERR [AUTH] invalid user name or password\r\n"


def test_overlong_sasl_response_ends_the_exchange(server):
    """RFC 5034 section 4: "If the server is unable to authenticate the client, it MUST
    reject the AUTH command with an -ERR reply", and after a failed AUTH "the server MUST
    behave as if the client had not issued the AUTH command": the line after the -ERR for
    a response over our 8192-octet limit is a command again, not base64."""
    with RawClient(server.address) as c:
        assert c.cmd("AUTH PLAIN") == b"+ \r\n"
        assert c.cmd("A" * 9000) == b"-ERR line too long\r\n"
        c.send(b"CAPA\r\n")
        assert c.multiline().startswith(b"+OK Capability list follows\r\nTOP\r\n")
        assert c.login("tim", "tanstaaftanstaaf").startswith(b"+OK")


def test_cram_md5_non_hex_digest_is_a_failed_login(server):
    """RFC 5034 section 4: a failed exchange is -ERR; a non-ASCII digest is a wrong
    answer like any other ([AUTH], RFC 3206 section 5), not an internal error, and it
    counts toward the failures that close the connection."""
    with RawClient(server.address) as c:
        for _ in range(3):
            assert c.cmd("AUTH CRAM-MD5").startswith(b"+ ")
            assert c.cmd(b64(("tim " + "é" * 32).encode())) == b"-ERR [AUTH] invalid user name or password\r\n"
        assert c.read_all() == b""


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_curl_sasl(server, mechanism):
    """No RFC rule: interoperability with a real client, curl, for each mechanism it offers."""
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
    # The exchange ends at the client-final message; verify() gives the server-final
    # one, which the session sends only when the failed-login delay allows an answer.
    with pytest.raises(StopIteration) as done:
        exchange.send(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                      b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    user, verify = done.value.value
    assert user == "user" and verify(None) == b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    # RFC 5034 section 4: that success data is a last challenge, answered empty.
    last = sasl.success_data(user, verify(None))
    assert next(last) == b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    with pytest.raises(StopIteration) as done:
        last.send(b"")
    assert done.value.value == ("user", None)


def test_scram_wrong_proof_and_unknown_user_fail_at_the_end():
    """RFC 5802 section 5.1 ("e"): on failure the server MAY end the exchange without a
    server-final-message.  An unknown user gets the same full exchange as a wrong proof,
    so the exchange does not reveal which names exist (no RFC rule; our choice)."""
    for secrets_map in ({"user": "other"}, {}):
        exchange = sasl.scram_sha_256(secrets_map.get, nonce=lambda: "abc", salt=lambda: b"salt")(
            b"n,,n=user,r=xyz")
        next(exchange)
        with pytest.raises(StopIteration) as done:
            exchange.send(b"c=biws,r=xyzabc,p=" + base64.b64encode(b"x" * 32))
        assert done.value.value[1](None) is False


@pytest.mark.parametrize("first", [b"p=tls-unique,,n=user,r=x", b"n,,r=x", b"n,,n=us=er,r=x", b"garbage"])
def test_scram_malformed_client_first(first):
    """RFC 5802 section 7 syntax and section 5.1: channel binding "p=" is not supported
    (section 6), the username is required, and "=" other than "=2C"/"=3D" MUST fail."""
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
