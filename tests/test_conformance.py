"""The shared adapter conformance suite.

Every ``tests/harness_<name>.py`` module defines ``Harness(tmp_path)`` with
``make_adapter()``, ``add_user(user, password)``, ``deliver(user, bytes)``
(returning a handle on the message), ``remove(user, handle)`` (the message
removed from the store as another program would, possibly while a session
streams it) and ``close()``; each test below runs once per harness, through a real
server on 127.0.0.1 and real clients (poplib and raw sockets).  A harness
may set ``skip_reason`` (a string) when its back end cannot run here;
``.ci/run`` fails the build if anything is skipped under CI.

Capabilities are class attributes of ``Harness`` (read at collection, so a
test that does not apply is not generated at all rather than skipped):

- ``verbatim`` (default True): RETR sends the delivered bytes (CRLF line
  ends, final line end added).  False for adapters that build their own
  messages from data; tests marked ``@needs("verbatim")`` then do not run
  for them, while the size, TOP, unique-id, UPDATE and locking tests still
  do.  Messages are told apart by their Subject, which every harness keeps.
- ``per_user_mailboxes`` (default True): each user sees only the mail
  delivered to them.  False when one source serves every user (a feed).
- ``replace`` (a method ``replace(user, handle, bytes)``): the message
  rewritten in place.  None where stored messages never change (SQLite,
  PostgreSQL, IMAP, memory); the harness says why.
- ``content_addressed_uids`` (default False): unique-ids are digests of the
  stored message (mbox), so byte-identical mail delivered again after the
  first copy was deleted may get the first one's unique-id back, naming the
  same bytes.
"""
from __future__ import annotations

import email.policy
import importlib
import pathlib
import poplib
import threading
from email.parser import BytesParser

import pytest

from pop3frame.testing import Controller
from tests.helpers import RawClient, drop, retr_interrupted, retr_lines_to_bytes, unstuff

HARNESSES = sorted(p.stem[len("harness_"):] for p in pathlib.Path(__file__).parent.glob("harness_*.py"))

MSG1 = b"From: a@example.org\r\nSubject: one\r\n\r\nHello\r\n"
DOTS = b"Subject: dots\r\n\r\n.starts with a dot\r\n.\r\n..two dots\r\nend\r\n"
LF_ONLY = b"Subject: lf\n\nbare LF line endings\nsecond line\n"
BINARY = b"Subject: =?iso-8859-1?q?caf=E9?=\r\n\r\nLatin-1 body: caf\xe9 \xff\xfe\r\n"
#: The very first line of the message and the first body line start with a dot.
DOT_FIRST = b".first line of the message\r\nSubject: dot first\r\n\r\n.first body line\r\nend\r\n"
NO_EOL_CRLF = b"Subject: no final CRLF\r\n\r\nline one\r\nlast line without CRLF"
NO_EOL_LF = b"Subject: no final LF\n\nline one\n.dotted last line without LF"
MIXED = b"Subject: mixed\nX-Mixed: yes\r\n\nCRLF line\r\nLF line\n.dot after LF\r\nend\n"
#: Messages whose wire form differs from the stored bytes in every way the
#: server has to get right: stuffing, line ends, a missing final line end.
CORPUS = (MSG1, DOTS, LF_ONLY, BINARY, DOT_FIRST, NO_EOL_CRLF, NO_EOL_LF, MIXED)
#: Carriage returns that are not part of a CRLF: inside a line (sent as it is),
#: before a CRLF, and a lone CR ending the message (it stands for the last line end).
BARE_CR = (
    b"Subject: bare cr\r\n\r\nbare\rCR inside a line\r\nlast\r\n",
    b"Subject: cr crlf\n\nCR before CRLF\r\r\nLF line\nno final line end",
    b"Subject: cr at end\r\n\r\nthe message ends in a lone CR\r",
)


def _crlf(data: bytes) -> bytes:
    """The message as RETR transmits it, before stuffing: CRLF, final line end."""
    out = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return out if out.endswith(b"\r\n") else out + b"\r\n"


def _harness_class(name: str):
    return importlib.import_module("tests.harness_" + name).Harness


