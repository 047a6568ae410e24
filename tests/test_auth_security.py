"""Failed-login defence (delays, per-connection limit, optional lockout) and UTF-8 logins.

Delays run on an injected clock (freezegun's, see the ``frozen`` fixture):
a test learns from the server's log that a reply is being withheld, sees
that no byte has arrived, moves the clock and only then reads the reply.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import poplib
import queue
import re
import select
import unicodedata

import pytest

from pop3frame.adapters.memory import MemoryAdapter
from pop3frame.auth import FailureThrottle
from pop3frame.testing import Controller
from tests.helpers import RawClient

ATTACKER = "127.0.0.2"
WRONG = b"-ERR [AUTH] invalid user name or password\r\n"
LOCKED = b"-ERR [SYS/TEMP] too many failed logins from your address; try again later\r\n"


class Withheld(logging.Handler):
    """The server's "reply withheld for N s" log lines, as a queue a test can block on."""

    PATTERN = re.compile(r"reply withheld for (\S+) s")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.delays: "queue.Queue[float]" = queue.Queue()

    def emit(self, record: logging.LogRecord) -> None:
        match = self.PATTERN.search(record.getMessage())
        if match:
            self.delays.put(float(match.group(1)))

    def next(self) -> float:
        """Seconds of the next withheld reply (waits for the server to get there)."""
        return self.delays.get(timeout=10)


@pytest.fixture
def withheld():
    handler = Withheld()
    logger = logging.getLogger("pop3frame")
    level = logger.level
    logger.setLevel(logging.DEBUG)  # a per-event line, DEBUG like the others
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def clock_of(frozen):
    return lambda: frozen().timestamp()


def nothing_to_read(client: RawClient) -> bool:
    """No reply byte has arrived (checked without waiting)."""
    return not client.buf and not select.select([client.sock], [], [], 0)[0]


def attacker(server: Controller) -> RawClient:
    return RawClient((ATTACKER, server.port), source=ATTACKER)


def failure_delays(count: int, free: int = 3, cap: float = 60) -> list:
    """The delay of each of ``count`` failures in a row from one address."""
    return [0 if n <= free else min(2 ** (n - free - 1), cap) for n in range(1, count + 1)]


# -- the throttle on its own -----------------------------------------------------------


def test_throttle_delays_grow_cap_and_follow_the_address(frozen):
    """Each failure beyond the free ones is answered 1, 2, 4 ... s later, capped, per address."""
    clock = clock_of(frozen)
    throttle = FailureThrottle(free=3, max_delay=15, clock=clock)
    delays = [throttle.failure("198.51.100.7") - clock() for _ in range(9)]
    assert delays == [0, 0, 0, 1, 2, 4, 8, 15, 15]
    assert throttle.not_before("198.51.100.8") == clock()  # another address waits for nothing
    assert throttle.failure("198.51.100.8") == clock()
    assert throttle.locked_for("198.51.100.7") == 0  # no lockout unless configured


def test_throttle_success_waits_for_the_pending_failure_only(frozen):
    """A right password is answered no sooner than the last wrong one, and at once after it."""
    clock = clock_of(frozen)
    throttle = FailureThrottle(free=0, max_delay=60, clock=clock)
    release = throttle.failure("198.51.100.7")
    assert release == clock() + 1
    assert throttle.not_before("198.51.100.7") == release
    frozen.tick(1)
    assert throttle.not_before("198.51.100.7") == clock()
    # Logging in does not reset the count (a valid account must not buy free guesses)...
    assert throttle.failure("198.51.100.7") == clock() + 2
    # ...only an hour without failures does.
    frozen.tick(FailureThrottle.FORGET_AFTER + 3)
    assert throttle.failure("198.51.100.7") == clock() + 1


def test_throttle_lockout(frozen):
    """Optional: after N failures the address is locked out for the configured time."""
    clock = clock_of(frozen)
    throttle = FailureThrottle(free=3, max_delay=60, clock=clock, lockout_failures=5, lockout_duration=900)
    for _ in range(4):
        throttle.failure("198.51.100.7")
    assert throttle.locked_for("198.51.100.7") == 0
    throttle.failure("198.51.100.7")
    assert throttle.locked_for("198.51.100.7") == 900
    assert throttle.locked_for("198.51.100.8") == 0
    frozen.tick(900)
    assert throttle.locked_for("198.51.100.7") == 0


