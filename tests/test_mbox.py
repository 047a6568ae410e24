"""mbox adapter: quoting, offsets, locking, atomic rewrite."""
from __future__ import annotations

import grp
import io
import os
import pathlib
import poplib
import pwd
import signal
import subprocess
import sys
import time
import tracemalloc

import pytest

from pop3frame import MessageInfo, TemporaryFailure
from pop3frame.adapters.mbox import MboxAdapter
from pop3frame.adapters.passwdfile import PasswdFile, set_password
from pop3frame.testing import ManualClock, Controller
from tests.harness_mbox import append_like_an_mda
from tests.helpers import RawClient, reachable_dir, refused_login, retr_lines_to_bytes
from tests.processes import Daemon


@pytest.fixture
def spool(tmp_path):
    passwd = str(tmp_path / "passwd")
    set_password(passwd, "alice", "pw", scheme="PLAIN")
    root = tmp_path / "spool"
    root.mkdir()
    return str(root), PasswdFile(passwd)


def fetch(server):
    client = server.pop3()
    client.user("alice")
    client.pass_("pw")
    out = [retr_lines_to_bytes(client.retr(i)[1]) for i in range(1, client.stat()[0] + 1)]
    return client, out


def crlf(b):
    return b.replace(b"\n", b"\r\n")


@pytest.mark.parametrize("chunk_size", [7, 11, 64, 4096])
def test_from_quoting_round_trip_across_chunk_boundaries(spool, chunk_size):
    root, auth = spool
    original = b"Subject: q\n\nFrom the start\n>From quoted once\n>>From twice\nmiddle From not at start\nFrom\n"
    append_like_an_mda(os.path.join(root, "alice"), original)
    append_like_an_mda(os.path.join(root, "alice"), b"Subject: 2\n\nsecond\n")
    with Controller(MboxAdapter(root, auth, chunk_size=chunk_size)) as server:
        client, got = fetch(server)
        assert got == [crlf(original), crlf(b"Subject: 2\n\nsecond\n")]
        assert client.list(1).split()[2] == str(len(crlf(original))).encode()
        client.quit()


def test_mbox_rewritten_after_listing_to_have_a_dot_line_never_ends_early(spool):
    """RFC 1939 section 3: the index says no line of the message starts with ".";
    another program (mutt rewrites in place) changes it after the listing to hold
    a lone "." line near its start, same length.  The changed mbox is noticed when
    the message is opened, so that line is stuffed and no early terminator goes
    out before the check at the message's end closes the connection."""
    root, auth = spool
    path = os.path.join(root, "alice")
    filler = b"A line of text. Another one.\n" * 30_000  # ~900 KB: several chunks
    append_like_an_mda(path, b"Subject: a\n\nfirst line.\nab\nsecond. last\n" + filler)
    with Controller(MboxAdapter(root, auth)) as server, RawClient(server.address) as c:
        assert c.login("alice", "pw").startswith(b"+OK")
        with open(path, "rb") as f:
            old = f.read()
        with open(path, "r+b") as f:
            f.write(old.replace(b"\nab\nsecond", b"\n.\nQsecond"))
        c.send(b"RETR 1\r\n")
        received = c.read_all()
    assert received.startswith(b"+OK") and b"\r\n..\r\nQsecond" in received
    assert b"\r\n.\r\n" not in received


def test_large_mbox_indexed_with_bounded_memory(spool):
    root, auth = spool
    path = os.path.join(root, "alice")
    body = b"Subject: big\n\n" + (b"y" * 76 + b"\n") * 13_000  # ~1 MB per message
    with open(path, "wb") as f:
        for i in range(20):
            f.write(b"From x@y Mon Jan  1 00:00:00 2026\n" + body + b"\n")
    adapter = MboxAdapter(root, auth)
    tracemalloc.start()
    try:
        messages = adapter.list_messages("alice")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        adapter.close_mailbox("alice")
    assert len(messages) == 20
    assert all(m.size == len(crlf(body)) for m in messages)
    assert peak < 3 * 1024 * 1024, peak  # the file is 20 MB


