"""Users from a Dovecot-compatible passwd-file.

Each line is ``user:{SCHEME}hash[:uid:gid:gecos:home:shell:extra]``; blank
lines and lines starting with ``#`` are ignored.  Schemes are those of
:mod:`pop3frame.passwords` (PLAIN, SHA512-CRYPT, BLF-CRYPT/BCRYPT, ARGON2ID,
SCRYPT), so a file written for Dovecot works unchanged.  Like Dovecot, the
first line for a user wins (a duplicate is logged).

A password field without ``{SCHEME}`` is recognised by its crypt prefix
(``$1$``, ``$5$``, ``$6$``, ``$2y$``, ``$argon2id$``, ``$scrypt$``); anything
else without a scheme, and an empty field, never verifies: a ``*``, ``!`` or
``x`` placeholder copied from ``/etc/shadow`` must not become a working
password (:func:`pop3frame.passwords.stored_password` with
``plaintext=False``).

The file is re-read when it changes (mtime, size or inode), so
``pop3frame passwd`` or another tool can edit it while the server runs.
:func:`set_password` and :func:`delete_user` replace the file atomically and
serialise concurrent editors with ``flock`` on ``<file>.lock``.
"""
from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from pop3frame import TemporaryFailure
from pop3frame.passwords import PasswordCheck, hash_password, stored_password
from pop3frame.regularfile import read_regular
from pop3frame.protocol import plural

__all__ = ["PasswdFile", "set_password", "delete_user", "read_entries", "malformed_lines"]

logger = logging.getLogger("pop3frame.adapters.passwdfile")

_RACY_NS = 2_000_000_000