def test_throttle_huge_failure_counts_stay_capped(frozen):
    """The exponential never overflows: the cap holds after thousands of failures."""
    clock = clock_of(frozen)
    throttle = FailureThrottle(free=0, max_delay=60, clock=clock)
    assert throttle.delay(5000) == 60
    assert throttle.delay(1) == 1 and throttle.delay(0) == 0


# -- over the wire ----------------------------------------------------------------------


def test_brute_force_is_delayed_and_cut_off(frozen, withheld):
    """50 wrong passwords in a row: growing delays that survive reconnecting, a closed
    connection after every third failure; a correct login from another client, and then
    from the attacker's address, goes straight in (no lockout by default)."""
    store = MemoryAdapter({"alice": "right"}, apop=False)
    # Three failures at the 60 s cap take one connection past the default
    # login_timeout (its own test is in test_exposure): room for them here.
    options = dict(host="0.0.0.0", clock=clock_of(frozen), poll_interval=0.01, allow_plaintext_auth=True,
                   login_timeout=600)
    with Controller(store, **options) as server:
        expected = failure_delays(50)
        seen, closed = [], 0
        while len(seen) < 50:
            with attacker(server) as c:
                for _ in range(3):
                    if len(seen) == 50:
                        break
                    assert c.cmd("USER alice") == b"+OK send PASS\r\n"
                    c.send(b"PASS wrong%d\r\n" % len(seen))
                    delay = expected[len(seen)]
                    if delay:
                        assert withheld.next() == delay
                        assert nothing_to_read(c)
                        frozen.tick(delay)
                    assert c.line() == WRONG
                    seen.append(delay)
                else:
                    closed += c.read_all() == b""  # the third failure on a connection closes it
        # Failure 4 is the first of the second connection: reconnecting kept the count.
        assert seen == expected and expected[3:10] == [1, 2, 4, 8, 16, 32, 60]
        assert closed == 16
        client = poplib.POP3("127.0.0.1", server.port, timeout=10)
        client.user("alice")
        assert client.pass_("right").startswith(b"+OK")
        client.quit()
        with attacker(server) as c:
            assert c.login("alice", "right").startswith(b"+OK alice's maildrop")
        assert withheld.delays.empty()


def test_right_password_is_withheld_as_long_as_a_wrong_one(frozen, withheld):
    """No timing oracle: while a failure's answer is pending, a right password from the
    same address is answered no sooner, so hanging up on slow answers skips nothing."""
    store = MemoryAdapter({"alice": "right"}, apop=False)
    options = dict(host="0.0.0.0", clock=clock_of(frozen), poll_interval=0.01, allow_plaintext_auth=True,
                   free_auth_failures=0)
    with Controller(store, **options) as server, attacker(server) as guesser, attacker(server) as owner:
        guesser.cmd("USER alice")
        guesser.send(b"PASS wrong\r\n")
        assert withheld.next() == 1
        owner.cmd("USER alice")
        owner.send(b"PASS right\r\n")
        assert withheld.next() == 1
        assert nothing_to_read(guesser) and nothing_to_read(owner)
        frozen.tick(1)
        assert guesser.line() == WRONG
        assert owner.line().startswith(b"+OK alice's maildrop")


def test_pipelined_guesses_wait_in_turn(frozen, withheld):
    """RFC 2449 section 6.6: pipelined commands are answered in order, so guesses sent
    in one write are delayed one after the other; the third failure closes the connection."""
    store = MemoryAdapter({"alice": "right"}, apop=False)
    options = dict(host="0.0.0.0", clock=clock_of(frozen), poll_interval=0.01, allow_plaintext_auth=True,
                   free_auth_failures=1)
    with Controller(store, **options) as server, attacker(server) as c:
        c.send(b"USER alice\r\nPASS a\r\nUSER alice\r\nPASS b\r\nUSER alice\r\nPASS c\r\nCAPA\r\n")
        assert c.line() == b"+OK send PASS\r\n" and c.line() == WRONG and c.line() == b"+OK send PASS\r\n"
        assert withheld.next() == 1 and nothing_to_read(c)
        frozen.tick(1)
        assert c.line() == WRONG and c.line() == b"+OK send PASS\r\n"
        assert withheld.next() == 2 and nothing_to_read(c)
        frozen.tick(2)
        assert c.line() == WRONG
        assert c.read_all() == b""  # closed: the pipelined CAPA is never answered