def test_deletion_rewrites_atomically_and_keeps_mail_appended_meanwhile(spool):
    root, auth = spool
    path = os.path.join(root, "alice")
    for i in range(3):
        append_like_an_mda(path, b"Subject: %d\n\nbody %d\n" % (i, i))
    os.chmod(path, 0o640)
    with Controller(MboxAdapter(root, auth)) as server:
        client, got = fetch(server)
        append_like_an_mda(path, b"Subject: late\n\nlate\n")
        client.dele(1)
        client.dele(3)
        assert client.quit().startswith(b"+OK")
        assert server.wait_for_connections(0)
        assert oct(os.stat(path).st_mode & 0o777) == "0o640"
        assert sorted(os.listdir(root)) == ["alice"]  # no temp file, no dotlock left
        client, got = fetch(server)
        assert got == [b"Subject: 1\r\n\r\nbody 1\r\n", b"Subject: late\r\n\r\nlate\r\n"]
        client.quit()


#: A pop3frame serve --adapter that kills itself with SIGKILL in the middle of
#: rewriting an mbox: at a read of the mbox opened for writing once the copy exists.
KILLED_MID_REWRITE = """
import os, signal
from pop3frame.adapters.mbox import MboxAdapter
from pop3frame.adapters.passwdfile import PasswdFile


class KilledMidRewrite(MboxAdapter):
    def __init__(self, spool, passwd):
        super().__init__(spool, PasswdFile(passwd))

    def open_file(self, fd, mode):
        f = super().open_file(fd, mode)
        read, spool = f.read, self.path_template.rsplit("/", 1)[0]

        def read_or_die(*args):
            if "+" in mode and any(n.startswith(".") for n in os.listdir(spool)):
                os.kill(os.getpid(), signal.SIGKILL)
            return read(*args)

        f.read = read_or_die
        return f
"""


def test_server_killed_during_the_rewrite_loses_nothing_and_its_leftovers_go(spool, tmp_path):
    """RFC 1939 section 6: DELE takes effect only in UPDATE, once QUIT is answered.  The
    server killed with SIGKILL while QUIT rewrites the mbox: the client gets no +OK and
    every message is still there.  The killed rewrite left its copy of the mbox (as large
    as the mbox, in the spool) and the dotlock; once the dotlock is stale the next rewrite
    runs and the copy is gone with it."""
    root, auth = spool
    path = os.path.join(root, "alice")
    for i in range(3):
        append_like_an_mda(path, b"Subject: %d\n\nbody %d\n" % (i, i))
    before = pathlib.Path(path).read_bytes()
    (tmp_path / "killer.py").write_text(KILLED_MID_REWRITE)
    with Daemon("--listen", "127.0.0.1:0", "--adapter", "%s:KilledMidRewrite" % (tmp_path / "killer.py"),
                "--adapter-option", "spool=%s" % root, "--passwd", auth.path) as server:
        with RawClient(("127.0.0.1", server.port)) as c:
            assert c.login("alice", "pw").startswith(b"+OK")
            assert c.cmd("DELE 1").startswith(b"+OK")
            assert c.cmd("QUIT") == b""  # killed: no reply
        assert server.proc.wait(30) == -signal.SIGKILL
    assert pathlib.Path(path).read_bytes() == before
    assert len(os.listdir(root)) == 3  # the mbox, its dotlock, the rewrite's copy
    clock = ManualClock(time.time() + 301)  # the dotlock is stale
    with Controller(MboxAdapter(root, auth, clock=clock)) as server:
        client, got = fetch(server)
        assert [subject.split(b"\r\n")[0] for subject in got] == [b"Subject: 0", b"Subject: 1", b"Subject: 2"]
        client.dele(1)
        assert client.quit().startswith(b"+OK")
    assert sorted(os.listdir(root)) == ["alice"]


def test_dotlock_held_by_another_program_refuses_login(spool):
    root, auth = spool
    path = os.path.join(root, "alice")
    append_like_an_mda(path, b"Subject: x\n\ny\n")
    clock = ManualClock(start=os.stat(path).st_mtime)
    open(path + ".lock", "w").close()
    os.utime(path + ".lock", (clock.now, clock.now))
    with Controller(MboxAdapter(root, auth, clock=clock)) as server:
        client = server.pop3()
        client.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\] mailbox is locked"):
            client.pass_("pw")
        clock.advance(301)  # now the dotlock counts as stale and is broken
        client.user("alice")
        assert client.pass_("pw").startswith(b"+OK")
        client.quit()