def needs(*capabilities: str):
    """Run the decorated test only for harnesses with all these capabilities."""
    def mark(test):
        test.needs = capabilities
        return test
    return mark


def pytest_generate_tests(metafunc):
    if "harness" in metafunc.fixturenames:
        wanted = getattr(metafunc.function, "needs", ())
        names = [n for n in HARNESSES if all(getattr(_harness_class(n), c, True) for c in wanted)]
        metafunc.parametrize("harness", names, indirect=True)


@pytest.fixture
def harness(request, tmp_path):
    h = _harness_class(request.param)(tmp_path)
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


def subject(message: bytes) -> str:
    return str(BytesParser(policy=email.policy.default).parsebytes(message)["Subject"])


def subjects(server, user="alice", password="alice-pw"):
    """The Subject of every message in the mailbox: what identifies a message for every harness."""
    return [subject(m) for m in fetch_all(server, user, password)]


def raw_session(server, user="alice", password="alice-pw") -> RawClient:
    # 60 s as retr_interrupted: the feed store parses its file at each login,
    # seconds with the tests' 16 MB message in it, and over 10 s under load.
    raw = RawClient(server.address, timeout=60)
    assert raw.login(user, password).startswith(b"+OK")
    return raw


def multiline(raw: RawClient, command: str):
    """(status line, everything after it up to and including '.CRLF') of one command."""
    raw.send(command.encode() + b"\r\n")
    status = raw.line()
    assert status.startswith(b"+OK"), (command, status)
    return status, raw.multiline()


def top_from_retr(retr: bytes, lines: int) -> bytes:
    """What TOP must send, cut from RETR's wire bytes (stuffing is per line).

    RFC 1939 section 7: the header, the blank line after it, then ``lines``
    lines of the body (all of them if it has fewer), then '.CRLF'.
    """
    stuffed = retr[:-3].split(b"\r\n")[:-1]
    if b"" not in stuffed:
        return retr  # no body: the whole message is header
    keep = stuffed[:stuffed.index(b"") + 1 + lines]
    return b"".join(line + b"\r\n" for line in keep) + b".\r\n"


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


@needs("verbatim")
def test_messages_round_trip_exactly(harness, server):
    """RFC 1939 sections 3 and 11: CRLF on the wire, sizes count CRLF, content intact,
    a final line end added where the stored message has none."""
    for body in CORPUS:
        harness.deliver("alice", body)
    expected = [_crlf(b) for b in CORPUS]
    client = login(server)
    count, total = client.stat()
    assert count == len(CORPUS)
    sizes = [int(line.split()[1]) for line in client.list()[1]]
    assert sizes == [len(e) for e in expected]
    assert total == sum(sizes)
    got = [retr_lines_to_bytes(client.retr(i)[1]) for i in range(1, count + 1)]
    assert got == expected
    client.quit()


@needs("verbatim")
def test_retr_exact_wire_bytes(harness, server):
    """RFC 1939 section 3: byte-stuffing, CRLF and the terminating '.CRLF', checked on raw bytes."""
    for body in (DOTS, DOT_FIRST, NO_EOL_LF, MIXED):
        harness.deliver("alice", body)
    with raw_session(server) as raw:
        assert multiline(raw, "RETR 1") == (
            b"+OK %d octets\r\n" % len(_crlf(DOTS)),
            b"Subject: dots\r\n\r\n..starts with a dot\r\n..\r\n...two dots\r\nend\r\n.\r\n",
        )
        assert multiline(raw, "RETR 2")[1] == (
            b"..first line of the message\r\nSubject: dot first\r\n\r\n..first body line\r\nend\r\n.\r\n"
        )
        assert multiline(raw, "RETR 3")[1] == b"Subject: no final LF\r\n\r\nline one\r\n..dotted last line without LF\r\n.\r\n"
        assert multiline(raw, "RETR 4")[1] == (
            b"Subject: mixed\r\nX-Mixed: yes\r\n\r\nCRLF line\r\nLF line\r\n..dot after LF\r\nend\r\n.\r\n"
        )
        raw.cmd("QUIT")