def test_lockout_refuses_without_checking_the_password(frozen, withheld):
    """Optional per-address lockout: refusals say [SYS/TEMP] (RFC 3206 section 4, a
    temporary condition), not [AUTH] (section 5: the credentials are the problem), since
    the password is not even looked at; other addresses are unaffected; it expires."""

    class Counting(MemoryAdapter):
        checks = 0

        def authenticate(self, username, password):
            Counting.checks += 1
            return super().authenticate(username, password)

    store = Counting({"alice": "right"}, apop=False)
    options = dict(host="0.0.0.0", clock=clock_of(frozen), poll_interval=0.01, allow_plaintext_auth=True,
                   auth_lockout_failures=3, auth_lockout_duration=900)
    with Controller(store, **options) as server:
        with attacker(server) as c:
            for _ in range(3):
                assert c.login("alice", "wrong") == WRONG
        assert Counting.checks == 3
        with attacker(server) as c:
            assert c.login("alice", "right") == LOCKED
            assert Counting.checks == 3
            assert c.cmd("AUTH PLAIN AGFsaWNlAHJpZ2h0") == LOCKED  # \0alice\0right
        with RawClient(server.address) as c:
            assert c.login("alice", "right").startswith(b"+OK")
        assert server.wait_for_connections(0)  # alice's mailbox lock is released
        frozen.tick(900)
        with attacker(server) as c:
            assert c.login("alice", "right").startswith(b"+OK")
        assert withheld.delays.empty()


# -- every mechanism: nothing that depends on the password before the delay or lockout --


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def send_credentials(c: RawClient, mechanism: str, user: str, password: str) -> None:
    """Log in with ``mechanism`` up to its last message, whose answer depends on the
    password and is left unread.  Earlier challenges depend on nothing secret."""
    if mechanism == "USER":
        assert c.cmd("USER " + user) == b"+OK send PASS\r\n"
        c.send(b"PASS %s\r\n" % password.encode())
    elif mechanism == "APOP":
        timestamp = re.search(rb"<[^>]*>", c.greeting).group(0)
        c.send(b"APOP %s %s\r\n" % (user.encode(), hashlib.md5(timestamp + password.encode()).hexdigest().encode()))
    elif mechanism == "PLAIN":
        c.send(b"AUTH PLAIN %s\r\n" % b64(b"\0%s\0%s" % (user.encode(), password.encode())))
    elif mechanism == "LOGIN":
        assert c.cmd("AUTH LOGIN") == b"+ " + b64(b"Username:") + b"\r\n"
        assert c.cmd(b64(user.encode()).decode()) == b"+ " + b64(b"Password:") + b"\r\n"
        c.send(b64(password.encode()) + b"\r\n")
    elif mechanism == "CRAM-MD5":
        challenge = base64.b64decode(c.cmd("AUTH CRAM-MD5")[2:])
        digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
        c.send(b64(("%s %s" % (user, digest)).encode()) + b"\r\n")
    else:  # SCRAM-SHA-256, RFC 5802 section 3
        bare = "n=%s,r=clientnonce" % user
        server_first = base64.b64decode(c.cmd("AUTH SCRAM-SHA-256 " + b64(("n,," + bare).encode()).decode())[2:])
        attrs = dict(part.split(b"=", 1) for part in server_first.split(b","))
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs[b"s"]), int(attrs[b"i"]))
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        without_proof = b"c=biws,r=" + attrs[b"r"]
        auth_message = b",".join((bare.encode(), server_first, without_proof))
        signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        c.send(b64(without_proof + b",p=" + b64(proof)) + b"\r\n")