def test_fcntl_lock_of_another_process_refuses_login(spool):
    root, auth = spool
    path = os.path.join(root, "alice")
    append_like_an_mda(path, b"Subject: x\n\ny\n")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys; f = open(sys.argv[1], 'r+b'); fcntl.lockf(f, fcntl.LOCK_EX);"
         "print('locked', flush=True); sys.stdin.read()", path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with Controller(MboxAdapter(root, auth)) as server:
            client = server.pop3()
            client.user("alice")
            with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
                client.pass_("pw")
            assert not os.path.exists(path + ".lock")  # our dotlock was undone
    finally:
        holder.kill()
        holder.communicate(timeout=30)  # reaps it and closes both pipes


def test_rewrite_refused_if_mailbox_changed_incompatibly(spool):
    root, auth = spool
    path = os.path.join(root, "alice")
    for i in range(2):
        append_like_an_mda(path, b"Subject: %d\n\nx\n" % i)
    with Controller(MboxAdapter(root, auth)) as server:
        client, _ = fetch(server)
        with open(path, "r+b") as f:  # another MUA rewrote the file
            f.truncate(10)
        client.dele(1)
        with pytest.raises(poplib.error_proto, match="nothing deleted"):
            client.quit()
    assert os.path.getsize(path) == 10


@pytest.mark.parametrize("chunk_size", [7, 4096])
def test_top_is_byte_exact_and_unquotes(spool, chunk_size):
    """RFC 1939 section 7 (TOP): the headers, the blank line, then n body
    lines, each as RETR would send it (mboxrd quoting undone)."""
    root, auth = spool
    original = b"Subject: top\nX-A: b\n\nFrom the start\n>From once\n.dot\nlast\n"
    append_like_an_mda(os.path.join(root, "alice"), original)
    with Controller(MboxAdapter(root, auth, chunk_size=chunk_size)) as server, RawClient(server.address) as c:
        assert c.login("alice", "pw").startswith(b"+OK")
        assert c.cmd("TOP 1 0") == b"+OK\r\n"
        assert c.multiline() == b"Subject: top\r\nX-A: b\r\n\r\n.\r\n"
        assert c.cmd("TOP 1 2") == b"+OK\r\n"
        assert c.multiline() == b"Subject: top\r\nX-A: b\r\n\r\nFrom the start\r\n>From once\r\n.\r\n"
        assert c.cmd("TOP 1 3").startswith(b"+OK")
        assert c.multiline().endswith(b">From once\r\n..dot\r\n.\r\n")
        assert c.cmd("QUIT").startswith(b"+OK")


def test_unquoting_does_not_depend_on_chunk_boundaries(spool):
    """mboxrd: exactly one '>' goes from a line of '>'s followed by "From ",
    however long the run and wherever a chunk ends."""
    root, auth = spool
    original = (b"Subject: q\n\n" + b">" * 100 + b"From deep\n" + b">" * 100 + b"Fromage\n"
                + b"From x\n>\n>>\nF\nFrom\n>From")
    append_like_an_mda(os.path.join(root, "alice"), original)
    for chunk_size in list(range(1, 24)) + [64, 4096]:
        adapter = MboxAdapter(root, auth, chunk_size=chunk_size)
        [message] = adapter.list_messages("alice")
        stream = adapter.open_message("alice", message)
        try:
            assert stream.read() == original + b"\n", chunk_size
        finally:
            stream.close()
        assert message.size == len(crlf(original)) + 2
        adapter.close_mailbox("alice")


def uidl(server):
    client = server.pop3()
    client.user("alice")
    client.pass_("pw")
    uids = [line.split()[1] for line in client.uidl()[1]]
    client.quit()
    assert server.wait_for_connections(0)
    return uids