TOP_MESSAGE = b"Subject: top\r\nX-Note: a .dot inside a header\r\n\r\n.first body line\r\nsecond\r\n.\r\nfourth"
TOP_HEAD = b"Subject: top\r\nX-Note: a .dot inside a header\r\n\r\n"


@needs("verbatim")
def test_top_exact_wire_bytes(harness, server):
    """RFC 1939 section 7 (TOP): the header, the blank line, n body lines (all if fewer),
    byte-stuffed, CRLF line ends and '.CRLF', for CRLF, LF and mixed storage with and
    without a final line end."""
    variants = (
        TOP_MESSAGE,                                # CRLF, no final line end
        TOP_MESSAGE.replace(b"\r\n", b"\n") + b"\n",  # LF only
        TOP_MESSAGE.replace(b"\r\n\r\n", b"\n\n", 1).replace(b"second\r\n", b"second\n"),  # mixed
    )
    for body in variants:
        harness.deliver("alice", body)
    expected = {
        0: TOP_HEAD + b".\r\n",
        2: TOP_HEAD + b"..first body line\r\nsecond\r\n.\r\n",
        3: TOP_HEAD + b"..first body line\r\nsecond\r\n..\r\n.\r\n",
        99: TOP_HEAD + b"..first body line\r\nsecond\r\n..\r\nfourth\r\n.\r\n",
    }
    with raw_session(server) as raw:
        for number in range(1, len(variants) + 1):
            for lines, wire in expected.items():
                assert multiline(raw, "TOP %d %d" % (number, lines))[1] == wire, (number, lines)
        raw.cmd("QUIT")


def test_top_is_retr_cut_after_n_body_lines(harness, server):
    """RFC 1939 section 7 (TOP n 0, TOP n 2, TOP n 1000) agrees line for line with RETR,
    for every message of the corpus (also where the adapter builds the message itself)."""
    for body in CORPUS:
        harness.deliver("alice", body)
    with raw_session(server) as raw:
        for number in range(1, len(CORPUS) + 1):
            retr = multiline(raw, "RETR %d" % number)[1]
            for lines in (0, 2, 1000):
                assert multiline(raw, "TOP %d %d" % (number, lines))[1] == top_from_retr(retr, lines), (number, lines)
        raw.cmd("QUIT")


def test_sizes_equal_retr_octets(harness, server):
    """RFC 1939 sections 5 and 11: the size STAT and LIST give is exactly the octets RETR
    sends before byte-stuffing (status line excluded, '.CRLF' and stuffing removed), also
    for messages stored without a final line end, with mixed line ends and with bare CR;
    every RETR ends with CRLF.CRLF (the server would close the connection instead if the
    adapter's stream were longer or shorter than the size it listed)."""
    for body in CORPUS + BARE_CR:
        harness.deliver("alice", body)
    with raw_session(server) as raw:
        assert raw.cmd("STAT").startswith(b"+OK %d " % len(CORPUS + BARE_CR))
        total = int(raw.cmd("STAT").split()[2])
        _, listing = multiline(raw, "LIST")
        sizes = [int(line.split()[1]) for line in listing.split(b"\r\n")[:-2]]
        assert len(sizes) == len(CORPUS + BARE_CR) and sum(sizes) == total
        for number, size in enumerate(sizes, 1):
            assert raw.cmd("LIST %d" % number) == b"+OK %d %d\r\n" % (number, size)
            wire = multiline(raw, "RETR %d" % number)[1]
            assert wire.endswith(b"\r\n.\r\n"), number
            assert len(unstuff(wire)) == size, number
        raw.cmd("QUIT")