MECHANISMS = ["USER", "APOP", "PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"]


class Counted(MemoryAdapter):
    """Counts every look at a secret: password checks and shared-secret lookups."""

    def __init__(self) -> None:
        super().__init__({"alice": "right"}, apop=True)
        self.looks = 0

    def authenticate(self, username, password):
        self.looks += 1
        return super().authenticate(username, password)

    def apop_secret(self, username):
        self.looks += 1
        return super().apop_secret(username)


def throttled_server(frozen, **options) -> Controller:
    return Controller(Counted(), host="0.0.0.0", clock=clock_of(frozen), poll_interval=0.01,
                      allow_plaintext_auth=True, **options)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_right_and_wrong_guesses_are_answered_together_after_failures(frozen, withheld, mechanism):
    """Issue 14, defect 4: after a failure, a right and a wrong guess made at once are
    both withheld until the failed-login delay is over, for every mechanism.  Before,
    SCRAM-SHA-256 sent its server-final message (RFC 5802 section 3: ``v=``, which only
    a right password earns) at once, so a guesser could hang up on every slow answer."""
    with throttled_server(frozen, free_auth_failures=1) as server, attacker(server) as first, \
            attacker(server) as wrong, attacker(server) as right:
        assert first.login("alice", "wrong") == WRONG
        send_credentials(wrong, mechanism, "alice", "wrong")
        assert withheld.next() == 1
        send_credentials(right, mechanism, "alice", "right")
        assert withheld.next() == 1  # the pending failure's answer time: nothing sooner
        assert nothing_to_read(wrong) and nothing_to_read(right)
        frozen.tick(1)
        assert wrong.line() == WRONG
        answer = right.line()
        if mechanism == "SCRAM-SHA-256":
            assert answer.startswith(b"+ ") and base64.b64decode(answer[2:]).startswith(b"v=")
            answer = right.cmd("")  # RFC 5034 section 4: the success data is answered empty
        assert answer.startswith(b"+OK alice's maildrop")


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_lockout_answers_right_and_wrong_alike_before_any_check(frozen, withheld, mechanism):
    """Issue 14, defect 4: a locked-out address gets the same -ERR [SYS/TEMP] at once for a
    right and a wrong guess, with every mechanism, and no secret is looked at (for SCRAM
    the decision comes before the server-final message)."""
    with throttled_server(frozen, auth_lockout_failures=1, auth_lockout_duration=900) as server:
        with attacker(server) as c:
            assert c.login("alice", "wrong") == WRONG
        store = server.context.adapter
        looks = store.looks
        for password in ("right", "wrong"):
            with attacker(server) as c:
                send_credentials(c, mechanism, "alice", password)
                assert c.line() == LOCKED
        assert store.looks == looks
        assert withheld.delays.empty()


def test_shutdown_ends_a_withheld_reply(frozen, withheld):
    """A session waiting out a delay ends at shutdown, without its reply, at once."""
    store = MemoryAdapter({"alice": "right"}, apop=False)
    options = dict(clock=clock_of(frozen), poll_interval=0.01, free_auth_failures=0)
    with Controller(store, **options) as server, RawClient(server.address) as c:
        c.cmd("USER alice")
        c.send(b"PASS wrong\r\n")
        assert withheld.next() == 1
        server.stop()
        assert server.wait_for_connections(0, timeout=5)
        assert c.read_all() == b""


# -- UTF-8 user names and passwords (RFC 6856) ---------------------------------------------


@pytest.fixture
def utf8_server():
    store = MemoryAdapter({"jürgen": "grüße"}, apop=False)
    with Controller(store) as server:
        yield server


def test_utf8_credentials_before_the_utf8_command(utf8_server):
    """RFC 6856 section 2.2: with "UTF8 USER" announced, "the client MAY use UTF-8
    characters with a USER, PASS, or APOP command; the client MAY do so before issuing
    the UTF8 command".  Section 2.1: outside UTF-8 mode no non-ASCII string is sent, so
    the +OK leaves the name out."""
    with RawClient(utf8_server.address) as c:
        c.send("USER jürgen\r\n".encode())
        assert c.line() == b"+OK send PASS\r\n"
        c.send("PASS grüße\r\n".encode())
        assert c.line() == b"+OK maildrop has 0 messages (0 octets)\r\n"


