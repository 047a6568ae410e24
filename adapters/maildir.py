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
- Sizes: exact wire octets, the octets RETR sends before byte-stuffing
  (CRLF line ends, a final line end added where the file has none).  Kept
  in a per-user cache file (``pop3frame-sizes.json``, written by rename so
  it is never half-written) keyed by base name and inode; a file missing
  from it is measured once.  A listing costs no system call per message:
  the inode and the file type come with the directory entry, and Maildir
  files are written once (an MDA writes in ``tmp/`` and renames, a new
  inode).  A file changed in place anyway is noticed when it is opened
  (its size or mtime differ from the cached ones): that session's RETR
  fails the octet count and the next login measures it again.  A
  directory whose mtime did not change since it was read, over a second
  after it last changed (so no later change can share its timestamp), is
  not read again: a login to an unchanged Maildir stats ``new/`` and
  ``cur/`` instead of listing them, as Dovecot's index does (on NFS this
  needs the server's clock in step with the file server's), and when both
  are as the previous login found them, that login's index serves it: the
  size cache is not looked at (a cache another program replaced is read
  at the next login after a delivery or a move).  With each
  size the cache keeps whether any line starts with ".", so RETR can skip
  looking for lines to byte-stuff.  Dovecot's ``,W=<vsize>`` in the name
  saves reading the file: it counts LF as CRLF but nothing for a missing
  final line end, so only the file's last octet is read to correct it.
  ``,W=`` is ignored when ``,S=`` disagrees with the file or when no file
  of that size could have it.  STAT on a big mailbox reads no message
  after the first login.
- RETR streams the open file.  A message another program moved or
  re-flagged since the listing is found again by its base name; one that
  is gone gives ``-ERR [SYS/TEMP]``.  One written in place while it is
  read (no Maildir writer does) ends without the terminator; sent with
  ``sendfile()`` (a message of 64 KiB or more stored in wire form), the
  write is noticed only at the end, after what it changed went out.
- After a session, retrieved messages move from ``new/`` to ``cur/`` with
  the ``S`` (seen) flag, as Dovecot does, by ``rename``: never copied, so a
  message is always in exactly one place and an existing name is never
  overwritten.  ``mark_seen=False`` or ``read_only=True`` leaves files alone.
- Deletion unlinks at UPDATE.  A Maildir cannot roll back an unlink, so on a
  failure the adapter stops, keeps the failing message and every message
  after it, logs which one failed and reports ``-ERR``; a file already gone
  counts as deleted.  Mail delivered during the session is never touched.
- User names that could leave ROOT are refused.  An authenticated user with
  no directory gets an empty mailbox and nothing is created: the delivery
  agent makes the Maildir with the owner it needs, and one made by a server
  running as root would lock that agent out.  But a mail root that is gone,
  or empty once a Maildir was found in it (an unmounted volume), is
  ``-ERR [SYS/TEMP]`` and an ERROR line, not an empty mailbox for everyone.
  Missing ``new``, ``cur`` or
  ``tmp`` in an existing Maildir are made (0700), and like the size cache
  they get the owner and group of ``ROOT/<user>`` when running as root.
- Symbolic links are not followed, neither inside ``new/`` and ``cur/`` nor
  as ``new/`` and ``cur/`` themselves: every file operation is made
  relative to a directory descriptor opened with ``O_NOFOLLOW``.  A local
  user owning a Maildir could otherwise have a server running as root
  serve, move or delete files elsewhere, by a link made before the listing
  or swapped in after it.  Only regular files are opened (a FIFO would block).

Users and passwords come from ``passwd``: a
:class:`adapters.passwdfile.PasswdFile`, a path to such a file, any object
with ``authenticate(user, password)``, or a plain callable of the same
shape.  With ``passwd=None`` nobody can log in unless a subclass overrides
:meth:`MaildirAdapter.authenticate`.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import stat
import tempfile
import threading
import time
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

from pop3frame import AdapterBase, MessageInfo, PermanentFailure, TemporaryFailure
from pop3frame.failures import log_failure
from pop3frame.protocol import CheckedFile, measure_stream, valid_uid

