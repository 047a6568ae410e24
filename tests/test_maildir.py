"""Maildir adapter: the layout real MTAs deliver to."""
from __future__ import annotations

import os
import poplib
import shutil

import pytest

from pop3frame.adapters.maildir import MaildirAdapter, safe_user_name
from pop3frame.adapters.passwdfile import PasswdFile, set_password
from pop3frame.testing import Controller
from tests.harness_maildir import deliver_like_an_mda
from tests.helpers import RawClient


@pytest.fixture
def maildir(tmp_path):
    root = str(tmp_path / "mail")
    passwd = str(tmp_path / "passwd")
    set_password(passwd, "alice", "pw", scheme="PLAIN")
    os.makedirs(root)
    return root, MaildirAdapter(root, PasswdFile(passwd))


def login(server):
    client = server.pop3()
    client.user("alice")
    client.pass_("pw")
    return client


def uidl(client):
    return [line.split()[1].decode() for line in client.uidl()[1]]


def test_new_to_cur_with_seen_flag_and_stable_uidl(maildir):
    root, adapter = maildir
    names = [deliver_like_an_mda(root, "alice", b"Subject: %d\n\nbody\n" % i) for i in range(3)]
    with Controller(adapter) as server:
        client = login(server)
        first = uidl(client)
        assert first == names  # delivery order, UID = Maildir base name
        client.retr(1)
        client.retr(3)
        client.quit()
        assert server.wait_for_connections(0)
        assert sorted(os.listdir(os.path.join(root, "alice", "cur"))) == sorted(
            [names[0] + ":2,S", names[2] + ":2,S"])
        assert os.listdir(os.path.join(root, "alice", "new")) == [names[1]]
        client = login(server)
        assert uidl(client) == first  # the move changed nothing a client sees
        client.quit()
    # A new adapter instance (a server restart) gives the same UIDs.
    with Controller(MaildirAdapter(root, adapter.auth)) as server:
        client = login(server)
        assert uidl(client) == first
        client.quit()


def test_existing_flags_kept_when_marking_seen(maildir):
    root, adapter = maildir
    name = deliver_like_an_mda(root, "alice", b"Subject: f\n\nx\n", flags="F")
    with Controller(adapter) as server:
        client = login(server)
        client.retr(1)
        client.quit()
        assert server.wait_for_connections(0)
    assert os.listdir(os.path.join(root, "alice", "cur")) == [name + ":2,FS"]


def test_sizes_come_from_the_cache_not_the_files(maildir):
    """After the first index, STAT/LIST read no message file (10,000 messages)."""
    root, adapter = maildir
    home = os.path.join(root, "alice", "new")
    os.makedirs(os.path.join(root, "alice", "cur"))
    os.makedirs(os.path.join(root, "alice", "tmp"))
    os.makedirs(home)
    body = b"Subject: s\n\n" + b"line\n" * 10
    for i in range(10_000):
        with open(os.path.join(home, "%d.M%d.host" % (1600000000 + i, i)), "wb") as f:
            f.write(body)
    expected_size = len(body) + body.count(b"\n")
    with Controller(adapter) as server:
        client = login(server)
        assert client.stat() == (10_000, 10_000 * expected_size)
        client.quit()
        assert server.wait_for_connections(0)
        # Same byte size and mtime, but a different wire size: if a file were
        # read again its LIST size would change.
        for name in os.listdir(home):
            path = os.path.join(home, name)
            st = os.stat(path)
            with open(path, "wb") as f:
                f.write(b"x" * len(body))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        client = login(server)
        assert client.stat() == (10_000, 10_000 * expected_size)
        client.quit()


def test_dovecot_wire_size_in_name_is_used(maildir):
    root, adapter = maildir
    for sub in ("new", "cur", "tmp"):
        os.makedirs(os.path.join(root, "alice", sub))
    with open(os.path.join(root, "alice", "cur", "1700000000.M1.host,S=9,W=10:2,S"), "wb") as f:
        f.write(b"a\nb\nc\nd\n\n")
    with Controller(adapter) as server:
        client = login(server)
        assert client.list(1).split()[2] == b"10"
        assert client.uidl(1).split()[2] == b"1700000000.M1.host,S=9,W=10"
        client.quit()


def test_invalid_base_name_gets_a_hashed_uid(maildir):
    root, adapter = maildir
    name = deliver_like_an_mda(root, "alice", b"x\n")
    new = os.path.join(root, "alice", "new")
    os.rename(os.path.join(new, name), os.path.join(new, "1700000000.with space." + "y" * 80))
    with Controller(adapter) as server:
        client = login(server)
        uid = uidl(client)[0]
        assert len(uid) == 40 and all(c in "0123456789abcdef" for c in uid)
        client.quit()


@pytest.mark.parametrize("name", ["..", "../alice", "a/b", "a\x00b", ".hidden", "", "x" * 300])
def test_path_traversal_names_rejected(maildir, name):
    root, adapter = maildir
    assert not safe_user_name(name)
    assert adapter.authenticate(name, "pw") is False


def test_traversal_login_over_the_wire(maildir, tmp_path):
    root, adapter = maildir
    set_password(adapter.auth.path, "../alice", "pw", scheme="PLAIN")
    with Controller(adapter) as server, RawClient(server.address) as c:
        c.cmd("USER ../alice")
        assert c.cmd("PASS pw").startswith(b"-ERR [AUTH]")


def test_deletion_failure_part_way_keeps_the_rest(maildir):
    root, adapter = maildir
    names = [deliver_like_an_mda(root, "alice", b"Subject: %d\n\nx\n" % i) for i in range(3)]
    with Controller(adapter) as server, RawClient(server.address) as c:
        c.login("alice", "pw")
        # Message 2 becomes something unlink() refuses (a non-empty directory).
        victim = os.path.join(root, "alice", "new", names[1])
        os.unlink(victim)
        os.makedirs(os.path.join(victim, "inner"))
        for n in (1, 2, 3):
            c.cmd("DELE %d" % n)
        assert c.cmd("QUIT") == b"-ERR [SYS/TEMP] some deleted messages not removed: could not delete all messages\r\n"
    left = sorted(os.listdir(os.path.join(root, "alice", "new")))
    assert left == sorted(names[1:])  # the first went, the third was not touched
    shutil.rmtree(victim)


def test_message_moved_by_another_program_is_still_served(maildir):
    root, adapter = maildir
    name = deliver_like_an_mda(root, "alice", b"Subject: moved\n\nbody\n")
    with Controller(adapter) as server:
        client = login(server)
        os.rename(os.path.join(root, "alice", "new", name), os.path.join(root, "alice", "cur", name + ":2,S"))
        assert client.retr(1)[1][0] == b"Subject: moved"
        client.dele(1)
        client.quit()
    assert os.listdir(os.path.join(root, "alice", "cur")) == []


def test_missing_user_directory_is_an_empty_mailbox(maildir):
    root, adapter = maildir
    with Controller(adapter) as server:
        client = login(server)
        assert client.stat() == (0, 0)
        client.quit()
    assert sorted(os.listdir(os.path.join(root, "alice"))) == ["cur", "new", "tmp"]


def test_binary_non_utf8_content(maildir):
    root, adapter = maildir
    deliver_like_an_mda(root, "alice", b"Subject: bin\n\n\xff\xfe\x80 caf\xe9\n")
    with Controller(adapter) as server:
        client = login(server)
        assert client.retr(1)[1][-1] == b"\xff\xfe\x80 caf\xe9"
        client.quit()
