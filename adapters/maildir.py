"""Maildir: serves ``ROOT/<user>/{new,cur,tmp}`` as Postfix, Dovecot and procmail write it.

- Order: delivery order, from the timestamp that starts a Maildir base name.
- UIDL: the base name (the part before ``:2,``), so it survives the move
  from ``new/`` to ``cur/``; a base name that is not a valid RFC 1939
  unique-id is replaced by its SHA-1.
- Sizes: Dovecot's ``,W=<octets>`` in the name when present, else a per-user
  cache file keyed by (base, file size, mtime); only files missing from it
  are read, so STAT on a big mailbox reads no message after the first login.
- After a session, retrieved messages move from ``new/`` to ``cur/`` with
  the ``S`` (seen) flag, by ``rename``: never copied, never lost.
- Deletion unlinks at UPDATE.  A Maildir cannot roll back an unlink, so on a
  failure the adapter stops, keeps every message it had not reached, and
  reports ``-ERR``; files already gone count as deleted.

Users and passwords come from any object with ``authenticate(user, password)``,
normally :class:`adapters.passwdfile.PasswdFile`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from typing import Dict, List, Optional, Sequence, Set, Tuple

from pop3frame import AdapterBase, MessageInfo, TemporaryFailure
from pop3frame.protocol import stream_wire_size, valid_uid

__all__ = ["MaildirAdapter", "safe_user_name"]

logger = logging.getLogger("pop3frame.adapters.maildir")

CACHE_NAME = "pop3frame-sizes.json"
_USER = re.compile(r"[A-Za-z0-9_@+=-][A-Za-z0-9._@+=-]{0,254}\Z")
_WIRE_SIZE = re.compile(r",W=(\d+)")


def safe_user_name(name: str) -> bool:
    """True if ``name`` cannot address anything outside its own directory under ROOT."""
    return bool(_USER.match(name)) and ".." not in name


def _base(filename: str) -> str:
    return filename.split(":", 1)[0]


def _order(base: str) -> Tuple[int, str]:
    head = base.split(".", 1)[0]
    return (int(head) if head.isdigit() else 0, base)


class MaildirAdapter(AdapterBase):
    """A Maildir per user under ``root``; thread-safe for one shared instance."""

    def __init__(self, root: str, auth, *, mark_seen: bool = True) -> None:
        self.root = os.path.abspath(root)
        self.auth = auth
        self.mark_seen = mark_seen
        self._mutex = threading.Lock()
        self._retrieved: Dict[str, Set[str]] = {}

    def _dir(self, username: str) -> str:
        if not safe_user_name(username):
            raise TemporaryFailure("invalid mailbox name")
        return os.path.join(self.root, username)

    def authenticate(self, username: str, password: str) -> bool:
        if not safe_user_name(username):
            return False
        return bool(self.auth.authenticate(username, password))

    # -- listing --------------------------------------------------------------

    def list_messages(self, username: str) -> Sequence[MessageInfo]:
        home = self._dir(username)
        for sub in ("new", "cur", "tmp"):
            os.makedirs(os.path.join(home, sub), mode=0o700, exist_ok=True)
        cache_path = os.path.join(home, CACHE_NAME)
        cache = self._load_cache(cache_path)
        fresh: Dict[str, list] = {}
        found = []
        for sub in ("new", "cur"):
            with os.scandir(os.path.join(home, sub)) as entries:
                for entry in entries:
                    if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                        continue
                    found.append((_order(_base(entry.name)), sub, entry))
        found.sort(key=lambda item: item[0])
        messages = []
        for _, sub, entry in found:
            base = _base(entry.name)
            try:
                size = self._size(entry, cache.get(base))
            except FileNotFoundError:
                continue  # moved or deleted by another program while we looked
            fresh[base] = [entry.stat().st_size, entry.stat().st_mtime_ns, size]
            uid = base if valid_uid(base) else hashlib.sha1(base.encode("utf-8", "surrogateescape")).hexdigest()
            messages.append(MessageInfo(uid, size, key=(sub, entry.name)))
        if fresh != cache:
            self._save_cache(cache_path, fresh)
        with self._mutex:
            self._retrieved[username] = set()
        return messages

    @staticmethod
    def _size(entry: os.DirEntry, cached: Optional[list]) -> int:
        m = _WIRE_SIZE.search(entry.name)
        if m:
            return int(m.group(1))
        st = entry.stat()
        if cached and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
            return cached[2]
        with open(entry.path, "rb") as f:
            return stream_wire_size(f)

    @staticmethod
    def _load_cache(path: str) -> Dict[str, list]:
        try:
            with open(path, "r", encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _save_cache(path: str, data: Dict[str, list]) -> None:
        try:
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".sizes-")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, path)
        except OSError as exc:
            # The cache only saves work; serving mail must not depend on it.
            logger.warning("cannot write size cache %s: %s", path, exc)

    # -- reading --------------------------------------------------------------

    def _locate(self, username: str, message: MessageInfo) -> Optional[str]:
        """Current path of a message, following a rename by another program."""
        home = self._dir(username)
        sub, name = message.key
        path = os.path.join(home, sub, name)
        if os.path.exists(path):
            return path
        base = _base(name)
        for other in ("cur", "new"):
            try:
                for candidate in os.listdir(os.path.join(home, other)):
                    if _base(candidate) == base:
                        return os.path.join(home, other, candidate)
            except FileNotFoundError:
                pass
        return None

    def open_message(self, username: str, message: MessageInfo):
        path = self._locate(username, message)
        if path is None:
            raise TemporaryFailure("message no longer exists")
        f = open(path, "rb")
        with self._mutex:
            self._retrieved.setdefault(username, set()).add(_base(message.key[1]))
        return f

    # -- UPDATE and cleanup ---------------------------------------------------

    def delete_messages(self, username: str, messages: Sequence[MessageInfo]) -> None:
        for number, message in enumerate(messages):
            path = self._locate(username, message)
            if path is None:
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                logger.error("cannot delete %s: %s; %d later deletions not attempted",
                             path, exc.strerror, len(messages) - number - 1)
                raise TemporaryFailure("could not delete all messages") from None
            with self._mutex:
                self._retrieved.get(username, set()).discard(_base(message.key[1]))

    def close_mailbox(self, username: str) -> None:
        with self._mutex:
            retrieved = self._retrieved.pop(username, set())
        if not self.mark_seen:
            return
        home = self._dir(username)
        for base in retrieved:
            self._mark_seen(home, base)

    @staticmethod
    def _mark_seen(home: str, base: str) -> None:
        """Move a retrieved message to cur/ with the S flag, as Dovecot does."""
        for sub in ("new", "cur"):
            try:
                names = os.listdir(os.path.join(home, sub))
            except FileNotFoundError:
                continue
            for name in names:
                if _base(name) != base:
                    continue
                flags = name.split(":2,", 1)[1] if ":2," in name else ""
                if sub == "cur" and "S" in flags:
                    return
                target = "%s:2,%s" % (base, "".join(sorted(set(flags + "S"))))
                try:
                    # rename() is atomic: the message is in exactly one place.
                    os.rename(os.path.join(home, sub, name), os.path.join(home, "cur", target))
                except FileNotFoundError:
                    pass  # another program moved it first
                return
