"""Every file in a directory is a message: for serving generated reports.

Single-user: ``DirectoryAdapter(root, user="reports", password="...")`` serves
``root`` itself.  Multi-user: ``DirectoryAdapter(root, auth=PasswdFile(...))``
serves ``root/<user>/``.  Dotfiles, subdirectories and symbolic links are
ignored; messages are ordered by modification time, then name.  Nor is
``root/<user>`` followed if it is a symlink (``-ERR [SYS/PERM]``, logged):
files are opened and deleted relative to a descriptor of the user's
directory opened with ``O_NOFOLLOW``, so a user who can replace it cannot
have a server running as root serve or delete someone else's files.

A message is one version of a file: its name, inode, size and mtime.  The
unique-id is a SHA-1 of those, so a report rewritten or replaced under the
same name is a new message, never mistaken for one a client already has.
A session that listed the old version gets ``-ERR`` for it and its DELE
leaves the new one alone; a file rewritten in place while RETR reads it is
noticed at the next read (its version changed) and the connection is closed
before any byte read after the write is sent, rather than the mix of old and
new bytes ended as a whole message.  Wire sizes are cached per directory by version
(entries for files that are gone are dropped), so files are read once, not
per STAT, and with them whether a line starts with "." (RETR of one with
none skips looking for lines to byte-stuff; never ``sendfile()``, which
would send a rewrite's bytes before it could be noticed): a file
rewritten in place with its size and mtime put back is served as it was
measured, as ``make`` or ``rsync`` would not notice it either.  Pass ``read_only=True`` to serve a shared directory nobody may
delete from.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import io
import logging
import os
import stat
import threading
from typing import Dict, Iterator, Optional, Sequence, Tuple

from pop3frame import AdapterBase, MessageInfo, PermanentFailure, TemporaryFailure
from pop3frame.protocol import CheckedFile, MessageChanged, measure_stream

from .maildir import safe_user_name

__all__ = ["DirectoryAdapter"]

logger = logging.getLogger("pop3frame.adapters.directory")

#: (name, st_ino, st_size, st_mtime_ns): one version of one file.
Version = Tuple[str, int, int, int]


class DirectoryAdapter(AdapterBase):
    """Files as messages; thread-safe for one shared instance."""

    def __init__(self, root: str, auth=None, *, user: Optional[str] = None, password: Optional[str] = None,
                 read_only: bool = False) -> None:
        if (auth is None) == (user is None):
            raise ValueError("give either auth (multi-user) or user and password (single-user)")
        if user is not None and not password:
            raise ValueError("single-user mode needs a password")
        self.root = os.path.abspath(root)
        self.auth = auth
        self.user = user
        self._password = password or ""
        self.read_only = read_only
        self._mutex = threading.Lock()
        #: directory -> version -> (wire size, whether a line starts with ".")
        self._sizes: Dict[str, Dict[Version, Tuple[int, bool]]] = {}

    def _dir(self, username: str) -> str:
        if self.user is not None:
            return self.root
        if not safe_user_name(username):
            raise TemporaryFailure("invalid mailbox name")
        return os.path.join(self.root, username)

    @contextlib.contextmanager
    def _opened(self, username: str) -> Iterator[int]:
        """A descriptor of the user's directory; ``root/<user>`` must not be a symlink.
        FileNotFoundError if it does not exist."""
        flags = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
        directory = self._dir(username)
        try:
            fd = os.open(directory, flags if self.user is not None else flags | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR):
                raise
            logger.error("%s is a symlink or not a directory; not served", directory)
            raise PermanentFailure("mailbox is not a directory") from None
        try:
            yield fd
        finally:
            os.close(fd)

    def authenticate(self, username: str, password: str) -> bool:
        if self.user is not None:
            return hmac.compare_digest(username.encode(), self.user.encode()) & hmac.compare_digest(
                password.encode("utf-8"), self._password.encode("utf-8"))
        return safe_user_name(username) and bool(self.auth.authenticate(username, password))

    def list_messages(self, username: str) -> Sequence[MessageInfo]:
        try:
            with self._opened(username) as fd:
                return self._list(self._dir(username), fd)
        except FileNotFoundError:
            return []

    def _list(self, directory: str, fd: int) -> Sequence[MessageInfo]:
        found = []
        with os.scandir(fd) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed while we looked
                if not entry.name.startswith(".") and stat.S_ISREG(st.st_mode):
                    found.append((st.st_mtime_ns, entry.name, st.st_ino, st.st_size))
        with self._mutex:
            known = self._sizes.get(directory, {})
        sizes: Dict[Version, Tuple[int, bool]] = {}
        messages = []
        for mtime, name, ino, size in sorted(found):
            version = (name, ino, size, mtime)
            measured = known.get(version)
            if measured is None:
                try:
                    with _open(fd, version) as f:
                        measured = measure_stream(f)
                except (TemporaryFailure, MessageChanged):
                    continue  # changed since the scan: the next session sees it
            sizes[version] = measured
            uid = hashlib.sha1(os.fsencode(name) + b"\0%d %d %d" % version[1:]).hexdigest()
            # open_message serves only this version, so dot_lines holds for it.
            messages.append(MessageInfo(uid, measured[0], key=version, dot_lines=measured[1]))
        with self._mutex:
            self._sizes[directory] = sizes  # versions not seen now are dropped
        return messages

    def open_message(self, username: str, message: MessageInfo):
        try:
            with self._opened(username) as fd:
                return _open(fd, message.key)
        except FileNotFoundError:
            raise TemporaryFailure("message no longer exists") from None

    def delete_messages(self, username: str, messages: Sequence[MessageInfo]) -> None:
        try:
            with self._opened(username) as fd:
                self._delete(fd, messages)
        except FileNotFoundError:
            pass  # the directory is gone, and every message with it

    @staticmethod
    def _delete(fd: int, messages: Sequence[MessageInfo]) -> None:
        for message in messages:
            name = message.key[0]
            try:
                if _version(name, os.stat(name, dir_fd=fd, follow_symlinks=False)) != message.key:
                    # The version the client saw is gone; the name now holds
                    # one it never saw, which stays for the next session.
                    continue
                os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                # Unlinks cannot be undone: stop here and keep the rest.
                logger.error("cannot delete %r: %s", name, exc.strerror)
                raise TemporaryFailure("could not delete all messages") from None


def _version(name: str, st: os.stat_result) -> Version:
    return (name, st.st_ino, st.st_size, st.st_mtime_ns)


def _open(directory: int, version: Version):
    """The file ``version`` names in the directory open as ``directory``, open for
    reading; TemporaryFailure if the name now holds another file (or none)."""
    try:
        # O_NOFOLLOW and O_NONBLOCK: a name swapped for a symbolic link or a
        # FIFO is neither followed nor waited on; the fstat check refuses it.
        fd = os.open(version[0], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=directory)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ELOOP):
            raise
        raise TemporaryFailure("message no longer exists") from None
    st = os.fstat(fd)
    if _version(version[0], st) != version:
        os.close(fd)
        raise TemporaryFailure("message changed since the listing")
    # Reports are rewritten in place: checked on every read, never sent with
    # sendfile(), whose bytes would leave before a rewrite could be noticed.
    return CheckedFile(io.FileIO(fd, "rb"), st, sendfile=False)
