"""Dovecot-compatible passwd-file: schemes verified against the reference libraries."""
from __future__ import annotations

import os

import argon2
import bcrypt
import pytest
from passlib.hash import sha512_crypt

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
    assert open(passwd).read() == "carol:{PLAIN}y:1000:1000::/home/carol::userdb_quota_rule=*:storage=1G\n"


def test_malformed_lines_are_skipped(passwd):
    write(passwd, "garbage\n:nouser\ngood:{PLAIN}pw\n")
    assert PasswdFile(passwd).users() == ["good"]


@pytest.mark.parametrize("name", ["", "a:b", "a\nb"])
def test_invalid_names_refused(passwd, name):
    with pytest.raises(ValueError):
        set_password(passwd, name, "pw")