def test_identical_messages_get_distinct_stable_uids(spool):
    """RFC 1939 section 7 (UIDL): a unique-id is unique within the maildrop
    and persists across sessions, also for byte-identical deliveries and
    after an earlier copy was deleted, and across a server restart."""
    root, auth = spool
    path = os.path.join(root, "alice")
    same = b"Subject: same\n\nsame body\n"
    for data in (same, b"Subject: other\n\nx\n", same, same):
        append_like_an_mda(path, data)
    with Controller(MboxAdapter(root, auth)) as server:
        uids = uidl(server)
        assert len(set(uids)) == 4
        assert uidl(server) == uids
        append_like_an_mda(path, same)
        grown = uidl(server)
        assert grown[:4] == uids and len(set(grown)) == 5
        client = server.pop3()
        client.user("alice")
        client.pass_("pw")
        client.dele(1)  # the first copy: the others must keep their ids
        client.dele(2)
        client.quit()
        assert server.wait_for_connections(0)
        assert uidl(server) == grown[2:]
    with Controller(MboxAdapter(root, auth)) as server:  # the ids are kept in the file
        assert uidl(server) == grown[2:]
        client, got = fetch(server)
        assert got == [crlf(same)] * 3  # the pin line is not part of the message
        client.quit()
    with open(path, "rb") as f:
        assert f.read().count(b"\nX-UIDL: ") == 3


class _CountingFile(io.FileIO):
    """A real file that adds the bytes it reads from the OS to ``owner.bytes_read``."""

    def __init__(self, fd, mode, owner):
        super().__init__(fd, mode)
        self.owner = owner

    def readinto(self, b):
        n = super().readinto(b)
        self.owner.bytes_read += n or 0
        return n