def test_uidl_unique_and_stable(harness, server):
    """RFC 1939 section 7 (UIDL): unique-ids are unique within the maildrop (even for
    identical messages), 1-70 chars 0x21-0x7E, stable across sessions."""
    for i in range(5):
        harness.deliver("alice", b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i))
    for _ in range(2):
        harness.deliver("alice", b"Subject: twin\r\n\r\nidentical\r\n")
    client = login(server)
    first = [line.split()[1] for line in client.uidl()[1]]
    assert [client.uidl(n).split()[2] for n in range(1, 8)] == first
    client.quit()
    assert len(set(first)) == 7
    assert all(1 <= len(u) <= 70 and all(0x21 <= c <= 0x7E for c in u) for u in first)
    client = login(server)
    assert [line.split()[1] for line in client.uidl()[1]] == first
    client.dele(2)
    client.dele(6)
    client.quit()
    client = login(server)
    assert [line.split()[1] for line in client.uidl()[1]] == [first[i] for i in (0, 2, 3, 4, 6)]
    client.quit()
    assert subjects(server) == ["m0", "m2", "m3", "m4", "twin"]


def _uidl_and_retr(server):
    """[(unique-id, RETR wire bytes)] of alice's mailbox, in order."""
    with raw_session(server) as raw:
        _, listing = multiline(raw, "UIDL")
        uids = [line.split()[1].decode() for line in listing.split(b"\r\n")[:-2]]
        got = [(uid, multiline(raw, "RETR %d" % n)[1]) for n, uid in enumerate(uids, 1)]
        assert raw.cmd("QUIT").startswith(b"+OK")
    return got


def _dele_newest(server):
    with raw_session(server) as raw:
        count = int(raw.cmd("STAT").split()[1])
        assert raw.cmd("DELE %d" % count).startswith(b"+OK")
        assert raw.cmd("QUIT").startswith(b"+OK")


def test_unique_ids_are_never_reused(harness, server):
    """RFC 1939 section 7 (UIDL): a unique-id names one message for good, so a client that
    leaves mail on the server never mistakes new mail for mail it has.  Deliver, fetch,
    delete the newest, deliver again: the new message's unique-id was never issued before.
    The same bytes delivered twice are two messages with two unique-ids.  And the deleted
    message's very bytes delivered again get a new unique-id, except where unique-ids are
    digests of the content (mbox): there the unique-id names the same bytes as before."""
    issued = {}  # unique-id -> the RETR bytes it named

    def fetch():
        got = _uidl_and_retr(server)
        for uid, wire in got:
            assert issued.setdefault(uid, wire) == wire, "unique-id %s named other bytes before" % uid
        return [uid for uid, _ in got]

    first, second, third = (b"Subject: %s\r\n\r\nmessage %s\r\n" % (n, n) for n in (b"one", b"two", b"three"))
    harness.deliver("alice", first)
    harness.deliver("alice", second)
    before = fetch()
    _dele_newest(server)
    harness.deliver("alice", third)
    known = set(issued)
    after = fetch()
    assert after[0] == before[0] and after[1] not in known
    harness.deliver("alice", third)
    twice = fetch()
    assert twice[:2] == after and twice[2] != twice[1]
    _dele_newest(server)
    harness.deliver("alice", second)
    known = set(issued)
    again = fetch()
    assert again[:2] == after and again[2] not in (after[0], after[1])
    if not getattr(harness, "content_addressed_uids", False):
        assert again[2] not in known


def test_dele_quit_deletes_rset_and_disconnect_do_not(harness, server):
    """RFC 1939 sections 5-6: deletions happen only in UPDATE, after QUIT."""
    for i in range(3):
        harness.deliver("alice", b"Subject: %d\r\n\r\nx\r\n" % i)
    client = login(server)
    client.dele(1)
    client.rset()
    client.quit()
    assert subjects(server) == ["0", "1", "2"]

    client = login(server)
    client.dele(1)
    drop(client)  # dropped connection: no UPDATE state
    assert server.wait_for_connections(0)
    assert subjects(server) == ["0", "1", "2"]

    client = login(server)
    client.dele(1)
    client.dele(3)
    assert client.quit().startswith(b"+OK")
    assert subjects(server) == ["1"]


def test_second_login_in_use(harness, server):
    """RFC 1939 section 8 / RFC 2449 section 8.1.2: exclusive maildrop lock, [IN-USE]."""
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
    assert [line.split()[0] for line in client.uidl()[1]] == [b"1"]
    client.dele(1)
    client.quit()
    assert subjects(server) == ["late"]


