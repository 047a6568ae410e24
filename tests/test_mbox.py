"""mbox adapter: quoting, offsets, locking, atomic rewrite."""
from __future__ import annotations

import fcntl
import os
import poplib
import subprocess
import sys
import tracemalloc

import pytest

from pop3frame.adapters.mbox import MboxAdapter
from pop3frame.adapters.passwdfile import PasswdFile, set_password
from pop3frame.testing import ManualClock, Controller
from tests.harness_mbox import append_like_an_mda
from tests.helpers import retr_lines_to_bytes


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
        holder.wait()


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
