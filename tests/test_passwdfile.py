"""Dovecot-compatible passwd-file: schemes verified against the reference libraries."""
from __future__ import annotations

import os
import pathlib
import threading

import argon2
import bcrypt
import pytest
from passlib.hash import sha512_crypt

from pop3frame import TemporaryFailure
from pop3frame.adapters.passwdfile import PasswdFile, delete_user, read_entries, set_password


@pytest.fixture
def passwd(tmp_path):
    return str(tmp_path / "passwd")


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def test_schemes_made_by_reference_libraries(passwd):
    dovecot_bcrypt = bcrypt.hashpw(b"blf", bcrypt.gensalt(5)).decode().replace("$2b$", "$2y$", 1)
    write(passwd, "\n".join([
        "# users",
        "plain:{PLAIN}pw-plain::::::",
        "sha:{SHA512-CRYPT}" + sha512_crypt.using(rounds=5000).hash("pw-sha"),
        # Dovecot's own SHA512-CRYPT strings carry no rounds= field.
        "sha2:{SHA512-CRYPT}" + sha512_crypt.using(rounds=5000).hash("pw-sha2").replace("rounds=5000$", ""),
        "blf:{BLF-CRYPT}" + dovecot_bcrypt + ":1000:1000::/home/blf::",
        "argon:{ARGON2ID}" + argon2.PasswordHasher().hash("pw-argon"),
        "",
    ]))
    users = PasswdFile(passwd)
    assert users.users() == ["argon", "blf", "plain", "sha", "sha2"]
    for user, password in [("plain", "pw-plain"), ("sha", "pw-sha"), ("sha2", "pw-sha2"),
                           ("blf", "blf"), ("argon", "pw-argon")]:
        assert users.authenticate(user, password), user
        assert not users.authenticate(user, password + "x"), user
    assert not users.authenticate("nobody", "pw-plain")


def test_reload_on_change_and_set_delete(passwd):
    set_password(passwd, "alice", "one")
    users = PasswdFile(passwd)
    assert users.authenticate("alice", "one")
    set_password(passwd, "alice", "two")
    set_password(passwd, "bob", "b", scheme="BLF-CRYPT")
    assert not users.authenticate("alice", "one")
    assert users.authenticate("alice", "two") and users.authenticate("bob", "b")
    assert oct(os.stat(passwd).st_mode & 0o777) == "0o600"
    assert read_entries(passwd)["alice"].startswith("{ARGON2ID}$argon2id$")
    assert delete_user(passwd, "bob") is True
    assert delete_user(passwd, "bob") is False
    assert not users.authenticate("bob", "b")


def test_set_password_keeps_extra_fields(passwd):
    write(passwd, "carol:{PLAIN}x:1000:1000::/home/carol::userdb_quota_rule=*:storage=1G\n")
    set_password(passwd, "carol", "y", scheme="PLAIN")
    assert pathlib.Path(passwd).read_text() == "carol:{PLAIN}y:1000:1000::/home/carol::userdb_quota_rule=*:storage=1G\n"


def test_malformed_lines_are_skipped(passwd):
    write(passwd, "garbage\n:nouser\ngood:{PLAIN}pw\n")
    assert PasswdFile(passwd).users() == ["good"]


@pytest.mark.parametrize("name", ["", "a:b", "a\nb", "#comment", "tab\there"])
def test_invalid_names_refused(passwd, name):
    with pytest.raises(ValueError):
        set_password(passwd, name, "pw")


def test_bare_crypt_hashes_and_placeholders(passwd):
    """Without {SCHEME}: crypt prefixes are recognised; '*', '!', 'x' and empty never verify."""
    write(passwd, "\n".join([
        "bare:" + sha512_crypt.using(rounds=5000).hash("pw-bare").replace("rounds=5000$", ""),
        "star:*", "bang:!locked", "x:x", "empty:", "emptyplain:{PLAIN}:1000",
        "",
    ]))
    users = PasswdFile(passwd)
    assert users.authenticate("bare", "pw-bare")
    assert not users.authenticate("bare", "$6$")
    for user, password in [("star", "*"), ("bang", "!locked"), ("x", "x"), ("empty", ""), ("emptyplain", "")]:
        assert not users.authenticate(user, password), user


def test_first_line_wins_like_dovecot(passwd, caplog):
    write(passwd, "dup:{PLAIN}first\ndup:{PLAIN}second\n")
    users = PasswdFile(passwd)
    assert users.authenticate("dup", "first") and not users.authenticate("dup", "second")
    assert "listed again" in caplog.text
    set_password(passwd, "dup", "third", scheme="PLAIN")
    assert pathlib.Path(passwd).read_text() == "dup:{PLAIN}third\n"


def test_non_utf8_bytes_spoil_only_their_line(passwd):
    with open(passwd, "wb") as f:
        f.write(b"bad\xff:{PLAIN}x\ngood:{PLAIN}pw\n")
    assert PasswdFile(passwd).authenticate("good", "pw")
    set_password(passwd, "new", "n", scheme="PLAIN")
    with open(passwd, "rb") as f:
        assert f.read() == b"bad\xff:{PLAIN}x\ngood:{PLAIN}pw\nnew:{PLAIN}n\n"