class CountingMbox(MboxAdapter):
    """Counts bytes read from mboxes and messages measured."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bytes_read = self.measured = 0

    def open_file(self, fd, mode):
        raw = _CountingFile(fd, mode.replace("b", ""), self)
        return io.BufferedRandom(raw) if "+" in mode else io.BufferedReader(raw)

    def measure(self, *args):
        self.measured += 1
        return super().measure(*args)


def listing(adapter):
    try:
        return [(m.uid, m.size, m.key) for m in adapter.list_messages("alice")]
    finally:
        adapter.close_mailbox("alice")


def test_index_is_cached_and_extended_by_appended_mail(spool):
    """PITFALLS: after the first index, STAT on 10,000 messages reads nothing;
    appended mail is read alone; our own rewrite leaves nothing to re-read."""
    root, auth = spool
    path = os.path.join(root, "alice")
    with open(path, "wb") as f:
        for i in range(10_000):
            f.write(b"From a@b Mon Jan  5 10:00:00 2026\nSubject: %05d\n\nline\nline\n\n" % i)
    size = len(b"Subject: 00000\r\n\r\nline\r\nline\r\n")
    adapter = CountingMbox(root, auth)
    with Controller(adapter) as server:
        client = server.pop3()
        client.user("alice")
        client.pass_("pw")
        assert client.stat() == (10_000, 10_000 * size)
        client.quit()
        assert server.wait_for_connections(0)
        assert adapter.measured == 10_000 and adapter.bytes_read >= os.path.getsize(path)
        adapter.bytes_read = adapter.measured = 0
        uids = uidl(server)
        assert len(uids) == 10_000
        assert (adapter.bytes_read, adapter.measured) == (0, 0)

        append_like_an_mda(path, b"Subject: late\n\nlate\n")
        grown = uidl(server)
        assert grown[:10_000] == uids and len(grown) == 10_001
        assert adapter.measured == 1 and adapter.bytes_read < 64 * 1024  # the file is 380 kB

        client = server.pop3()
        client.user("alice")
        client.pass_("pw")
        client.dele(1)
        client.quit()
        assert server.wait_for_connections(0)
        adapter.bytes_read = adapter.measured = 0
        assert uidl(server) == grown[1:]
        assert (adapter.bytes_read, adapter.measured) == (0, 0)
    assert listing(MboxAdapter(root, auth)) == listing(adapter)  # the cache says what a fresh index says


def test_rewritten_index_matches_a_fresh_one(spool):
    """The index kept after a rewrite (shifted offsets, pinned unique-ids,
    mail appended during the session) equals the one a restart builds."""
    root, auth = spool
    path = os.path.join(root, "alice")
    for data in (b"Subject: 1\n\none\n", b"Subject: 2\n\n>From two\n", b"Subject: 1\n\none\n", b"Subject: 4\n\nfour"):
        append_like_an_mda(path, data)
    adapter = CountingMbox(root, auth)
    with Controller(adapter) as server:
        for doomed, late in ((1, b"Subject: late\n\nlate\n"), (1, None)):
            client, _ = fetch(server)
            if late:
                append_like_an_mda(path, late)
            client.dele(doomed)
            assert client.quit().startswith(b"+OK")
            assert server.wait_for_connections(0)
            adapter.measured = 0
            assert listing(adapter) == listing(MboxAdapter(root, auth))
            assert adapter.measured == (1 if late else 0)  # only the late message is read
        client, got = fetch(server)
        assert got == [b"Subject: 1\r\n\r\none\r\n", b"Subject: 4\r\n\r\nfour\r\n", b"Subject: late\r\n\r\nlate\r\n"]
        client.quit()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_rewrite_keeps_owner_group_and_mode(spool):
    root, auth = spool
    path = os.path.join(root, "alice")
    for i in range(2):
        append_like_an_mda(path, b"Subject: %d\n\nx\n" % i)
    nobody, mail = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("mail").gr_gid
    os.chown(path, nobody, mail)
    os.chmod(path, 0o660)
    with Controller(MboxAdapter(root, auth)) as server:
        client, _ = fetch(server)
        client.dele(1)
        assert client.quit().startswith(b"+OK")
        assert server.wait_for_connections(0)
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (nobody, mail, 0o660)
        client, got = fetch(server)
        assert got == [b"Subject: 1\r\n\r\nx\r\n"]
        client.quit()


@pytest.fixture
def shared_spool():
    """A spool directory nobody can write to."""
    with reachable_dir("pop3frame-mbox-", 0o777) as path:
        yield path


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")
def test_rewrite_refused_when_the_owner_cannot_be_kept(shared_spool):
    """A server not running as root cannot give the new file root's
    ownership: it deletes nothing and answers -ERR, the mbox is untouched."""
    path = os.path.join(shared_spool, "alice")
    for i in range(2):
        append_like_an_mda(path, b"Subject: %d\n\nx\n" % i)
    os.chown(path, 0, grp.getgrnam("mail").gr_gid)
    os.chmod(path, 0o666)
    before = pathlib.Path(path).read_bytes()
    code = (
        "import sys; from pop3frame import PermanentFailure; from pop3frame.lifecycle import drop_privileges\n"
        "from pop3frame.adapters.mbox import MboxAdapter\n"
        "adapter = MboxAdapter(sys.argv[1], None)\n"
        "drop_privileges('nobody', None)\n"
        "messages = adapter.list_messages('alice')\n"
        "try:\n"
        "    adapter.delete_messages('alice', messages[:1])\n"
        "except PermanentFailure as exc:\n"
        "    print(exc.text)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, shared_spool], capture_output=True, text=True, timeout=60)
    assert out.stdout == "cannot keep the mailbox's owner; nothing deleted\n", out.stderr
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, grp.getgrnam("mail").gr_gid, 0o666)
    assert pathlib.Path(path).read_bytes() == before
    assert os.listdir(shared_spool) == ["alice"]  # no temporary file, no dotlock


def test_user_template_places_each_mailbox(spool):
    root, auth = spool
    os.makedirs(os.path.join(root, "alice"))
    path = os.path.join(root, "alice", "mbox")
    append_like_an_mda(path, b"Subject: t\n\nhere\n")
    with Controller(MboxAdapter(os.path.join(root, "{user}", "mbox"), auth)) as server:
        client, got = fetch(server)
        assert got == [b"Subject: t\r\n\r\nhere\r\n"]
        client.dele(1)
        assert client.quit().startswith(b"+OK")
    assert os.listdir(os.path.join(root, "alice")) == ["mbox"] and os.path.getsize(path) == 0


class Anyone:
    def authenticate(self, user, password):
        return True


def files_under(top):
    return {os.path.join(d, n): pathlib.Path(d, n).read_bytes()
            for d, _, names in os.walk(top) for n in names}


@pytest.mark.parametrize("name", ["..", "../victim", "a/b", "/etc/passwd", "x\x00y", ".hidden", ""])
def test_user_names_that_leave_the_spool_are_refused(tmp_path, name):
    spool = tmp_path / "spool"
    spool.mkdir()
    append_like_an_mda(str(tmp_path / "victim"), b"Subject: v\n\nnot yours\n")
    before = files_under(str(tmp_path))
    adapter = MboxAdapter(str(spool), Anyone())
    assert adapter.authenticate(name, "pw") is False
    with pytest.raises(TemporaryFailure):
        adapter.list_messages(name)
    with pytest.raises(TemporaryFailure):
        adapter.delete_messages(name, [MessageInfo("x", 1, key=None)])
    assert files_under(str(tmp_path)) == before


def test_traversal_login_over_pop3_is_refused(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    append_like_an_mda(str(tmp_path / "victim"), b"Subject: v\n\nnot yours\n")
    with Controller(MboxAdapter(str(spool), Anyone())) as server:
        assert refused_login(server, "../victim", "pw").startswith(b"-ERR [AUTH]")
    assert not os.path.exists(str(tmp_path / "victim.lock"))


def test_rewrite_keeps_bytes_before_the_first_message(spool):
    """Whatever precedes the first From_ line is not mail, but it is not ours to drop."""
    root, auth = spool
    path = os.path.join(root, "alice")
    with open(path, "wb") as f:
        f.write(b"\n")
    append_like_an_mda(path, b"Subject: 1\n\none\n")
    append_like_an_mda(path, b"Subject: 2\n\ntwo\n")
    with Controller(MboxAdapter(root, auth)) as server:
        client, got = fetch(server)
        assert got == [b"Subject: 1\r\n\r\none\r\n", b"Subject: 2\r\n\r\ntwo\r\n"]
        client.dele(2)
        assert client.quit().startswith(b"+OK")
        assert server.wait_for_connections(0)
        with open(path, "rb") as f:
            assert f.read().startswith(b"\nFrom ")
        client, got = fetch(server)
        assert got == [b"Subject: 1\r\n\r\none\r\n"]
        client.quit()


# -- symlinks, hard links and other files at a mailbox's path ---------------------------


@pytest.fixture
def two_users(tmp_path):
    """alice and bob in a sticky, world-writable spool (as /var/mail on some
    systems): alice may replace her own mbox with whatever she likes.  bob's
    mbox is nobody's, mode 0600; only root (the server here) can read it."""
    passwd = str(tmp_path / "passwd")
    set_password(passwd, "alice", "pw", scheme="PLAIN")
    set_password(passwd, "bob", "bob-pw", scheme="PLAIN")
    with reachable_dir("pop3frame-spool-", 0o1777) as spool:
        bob = os.path.join(spool, "bob")
        append_like_an_mda(bob, b"Subject: for bob only\n\nsecret\n")
        nobody = pwd.getpwnam("nobody")
        os.chown(bob, nobody.pw_uid, nobody.pw_gid)
        os.chmod(bob, 0o600)
        yield spool, PasswdFile(passwd), bob


