"""Every file in a directory is a message: for serving generated reports.

Single-user: ``DirectoryAdapter(root, user="reports", password="...")`` serves
``root`` itself.  Multi-user: ``DirectoryAdapter(root, auth=PasswdFile(...))``
serves ``root/<user>/``.  Dotfiles and subdirectories are ignored; messages
are ordered by modification time, then name; the unique-id is the file name
(or its SHA-1 when the name is not a valid RFC 1939 unique-id).  Wire sizes
are cached by (name, size, mtime), so files are read once, not per STAT.
Pass ``read_only=True`` to serve a shared directory nobody may delete from.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from typing import Dict, Optional, Sequence, Tuple

from pop3frame import AdapterBase, MessageInfo, TemporaryFailure
from pop3frame.protocol import stream_wire_size, valid_uid

from .maildir import safe_user_name

__all__ = ["DirectoryAdapter"]

logger = logging.getLogger("pop3frame.adapters.directory")


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
        self._sizes: Dict[Tuple[str, int, int], int] = {}

    def _dir(self, username: str) -> str:
        if self.user is not None:
            return self.root
        if not safe_user_name(username):
            raise TemporaryFailure("invalid mailbox name")
        return os.path.join(self.root, username)

    def authenticate(self, username: str, password: str) -> bool:
        if self.user is not None:
            return hmac.compare_digest(username.encode(), self.user.encode()) & hmac.compare_digest(
                password.encode("utf-8"), self._password.encode("utf-8"))
        return safe_user_name(username) and bool(self.auth.authenticate(username, password))

    def list_messages(self, username: str) -> Sequence[MessageInfo]:
        directory = self._dir(username)
        try:
            entries = [e for e in os.scandir(directory)
                       if not e.name.startswith(".") and e.is_file(follow_symlinks=False)]
        except FileNotFoundError:
            return []
        stats = sorted(((e.stat().st_mtime_ns, e.name, e.stat().st_size) for e in entries))
        messages = []
        for mtime, name, size in stats:
            key = (name, size, mtime)
            with self._mutex:
                wire = self._sizes.get(key)
            if wire is None:
                try:
                    with open(os.path.join(directory, name), "rb") as f:
                        wire = stream_wire_size(f)
                except FileNotFoundError:
                    continue
                with self._mutex:
                    self._sizes[key] = wire
            uid = name if valid_uid(name) else hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()
            messages.append(MessageInfo(uid, wire, key=name))
        return messages

    def open_message(self, username: str, message: MessageInfo):
        try:
            return open(os.path.join(self._dir(username), message.key), "rb")
        except FileNotFoundError:
            raise TemporaryFailure("message no longer exists") from None

    def delete_messages(self, username: str, messages: Sequence[MessageInfo]) -> None:
        directory = self._dir(username)
        for message in messages:
            try:
                os.unlink(os.path.join(directory, message.key))
            except FileNotFoundError:
                continue
            except OSError as exc:
                # Unlinks cannot be undone: stop here and keep the rest.
                logger.error("cannot delete %s: %s", message.key, exc.strerror)
                raise TemporaryFailure("could not delete all messages") from None
