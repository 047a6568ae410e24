"""Maildir adapter: the layout real MTAs deliver to."""
from __future__ import annotations

import json
import logging
import os
import poplib
import pwd
import shutil
import subprocess
import threading
import time

import pytest

from pop3frame import TemporaryFailure
from pop3frame.adapters.maildir import CACHE_NAME, MaildirAdapter, safe_user_name
from pop3frame.adapters.passwdfile import PasswdFile, set_password
from pop3frame.testing import Controller
from tests.harness_maildir import deliver_like_an_mda
from tests.helpers import (RawClient, drop, expected_failure_logged_once, reachable_dir, retr_interrupted,
                           retr_lines_to_bytes, unstuff)


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


def test_top_and_a_cut_retr_do_not_mark_seen(maildir):
    """Only a whole RETR marks a message seen, as Dovecot does: TOP reads headers
    (a client previewing), and a RETR the client hung up on was not retrieved."""
    root, adapter = maildir
    big_body = b"Subject: big\n\n" + b"x" * 32_000_000 + b"\n"  # far more than loopback socket buffers hold
    names = [deliver_like_an_mda(root, "alice", body) for body in (b"Subject: a\n\nbody\n", big_body)]
    with Controller(adapter) as server:
        client = login(server)
        assert client.top(1, 0)[1] == [b"Subject: a", b""]
        client.sock.sendall(b"RETR 2\r\n")
        assert client.sock.recv(100).startswith(b"+OK")
        drop(client)  # mid-RETR
        assert server.wait_for_connections(0)
    assert sorted(os.listdir(os.path.join(root, "alice", "new"))) == sorted(names)
    assert os.listdir(os.path.join(root, "alice", "cur")) == []


def test_existing_flags_kept_when_marking_seen(maildir):
    root, adapter = maildir
    name = deliver_like_an_mda(root, "alice", b"Subject: f\n\nx\n", flags="F")
    with Controller(adapter) as server:
        client = login(server)
        client.retr(1)
        client.quit()
        assert server.wait_for_connections(0)
    assert os.listdir(os.path.join(root, "alice", "cur")) == [name + ":2,FS"]