@needs("per_user_mailboxes")
def test_users_are_separate_and_parallel(harness, server):
    """Two users' sessions run at the same time and see only their own mail."""
    harness.deliver("alice", b"Subject: for alice\r\n\r\na\r\n")
    harness.deliver("bob", b"Subject: for bob\r\n\r\nb\r\n")
    a, b = login(server), login(server, "bob", "bob-pw")
    assert subject(retr_lines_to_bytes(a.retr(1)[1])) == "for alice"
    assert subject(retr_lines_to_bytes(b.retr(1)[1])) == "for bob"
    assert a.stat()[0] == b.stat()[0] == 1
    a.quit()
    b.quit()


@needs("verbatim")
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
    """Ten users fetching at once: every session gets its mail (its own, or the
    shared source's), no errors."""
    users = ["u%d" % i for i in range(10)]
    for u in users:
        harness.add_user(u, "pw-" + u)
        harness.deliver(u, b"Subject: " + u.encode() + b"\r\n\r\nhi\r\n")
    results = {}

    def run(u):
        results[u] = subjects(server, u, "pw-" + u)

    threads = [threading.Thread(target=run, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    shared = getattr(harness, "per_user_mailboxes", True) is False
    assert results == {u: users if shared else [u] for u in users}


#: 16 MB: far more than the server can have sent to a client reading slowly (its
#: send buffer holds at most 4 MB here) when the message is changed under it.
HUGE = b"Subject: huge\r\n\r\n" + (b"x" * 998 + b"\r\n") * 16_000
#: The same length and shape, other bytes.
CHANGED = HUGE.replace(b"x", b"y")
#: The same length, every other line "." alone: sent unstuffed (a store that said
#: HUGE has no line starting with "." and did not notice the change), the first
#: one would end the reply early, in a terminator the client believes.
DOTTED = b"Subject: huge\r\n\r\n" + (b".\r\n" + b"y" * 995 + b"\r\n") * 16_000


def _retr_while(harness, server, change):
    """RETR 1 of HUGE by a slow client while ``change(handle)`` runs.  Either the whole
    original message arrives, or the connection closes without the terminator: never a
    short or altered message ending in '.'."""
    handle = harness.deliver("alice", HUGE)
    status, body, complete = retr_interrupted(server.address, "alice", "alice-pw", 1, lambda: change(handle))
    assert status.startswith(b"+OK"), status
    assert b"yyyy" not in body or not complete
    if complete:
        if getattr(harness, "verbatim", True):
            assert body == HUGE + b".\r\n"
        else:
            assert len(unstuff(body)) == int(status.split()[1]) and subject(unstuff(body)) == "huge"
    assert server.wait_for_connections(0)
    # The next client is served as usual.
    with raw_session(server) as raw:
        assert raw.cmd("QUIT").startswith(b"+OK")


def test_a_message_removed_mid_retr_never_ends_cleanly(harness, server):
    """RFC 1939 section 3: '.CRLF' tells the client it has the whole message.  A message
    removed from the store while a slow client reads it (another program, another server,
    an administrator) arrives whole or not at all: no terminator after a short message."""
    _retr_while(harness, server, lambda handle: harness.remove("alice", handle))


@needs("replace")
def test_a_message_replaced_mid_retr_never_ends_cleanly(harness, server):
    """As above, with the message rewritten under the same name while it streams (same
    length, other bytes): never a mix of old and new bytes ending in '.'.  Not generated
    for stores whose messages cannot change (SQLite, PostgreSQL, IMAP, memory)."""
    _retr_while(harness, server, lambda handle: harness.replace("alice", handle, CHANGED))


@needs("replace")
def test_a_message_replaced_by_dot_lines_mid_retr_never_ends_cleanly(harness, server):
    """As above, the new bytes holding lines that are "." alone (RFC 1939 section 3:
    each must go out as ".."): a store that measured the message as having no line
    starting with "." (MessageInfo.dot_lines) must not let the change out unstuffed,
    where the first such line would end the reply early in a terminator."""
    _retr_while(harness, server, lambda handle: harness.replace("alice", handle, DOTTED))