def assert_untouched(bob: str, before: bytes) -> None:
    assert pathlib.Path(bob).read_bytes() == before
    assert (os.stat(bob).st_uid, os.stat(bob).st_mode & 0o7777) == (pwd.getpwnam("nobody").pw_uid, 0o600)


@pytest.mark.parametrize("how", ["symlink", "hard link"])
def test_mbox_replaced_by_a_link_to_another_users_mbox_is_refused(two_users, how, caplog):
    """Issue 14 defect 7: alice's mbox a symlink (or a hard link, where the
    kernel allows one) to bob's 0600 mbox.  Followed, RETR served bob's mail and
    DELE/QUIT replaced her link with a copy of his mail owned by him; now the
    login is refused with -ERR [SYS/PERM] and nothing is read or written."""
    spool, auth, bob = two_users
    alice = os.path.join(spool, "alice")
    (os.symlink if how == "symlink" else os.link)(bob, alice)
    before = pathlib.Path(bob).read_bytes()
    with Controller(MboxAdapter(spool, auth)) as server:
        assert refused_login(server, "alice", "pw") == b"-ERR [SYS/PERM] mailbox is not a regular file"
    assert_untouched(bob, before)
    assert os.path.islink(alice) == (how == "symlink")
    assert sorted(os.listdir(spool)) == ["alice", "bob"]  # no dotlock or temporary file left
    assert "not served" in caplog.text and "secret" not in caplog.text


