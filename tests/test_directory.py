"""Directory-of-files adapter, single- and multi-user."""
from __future__ import annotations

import os
import poplib

import pytest

from pop3frame.adapters.directory import DirectoryAdapter
from pop3frame.testing import Controller
from tests.helpers import FileSpanServer, RawClient, refused_login, retr_lines_to_bytes, unstuff


def test_single_user_serves_the_directory_itself(tmp_path):
    for i, name in enumerate(["b-report.txt", "a-report.txt"]):
        (tmp_path / name).write_bytes(b"Subject: %s\n\nnumbers\n" % name.encode())
        os.utime(tmp_path / name, (1_700_000_000 + i, 1_700_000_000 + i))
    (tmp_path / ".hidden").write_bytes(b"ignored")
    (tmp_path / "subdir").mkdir()
    adapter = DirectoryAdapter(str(tmp_path), user="reports", password="pw", read_only=True)
    with Controller(adapter) as server:
        client = server.pop3()
        client.user("reports")
        client.pass_("pw")
        assert [client.top(i, 0)[1][0] for i in (1, 2)] == [b"Subject: b-report.txt", b"Subject: a-report.txt"]  # by mtime
        with pytest.raises(poplib.error_proto, match=r"SYS/PERM"):
            client.dele(1)
        client.quit()
        wrong = server.pop3()
        wrong.user("someone")
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            wrong.pass_("pw")


def test_constructor_demands_one_mode(tmp_path):
    with pytest.raises(ValueError):
        DirectoryAdapter(str(tmp_path))
    with pytest.raises(ValueError):
        DirectoryAdapter(str(tmp_path), user="u")


@pytest.mark.parametrize("name", ["..", "../x", "a/b", ".x"])
def test_multi_user_traversal_rejected(tmp_path, name):
    class Yes:
        def authenticate(self, u, p):
            return True

    assert DirectoryAdapter(str(tmp_path), Yes()).authenticate(name, "pw") is False