class CountingMaildir(MaildirAdapter):
    """Counts reads of message content through the adapter's measure() hook:
    ``measured`` whole files, ``peeked`` last octets of ``,W=`` files."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.measured = self.peeked = 0

    def measure(self, path):
        result = super().measure(path)
        if result.dot_lines is None:  # what only a peek leaves unknown
            self.peeked += 1
        else:
            self.measured += 1
        return result


def test_sizes_come_from_the_cache_not_the_files(maildir):
    """After the first index, STAT/LIST read no message file (10,000 messages)."""
    root, adapter = maildir
    adapter = CountingMaildir(root, adapter.auth)
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
        assert adapter.measured == 10_000
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
        assert server.wait_for_connections(0)
        assert adapter.measured == 10_000  # not one more read
    # A server restart (new adapter instance) uses the cache file too.
    restarted = CountingMaildir(root, adapter.auth)
    with Controller(restarted) as server:
        client = login(server)
        assert client.stat() == (10_000, 10_000 * expected_size)
        client.quit()
    assert restarted.measured == 0


def test_only_new_or_replaced_files_are_read(maildir):
    """A listing measures files it has no size for: new ones, and ones replaced
    by rename (a new inode, as every Maildir writer makes), nothing else."""
    root, adapter = maildir
    adapter = CountingMaildir(root, adapter.auth)
    names = [deliver_like_an_mda(root, "alice", b"Subject: %d\n\nx\n" % i) for i in range(5)]
    with Controller(adapter) as server:
        login(server).quit()
        assert server.wait_for_connections(0)
        assert adapter.measured == 5
        deliver_like_an_mda(root, "alice", b"Subject: later\n\ny\n")
        replaced = os.path.join(root, "alice", "new", names[0])
        _write(replaced + ".tmp", b"Subject: 0\n\nx\nappended line\n")
        os.rename(replaced + ".tmp", replaced)
        client = login(server)
        assert client.list(1).split()[2] == str(len(b"Subject: 0\r\n\r\nx\r\nappended line\r\n")).encode()
        client.quit()
        assert adapter.measured == 7


@pytest.mark.parametrize("quiet", [False, True])
def test_file_changed_in_place_is_measured_again_once_opened(maildir, quiet):
    """Maildir files are written once, so a listing does not stat them; one
    changed in place anyway (same inode) is noticed when opened (its size and
    mtime no longer match), and the next login measures it again.  ``quiet``:
    the directories are old, so the second login's listings and index come
    from memory; opening the changed file drops that index."""
    root, adapter = maildir
    adapter = CountingMaildir(root, adapter.auth)
    names = [deliver_like_an_mda(root, "alice", b"Subject: %d\n\nx\n" % i) for i in range(2)]
    with Controller(adapter) as server:
        for sub in ("new", "cur") if quiet else ():
            _set_mtime(os.path.join(root, "alice", sub), 1600000000)
        for _ in range(2 if quiet else 1):
            login(server).quit()
            assert server.wait_for_connections(0)
        assert adapter.measured == 2
        with open(os.path.join(root, "alice", "new", names[0]), "ab") as f:
            f.write(b"appended line\n")
        client = login(server)
        assert client.top(1, 0)[1] == [b"Subject: 0", b""]  # opens it
        client.quit()
        assert server.wait_for_connections(0)
        client = login(server)
        assert client.list(1).split()[2] == str(len(b"Subject: 0\r\n\r\nx\r\nappended line\r\n")).encode()
        assert client.list(2).split()[2] == b"17"
        client.quit()
    assert adapter.measured == 3


def _set_mtime(path, seconds):
    os.utime(path, ns=(seconds * 10**9, seconds * 10**9))


def test_directory_unchanged_since_a_quiet_listing_is_not_read_again(maildir):
    """A login to a Maildir whose new/ and cur/ kept their mtime since they were
    listed, over a second after their last change, costs two lstat() calls, not
    two directory reads: the listing comes from memory (as Dovecot's index)."""
    root, adapter = maildir
    first = deliver_like_an_mda(root, "alice", b"Subject: 1\n\nx\n")
    new = os.path.join(root, "alice", "new")
    with Controller(adapter) as server:
        for sub in ("new", "cur"):
            _set_mtime(os.path.join(root, "alice", sub), 1600000000)  # long quiet
        login(server).quit()
        assert server.wait_for_connections(0)
        # A file the directory's mtime does not admit to: only a read of the
        # directory could find it, so a listing without it came from memory.
        hidden = deliver_like_an_mda(root, "alice", b"Subject: 2\n\nx\n")
        _set_mtime(new, 1600000000)
        client = login(server)
        assert uidl(client) == [first]
        client.quit()
        assert server.wait_for_connections(0)
        _set_mtime(new, 1600000001)  # what any change does: read again
        client = login(server)
        assert uidl(client) == [first, hidden]
        client.quit()


def test_login_to_an_unchanged_maildir_does_not_look_at_the_size_cache(maildir, caplog):
    """When new/ and cur/ are as the last login found them (quiet listings from
    memory), that login's index is the answer: the size cache is not even
    looked at, so a cache replaced meanwhile (here by garbage) is not read;
    once a directory changes, the next login reads it again."""
    root, adapter = maildir
    deliver_like_an_mda(root, "alice", b"Subject: a\n\nbody\n")
    home = os.path.join(root, "alice")
    cache = os.path.join(home, CACHE_NAME)
    with Controller(adapter) as server, caplog.at_level(logging.WARNING, logger="pop3frame.adapters.maildir"):
        for sub in ("new", "cur"):
            _set_mtime(os.path.join(home, sub), 1600000000)  # long quiet
        for _ in range(2):  # the first lists and writes the cache, the second is from memory
            client = login(server)
            assert client.stat() == (1, 20)
            client.quit()
            assert server.wait_for_connections(0)
        _write(cache + ".new", b"{not json")
        os.replace(cache + ".new", cache)
        client = login(server)
        assert client.stat() == (1, 20)
        client.quit()
        assert server.wait_for_connections(0)
        assert "unreadable size cache" not in caplog.text  # not even opened
        second = deliver_like_an_mda(root, "alice", b"Subject: b\n\nbody\n")
        client = login(server)
        assert client.stat() == (2, 40)
        assert uidl(client)[1] == second
        client.quit()
        assert "ignoring unreadable size cache" in caplog.text


def test_directory_changed_within_a_second_of_its_listing_is_read_every_time(maildir):
    """A change made in the same clock tick as the listing could leave the
    mtime as it was: a directory changed less than a second before it was read
    is read again at every login."""
    root, adapter = maildir
    first = deliver_like_an_mda(root, "alice", b"Subject: 1\n\nx\n")
    new = os.path.join(root, "alice", "new")
    recent = int(time.time()) + 3600  # "now" however long the login takes
    with Controller(adapter) as server:
        _set_mtime(new, recent)
        login(server).quit()
        assert server.wait_for_connections(0)
        second = deliver_like_an_mda(root, "alice", b"Subject: 2\n\nx\n")
        _set_mtime(new, recent)  # the change kept the timestamp
        client = login(server)
        assert uidl(client) == [first, second]
        client.quit()


@pytest.mark.parametrize("how", ["in place", "renamed over, mtime copied"])
def test_message_changed_after_listing_to_have_a_dot_line_is_still_stuffed(maildir, how):
    """RFC 1939 section 3: the cache says this message has no line starting with
    ".", so RETR would skip looking; the file is rewritten after the listing
    (same length), now with a line holding a lone ".".  Opening it notices (its
    inode, size or mtime differ from what was measured) and the line is stuffed:
    the client gets the whole new message, not an early terminator."""
    root, adapter = maildir
    old = b"Subject: a\n\nfirst line.\nab\nsecond. last\n"
    new = b"Subject: a\n\nfirst line.\n.\nQsecond. last\n"
    assert len(old) == len(new) and old.count(b"\n") == new.count(b"\n")  # the same size on the wire
    name = deliver_like_an_mda(root, "alice", old)
    path = os.path.join(root, "alice", "new", name)
    with Controller(adapter) as server, RawClient(server.address) as c:
        assert c.login("alice", "pw").startswith(b"+OK")
        st = os.stat(path)
        if how == "in place":
            with open(path, "r+b") as f:
                f.write(new)
        else:
            _write(path + ".tmp", new)
            os.utime(path + ".tmp", ns=(st.st_atime_ns, st.st_mtime_ns))
            os.rename(path + ".tmp", path)
        c.send(b"RETR 1\r\n")
        assert c.line() == b"+OK %d octets\r\n" % (len(old) + old.count(b"\n"))
        assert unstuff(c.multiline()) == new.replace(b"\n", b"\r\n")
        assert c.cmd("NOOP") == b"+OK\r\n"  # still in step: nothing was taken for a command


def test_damaged_size_cache_is_ignored_and_rebuilt(maildir):
    root, adapter = maildir
    deliver_like_an_mda(root, "alice", b"Subject: a\n\nbody\n")
    cache = os.path.join(root, "alice", CACHE_NAME)
    for damage in (b"{not json", b"[1, 2]", b'{"x": "y"}', b"\xff\xfe"):
        with open(cache, "wb") as f:
            f.write(damage)
        with Controller(adapter) as server:
            client = login(server)
            assert client.stat() == (1, len(b"Subject: a\r\n\r\nbody\r\n"))
            client.quit()
    with open(cache, "rb") as f:
        assert b"body" not in f.read()  # sizes only, never content
    # The damaged copy was replaced by rename, and no temporary file is left.
    assert sorted(os.listdir(os.path.join(root, "alice"))) == sorted([CACHE_NAME, "cur", "new", "tmp"])


def test_unchanged_size_cache_is_not_read_again(maildir, caplog):
    """A login reads the size cache only if the file changed since this adapter
    last read or wrote it (one stat() instead of a parse of a big file); a
    cache another program replaced is read."""
    root, adapter = maildir
    deliver_like_an_mda(root, "alice", b"Subject: a\n\nbody\n")
    cache = os.path.join(root, "alice", CACHE_NAME)
    with Controller(adapter) as server:
        login(server).quit()  # writes the cache
        assert server.wait_for_connections(0)
        st = os.stat(cache)
        with open(cache, "r+b") as f:  # same inode, size and mtime, garbage inside
            f.write(b"#" * st.st_size)
        os.utime(cache, ns=(st.st_atime_ns, st.st_mtime_ns))
        with caplog.at_level(logging.WARNING, logger="pop3frame.adapters.maildir"):
            client = login(server)
            assert client.stat() == (1, 20)
            client.quit()
            assert server.wait_for_connections(0)
            assert "unreadable size cache" not in caplog.text  # not even opened
            _write(cache + ".new", b"{not json")
            os.replace(cache + ".new", cache)  # a new file: read, found damaged, rebuilt
            client = login(server)
            assert client.stat() == (1, 20)
            client.quit()
            assert "ignoring unreadable size cache" in caplog.text


def test_dovecot_wire_size_in_name_is_used(maildir):
    root, adapter = maildir
    adapter = CountingMaildir(root, adapter.auth)
    for sub in ("new", "cur", "tmp"):
        os.makedirs(os.path.join(root, "alice", sub))
    with open(os.path.join(root, "alice", "cur", "1700000000.M1.host,S=9,W=13:2,S"), "wb") as f:
        f.write(b"a\nb\nc\nd\n\n")  # 9 octets, 5 LF: really 14 on the wire
    with Controller(adapter) as server:
        client = login(server)
        assert client.list(1).split()[2] == b"13"  # the name, not a count of the file
        assert client.uidl(1).split()[2] == b"1700000000.M1.host,S=9,W=13"
        client.quit()
    assert (adapter.measured, adapter.peeked) == (0, 1)


def list_and_retr_octets(server, user="alice", password="pw"):
    """[(LIST size, octets RETR sent before stuffing)] for every message, on raw bytes."""
    out = []
    with RawClient(server.address) as c:
        assert c.login(user, password).startswith(b"+OK")
        count = int(c.cmd("STAT").split()[1])
        for n in range(1, count + 1):
            size = int(c.cmd("LIST %d" % n).split()[2])
            c.send(b"RETR %d\r\n" % n)
            assert c.line().startswith(b"+OK")
            out.append((size, len(unstuff(c.multiline()))))
        c.cmd("QUIT")
    return out


def _dovecot_name(stamp, data):
    """A name as Dovecot gives it: ,S= file size, ,W= size with LF counted as CRLF."""
    vsize = len(data) + data.count(b"\n") - data.count(b"\r\n")
    return "%d.M1P1.host,S=%d,W=%d" % (stamp, len(data), vsize)


def test_wire_size_in_name_gets_the_line_end_retr_adds(maildir):
    """RFC 1939 section 11 / Dovecot's ,W= (RFC822.SIZE, nothing added at the end):
    a file without a final LF lists W+2 (W+1 if it ends in CR), what RETR sends;
    one octet per file is read, once, and cached."""
    root, adapter = maildir
    adapter = CountingMaildir(root, adapter.auth)
    home = _mkdirs(root)
    files = [b"Subject: w\n\nno final LF", b"Subject: w\r\n\r\nends in a lone CR\r",
             b"Subject: w\n\nfinal LF\n", b"", b"Subject: w\r\n\r\n.dot, no final CRLF"]
    for i, data in enumerate(files):
        _write(os.path.join(home, "new", _dovecot_name(1700000000 + i, data)), data)
    with Controller(adapter) as server:
        pairs = list_and_retr_octets(server)
        assert [size for size, _ in pairs] == [27, 33, 24, 0, 35]
        assert all(size == sent for size, sent in pairs), pairs
        assert (adapter.measured, adapter.peeked) == (0, 5)
        assert server.wait_for_connections(0)
        assert list_and_retr_octets(server) == pairs
    assert (adapter.measured, adapter.peeked) == (0, 5)  # from the cache the second time


def test_size_cache_of_an_older_version_is_not_trusted_for_wire_size_names(maildir):
    """Caches written before ,W= sizes were corrected hold W without the final CRLF:
    those entries are recomputed, measured entries are kept."""
    root, adapter = maildir
    adapter = CountingMaildir(root, adapter.auth)
    home = _mkdirs(root)
    named_data, plain_data = b"Subject: w\n\nno final LF", b"Subject: p\n\nplain\n"
    named = _dovecot_name(1700000000, named_data)
    _write(os.path.join(home, "new", named), named_data)
    plain = deliver_like_an_mda(root, "alice", plain_data)
    old = {}
    for name, sub, size in ((named, "new", 25), (plain, "new", 21)):
        st = os.stat(os.path.join(home, sub, name))
        old[name] = [st.st_size, st.st_mtime_ns, size]
    _write(os.path.join(home, CACHE_NAME), json.dumps(old).encode())
    with Controller(adapter) as server:
        assert list_and_retr_octets(server) == [(27, 27), (21, 21)]
    assert (adapter.measured, adapter.peeked) == (0, 1)


def test_wire_size_in_name_impossible_for_the_file_is_ignored(maildir):
    root, adapter = maildir
    home = _mkdirs(root)
    for i, wire in enumerate((5, 99)):  # below the file size, above twice the file size
        _write(os.path.join(home, "new", "%d.M1.host,W=%d" % (1700000000 + i, wire)), b"Subject: x\n\nbody\n")
    with Controller(adapter) as server:
        assert list_and_retr_octets(server) == [(20, 20), (20, 20)]


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


def test_missing_user_directory_is_an_empty_mailbox_and_stays_missing(maildir):
    """The delivery agent creates the Maildir with the owner it needs; the server does not."""
    root, adapter = maildir
    with Controller(adapter) as server:
        client = login(server)
        assert client.stat() == (0, 0)
        client.quit()
    assert os.listdir(root) == []


def test_binary_non_utf8_content(maildir):
    root, adapter = maildir
    deliver_like_an_mda(root, "alice", b"Subject: bin\n\n\xff\xfe\x80 caf\xe9\n")
    with Controller(adapter) as server:
        client = login(server)
        assert client.retr(1)[1][-1] == b"\xff\xfe\x80 caf\xe9"
        client.quit()


def _mkdirs(root, user="alice"):
    for sub in ("new", "cur", "tmp"):
        os.makedirs(os.path.join(root, user, sub), exist_ok=True)
    return os.path.join(root, user)


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def test_wire_size_in_name_ignored_when_file_size_disagrees(maildir):
    """,S= no longer matching the file means the file changed: its ,W= is stale too."""
    root, adapter = maildir
    home = _mkdirs(root)
    _write(os.path.join(home, "cur", "1700000000.M1.host,S=3,W=999:2,S"), b"a\nb\n")
    with Controller(adapter) as server:
        client = login(server)
        assert client.list(1).split()[2] == b"6"
        client.quit()


def test_message_seen_twice_during_a_move_is_listed_once(maildir):
    """A rename new/ -> cur/ between the two directory listings shows both names."""
    root, adapter = maildir
    name = deliver_like_an_mda(root, "alice", b"Subject: once\n\nx\n")
    home = os.path.join(root, "alice")
    # Both names of one file: exactly what a scan caught mid-rename sees.
    os.link(os.path.join(home, "new", name), os.path.join(home, "cur", name + ":2,S"))
    with Controller(adapter) as server:
        client = login(server)
        assert uidl(client) == [name]
        client.quit()


def test_two_files_with_one_base_name_never_share_a_uid(maildir, caplog):
    root, adapter = maildir
    home = _mkdirs(root)
    _write(os.path.join(home, "new", "1700000000.M1.host"), b"Subject: a\n\nx\n")
    _write(os.path.join(home, "cur", "1700000000.M1.host:2,S"), b"Subject: b\n\nx\n")
    with Controller(adapter) as server:
        client = login(server)
        assert uidl(client) == ["1700000000.M1.host"]
        client.quit()
    assert "two messages named" in caplog.text


def test_file_names_cannot_forge_log_lines(maildir, caplog):
    """The mailbox's owner names its files: one with a newline is logged quoted."""
    root, adapter = maildir
    home = _mkdirs(root)
    forged = "1700000000.M1.host\n2026-01-01 ERROR pop3frame forged"
    _write(os.path.join(home, "new", forged), b"Subject: a\n\nx\n")
    _write(os.path.join(home, "cur", forged + ":2,S"), b"Subject: b\n\nx\n")
    with Controller(adapter) as server:
        login(server).quit()
    assert "two messages named" in caplog.text
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_delivery_order_with_odd_names(maildir):
    """Leading timestamp, then digit runs as numbers; names without a timestamp use mtime."""
    root, adapter = maildir
    home = _mkdirs(root)
    names = ["1700000001.M10P1.host", "1700000001.M9P1.host", "1700000000.M5P1.host",
             "no-timestamp", "\u00b2\u00b3.superscript-digits", "1699999999"]
    for i, name in enumerate(names):
        path = os.path.join(home, "new", name)
        _write(path, b"Subject: %d\n\nx\n" % i)
    # Undated names sort by mtime: one old, one newer than everything.
    os.utime(os.path.join(home, "new", "no-timestamp"), (1, 1))
    os.utime(os.path.join(home, "new", "\u00b2\u00b3.superscript-digits"), (1800000000, 1800000000))
    with Controller(adapter) as server:
        client = login(server)
        assert uidl(client)[:5] == ["no-timestamp", "1699999999", "1700000000.M5P1.host",
                                    "1700000001.M9P1.host", "1700000001.M10P1.host"]
        assert len(uidl(client)) == 6
        client.quit()


def test_non_utf8_file_name_gets_a_stable_hashed_uid(maildir):
    root, adapter = maildir
    home = _mkdirs(root)
    raw_name = b"1700000000.M1.h\xf6st"
    _write(os.path.join(os.fsencode(home), b"new", raw_name), b"Subject: bytes\n\nx\n")
    with Controller(adapter) as server:
        client = login(server)
        first = uidl(client)
        assert len(first[0]) == 40
        assert client.retr(1)[1][0] == b"Subject: bytes"
        client.quit()
        assert server.wait_for_connections(0)
        assert os.listdir(os.path.join(os.fsencode(home), b"cur")) == [raw_name + b":2,S"]
        client = login(server)
        assert uidl(client) == first  # the cache file round-tripped the name too
        client.quit()


def test_symlinks_fifos_and_directories_are_not_messages(maildir, tmp_path):
    root, adapter = maildir
    home = _mkdirs(root)
    secret = tmp_path / "secret"
    secret.write_bytes(b"root:x:0:0\n")
    os.symlink(secret, os.path.join(home, "new", "1700000000.M1.link"))
    os.mkfifo(os.path.join(home, "new", "1700000000.M2.fifo"))  # reading it would block forever
    os.mkdir(os.path.join(home, "cur", "1700000000.M3.dir"))
    real = deliver_like_an_mda(root, "alice", b"Subject: real\n\nx\n")
    with Controller(adapter) as server:
        client = login(server)
        assert uidl(client) == [real]
        client.quit()


def test_message_deleted_by_another_program_gives_temporary_error(maildir):
    root, adapter = maildir
    names = [deliver_like_an_mda(root, "alice", b"Subject: %d\n\nx\n" % i) for i in range(2)]
    with Controller(adapter) as server, RawClient(server.address) as c:
        assert c.login("alice", "pw").startswith(b"+OK")
        os.unlink(os.path.join(root, "alice", "new", names[0]))
        assert c.cmd("RETR 1") == b"-ERR [SYS/TEMP] message no longer exists\r\n"
        c.send(b"RETR 2\r\n")
        assert c.multiline().startswith(b"+OK")
        # Gone already counts as deleted: QUIT succeeds.
        assert c.cmd("DELE 1").startswith(b"+OK")
        assert c.cmd("QUIT").startswith(b"+OK")


def test_deleting_a_message_another_program_moved(maildir):
    """DELE of a message re-flagged in cur/ by an IMAP client still removes it."""
    root, adapter = maildir
    names = [deliver_like_an_mda(root, "alice", b"Subject: %d\n\nx\n" % i) for i in range(3)]
    home = os.path.join(root, "alice")
    with Controller(adapter) as server:
        client = login(server)
        for name in names:
            os.rename(os.path.join(home, "new", name), os.path.join(home, "cur", name + ":2,R"))
        client.dele(1)
        client.dele(3)
        assert client.quit().startswith(b"+OK")
    assert os.listdir(os.path.join(home, "new")) == []
    assert os.listdir(os.path.join(home, "cur")) == [names[1] + ":2,R"]


def test_seen_flag_added_where_another_program_moved_it(maildir):
    root, adapter = maildir
    name = deliver_like_an_mda(root, "alice", b"Subject: r\n\nx\n")
    home = os.path.join(root, "alice")
    with Controller(adapter) as server:
        client = login(server)
        client.retr(1)
        os.rename(os.path.join(home, "new", name), os.path.join(home, "cur", name + ":2,R"))
        client.quit()
        assert server.wait_for_connections(0)
    assert os.listdir(os.path.join(home, "cur")) == [name + ":2,RS"]


def test_seen_move_never_overwrites_an_existing_file(maildir):
    root, adapter = maildir
    name = deliver_like_an_mda(root, "alice", b"Subject: original\n\nx\n")
    home = os.path.join(root, "alice")
    with Controller(adapter) as server:
        client = login(server)
        client.retr(1)
        _write(os.path.join(home, "cur", name + ":2,S"), b"Subject: other file\n\ny\n")
        client.quit()
        assert server.wait_for_connections(0)
    assert os.listdir(os.path.join(home, "new")) == [name]
    with open(os.path.join(home, "cur", name + ":2,S"), "rb") as f:
        assert f.read() == b"Subject: other file\n\ny\n"


def test_delivery_during_session_is_not_shown_marked_or_deleted(maildir):
    root, adapter = maildir
    first = deliver_like_an_mda(root, "alice", b"Subject: first\n\nx\n")
    home = os.path.join(root, "alice")
    with Controller(adapter) as server:
        client = login(server)
        late = deliver_like_an_mda(root, "alice", b"Subject: late\n\ny\n")
        assert client.stat()[0] == 1
        client.retr(1)
        client.dele(1)
        client.quit()
        assert server.wait_for_connections(0)
        assert os.listdir(os.path.join(home, "new")) == [late]
        assert os.listdir(os.path.join(home, "cur")) == []
        client = login(server)
        assert uidl(client) == [late] and first != late
        client.quit()


def test_passwd_may_be_a_path_a_callable_or_none(maildir, tmp_path):
    root, adapter = maildir
    deliver_like_an_mda(root, "alice", b"Subject: a\n\nx\n")
    by_path = MaildirAdapter(root, adapter.auth.path)
    assert by_path.authenticate("alice", "pw") and not by_path.authenticate("alice", "no")
    calls = []

    def check(user, password):
        calls.append(user)
        return password == "secret"

    by_callable = MaildirAdapter(root, check)
    with Controller(by_callable) as server:
        client = server.pop3()
        client.user("alice")
        assert client.pass_("secret").startswith(b"+OK")
        client.quit()
    assert not by_callable.authenticate("../x", "secret")
    assert calls == ["alice"]  # unsafe names never reach the user database
    assert MaildirAdapter(root).authenticate("alice", "pw") is False
    with pytest.raises(TypeError):
        MaildirAdapter(root, 42)


@pytest.fixture
def shared_root():
    """A Maildir root another user can reach."""
    with reachable_dir("pop3frame-maildir-") as root:
        yield root


def test_directories_made_for_a_maildir_belong_to_its_owner(shared_root, tmp_path):
    """A server running as root completes ROOT/<user> (here owned by nobody) with
    private new/, cur/, tmp/ and a size cache that belong to nobody too, so a
    delivery agent running as the user still delivers."""
    me = os.geteuid() == 0
    owner = pwd.getpwnam("nobody") if me else pwd.getpwuid(os.geteuid())
    home = os.path.join(shared_root, "alice")
    os.mkdir(home, 0o700)
    os.chown(home, owner.pw_uid, owner.pw_gid)
    passwd = str(tmp_path / "passwd")
    set_password(passwd, "alice", "pw", scheme="PLAIN")
    with Controller(MaildirAdapter(shared_root, passwd)) as server:
        login(server).quit()
        assert server.wait_for_connections(0)
        for sub in ("new", "cur", "tmp"):
            st = os.lstat(os.path.join(home, sub))
            assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (owner.pw_uid, owner.pw_gid, 0o700), sub
        # The user's own delivery agent: tmp/ then rename into new/, as Maildir requires.
        subprocess.run(["sh", "-c", "printf 'Subject: mda\\n\\nx\\n' > tmp/m && mv tmp/m new/1700000001.M1P1.mda"],
                       cwd=home, user=owner.pw_uid, group=owner.pw_gid, extra_groups=[], check=True)
        client = login(server)
        assert client.retr(1)[1][0] == b"Subject: mda"
        client.quit()
    st = os.lstat(os.path.join(home, CACHE_NAME))
    assert (st.st_uid, st.st_gid) == (owner.pw_uid, owner.pw_gid)


def test_read_only_adapter_creates_no_directory(maildir):
    root, adapter = maildir
    name = deliver_like_an_mda(root, "alice", b"Subject: ro\n\nx\n")
    for sub in ("cur", "tmp"):
        os.rmdir(os.path.join(root, "alice", sub))
    with Controller(MaildirAdapter(root, adapter.auth, read_only=True)) as server:
        client = login(server)
        assert uidl(client) == [name]
        client.quit()
    assert sorted(os.listdir(os.path.join(root, "alice"))) == sorted([CACHE_NAME, "new"])


def test_read_only_leaves_every_file_alone(maildir):
    root, adapter = maildir
    name = deliver_like_an_mda(root, "alice", b"Subject: ro\n\nx\n")
    with Controller(MaildirAdapter(root, adapter.auth, read_only=True)) as server, \
            RawClient(server.address) as c:
        c.login("alice", "pw")
        c.send(b"RETR 1\r\n")
        assert c.multiline().startswith(b"+OK")
        assert c.cmd("DELE 1").startswith(b"-ERR [SYS/PERM]")
        assert c.cmd("QUIT").startswith(b"+OK")
        assert server.wait_for_connections(0)
    assert os.listdir(os.path.join(root, "alice", "new")) == [name]


def test_deletion_failure_is_logged_with_the_message(maildir, caplog):
    root, adapter = maildir
    names = [deliver_like_an_mda(root, "alice", b"Subject: %d\n\nx\n" % i) for i in range(4)]
    victim = os.path.join(root, "alice", "new", names[2])
    with Controller(adapter) as server:
        client = login(server)
        client.retr(4)
        os.unlink(victim)
        os.makedirs(os.path.join(victim, "inner"))
        for n in (1, 2, 3, 4):
            client.dele(n)
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.quit()
        assert server.wait_for_connections(0)
    assert "cannot delete message %s" % names[2] in caplog.text
    assert "1 later message(s) kept" in caplog.text
    # Messages 1 and 2 went; 3 (the directory) and 4 stayed, 4 marked seen
    # since it was retrieved, and the next session still serves it.
    assert os.listdir(os.path.join(root, "alice", "new")) == [names[2]]
    assert os.listdir(os.path.join(root, "alice", "cur")) == [names[3] + ":2,S"]
    with Controller(adapter) as server:
        client = login(server)
        assert uidl(client) == [names[3]]
        client.quit()
    shutil.rmtree(victim)


def test_symlinked_new_directory_is_not_served(maildir, tmp_path, caplog):
    """new/ as a symlink would let a user who owns the Maildir have a root server read any directory."""
    root, adapter = maildir
    home = _mkdirs(root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "1700000000.M9.secret").write_bytes(b"root secret\n")
    os.rmdir(os.path.join(home, "new"))
    os.symlink(elsewhere, os.path.join(home, "new"))
    kept = deliver_like_an_mda(root, "alice", b"Subject: cur\n\nx\n", flags="")
    with Controller(adapter) as server:
        client = login(server)
        assert uidl(client) == [kept]
        client.quit()
    assert "is not a directory" in caplog.text
    assert os.listdir(elsewhere) == ["1700000000.M9.secret"]


def test_directories_swapped_for_symlinks_during_a_session(maildir, tmp_path):
    """After the listing, new/ and cur/ become symlinks to other directories: RETR,
    DELE and the move to cur/ must not reach them, and no message is lost.  (RETR
    reads through the descriptor of new/ the session opened before the swap: the
    real directory, whatever now has its name.)"""
    root, adapter = maildir
    names = [deliver_like_an_mda(root, "alice", b"Subject: %d\n\nx\n" % i) for i in range(2)]
    home = os.path.join(root, "alice")
    target_new, target_cur = tmp_path / "target-new", tmp_path / "target-cur"
    target_new.mkdir()
    target_cur.mkdir()
    (target_new / names[0]).write_bytes(b"Subject: not yours\n\nsecret\n")
    with Controller(adapter) as server:
        client = login(server)
        client.retr(2)
        for sub, target in (("new", target_new), ("cur", target_cur)):
            os.rename(os.path.join(home, sub), os.path.join(home, sub + ".real"))
            os.symlink(target, os.path.join(home, sub))
        assert client.retr(1)[1] == [b"Subject: 0", b"", b"x"]  # not the link target's "secret"
        client.dele(1)
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.quit()
        assert server.wait_for_connections(0)
    assert os.listdir(target_new) == [names[0]]
    assert os.listdir(target_cur) == []
    assert sorted(os.listdir(os.path.join(home, "new.real"))) == sorted(names)


def test_size_cache_that_is_a_fifo_does_not_block_the_login(maildir):
    """Only regular files are opened: a FIFO in the Maildir must not hang a session thread."""
    root, adapter = maildir
    deliver_like_an_mda(root, "alice", b"Subject: f\n\nx\n")
    cache = os.path.join(root, "alice", CACHE_NAME)
    os.mkfifo(cache)
    result = []
    reader = threading.Thread(target=lambda: result.append(adapter.list_messages("alice")), daemon=True)
    reader.start()
    reader.join(10)
    blocked = reader.is_alive()
    if blocked:
        # Release the blocked open (a writer appears and leaves) before failing.
        os.close(os.open(cache, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(10)
    assert not blocked
    assert [m.size for m in result[0]] == [len(b"Subject: f\r\n\r\nx\r\n")]
    assert os.path.isfile(cache)  # replaced by a real cache file



def test_unreadable_new_directory_is_an_error_not_an_empty_mailbox(shared_root, caplog):
    """A permission problem must reach the client as an error, not look like "no mail":
    [SYS/TEMP] (RFC 3206 section 4), and one ERROR line with the cause, no traceback."""
    caplog.set_level(logging.INFO)
    new = os.path.join(shared_root, "alice", "new")
    os.makedirs(new)
    adapter = MaildirAdapter(shared_root, read_only=True)  # read-only: makes nothing
    os.chmod(new, 0)  # stops a non-root run; root ignores modes, so it acts as nobody
    nobody = pwd.getpwnam("nobody")
    try:
        if os.geteuid() == 0:
            os.setegid(nobody.pw_gid)
            os.seteuid(nobody.pw_uid)
        with pytest.raises(TemporaryFailure, match="^mailbox unavailable$"):
            adapter.list_messages("alice")
    finally:
        if os.geteuid() != os.getuid():
            os.seteuid(os.getuid())
            os.setegid(os.getgid())
        os.chmod(new, 0o700)
    line = expected_failure_logged_once(caplog.records, "Permission denied")
    assert line.getMessage() == "%s: cannot open the Maildir: Permission denied" % os.path.join(shared_root, "alice")


#: 16 MB: far more than the server can have sent a slow reader (see retr_interrupted).
HUGE = b"Subject: huge\r\n\r\n" + (b"x" * 998 + b"\r\n") * 16_000


@pytest.mark.parametrize("stored, new, only_old", [
    # LF line ends: read and converted, without looking for "." lines (none were):
    # each read is checked, so no byte read after the rewrite is sent.
    (HUGE.replace(b"\r\n", b"\n"), HUGE.replace(b"\r\n", b"\n").replace(b"xx\nx", b"xx\n."), True),
    # Stored as sent: the file goes out with sendfile(), unread, so the rewrite is
    # seen only at its end, after new bytes went out (never a terminator, though).
    (HUGE, HUGE.replace(b"x", b"y"), False),
], ids=["read", "sendfile"])
def test_message_written_in_place_mid_retr_never_ends_cleanly(maildir, stored, new, only_old):
    """RFC 1939 section 3: a message file rewritten in place (same size; no Maildir
    writer does it, an operator's cp or a broken tool may) while a slow client reads it
    never ends in a terminator, before its end (a "." line of the new bytes sent
    unstuffed: the size cache said there was none) or at it (old and new bytes mixed):
    the connection closes, and the next session serves the file as it is now."""
    root, adapter = maildir
    assert len(new) == len(stored)
    name = deliver_like_an_mda(root, "alice", stored)
    path = os.path.join(root, "alice", "new", name)

    def rewrite():
        old = os.stat(path).st_mtime_ns
        with open(path, "r+b") as f:
            f.write(new)
        os.utime(path, ns=(old + 10**9, old + 10**9))  # a later clock tick, as any real write

    with Controller(adapter) as server:
        status, body, complete = retr_interrupted(server.address, "alice", "pw", 1, rewrite)
        assert status == b"+OK %d octets\r\n" % len(HUGE)
        assert not complete and (HUGE.startswith(body) or not only_old)
        assert server.wait_for_connections(0)
        client = login(server)
        assert retr_lines_to_bytes(client.retr(1)[1]) == new.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        client.quit()


@pytest.mark.parametrize("how", ["root-removed", "volume-unmounted"])
def test_a_mail_root_gone_after_start_is_sys_temp_not_an_empty_maildrop(tmp_path, caplog, how):
    """The mail root removed, or its volume unmounted (the mount point left
    empty), after the server started: every user would have seen an empty
    maildrop, with no log line.  Now LIST is never reached: -ERR [SYS/TEMP]
    at PASS (RFC 3206 section 4) and one ERROR line naming the root, both for
    a user found at an earlier login and for one without a Maildir.  A new,
    empty root (nothing delivered yet) stays an empty maildrop."""
    mount = tmp_path / "mail"
    root = mount / "vol" if how == "root-removed" else mount
    deliver_like_an_mda(str(root), "alice", b"Subject: kept\n\nmail\n")
    os.makedirs(str(root / "carol"))  # a user with no mail yet: empty, not an error
    adapter = MaildirAdapter(str(root), lambda user, password: password == user + "-pw")
    with Controller(MaildirAdapter(str(tmp_path / "new-root"), adapter.authenticate)) as server:
        os.mkdir(str(tmp_path / "new-root"))
        client = server.pop3()
        client.user("bob")
        client.pass_("bob-pw")
        assert client.stat() == (0, 0)
        client.quit()
    with Controller(adapter) as server:
        client = server.pop3()
        client.user("alice")
        client.pass_("alice-pw")
        assert client.stat() == (1, len(b"Subject: kept\r\n\r\nmail\r\n"))
        client.quit()
        client = server.pop3()
        client.user("carol")
        client.pass_("carol-pw")
        assert client.stat() == (0, 0)
        client.quit()
        if how == "root-removed":
            shutil.rmtree(str(root))
        else:
            for entry in os.listdir(str(root)):
                shutil.rmtree(str(root / entry))
        caplog.clear()
        for user in ("alice", "bob"):
            client = server.pop3()
            client.user(user)
            with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[SYS/TEMP\] "):
                client.pass_(user + "-pw")
            client.quit()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and all(e.startswith(str(root)) for e in errors), errors
    cause = "No such file or directory" if how == "root-removed" else "the mail root is empty (not mounted?)"
    assert all(e.endswith(cause) for e in errors) and not any(r.exc_info for r in caplog.records), errors
