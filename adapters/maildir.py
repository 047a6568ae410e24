"""Maildir: serves ``ROOT/<user>/{new,cur,tmp}`` as Postfix, Dovecot and procmail write it.

Contract (what a POP3 client and the other programs sharing the Maildir see):

- Order: delivery order, from the timestamp that starts a Maildir base name,
  then the rest of the name compared with its digit runs as numbers (so
  ``M9`` comes before ``M10`` within one second).  A name without a leading
  timestamp sorts by its modification time instead: odd names never fail.
- UIDL: the base name (the part before ``:2,``), so it survives the move
  from ``new/`` to ``cur/``, flag changes and server restarts.  A base name
  that is not a valid RFC 1939 unique-id (1-70 chars in 0x21-0x7E) is
  replaced by the SHA-1 hex of its bytes, which is just as stable.
- Sizes: exact wire octets (CRLF line ends).  Taken from Dovecot's
  ``,W=<octets>`` in the name when present (and ``,S=`` agrees with the file),
  else from a per-user cache file (``pop3frame-sizes.json``, written by
  rename so it is never half-written) keyed by (base name, file size,
  mtime).  Only files missing from both are read, so STAT on a big mailbox
  reads no message after the first login.
- RETR streams the open file.  A message another program moved or
  re-flagged since the listing is found again by its base name; one that
  is gone gives ``-ERR [SYS/TEMP]``.
- After a session, retrieved messages move from ``new/`` to ``cur/`` with
  the ``S`` (seen) flag, as Dovecot does, by ``rename``: never copied, so a
  message is always in exactly one place and an existing name is never
  overwritten.  ``mark_seen=False`` or ``read_only=True`` leaves files alone.
- Deletion unlinks at UPDATE.  A Maildir cannot roll back an unlink, so on a
  failure the adapter stops, keeps the failing message and every message
  after it, logs which one failed and reports ``-ERR``; a file already gone
  counts as deleted.  Mail delivered during the session is never touched.
- User names that could leave ROOT are refused; an authenticated user with
  no directory gets an empty mailbox (``new``, ``cur``, ``tmp`` made 0700).
- Symbolic links inside ``new/`` and ``cur/`` are not served: a local user
  could otherwise link a file they cannot read into their own mailbox.

Users and passwords come from ``passwd``: a
:class:`adapters.passwdfile.PasswdFile`, a path to such a file, any object
with ``authenticate(user, password)``, or a plain callable of the same
shape.  With ``passwd=None`` nobody can log in unless a subclass overrides
:meth:`MaildirAdapter.authenticate`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import threading
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Sequence, Set, Tuple

from pop3frame import AdapterBase, MessageInfo, PermanentFailure, TemporaryFailure
from pop3frame.protocol import stream_wire_size, valid_uid

__all__ = ["MaildirAdapter", "safe_user_name", "CACHE_NAME"]

logger = logging.getLogger("pop3frame.adapters.maildir")

CACHE_NAME = "pop3frame-sizes.json"
_USER = re.compile(r"[A-Za-z0-9_@+=-][A-Za-z0-9._@+=-]{0,254}\Z")
_WIRE_SIZE = re.compile(r",W=([0-9]{1,15})(?:,|\Z)")
_FILE_SIZE = re.compile(r",S=([0-9]{1,15})(?:,|\Z)")
_DIGITS = re.compile(r"([0-9]+)")
_TIMESTAMP = re.compile(r"[0-9]{1,12}(?=\.|\Z)")
#: How often one operation follows a message that keeps moving before it
#: gives up; each attempt rescans the directories once.
_ATTEMPTS = 3

Where = Tuple[str, str]  # ("new" or "cur", file name)


def safe_user_name(name: str) -> bool:
    """True if ``name`` cannot address anything outside its own directory under ROOT.

    Letters, digits and ``._@+=-``, 1-255 characters, not starting with a
    dot and without ``..``: no ``/``, NUL, empty name or hidden directory.
    """
    return bool(_USER.match(name)) and ".." not in name


def _base(filename: str) -> str:
    # Dovecot also cuts at the first ':' (the info separator).
    return filename.split(":", 1)[0]


def _flags(filename: str) -> str:
    return filename.split(":2,", 1)[1] if ":2," in filename else ""


def _order(base: str, mtime: float) -> Tuple[int, Tuple[Any, ...], str]:
    """Sort key: leading timestamp (else mtime), then the name with numbers as numbers."""
    m = _TIMESTAMP.match(base)
    stamp = int(m.group()) if m else int(mtime)
    # re.split puts text at even and digit runs at odd positions, so two keys
    # only ever compare str with str and int with int.
    parts = _DIGITS.split(base)
    natural = tuple(int(p) if i % 2 else p for i, p in enumerate(parts))
    return stamp, natural, base


def _uid(base: str) -> str:
    if valid_uid(base):
        return base
    return hashlib.sha1(base.encode("utf-8", "surrogateescape")).hexdigest()


def _name_wire_size(base: str, file_size: int) -> Optional[int]:
    """Dovecot's ``,W=`` wire size, unless ``,S=`` shows the file changed since."""
    w = _WIRE_SIZE.search(base)
    if not w:
        return None
    s = _FILE_SIZE.search(base)
    if s and int(s.group(1)) != file_size:
        return None
    return int(w.group(1))