__all__ = ["MaildirAdapter", "safe_user_name", "CACHE_NAME"]

logger = logging.getLogger("pop3frame.adapters.maildir")

CACHE_NAME = "pop3frame-sizes.json"
#: Format 3: base name -> [inode, file size, mtime_ns, wire size, dots,
#: file inode] (inode: the directory entry's, d_ino, which validates a
#: listing; file inode: fstat's, which opening compares, the two differing
#: on overlayfs; dots: whether a line starts with ".", see _DOTS).  Format 2 held
#: [file size, mtime_ns, wire size], with ``,W=`` sizes corrected for a
#: missing final line end; format 1 (no marker) held them uncorrected.
#: The key is never a base name: names starting with a dot are not messages.
_CACHE_FORMAT_KEY, _CACHE_FORMAT = ".format", 3
#: MessageInfo.dot_lines as cached: False (none), True, None (not known:
#: a ``,W=`` size was taken from the name without reading the file).
_DOTS = {False: 0, True: 1, None: 2}
_DOTS_OF = {v: k for k, v in _DOTS.items()}
#: A directory is listed again unless it is older than this: file systems
#: stamp times from a clock with a tick of a few ms, so a change after our
#: listing could carry the same mtime as one just before it.
_QUIET_NS = 1_000_000_000
_USER = re.compile(r"[A-Za-z0-9_@+=-][A-Za-z0-9._@+=-]{0,254}\Z")
_WIRE_SIZE = re.compile(r",W=([0-9]{1,15})(?:,|\Z)")
_FILE_SIZE = re.compile(r",S=([0-9]{1,15})(?:,|\Z)")
_DIGITS = re.compile(r"([0-9]+)")
_TIMESTAMP = re.compile(r"[0-9]{1,12}(?=\.|\Z)")
#: How often one operation follows a message that keeps moving before it
#: gives up; each attempt rescans the directories once.
_ATTEMPTS = 3

Where = Tuple[str, str]  # ("new" or "cur", file name)

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
# O_NONBLOCK: opening a FIFO must not wait for a writer; regular files ignore it.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC


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
    """Dovecot's ``,W=`` virtual size, unless it cannot be this file's.

    ``,S=`` no longer matching shows the file changed since it was named;
    and every octet counts once, an LF at most twice.
    """
    w = _WIRE_SIZE.search(base)
    if not w:
        return None
    s = _FILE_SIZE.search(base)
    if s and int(s.group(1)) != file_size:
        return None
    size = int(w.group(1))
    return size if file_size <= size <= 2 * file_size else None


def _give(fd: int, owner: os.stat_result, what: str) -> None:
    """Hand a file or directory this process made (open as ``fd``) to the Maildir's owner.

    Only root can, and only root needs to: otherwise it is ours, and so is
    the Maildir.  By descriptor, as the name may have been swapped already.
    """
    if os.geteuid() != 0 or (owner.st_uid, owner.st_gid) == (0, 0):
        return
    try:
        os.fchown(fd, owner.st_uid, owner.st_gid)
    except OSError as exc:
        logger.warning("cannot give %s to uid %d: %s", what, owner.st_uid, exc.strerror or exc)


