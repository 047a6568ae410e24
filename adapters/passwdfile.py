"""Users from a Dovecot-compatible passwd-file.

Each line is ``user:{SCHEME}hash[:uid:gid:gecos:home:shell:extra]``; blank
lines and lines starting with ``#`` are ignored.  Schemes are those of
:mod:`pop3frame.passwords` (PLAIN, SHA512-CRYPT, BLF-CRYPT/BCRYPT, ARGON2ID,
SCRYPT), so a file written for Dovecot works unchanged.

The file is re-read when it changes (mtime, size or inode), so
``pop3frame passwd`` or another tool can edit it while the server runs.
"""
from __future__ import annotations

import logging
import os
import secrets
import tempfile
import threading
from typing import Dict, List, Optional, Tuple

from pop3frame.passwords import hash_password, verify_password

__all__ = ["PasswdFile", "set_password", "delete_user", "read_entries"]

logger = logging.getLogger("pop3frame.adapters.passwdfile")


def read_entries(path: str) -> Dict[str, str]:
    """``{user: "{SCHEME}hash"}`` from a passwd-file; malformed lines are skipped and logged."""
    entries: Dict[str, str] = {}
    with open(path, "r", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            fields = line.split(":")
            if len(fields) < 2 or not fields[0]:
                logger.warning("%s:%d: malformed line skipped", path, number)
                continue
            entries[fields[0]] = fields[1]
    return entries


class PasswdFile:
    """Password checks against a passwd-file; safe to share between threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._mutex = threading.Lock()
        self._stamp: Optional[Tuple[int, int, int]] = None
        self._entries: Dict[str, str] = {}
        self._dummy = hash_password(secrets.token_hex(8))

    def _current(self) -> Dict[str, str]:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._mutex:
            if stamp != self._stamp:
                self._entries = read_entries(self.path)
                self._stamp = stamp
                logger.info("loaded %d users from %s", len(self._entries), self.path)
            return self._entries

    def users(self) -> List[str]:
        return sorted(self._current())

    def authenticate(self, username: str, password: str) -> bool:
        hashed = self._current().get(username)
        if hashed is None:
            # Same work as a real check, so response time does not reveal names.
            verify_password(self._dummy, password)
            return False
        return verify_password(hashed, password)


def _rewrite(path: str, user: str, new_line: Optional[str]) -> bool:
    """Replace (or drop, or append) ``user``'s line atomically; True if it existed."""
    if ":" in user or "\n" in user or not user:
        raise ValueError("invalid user name %r" % (user,))
    try:
        with open(path, "r", encoding="utf-8") as f:
            lines = f.read().splitlines()
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        lines, mode = [], 0o600
    out, found = [], False
    for line in lines:
        if line.split(":", 1)[0] == user and not line.lstrip().startswith("#"):
            found = True
            if new_line is not None:
                out.append(new_line)
        else:
            out.append(line)
    if not found and new_line is not None:
        out.append(new_line)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".passwd-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in out))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        # A reader sees the old file or the new one, never half of one.
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return found


def set_password(path: str, user: str, password: str, scheme: str = "") -> None:
    """Add ``user`` or change their password (strong default scheme); keeps other fields."""
    hashed = hash_password(password, scheme)
    rest = ""
    try:
        for line in open(path, encoding="utf-8").read().splitlines():
            fields = line.split(":")
            if fields[0] == user and len(fields) > 2:
                rest = ":" + ":".join(fields[2:])
    except FileNotFoundError:
        pass
    _rewrite(path, user, "%s:%s%s" % (user, hashed, rest))


def delete_user(path: str, user: str) -> bool:
    """Remove ``user``'s line; returns whether it existed."""
    return _rewrite(path, user, None)