@pytest.mark.parametrize("template,linked", [
    ("{spool}/{{user}}/mbox", "{spool}/alice"),
    ("{spool}/{{user}}/Mail/mbox", "{spool}/alice/Mail"),
])
def test_symlinked_directory_on_the_way_to_the_mbox_is_refused(two_users, template, linked):
    """Below the template's fixed directory no symlink is followed: alice's
    home (or a folder in it) pointing into bob's serves nothing of his, and the
    dotlock and a rewrite's temporary file are not made there."""
    spool, auth, _ = two_users
    os.makedirs(os.path.join(spool, "bobdir", "Mail"))
    bob = os.path.join(spool, "bobdir", "Mail" if "Mail" in template else "", "mbox")
    append_like_an_mda(bob, b"Subject: for bob only\n\nsecret\n")
    os.makedirs(os.path.dirname(linked.format(spool=spool)), exist_ok=True)
    os.symlink(os.path.dirname(bob), linked.format(spool=spool))
    before = files_under(os.path.join(spool, "bobdir"))
    with Controller(MboxAdapter(template.format(spool=spool), auth)) as server:
        assert refused_login(server, "alice", "pw") == b"-ERR [SYS/PERM] mailbox is not a regular file"
    assert files_under(os.path.join(spool, "bobdir")) == before


def test_symlinked_spool_given_by_the_operator_is_followed(tmp_path, spool):
    """The template's fixed directory is the operator's (/var/spool/mail is a
    symlink to /var/mail on Debian): links there are followed."""
    root, auth = spool
    append_like_an_mda(os.path.join(root, "alice"), b"Subject: s\n\nvia the link\n")
    os.symlink(root, str(tmp_path / "linked-spool"))
    with Controller(MboxAdapter(str(tmp_path / "linked-spool"), auth)) as server:
        client, got = fetch(server)
        assert got == [b"Subject: s\r\n\r\nvia the link\r\n"]
        client.dele(1)
        assert client.quit().startswith(b"+OK")
    assert os.path.getsize(os.path.join(root, "alice")) == 0


class SwapBeforeRewrite(MboxAdapter):
    """Runs ``swap`` at the first read of the locked mbox once it is set: the
    moment between opening the mbox for a rewrite and renaming over it."""

    swap = None

    def open_file(self, fd, mode):
        f = super().open_file(fd, mode)
        adapter, read = self, f.read

        def read_then_swap(*args):
            if adapter.swap is not None:
                swap, adapter.swap = adapter.swap, None
                swap()
            return read(*args)

        f.read = read_then_swap
        return f


def test_mbox_swapped_for_a_symlink_during_the_rewrite_is_not_replaced(two_users):
    """alice swaps her mbox for a symlink to bob's after the server opened it to
    delete: the rewrite is not renamed over her link (nothing deleted, -ERR),
    and bob's mbox is untouched."""
    spool, auth, bob = two_users
    alice = os.path.join(spool, "alice")
    append_like_an_mda(alice, b"Subject: a\n\nalice's\n")
    before = pathlib.Path(bob).read_bytes()
    adapter = SwapBeforeRewrite(spool, auth)
    with Controller(adapter) as server:
        client, got = fetch(server)
        assert got == [b"Subject: a\r\n\r\nalice's\r\n"]
        client.dele(1)
        adapter.swap = lambda: (os.unlink(alice), os.symlink(bob, alice))
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\] .*mailbox changed by another program; nothing deleted"):
            client.quit()
    assert os.readlink(alice) == bob
    assert_untouched(bob, before)
    assert sorted(os.listdir(spool)) == ["alice", "bob"]


def test_fifo_at_the_mbox_path_is_refused_at_once(spool):
    """A FIFO would block the session's thread, holding the dotlock, forever."""
    root, auth = spool
    os.mkfifo(os.path.join(root, "alice"))
    with Controller(MboxAdapter(root, auth)) as server:
        assert refused_login(server, "alice", "pw") == b"-ERR [SYS/PERM] mailbox is not a regular file"
    assert os.listdir(root) == ["alice"]