@contextlib.contextmanager
def _directory(path: str) -> Iterator[int]:
    """A descriptor of directory ``path``; its last component must not be a symlink."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


def _names(home: str, sub: str) -> Iterator[str]:
    """The names in ``home/sub`` not starting with a dot; none if it is missing or not
    a real directory."""
    listed = _read_directory(os.path.join(home, sub))
    return (name for name, _, _ in listed[1]) if listed is not None else iter(())


def _read_directory(path: str) -> Optional[Tuple[Tuple[int, ...], List[Tuple[str, int, bool]]]]:
    """(version, [(name, inode, regular file?)]) of the entries of directory
    ``path`` not starting with a dot, read through a descriptor opened without
    following a symlink; None if it is missing or not a real directory.

    Inode and file type come with the entry (``d_ino``, ``d_type``); only on
    a file system without ``d_type`` does the type cost an lstat(), which
    must run while the descriptor is open.
    """
    try:
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        return None  # not made yet (read-only adapters make nothing)
    except OSError as exc:
        # A symlink (ELOOP; EMLINK on the BSDs) or a file; anything else,
        # such as EACCES, is an error rather than an empty mailbox.
        if exc.errno not in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR):
            raise
        _not_a_directory(path)
        return None
    try:
        version = _directory_version(os.fstat(fd))
        entries = []
        with os.scandir(fd) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                try:
                    regular = entry.is_file(follow_symlinks=False)
                except FileNotFoundError:  # no d_type, and gone before the lstat()
                    continue
                entries.append((entry.name, entry.inode(), regular))
        return version, entries
    finally:
        os.close(fd)


def _not_a_directory(path: str) -> None:
    logger.warning("%s is not a directory (a symlink?): not served", path)


def _directory_version(st: os.stat_result) -> Tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


class _Bounded:
    """Parsed caches: key -> (version, items), least recently used first,
    dropped beyond ``limit`` items in all (the newest is always kept).
    Thread-safe."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._mutex = threading.Lock()
        self._data: "collections.OrderedDict[str, Tuple[Tuple[int, ...], Any]]" = collections.OrderedDict()
        self._held = 0

    def get(self, key: str, version: Optional[Tuple[int, ...]]) -> Any:
        """The items stored under ``key`` for ``version``, or None."""
        with self._mutex:
            hit = self._data.get(key)
            if hit is None or hit[0] != version:
                return None
            self._data.move_to_end(key)
            return hit[1]

    def drop(self, key: str) -> None:
        with self._mutex:
            old = self._data.pop(key, None)
            if old is not None:
                self._held -= len(old[1])

    def put(self, key: str, version: Tuple[int, ...], items: Any) -> None:
        with self._mutex:
            old = self._data.pop(key, None)
            self._held += len(items) - (len(old[1]) if old else 0)
            self._data[key] = (version, items)
            while self._held > self._limit and len(self._data) > 1:
                _, (_, evicted) = self._data.popitem(last=False)
                self._held -= len(evicted)


class _Indexed:
    """One mailbox as :meth:`MaildirAdapter._index` found it: its result, the
    size cache's entries and where each message is (base name -> Where)."""

    __slots__ = ("listed", "sizes", "where")

    def __init__(self, listed: List[Tuple[str, str, str, int, int]], sizes: Dict[str, List[int]],
                 where: Dict[str, Where]) -> None:
        self.listed, self.sizes, self.where = listed, sizes, where

    def __len__(self) -> int:
        return 1 + len(self.listed)  # an empty mailbox counts too, for _Bounded


#: Message sizes kept parsed in memory, over all mailboxes (the most
#: recently used ones; about 200 bytes each), and as many directory entries.
_SIZES_IN_MEMORY = 200_000


class Measured(NamedTuple):
    """What :meth:`MaildirAdapter.measure` learnt from one message file."""

    #: Octets on the wire (MessageInfo.size).
    size: int
    #: Whether a line starts with "."; None when only the last octet was
    #: read (a ``,W=`` size in the name).
    dot_lines: Optional[bool]
    file_size: int
    mtime_ns: int
    file_ino: int