def test_sizes_cached(tmp_path):
    (tmp_path / "r1").write_bytes(b"a\nb\n")
    adapter = DirectoryAdapter(str(tmp_path), user="u", password="p")
    assert adapter.list_messages("u")[0].size == 6
    st = os.stat(tmp_path / "r1")
    (tmp_path / "r1").write_bytes(b"abcd")  # same size and mtime, other content
    os.utime(tmp_path / "r1", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert adapter.list_messages("u")[0].size == 6


class Anyone:
    def authenticate(self, user, password):
        return True


def login(server, user):
    client = server.pop3()
    client.user(user)
    client.pass_("pw")
    return client


def test_size_cache_is_not_shared_between_users(tmp_path):
    """RFC 1939 section 11: LIST gives the exact octets RETR sends, even when
    two users have files of the same name, byte size and mtime."""
    bodies = {"alice": b"a\nb\nc\nd\n", "bob": b"abcdefg\n"}  # 8 bytes each; 12 and 9 on the wire
    for user, body in bodies.items():
        (tmp_path / user).mkdir()
        (tmp_path / user / "r").write_bytes(body)
        os.utime(tmp_path / user / "r", ns=(1_700_000_000 * 10**9,) * 2)
    with Controller(DirectoryAdapter(str(tmp_path), Anyone())) as server:
        for user, body in bodies.items():
            client = login(server, user)
            size = int(client.list(1).split()[2])
            assert size == len(retr_lines_to_bytes(client.retr(1)[1])) == len(body.replace(b"\n", b"\r\n"))
            client.quit()


def test_size_cache_forgets_files_that_are_gone(tmp_path):
    for i in range(3):
        (tmp_path / ("r%d" % i)).write_bytes(b"x\n")
    adapter = DirectoryAdapter(str(tmp_path), user="u", password="p")
    assert len(adapter.list_messages("u")) == 3
    for i in range(2):
        os.unlink(tmp_path / ("r%d" % i))
    assert len(adapter.list_messages("u")) == 1
    assert sum(len(sizes) for sizes in adapter._sizes.values()) == 1


def replace_by_rename(path, data):
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_bytes(data)
    os.rename(tmp, path)


def rewrite_in_place(path, data):
    with open(path, "r+b") as f:
        f.write(data)


@pytest.mark.parametrize("replace", [replace_by_rename, rewrite_in_place])
def test_report_replaced_during_a_session_is_neither_served_nor_deleted(tmp_path, replace):
    """RFC 1939 section 7 (UIDL): the new file is a new message with a new
    unique-id; the session that listed the old one gets -ERR for it and its
    DELE does not remove the new file."""
    report = tmp_path / "daily.txt"
    report.write_bytes(b"Subject: old\n\nold\n")
    os.utime(report, ns=(1_700_000_000 * 10**9,) * 2)
    new = b"Subject: new\n\nnew, and longer\n"
    with Controller(DirectoryAdapter(str(tmp_path), user="u", password="pw")) as server:
        client = login(server, "u")
        old_uid = client.uidl(1).split()[2]
        replace(report, new)
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.retr(1)
        client.dele(1)
        assert client.quit().startswith(b"+OK")
        assert server.wait_for_connections(0)
        assert report.read_bytes() == new
        client = login(server, "u")
        assert client.uidl(1).split()[2] != old_uid
        assert retr_lines_to_bytes(client.retr(1)[1]) == new.replace(b"\n", b"\r\n")
        client.quit()


def test_report_swapped_for_a_symlink_is_not_followed(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    (tmp_path / "secret").write_bytes(b"Subject: secret\n\nnot for you\n")
    report = reports / "r"
    report.write_bytes(b"Subject: r\n\nreport\n")
    with Controller(DirectoryAdapter(str(reports), user="u", password="pw")) as server:
        client = login(server, "u")
        assert client.stat()[0] == 1
        os.unlink(report)
        os.symlink(tmp_path / "secret", report)
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.retr(1)
        client.dele(1)
        assert client.quit().startswith(b"+OK")
    assert os.path.islink(report) and (tmp_path / "secret").exists()


def test_user_directory_that_is_a_symlink_is_refused(tmp_path, caplog):
    """root/alice a symlink to root/bob: bob's files are neither served to alice nor
    deleted by her; the login answers -ERR [SYS/PERM] and the log says why."""
    bob = tmp_path / "bob"
    bob.mkdir()
    (bob / "r").write_bytes(b"Subject: bob's\n\nnot for alice\n")
    os.symlink(bob, tmp_path / "alice")
    with Controller(DirectoryAdapter(str(tmp_path), Anyone())) as server:
        assert refused_login(server, "alice", "pw") == b"-ERR [SYS/PERM] mailbox is not a directory"
        assert login(server, "bob").stat()[0] == 1  # bob's own directory is served
    assert (bob / "r").exists()
    assert "alice is a symlink or not a directory; not served" in caplog.text


REPORT = b"Subject: stored as sent\r\n\r\n" + b"Totals. All green, as before. Next run at 2.\r\n" * 4000


def test_report_stored_as_sent_is_read_not_sent_with_sendfile(tmp_path):
    """RFC 1939 section 3: a report already in wire form (CRLF, a final CRLF, no
    line starting with ".") and one with dot lines both arrive exact.  Neither goes
    out with sendfile(): reports are rewritten in place, and bytes sendfile() sends
    leave before a rewrite can be noticed, where a "." line of the new report would
    go out unstuffed and end the reply early (each read is checked instead)."""
    dotted = REPORT.replace(b"\r\nTotals.", b"\r\n.Totals.", 7)
    (tmp_path / "a-plain").write_bytes(REPORT)
    (tmp_path / "b-dotted").write_bytes(dotted)
    os.utime(tmp_path / "b-dotted", (1_800_000_000, 1_800_000_000))
    adapter = DirectoryAdapter(str(tmp_path), user="u", password="pw")
    assert [m.dot_lines for m in adapter.list_messages("u")] == [False, True]
    with Controller(adapter, server_class=FileSpanServer) as server, RawClient(server.address) as c:
        assert c.login("u", "pw").startswith(b"+OK")
        for number, data in ((1, REPORT), (2, dotted), (1, REPORT)):
            c.send(b"RETR %d\r\n" % number)
            assert c.line() == b"+OK %d octets\r\n" % len(data)
            wire = c.multiline()
            assert wire == data + b".\r\n" if number == 1 else unstuff(wire) == data
        assert c.cmd("QUIT").startswith(b"+OK")
        assert server.wait_for_connections(0)
        assert server.server.file_spans == []