def _lines(data: bytes) -> Iterator[Tuple[int, Optional[List[str]]]]:
    """(line number, fields) of each entry line; fields None for a malformed line."""
    # surrogateescape: a stray non-UTF-8 byte spoils its own line, not the file.
    for number, line in enumerate(data.decode("utf-8", "surrogateescape").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(":")
        yield number, fields if len(fields) >= 2 and fields[0] else None


def malformed_lines(data: bytes) -> List[int]:
    """Numbers of the lines that are not ``user:password...`` (blank and ``#`` lines are fine)."""
    return [number for number, fields in _lines(data) if fields is None]


def _parse(data: bytes, path: str) -> Dict[str, str]:
    entries: Dict[str, str] = {}
    for number, fields in _lines(data):
        if fields is None:
            logger.warning("%s:%d: malformed line skipped", path, number)
            continue
        if fields[0] in entries:
            logger.warning("%s:%d: user %r listed again; the first line wins", path, number, fields[0])
            continue
        entries[fields[0]] = fields[1]
    return entries


def read_entries(path: str) -> Dict[str, str]:
    """``{user: password field}`` from a passwd-file, as written; malformed lines are skipped and logged."""
    return _parse(read_regular(path), path)


class PasswdFile:
    """Password checks against a passwd-file; one instance is safe to share between threads.

    ``authenticate`` raises :class:`pop3frame.TemporaryFailure` (the client
    sees ``-ERR [SYS/TEMP]``, not a wrong-password reply) when the file cannot
    be read, and keeps serving the last good copy if a reload fails halfway.
    """

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        self._mutex = threading.Lock()
        self._stamp: Optional[Tuple[int, int, int, int]] = None
        self._entries: Dict[str, Optional[str]] = {}
        # Unknown users are checked against the file's most common scheme.
        self._check = PasswordCheck(plaintext=False)
        self._raw = b""

    def _current(self) -> Dict[str, Optional[str]]:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            logger.error("cannot read passwd-file %s: %s", self.path, exc.strerror or exc)
            raise TemporaryFailure("user database unavailable") from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
        # File times tick in coarse steps and a replaced file may get the old
        # inode back, so two edits in one tick can share a stamp ("racy git"):
        # a recently changed file is compared by content too.
        racy = time.time_ns() - st.st_mtime_ns < _RACY_NS
        with self._mutex:
            if stamp != self._stamp or racy:
                try:
                    # Not open(): a FIFO put in the file's place would hold
                    # this lock, and so every login, until someone wrote to it.
                    raw = read_regular(self.path)
                except OSError as exc:
                    logger.error("cannot read passwd-file %s: %s", self.path, exc.strerror or exc)
                    raise TemporaryFailure("user database unavailable") from None
                if raw != self._raw or self._stamp is None:
                    self._entries = {user: stored_password(value, plaintext=False)
                                     for user, value in _parse(raw, self.path).items()}
                    unusable = sorted(u for u, v in self._entries.items() if v is None)
                    if unusable:
                        logger.warning("%s: no usable password for %s; they cannot log in",
                                       self.path, ", ".join(map(repr, unusable)))
                    self._check.learn(self._entries.values())
                    self._raw = raw
                    logger.info("loaded %s from %s", plural(len(self._entries), "user"), self.path)
                self._stamp = stamp
            return self._entries

    def load(self) -> int:
        """Read the file now (else at the first login); returns how many users it has.

        Raises :class:`pop3frame.TemporaryFailure` if it cannot be read.
        """
        return len(self._current())

    def users(self) -> List[str]:
        """Every user name in the file, sorted."""
        return sorted(self._current())

    def authenticate(self, username: str, password: str) -> bool:
        # An unknown name costs what a wrong password costs: see PasswordCheck.
        return self._check.check(self._current().get(username), password)

    __call__ = authenticate


def _check_user(user: str) -> None:
    if not user or ":" in user or user.startswith("#") or any(c < " " or c == "\x7f" for c in user):
        raise ValueError("invalid user name %r" % (user,))


def _edit(path: str, change: Callable[[List[str]], Tuple[List[str], bool]]) -> bool:
    """Rewrite the file through ``change(lines) -> (lines, result)``, atomically.

    An exclusive ``flock`` on ``<path>.lock`` stops two editors from each
    writing a copy without the other's change.  The new file keeps the old
    one's owner and group when possible and its mode minus the bits for
    others (a fresh file is 0600), so a server reading it as a group member
    goes on working.
    """
    path = os.path.abspath(path)
    # O_NOFOLLOW: a symlink planted at the lock's name must not make root create its target.
    lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            with open(path, "rb") as f:
                lines = f.read().decode("utf-8", "surrogateescape").splitlines()
                st: Optional[os.stat_result] = os.fstat(f.fileno())
        except FileNotFoundError:
            lines, st = [], None
        lines, result = change(lines)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".passwd-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write("".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape"))
                f.flush()
                os.fsync(f.fileno())
            if st is not None:
                try:
                    os.chown(tmp, st.st_uid, st.st_gid)
                except OSError:
                    pass  # not root: the file becomes ours, as any editor would make it
                os.chmod(tmp, st.st_mode & 0o660)
            else:
                os.chmod(tmp, 0o600)
            # A reader sees the old file or the new one, never half of one.
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return result
    finally:
        os.close(lock_fd)


def _is_line_of(line: str, user: str) -> bool:
    return not line.lstrip().startswith("#") and line.split(":", 1)[0] == user


def set_password(path: str, user: str, password: str, scheme: str = "") -> None:
    """Add ``user`` or change their password; keeps the line's other fields.

    ``scheme`` defaults to :func:`pop3frame.passwords.default_scheme`.
    Raises ValueError for a user name or (PLAIN) password that would break
    the line format.
    """
    _check_user(user)
    hashed = hash_password(password, scheme or "")
    if ":" in hashed or any(c < " " for c in hashed):
        raise ValueError("this password cannot be stored with the PLAIN scheme; choose a hashing scheme")

    def change(lines: List[str]) -> Tuple[List[str], bool]:
        out, found = [], False
        for line in lines:
            if _is_line_of(line, user):
                if not found:
                    rest = line.split(":")[2:]
                    out.append(":".join([user, hashed] + rest))
                found = True  # later duplicates are dropped: they were dead anyway
            else:
                out.append(line)
        if not found:
            out.append("%s:%s" % (user, hashed))
        return out, found

    _edit(path, change)


def delete_user(path: str, user: str) -> bool:
    """Remove ``user``'s line(s); returns whether there was one."""
    _check_user(user)

    def change(lines: List[str]) -> Tuple[List[str], bool]:
        out = [line for line in lines if not _is_line_of(line, user)]
        return out, len(out) != len(lines)

    return _edit(path, change)