def _file_version(st: os.stat_result) -> Tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _open_regular(name: str, dir_fd: Optional[int] = None) -> Tuple[BinaryIO, os.stat_result]:
    """Open a regular file for reading, not following a symlink; else OSError.

    Returns the file and its fstat().
    """
    fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a regular file", name)
        # Unbuffered: every read is of a chunk anyway, and a buffered file
        # costs an lseek() to open and a read() more to find the end.
        return io.FileIO(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _remove(path: str) -> None:
    directory, name = os.path.split(path)
    with _directory(directory) as fd:
        os.unlink(name, dir_fd=fd)


class _Box:
    """One session's view of a Maildir; used only under the mailbox lock."""

    __slots__ = ("home", "where", "retrieved", "sizes", "_dirs")

    def __init__(self, home: str) -> None:
        self.home = home
        #: "new"/"cur" -> a descriptor of that directory, opened (without
        #: following a symlink) at the session's first RETR or TOP there.
        self._dirs: Dict[str, int] = {}
        #: The size cache's entries (see _CACHE_FORMAT) as of the listing.
        self.sizes: Dict[str, List[int]] = {}
        #: base name -> where the message was last seen (updated on rescans).
        self.where: Dict[str, Where] = {}
        self.retrieved: Set[str] = set()

    def path(self, base: str) -> Optional[str]:
        w = self.where.get(base)
        return None if w is None else os.path.join(self.home, w[0], w[1])

    def open(self, base: str) -> Tuple[BinaryIO, os.stat_result]:
        """The message where it was last seen, and its fstat(); KeyError if
        it is nowhere.  Opened relative to a directory descriptor kept for
        the session: one open() per message, not two."""
        sub, name = self.where[base]
        fd = self._dirs.get(sub)
        if fd is None:
            fd = self._dirs[sub] = os.open(os.path.join(self.home, sub), _DIR_FLAGS)
        return _open_regular(name, fd)

    def close(self) -> None:
        """Close the directory descriptors (also before looking again: the
        directory itself may have been replaced)."""
        dirs, self._dirs = self._dirs, {}
        for fd in dirs.values():
            os.close(fd)

    def rescan(self) -> None:
        """Find every message again after another program moved or renamed some."""
        found: Dict[str, Where] = {}
        # new/ before cur/: a message renamed new->cur between the two
        # listings is seen twice, never missed, and cur/ (the later) wins.
        for sub in ("new", "cur"):
            for name in _names(self.home, sub):
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
        #: Size caches as last read or written: path -> (file version, sizes).
        self._caches = _Bounded(_SIZES_IN_MEMORY)
        #: Directories as last listed: path -> (version, [(name, inode)]),
        #: only those quiet for _QUIET_NS when listed.
        self._listings = _Bounded(_SIZES_IN_MEMORY)
        #: Mailboxes as last indexed: home -> (versions of new/ and cur/,
        #: _Indexed), for listings that came from _listings.
        self._indexes = _Bounded(_SIZES_IN_MEMORY)
        #: Homes this adapter found, whose new/, cur/ and tmp/ it has made
        #: or found unless read-only: three mkdir() calls per login are not
        #: free when threads queue for the GIL after each, and the home's
        #: owner matters only when the size cache is written.  A directory
        #: removed later reads as empty, and delivery makes it again.
        self._prepared: Set[str] = set()
        #: Whether any home was found: from then on an empty root is an outage.
        self._prepared_once = False

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
        box = _Box(home)
        listed = []
        try:
            owner: Optional[os.stat_result] = None
            if home not in self._prepared:
                try:
                    owner = os.stat(home)
                except FileNotFoundError:
                    # No mail delivered yet (see the module docstring), unless
                    # the mail root itself is gone or unmounted: an outage.
                    self._check_root()
                else:
                    if not self.read_only:
                        for sub in ("new", "cur", "tmp"):
                            self._make_private_dir(os.path.join(home, sub), owner)
                    with self._mutex:
                        self._prepared.add(home)
                    self._prepared_once = True
            if home in self._prepared:
                listed = self._index(home, owner, box)
                if not listed and not os.path.isdir(home):
                    # Removed since it was found (or its volume unmounted).
                    with self._mutex:
                        self._prepared.discard(home)
                    self._check_root()
        except OSError as exc:
            # Permissions or a failing disk: the operator's to fix, not a bug.
            log_failure(logger, logging.ERROR, "%s: cannot open the Maildir", home, exc=exc)
            raise TemporaryFailure("mailbox unavailable") from None
        with self._mutex:
            self._boxes[username] = box
        return [MessageInfo(_uid(base), size, key=(sub, name), dot_lines=_DOTS_OF[dots])
                for base, sub, name, size, dots in listed]

    def _check_root(self) -> None:
        """OSError if the mail root is missing, or empty after this adapter
        found a Maildir in it: what a removed tree or an unmounted volume
        looks like (every user would otherwise see an empty maildrop).  A
        new root, where nothing was ever delivered, is empty by right.
        Asked only for a user without a Maildir, and for one whose Maildir
        vanished."""
        with os.scandir(self.root) as entries:
            if self._prepared_once and next(entries, None) is None:
                raise FileNotFoundError(errno.ENOENT, "the mail root is empty (not mounted?)", self.root)

    @staticmethod
    def _make_private_dir(path: str, owner: os.stat_result) -> None:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return
        with _directory(path) as fd:
            _give(fd, owner, path)

    def _index(self, home: str, owner: Optional[os.stat_result],
               box: _Box) -> List[Tuple[str, str, str, int, int]]:
        """(base, sub, name, size, dots) of every message, in delivery
        order; fills ``box`` and brings the size cache up to date.

        ``owner``: the home's stat(), if at hand; needed only to write the
        size cache.  When new/ and cur/ are as they were at the last index
        (the versions their cached listings have), that index is the
        answer: no size cache to look at, nothing to sort.  A message
        changed in place since (which no Maildir writer does) is noticed
        when it is opened, as always, and that drops the index.
        """
        pending, versions = self._scan(home)
        if versions is not None:
            hit = self._indexes.get(home, versions)
            if hit is not None:
                box.where = dict(hit.where)
                box.sizes = hit.sizes
                return hit.listed
        cache_path = os.path.join(home, CACHE_NAME)
        cache = self._load_cache(cache_path)
        fresh: Dict[str, List[int]] = {}
        listed = []
        complete = True
        for _ in range(2):
            moved = set()
            for base, (sub, name, inode) in pending.items():
                path = os.path.join(home, sub, name)
                entry = cache.get(base)
                if entry is not None and len(entry) == 3:
                    entry = self._upgrade(path, inode, entry)
                if entry is None or entry[0] != inode:
                    try:
                        m = self.measure(path)
                    except FileNotFoundError:
                        moved.add(base)
                        continue
                    except OSError as exc:
                        # One unreadable file must not cost the user all the
                        # others (nor be forgotten by the next index).
                        complete = False
                        logger.error("%s: skipping unreadable message %s/%s: %s",
                                     home, sub, name, exc.strerror or exc)
                        continue
                    entry = [inode, m.file_size, m.mtime_ns, m.size, _DOTS[m.dot_lines], m.file_ino]
                fresh[base] = entry
                box.where[base] = (sub, name)
                listed.append((_order(base, entry[2] // 1_000_000_000), base, sub, name, entry[3], entry[4]))
            if not moved:
                break
            # Renamed (flag change, new/ -> cur/) between the listing and the
            # read: one fresh look finds it under its new name.
            complete = False
            pending = {base: where for base, where in self._scan(home, cached=False)[0].items() if base in moved}
        listed.sort(key=lambda item: item[0])
        ordered = [item[1:] for item in listed]  # the sort keys would only take memory
        if fresh != cache:
            self._save_cache(cache_path, fresh, home if owner is None else owner)
        box.sizes = fresh
        if versions is not None and complete:
            self._indexes.put(home, versions, _Indexed(ordered, fresh, dict(box.where)))
        return ordered

    @staticmethod
    def _upgrade(path: str, inode: int, entry: List[int]) -> Optional[List[int]]:
        """A format-2 entry [file size, mtime_ns, wire size], if the file still matches it."""
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            return None
        if [st.st_size, st.st_mtime_ns] != entry[:2]:
            return None
        return [inode, entry[0], entry[1], entry[2], _DOTS[None], st.st_ino]

    def _scan(self, home: str, cached: bool = True) -> Tuple[Dict[str, Tuple[str, str, int]],
                                                             Optional[Tuple[Tuple[int, ...], ...]]]:
        """base name -> (sub, name, inode) of every message in new/ and cur/,
        and the versions of the two listings if both are ones kept in memory
        (else None)."""
        found: Dict[str, Tuple[str, str, int]] = {}
        versions: Optional[List[Tuple[int, ...]]] = []
        for sub in ("new", "cur"):
            names, version = self._list(os.path.join(home, sub), cached)
            if versions is not None:
                versions = None if version is None else versions + [version]
            for name, inode in names:
                base = _base(name)
                other = found.get(base)
                if other is not None and other[2] != inode:
                    # Two different files, one base name (a broken MDA): one
                    # unique-id cannot name both; the other waits its turn.
                    logger.warning("%s: two messages named %r; serving %s/%r", home, base, sub, name)
                found[base] = (sub, name, inode)
        return found, None if versions is None else tuple(versions)

    def _list(self, path: str, cached: bool = True) -> Tuple[Sequence[Tuple[str, int]], Optional[Tuple[int, ...]]]:
        """(name, inode) of the regular files in directory ``path``, not
        starting with a dot, and the directory's version if that listing is
        kept in memory (else None; ``()``: there is no such directory).

        From memory when the directory's version (device, inode, mtime) is
        the one listed, which costs one lstat(); a listing is kept only if
        the directory was quiet for ``_QUIET_NS`` before it was read.  No
        stat() per file (see :func:`_read_directory`).
        """
        if cached:
            try:
                st = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                return (), ()
            if not stat.S_ISDIR(st.st_mode):
                _not_a_directory(path)
                return (), None
            version = _directory_version(st)
            names = self._listings.get(path, version)
            if names is not None:
                return names, version
        started = time.time_ns()
        listed = _read_directory(path)
        if listed is None:
            return (), None
        version, entries = listed
        names = [(name, inode) for name, inode, regular in entries if regular]
        if started - version[2] > _QUIET_NS:
            self._listings.put(path, version, names)
            return names, version
        return names, None

    def measure(self, path: str) -> Measured:
        """Wire size (and more) of one message file.

        With a ``,W=`` size in the name, which counts LF as CRLF but nothing
        for a missing final line end, only the last octet is read to add
        what RETR adds there (the rule of
        :func:`pop3frame.protocol.wire_size`), and ``dot_lines`` stays
        unknown.  Otherwise the whole file is read, in chunks.  The only
        place a listing reads message content: subclasses (and the tests)
        can wrap it to count or forbid reads.
        """
        f, st = self._open(path)
        with f:
            named = _name_wire_size(_base(os.path.basename(path)), st.st_size)
            if named is None:
                size, dots = measure_stream(f)
                return Measured(size, dots, st.st_size, st.st_mtime_ns, st.st_ino)
            end = st.st_size
            # An empty message needs no line end.
            last = os.pread(f.fileno(), 1, end - 1) if end else b"\n"
        named += 0 if last == b"\n" else 1 if last == b"\r" else 2
        return Measured(named, None, st.st_size, st.st_mtime_ns, st.st_ino)

    def _load_cache(self, path: str) -> Dict[str, List[int]]:
        """The size cache at ``path``; parsed again only when the file changed.

        Every write replaces the file (a new inode), so an unchanged stat
        means unchanged content: a login to a big mailbox costs one stat()
        here, not a read and a JSON parse.
        """
        try:
            known = _file_version(os.stat(path, follow_symlinks=False))
        except OSError:
            known = None
        hit = self._caches.get(path, known)
        if hit is not None:
            return hit
        try:
            f, st = _open_regular(path)
            with f:
                version = _file_version(st)
                data = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable size cache %s: %s", path, exc)
            return {}
        if not isinstance(data, dict):
            return {}
        form = data.get(_CACHE_FORMAT_KEY)
        # Format 2 entries (three numbers) are checked against the file once.
        length = 6 if form == _CACHE_FORMAT else 3
        # A damaged entry is a cache miss, never a wrong size.
        sizes = {k: v for k, v in data.items()
                 if isinstance(v, list) and len(v) == length and all(type(x) is int and x >= 0 for x in v)
                 and (length == 6 and v[4] in _DOTS_OF or length == 3 and not (form is None and _WIRE_SIZE.search(k)))}
        self._caches.put(path, version, sizes)
        return sizes

    def _save_cache(self, path: str, data: Dict[str, List[int]], owner: Union[os.stat_result, str]) -> None:
        """Write the size cache; ``owner``: the home's stat(), or the home to stat."""
        tmp = None
        try:
            if isinstance(owner, str):
                owner = os.stat(owner)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".sizes-")
            _give(fd, owner, path)
            with os.fdopen(fd, "wb") as f:
                # ensure_ascii keeps non-UTF-8 file names (surrogates) round-trippable.
                marked = dict(data, **{_CACHE_FORMAT_KEY: _CACHE_FORMAT})
                f.write(json.dumps(marked, separators=(",", ":")).encode("ascii"))
                f.flush()
                # The rename keeps inode, size and mtime: this is the version
                # readers will stat, whoever writes after us.
                version = _file_version(os.fstat(f.fileno()))
            # Readers see the old cache or the new one, never half of one.
            os.replace(tmp, path)
            tmp = None
            self._caches.put(path, version, data)
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
    def _open(path: str) -> Tuple[BinaryIO, os.stat_result]:
        """A message file, relative to its new/ or cur/ (see the module docstring), and its fstat()."""
        directory, name = os.path.split(path)
        with _directory(directory) as fd:
            return _open_regular(name, fd)

    def open_message(self, username: str, message: MessageInfo) -> BinaryIO:
        box = self._box(username)
        base = _base(message.key[1])
        box.where.setdefault(base, message.key)
        for _ in range(_ATTEMPTS):
            try:
                f, st = box.open(base)
            except KeyError:
                break
            except FileNotFoundError:
                box.close()
                box.rescan()
                continue
            except OSError as exc:
                logger.error("%s: cannot read message %s: %s", box.home, base, exc.strerror or exc)
                raise TemporaryFailure("cannot read message") from None
            entry = box.sizes.get(base)
            if entry is not None and [entry[5], entry[1], entry[2]] != [st.st_ino, st.st_size, st.st_mtime_ns]:
                # Changed (in place, or replaced under its name) since it
                # was measured, which Maildir writers never do: the size this
                # session announced may be wrong (the server's octet count
                # ends such a RETR), lines may start with "." now, and the
                # next login measures the file again.
                logger.warning("%s: message %s changed since it was measured", box.home, base)
                entry[0] = -1
                self._indexes.drop(box.home)
                message.dot_lines = None
            # Checked on every read from this version on: one written in
            # place while RETR reads it never ends in a terminator.
            return CheckedFile(f, st)
        raise TemporaryFailure("message no longer exists")

    def message_retrieved(self, username: str, message: MessageInfo) -> None:
        # Marked seen at the end of the session, like Dovecot: only after a
        # whole RETR, never for TOP.
        self._box(username).retrieved.add(_base(message.key[1]))

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
                _remove(path)
                return
            except FileNotFoundError:
                # Deleted, or just moved by another program: only a fresh
                # look can tell, and a moved message must still go.
                box.rescan()
        raise OSError(0, "message keeps moving")

    def close_mailbox(self, username: str) -> None:
        with self._mutex:
            box = self._boxes.pop(username, None)
        if box is None:
            return
        box.close()
        if not self.mark_seen:
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
            try:
                with _directory(os.path.join(box.home, sub)) as src, \
                        _directory(os.path.join(box.home, "cur")) as dst:
                    if _exists(target_name, dst):
                        # rename() would replace it: better a message left
                        # unflagged than a file destroyed.
                        logger.warning("%s: not marking %r seen, cur/%r exists", box.home, base, target_name)
                        return
                    # rename() is atomic: the message is in exactly one place.
                    os.rename(name, target_name, src_dir_fd=src, dst_dir_fd=dst)
                box.where[base] = ("cur", target_name)
                return
            except FileNotFoundError:
                box.rescan()  # another program moved it first; follow it
            except OSError as exc:
                logger.warning("%s: cannot mark %s seen: %s", box.home, base, exc.strerror or exc)
                return
