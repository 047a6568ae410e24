"""Directory-of-files adapter, single- and multi-user."""
from __future__ import annotations

import os
import poplib

import pytest

from pop3frame.adapters.directory import DirectoryAdapter
from pop3frame.testing import Controller


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
        assert [l.split()[1] for l in client.uidl()[1]] == [b"b-report.txt", b"a-report.txt"]  # by mtime
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