def test_utf8_mode_names_the_user(utf8_server):
    """RFC 6856 section 2.1: the UTF8 command switches to UTF-8 mode, where UTF-8
    strings may be sent to the client."""
    with RawClient(utf8_server.address) as c:
        assert c.cmd("UTF8") == b"+OK UTF8 enabled\r\n"
        c.send("USER jürgen\r\nPASS grüße\r\n".encode())
        assert c.line() == b"+OK send PASS\r\n"
        assert c.line() == "+OK jürgen's maildrop has 0 messages (0 octets)\r\n".encode()


def test_utf8_credentials_are_saslprepped(utf8_server):
    """RFC 6856 section 2.2: the server SHOULD apply SASLprep to USER and PASS, and MUST
    reject names or passwords holding a character SASLprep prohibits (U+FFFD, RFC 3454
    table C.6) or that are not UTF-8 (RFC 3629)."""
    decomposed = unicodedata.normalize("NFD", "jürgen")
    assert decomposed != "jürgen"
    with RawClient(utf8_server.address) as c:
        c.send(("USER %s\r\nPASS grüße\r\n" % decomposed).encode())
        assert c.line() == b"+OK send PASS\r\n"
        assert c.line().startswith(b"+OK maildrop has 0 messages")
    with RawClient(utf8_server.address) as c:
        c.send("USER jürgen\r\nPASS grüße\ufffd\r\n".encode())
        assert c.line() == b"+OK send PASS\r\n"
        assert c.line() == WRONG
        c.send(b"USER j\xfcrgen\r\n")  # Latin-1, not UTF-8
        assert c.line().startswith(b"-ERR")


def test_other_commands_stay_ascii_until_utf8(utf8_server):
    """RFC 6856 section 2.2 exempts only USER, PASS and APOP from ASCII-only mode."""
    with RawClient(utf8_server.address) as c:
        c.send("LANG dé\r\n".encode())
        assert c.line() == b"-ERR non-ASCII octets in command\r\n"
        c.cmd("UTF8")
        c.send("LANG dé\r\n".encode())
        assert c.line() == "-ERR invalid language dé\r\n".encode()


def test_lang(pop3_controller_factory):
    """RFC 6856 section 3.2: LANG lists languages; a selection answers "+OK", the exact
    tag selected, then text; "*" selects the server's preferred language; an unknown
    language is -ERR and the current one stays.  Both states (section 3.1)."""
    server = pop3_controller_factory(MemoryAdapter({"alice": "pw"}))
    with RawClient(server.address) as c:
        c.send(b"LANG\r\n")
        assert c.multiline() == b"+OK Language listing follows\r\nen English\r\n.\r\n"
        assert c.cmd("LANG en") == b"+OK en Language changed\r\n"
        assert c.cmd("LANG EN-gb") == b"+OK en Language changed\r\n"  # RFC 4647 section 3.4 lookup
        assert c.cmd("LANG *") == b"+OK en Language changed\r\n"
        assert c.cmd("LANG MUL") == b"-ERR invalid language MUL\r\n"
        assert c.cmd("LANG en_US") == b"-ERR invalid language en_US\r\n"  # not a language range
        assert c.login("alice", "pw").startswith(b"+OK")
        assert c.cmd("LANG en") == b"+OK en Language changed\r\n"


@pytest.mark.parametrize("command", ["UTF8", "STLS", "AUTH PLAIN"])
def test_authorization_only_commands_refused_in_transaction(command):
    """Valid only in AUTHORIZATION: UTF8 (RFC 6856 section 2, "Commands valid in
    states"), STLS (RFC 2595 section 4) and AUTH (RFC 5034 section 4, which requires
    -ERR for AUTH after a successful login)."""
    store = MemoryAdapter({"a": "b"}, apop=False)
    with Controller(store) as server, RawClient(server.address) as c:
        c.login("a", "b")
        assert c.cmd(command).startswith(b"-ERR %s not valid in the TRANSACTION state" % command.split()[0].encode())