class _Box:
    """One session's view of a Maildir; used only under the mailbox lock."""

    __slots__ = ("home", "where", "retrieved")

    def __init__(self, home: str) -> None:
        self.home = home
        #: base name -> where the message was last seen (updated on rescans).
        self.where: Dict[str, Where] = {}
        self.retrieved: Set[str] = set()

    def path(self, base: str) -> Optional[str]:
        w = self.where.get(base)
        return None if w is None else os.path.join(self.home, w[0], w[1])

    def rescan(self) -> None:
        """Find every message again after another program moved or renamed some."""
        found: Dict[str, Where] = {}
        # new/ before cur/: a message renamed new->cur between the two
        # listings is seen twice, never missed, and cur/ (the later) wins.
        for sub in ("new", "cur"):
            try:
                names = os.listdir(os.path.join(self.home, sub))
            except FileNotFoundError:
                continue
            for name in names:
                if not name.startswith("."):
                    found[_base(name)] = (sub, name)
        self.where = found


class MaildirAdapter(AdapterBase):
    """A Maildir per user under ``root``; one instance is shared by all sessions.

    Thread safety: per-mailbox state (:class:`_Box`) is touched only by the
    session holding that mailbox's lock; the table of boxes is guarded by a
    mutex.  ``passwd`` must be thread-safe itself (PasswdFile is).
    """

    def __init__(self, root: str, passwd: Any = None, *, mark_seen: bool = True,
                 read_only: bool = False) -> None:
        self.root = os.path.abspath(root)
        if isinstance(passwd, (str, os.PathLike)):
            from .passwdfile import PasswdFile

            passwd = PasswdFile(os.fspath(passwd))
        #: The user database as given (kept for callers that reuse it).
        self.auth = passwd
        self._check: Optional[Callable[[str, str], Any]]
        if passwd is None:
            self._check = None
        elif hasattr(passwd, "authenticate"):
            self._check = passwd.authenticate
        elif callable(passwd):
            self._check = passwd
        else:
            raise TypeError("passwd must be None, a path, a PasswdFile-like object or a callable")
        self.read_only = read_only
        self.mark_seen = mark_seen and not read_only
        self._mutex = threading.Lock()
        self._boxes: Dict[str, _Box] = {}

    # -- users ----------------------------------------------------------------

    def home(self, username: str) -> str:
        """The user's Maildir; PermanentFailure for names that could leave ROOT."""
        if not safe_user_name(username):
            raise PermanentFailure("invalid mailbox name")
        return os.path.join(self.root, username)

    def authenticate(self, username: str, password: str) -> bool:
        """Refuse unsafe names before the user database is even asked."""
        if not safe_user_name(username) or self._check is None:
            return False
        return bool(self._check(username, password))

    # -- listing --------------------------------------------------------------

    def list_messages(self, username: str) -> Sequence[MessageInfo]:
        home = self.home(username)
        # makedirs applies its mode only to the last component, hence two calls.
        os.makedirs(home, mode=0o700, exist_ok=True)
        for sub in ("new", "cur", "tmp"):
            os.makedirs(os.path.join(home, sub), mode=0o700, exist_ok=True)
        box = _Box(home)
        entries = self._scan(home)
        cache_path = os.path.join(home, CACHE_NAME)
        cache = self._load_cache(cache_path)
        fresh: Dict[str, List[int]] = {}
        listed = []
        for base, (sub, name, st) in entries.items():
            size = _name_wire_size(base, st.st_size)
            if size is None:
                cached = cache.get(base)
                if cached is not None and cached[:2] == [st.st_size, st.st_mtime_ns]:
                    size = cached[2]
                else:
                    try:
                        size = self.measure(os.path.join(home, sub, name))
                    except FileNotFoundError:
                        # Moved since the scan; it shows up in the next session.
                        continue
                    except OSError as exc:
                        # One unreadable file must not cost the user all the others.
                        logger.error("%s: skipping unreadable message %s/%s: %s",
                                     home, sub, name, exc.strerror or exc)
                        continue
            fresh[base] = [st.st_size, st.st_mtime_ns, size]
            box.where[base] = (sub, name)
            listed.append((_order(base, st.st_mtime), base, sub, name, size))
        listed.sort(key=lambda item: item[0])
        if fresh != cache:
            self._save_cache(cache_path, fresh)
        with self._mutex:
            self._boxes[username] = box
        return [MessageInfo(_uid(base), size, key=(sub, name)) for _, base, sub, name, size in listed]

    def _scan(self, home: str) -> Dict[str, Tuple[str, str, os.stat_result]]:
        """base name -> (sub, name, lstat) of every message in new/ and cur/."""
        found: Dict[str, Tuple[str, str, os.stat_result]] = {}
        vanished = False
        for sub in ("new", "cur"):
            with os.scandir(os.path.join(home, sub)) as it:
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        vanished = True  # moved or re-flagged while we looked
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    base = _base(entry.name)
                    other = found.get(base)
                    if other is not None and (other[2].st_ino, other[2].st_dev) != (st.st_ino, st.st_dev):
                        # Two different files, one base name (a broken MDA): one
                        # unique-id cannot name both; the other waits its turn.
                        logger.warning("%s: two messages named %r; serving %s/%s", home, base, sub, entry.name)
                    found[base] = (sub, entry.name, st)
        if vanished:
            # A rename inside cur/ (flag change) can hide a file from one
            # directory listing; one more look finds it under its new name.
            for sub in ("new", "cur"):
                with os.scandir(os.path.join(home, sub)) as it:
                    for entry in it:
                        base = _base(entry.name)
                        if entry.name.startswith(".") or base in found:
                            continue
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if stat.S_ISREG(st.st_mode):
                            found[base] = (sub, entry.name, st)
        return found

    def measure(self, path: str) -> int:
        """Wire size of one message file, read in chunks.

        The only place a listing reads message content: subclasses (and the
        tests) can wrap it to count or forbid reads.
        """
        with self._open(path) as f:
            return stream_wire_size(f)

    @staticmethod
    def _load_cache(path: str) -> Dict[str, List[int]]:
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable size cache %s: %s", path, exc)
            return {}
        if not isinstance(data, dict):
            return {}
        # A damaged entry is a cache miss, never a wrong size.
        return {k: v for k, v in data.items()
                if isinstance(v, list) and len(v) == 3 and all(type(x) is int and x >= 0 for x in v)}

    @staticmethod
    def _save_cache(path: str, data: Dict[str, List[int]]) -> None:
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".sizes-")
            with os.fdopen(fd, "wb") as f:
                # ensure_ascii keeps non-UTF-8 file names (surrogates) round-trippable.
                f.write(json.dumps(data, separators=(",", ":")).encode("ascii"))
            # Readers see the old cache or the new one, never half of one.
            os.replace(tmp, path)
        except OSError as exc:
            # The cache only saves work; serving mail must not depend on it.
            logger.warning("cannot write size cache %s: %s", path, exc.strerror or exc)
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    # -- reading --------------------------------------------------------------

    def _box(self, username: str) -> _Box:
        with self._mutex:
            box = self._boxes.get(username)
            if box is None:
                box = self._boxes[username] = _Box(self.home(username))
        return box

    @staticmethod
    def _open(path: str) -> BinaryIO:
        # O_NOFOLLOW: a file swapped for a symlink after the listing is not
        # followed; the fstat check refuses directories and devices.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise IsADirectoryError(path)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def open_message(self, username: str, message: MessageInfo) -> BinaryIO:
        box = self._box(username)
        base = _base(message.key[1])
        box.where.setdefault(base, message.key)
        for _ in range(_ATTEMPTS):
            path = box.path(base)
            if path is None:
                break
            try:
                f = self._open(path)
            except FileNotFoundError:
                box.rescan()
                continue
            except OSError as exc:
                logger.error("%s: cannot read message %s: %s", box.home, base, exc.strerror or exc)
                raise TemporaryFailure("cannot read message") from None
            box.retrieved.add(base)
            return f
        raise TemporaryFailure("message no longer exists")

    # -- UPDATE and cleanup ---------------------------------------------------

    def delete_messages(self, username: str, messages: Sequence[MessageInfo]) -> None:
        box = self._box(username)
        for number, message in enumerate(messages):
            base = _base(message.key[1])
            box.where.setdefault(base, message.key)
            try:
                self._unlink(box, base)
            except OSError as exc:
                logger.error("%s: cannot delete message %s (uid %s): %s; it and %d later message(s) kept",
                             box.home, base, message.uid, exc.strerror or exc, len(messages) - number - 1)
                raise TemporaryFailure("could not delete all messages") from None
            box.retrieved.discard(base)

    @staticmethod
    def _unlink(box: _Box, base: str) -> None:
        """Remove a message wherever it is now; gone already counts as removed."""
        for _ in range(_ATTEMPTS):
            path = box.path(base)
            if path is None:
                return
            try:
                os.unlink(path)
                return
            except FileNotFoundError:
                # Deleted, or just moved by another program: only a fresh
                # look can tell, and a moved message must still go.
                box.rescan()
        raise OSError(0, "message keeps moving")

    def close_mailbox(self, username: str) -> None:
        with self._mutex:
            box = self._boxes.pop(username, None)
        if box is None or not self.mark_seen:
            return
        for base in sorted(box.retrieved):
            self._mark_seen(box, base)

    @staticmethod
    def _mark_seen(box: _Box, base: str) -> None:
        """Move a retrieved message to cur/ with the S flag, as Dovecot does.

        Best effort: a failure is logged and the message stays where it is;
        it is still listed and served next time.
        """
        for _ in range(_ATTEMPTS):
            where = box.where.get(base)
            if where is None:
                return  # deleted by another program
            sub, name = where
            flags = _flags(name)
            if sub == "cur" and "S" in flags:
                return
            target_name = "%s:2,%s" % (base, "".join(sorted(set(flags + "S"))))
            target = os.path.join(box.home, "cur", target_name)
            if os.path.lexists(target):
                # rename() would replace it: better a message left unflagged
                # than a file destroyed.
                logger.warning("%s: not marking %s seen, cur/%s exists", box.home, base, target_name)
                return
            try:
                # rename() is atomic: the message is in exactly one place.
                os.rename(os.path.join(box.home, sub, name), target)
                box.where[base] = ("cur", target_name)
                return
            except FileNotFoundError:
                box.rescan()  # another program moved it first; follow it
            except OSError as exc:
                logger.warning("%s: cannot mark %s seen: %s", box.home, base, exc.strerror or exc)
                return