def test_edit_within_one_clock_tick_is_noticed(passwd):
    """Same size, same inode, same mtime: the content comparison still sees the change."""
    write(passwd, "alice:{PLAIN}aaaa\n")
    users = PasswdFile(passwd)
    assert users.authenticate("alice", "aaaa")
    st = os.stat(passwd)
    with open(passwd, "r+") as f:
        f.write("alice:{PLAIN}bbbb\n")
    os.utime(passwd, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(passwd).st_ino == st.st_ino
    assert users.authenticate("alice", "bbbb") and not users.authenticate("alice", "aaaa")


def test_missing_file_is_a_temporary_failure_on_the_wire(passwd, tmp_path):
    from pop3frame import TemporaryFailure
    from pop3frame.adapters.maildir import MaildirAdapter
    from pop3frame.testing import Controller
    from tests.helpers import RawClient

    users = PasswdFile(passwd)
    with pytest.raises(TemporaryFailure):
        users.authenticate("alice", "pw")
    (tmp_path / "mail").mkdir()  # a missing mail root is an outage of its own (SYS/TEMP too)
    with Controller(MaildirAdapter(str(tmp_path / "mail"), users)) as server, RawClient(server.address) as c:
        c.cmd("USER alice")
        # Not [AUTH]: the client must not conclude the password is wrong.
        assert c.cmd("PASS pw") == b"-ERR [SYS/TEMP] user database unavailable\r\n"
        set_password(passwd, "alice", "pw", scheme="PLAIN")
        c.cmd("USER alice")
        assert c.cmd("PASS pw").startswith(b"+OK")


def test_unknown_user_costs_a_real_check(passwd):
    """The dummy check for unknown users has the scheme and cost of the file's real hashes."""
    import time

    slow = sha512_crypt.using(rounds=400_000).hash("pw")
    write(passwd, "a:{PLAIN}pa\nb:{SHA512-CRYPT}%s\nc:{SHA512-CRYPT}%s\n" % (slow, slow))
    users = PasswdFile(passwd)
    users.authenticate("b", "warm-up")

    def cost(user):  # CPU time: other processes' load does not count
        start = time.process_time()
        users.authenticate(user, "guess")
        return time.process_time() - start

    known = min(cost("b") for _ in range(3))
    unknown = min(cost("nobody") for _ in range(3))
    assert unknown > known * 0.5, (known, unknown)
    assert not users.authenticate("nobody", "pw")  # even with a real user's password


def test_concurrent_editors_lose_no_update(passwd):
    import threading

    names = ["user%d" % i for i in range(20)]
    threads = [threading.Thread(target=set_password, args=(passwd, n, "pw-" + n, "PLAIN")) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(read_entries(passwd)) == sorted(names)


def test_group_readable_file_stays_group_readable_never_world(passwd):
    write(passwd, "alice:{PLAIN}x\n")
    os.chown(passwd, 0, 1234)
    os.chmod(passwd, 0o644)
    set_password(passwd, "alice", "y", scheme="PLAIN")
    st = os.stat(passwd)
    assert st.st_mode & 0o777 == 0o640 and st.st_gid == 1234


@pytest.mark.parametrize("password", ["a:b", "line\nbreak"])
def test_plain_password_that_would_break_the_line_is_refused(passwd, password):
    with pytest.raises(ValueError):
        set_password(passwd, "alice", password, scheme="PLAIN")
    set_password(passwd, "alice", password, scheme="SHA512-CRYPT")
    assert PasswdFile(passwd).authenticate("alice", password)


def test_passwdfile_is_callable_auth_for_adapters(passwd):
    set_password(passwd, "alice", "pw", scheme="PLAIN")
    assert PasswdFile(passwd)("alice", "pw")


def test_a_symlink_at_the_lock_name_is_not_followed(tmp_path):
    """Editing as root: a link planted at <file>.lock must not make root create its target."""
    path = str(tmp_path / "passwd")
    target = tmp_path / "created-by-root"
    os.symlink(target, path + ".lock")
    with pytest.raises(OSError):
        set_password(path, "alice", "pw", scheme="PLAIN")
    assert not target.exists() and not os.path.exists(path)


def test_a_fifo_in_place_of_the_file_is_sys_temp_not_a_hang(passwd, tmp_path):
    """The file replaced by a FIFO nobody writes to: the login that finds it fails at once
    (-ERR [SYS/TEMP]); open() waited for a writer, holding the lock every login needs."""
    write(passwd, "alice:{PLAIN}pw\n")
    users = PasswdFile(passwd)
    assert users.authenticate("alice", "pw")
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    os.replace(fifo, passwd)
    outcome = []

    def login():
        try:
            outcome.append(users.authenticate("alice", "pw"))
        except TemporaryFailure as exc:
            outcome.append(exc)

    thread = threading.Thread(target=login, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # the defect: let the waiting open() return, then fail
        os.close(os.open(passwd, os.O_WRONLY))
        thread.join(10)
    assert [type(o) for o in outcome] == [TemporaryFailure]
    assert not thread.is_alive()
    os.unlink(passwd)
    write(passwd, "alice:{PLAIN}pw\n")
    assert users.authenticate("alice", "pw")
