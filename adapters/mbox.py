"""mbox: one file per user, as ``/var/mail/<user>``.

- Messages start at a ``From `` line at the beginning of the file or after
  an empty line; the separator line is not part of the message, nor is the
  empty line before the next one.
- Quoting is undone on RETR and TOP, mboxrd style: ``>From `` becomes
  ``From `` and ``>>From `` becomes ``>From ``.  At a chunk boundary at most
  a few bytes wait for the next chunk, and the result never depends on where
  the boundaries fall.
- The index (byte offsets, wire size and SHA-1 of every message) is built
  in streaming passes, nothing is loaded whole, and it is cached per mbox
  by (device, inode, size, mtime): an unchanged mbox is not read at login,
  one that only grew (an MDA appended mail) is read from its old end, and
  the cache follows our own rewrites.
- UIDL: the SHA-1 of the message with its ``From `` line (envelope sender
  and delivery time), so it is stable while the message is unchanged.
  Unique-ids are given in file order, and one already taken (a byte-identical
  copy) gets ``-2``, ``-3``... appended, so appended mail never changes an
  existing one.  When a rewrite would change a kept message's unique-id (an
  earlier copy was deleted), the rewrite pins it in an ``X-UIDL:`` line right
  after the ``From `` line, as qpopper and UW imapd keep state in the mbox;
  that line is not part of the message as served.
- RETR and TOP read without the locks.  At the end of a message the mbox
  must still be as indexed, or (mail was appended, or the file rewritten)
  still hold that message's bytes by its SHA-1; otherwise the read raises
  and the server closes the connection without the terminator, rather
  than end a message another program changed in place while it was sent.
  A message the index found no line starting with "." in goes out
  unstuffed, so once the mbox changed each piece read is searched for one
  before it goes out: one there raises at once.
- Locking follows Debian's mutt/procmail/Dovecot convention: a dotlock
  ``<mbox>.lock`` created with O_EXCL, plus ``fcntl.lockf`` on the mbox,
  held while indexing and while rewriting.  A dotlock older than
  ``stale_lock_after`` seconds (by the injectable clock) is broken.
- Deletion rewrites the mbox into a temporary file in the same directory,
  copies any mail appended since the session started, fsyncs and renames
  over the original: the file is always either the old or the new one.
  The temporary file has one name per mbox, so the copy a rewrite killed
  part-way leaves is removed by the next rewrite (its dotlock, left too,
  is broken once stale).
  The new file gets the old one's owner, group and mode; if the owner cannot
  be kept (the server does not run as root), nothing is deleted.  MDAs must
  take the dotlock too (Debian's do): one waiting only for the fcntl lock
  would append to the replaced file.
- Symbolic links are not followed below the template's fixed directory
  (``/var/mail`` of ``/var/mail/{user}``, ``/home`` of
  ``/home/{user}/mbox``; links there are the operator's): each directory
  under it and the mbox itself are opened relative to their parent's
  descriptor with ``O_NOFOLLOW``, and so are the dotlock and the temporary
  file of a rewrite, renamed over the mbox only while the name still holds
  the file that was read.  An mbox that is a symlink, not a regular file,
  or has a second hard link is refused (``-ERR [SYS/PERM]``, logged): a
  user who may replace their mbox (a sticky spool, their own home) must
  not have a server running as root serve, or rewrite, someone else's.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import logging
import os
import re
import stat
import threading
import time
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple

from pop3frame import AdapterBase, MessageInfo, PermanentFailure, TemporaryFailure
from pop3frame.clientlog import quoted
from pop3frame.protocol import CHUNK_SIZE, measure_stream

from .maildir import safe_user_name

__all__ = ["MboxAdapter"]

logger = logging.getLogger("pop3frame.adapters.mbox")

_QUOTED = re.compile(rb"\n>(>*From )")
#: A line that may still turn out to be a quoted From_ line: '>'s, then a
#: prefix of "From".  (Without a '>' it is harmless to hold back too.)
_UNDECIDED = re.compile(rb"(>*)(?:F(?:r(?:o(?:m)?)?)?)?")
_PIN = re.compile(rb"X-UIDL: ([\x21-\x7e]{1,70})\n")
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = os.O_NOFOLLOW | _CLOEXEC
#: What open() says for a symlink refused by O_NOFOLLOW: ELOOP (EMLINK on
#: the BSDs), or ENOTDIR for one standing where a directory should be.
_LINKED = (errno.ELOOP, errno.EMLINK, errno.ENOTDIR)


class _Unquote(io.RawIOBase):
    """One message's byte range with mboxrd quoting undone, read in chunks.

    ``digest``, if given, is fed the raw bytes as they are read (the index
    hashes a message in the same pass that measures it).  ``check``, if
    given, is called once the range was read (or the file ended before it),
    before the end is reported; it raises if what was read is not what was
    indexed.  ``guard``, if given, is called with each piece of output and
    whether it starts a line, before the piece is returned; it raises if the
    piece must not go out.  Closing closes ``f`` unless ``closefd`` is false.
    """

    def __init__(self, f, start: int, end: int, chunk_size: int, *, digest=None, closefd: bool = True,
                 check: Optional[Callable[[], None]] = None,
                 guard: Optional[Callable[[bytes, bool], None]] = None) -> None:
        super().__init__()
        self._f = f
        self._check = check
        self._guard = guard
        self._line_start = True  # the output so far ends at a line start
        self._left = end - start
        self._chunk_size = chunk_size
        self._digest = digest
        self._closefd = closefd
        self._tail = b""  # held back; it starts a line (or stands for one's last '>')
        self._mid_line = False  # the next byte continues a line already decided
        self._out = memoryview(b"")
        self._done = False
        f.seek(start)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._out:
            if self._done:
                return 0
            chunk = self._f.read(min(self._chunk_size, self._left)) if self._left > 0 else b""
            if not chunk:
                self._left = 0  # the file is shorter than indexed: end the message here
            self._left -= len(chunk)
            if self._digest is not None:
                self._digest.update(chunk)
            self._done = self._left <= 0
            if self._done and self._check is not None:
                self._check()
            out = self._unquote(chunk, self._done)
            if out:
                if self._guard is not None:
                    self._guard(out, self._line_start)
                self._line_start = out.endswith(b"\n")
            self._out = memoryview(out)
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _unquote(self, chunk: bytes, final: bool) -> bytes:
        # A leading "\n" shows the expression a line start; it is cut off below.
        head = b"" if self._mid_line else b"\n"
        data = head + self._tail + chunk
        self._tail = b""
        cut = data.rfind(b"\n")
        if not final and cut >= 0:
            undecided = _UNDECIDED.fullmatch(data, cut + 1)
            if undecided:
                # Hold the last line back, but of its leading '>'s only one:
                # they are all alike and unquoting removes exactly one.
                keep = cut + 1 + max(len(undecided.group(1)) - 1, 0)
                data, self._tail = data[:keep], data[keep:]
            self._mid_line = undecided is None
        return _QUOTED.sub(rb"\n\1", data)[len(head):]

    def close(self) -> None:
        if not self.closed and self._closefd:
            self._f.close()
        super().close()


class _Entry(NamedTuple):
    """One message: separator offset, body start and end, SHA-1, wire size, pinned
    unique-id, whether a line (unquoted) starts with "."."""

    start: int
    body: int  # after the From_ line and the pin line, if any
    end: int
    digest: str
    size: int
    pin: str
    dots: bool


def _pin_line(uid: str) -> bytes:
    return b"X-UIDL: %s\n" % uid.encode() if uid else b""


def _assign_uids(entries: Sequence[_Entry]) -> List[str]:
    """Unique-ids in file order: the pinned one if still free, else the
    digest, or the digest with the first free ``-n``."""
    taken: Set[str] = set()
    copies: Dict[str, int] = {}
    uids = []
    for entry in entries:
        uid = entry.pin
        while not uid or uid in taken:
            n = copies[entry.digest] = copies.get(entry.digest, 0) + 1
            uid = entry.digest if n == 1 else "%s-%d" % (entry.digest, n)
        taken.add(uid)
        uids.append(uid)
    return uids


class _Index(NamedTuple):
    """An mbox as indexed: the file's identity, how much was indexed, the messages."""

    ident: Optional[Tuple[int, int]]  # (st_dev, st_ino); None for a missing mbox
    size: int
    mtime_ns: int
    entries: List[_Entry]


_EMPTY = _Index(None, 0, 0, [])


class MboxAdapter(AdapterBase):
    """An mbox file per user; thread-safe for one shared instance.

    ``path_template``: ``"/var/mail/{user}"`` style, or a directory (then
    ``<dir>/<user>``).  ``auth``: an object with ``authenticate(user, pw)``
    (such as :class:`adapters.passwdfile.PasswdFile`).
    """

    def __init__(self, path_template: str, auth, *, stale_lock_after: float = 300.0,
                 clock: Callable[[], float] = time.time, chunk_size: int = CHUNK_SIZE) -> None:
        if "{user}" not in path_template:
            path_template = os.path.join(path_template, "{user}")
        self.path_template = path_template
        # The operator's directory, up to the last "/" before {user}, and
        # the part below it, walked without following symlinks.
        cut = path_template.rfind("/", 0, path_template.index("{user}")) + 1
        self._spool = path_template[:cut] or "."
        self._below = path_template[cut:]
        self.auth = auth
        self.stale_lock_after = stale_lock_after
        self.clock = clock
        self.chunk_size = chunk_size
        self._mutex = threading.Lock()
        self._cache: Dict[str, _Index] = {}  # by mbox path, across sessions
        self._sessions: Dict[str, _Index] = {}  # by user, what the session listed

    def path(self, username: str) -> str:
        if not safe_user_name(username):
            raise TemporaryFailure("invalid mailbox name")
        return self.path_template.replace("{user}", username)

    def authenticate(self, username: str, password: str) -> bool:
        return safe_user_name(username) and bool(self.auth.authenticate(username, password))

    def open_file(self, fd: int, mode: str):
        """Every mbox opened (a checked regular file's descriptor) becomes a
        file object here: subclasses (and the tests) can wrap it to count reads."""
        return os.fdopen(fd, mode)

    # -- opening, without following symlinks -----------------------------------

    def _refuse(self, username: str, what: str) -> PermanentFailure:
        logger.error("mbox of %s (%s): %s; not served", quoted(username), self.path(username), what)
        return PermanentFailure("mailbox is not a regular file")

    @contextlib.contextmanager
    def _directory(self, username: str) -> Iterator[Tuple[int, str]]:
        """The descriptor of the directory holding the user's mbox, and the mbox's name in it.

        The template's fixed directory is opened as it is; every directory
        below it, one at a time, with ``O_NOFOLLOW``.  FileNotFoundError if
        one is missing.
        """
        self.path(username)  # refuses names that could leave the spool
        *parents, name = self._below.replace("{user}", username).split("/")
        fd = os.open(self._spool, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        try:
            for part in filter(None, parents):
                try:
                    below = os.open(part, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in _LINKED:
                        raise
                    raise self._refuse(username, "%s is a symlink or not a directory" % part) from None
                os.close(fd)
                fd = below
            yield fd, name
        finally:
            os.close(fd)

    def _open(self, username: str, directory: int, name: str, flags: int, mode: str):
        """The mbox ``name`` in ``directory``, if it is a regular file with one link."""
        try:
            fd = os.open(name, flags | os.O_NONBLOCK | _NOFOLLOW, dir_fd=directory)
        except OSError as exc:
            if exc.errno not in _LINKED:
                raise
            raise self._refuse(username, "a symlink") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._refuse(username, "not a regular file")
            if st.st_nlink != 1:
                # A hard link made to another user's mbox reads like one's own.
                raise self._refuse(username, "%d hard links" % st.st_nlink)
            return self.open_file(fd, mode)
        except BaseException:
            os.close(fd)
            raise

    # -- locking --------------------------------------------------------------

    def _dotlock(self, directory: int, name: str) -> str:
        lock = name + ".lock"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600, dir_fd=directory)
            except FileExistsError:
                try:
                    age = self.clock() - os.stat(lock, dir_fd=directory, follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                if age > self.stale_lock_after:
                    logger.warning("breaking stale dotlock %s.lock (%.0f s old)", name, age)
                    try:
                        os.unlink(lock, dir_fd=directory)
                    except FileNotFoundError:
                        pass
                    continue
                raise TemporaryFailure("mailbox is locked by another program")
            try:
                os.write(fd, b"%d\n" % os.getpid())
            except OSError:
                os.unlink(lock, dir_fd=directory)  # a full disk must not leave the mailbox locked
                raise
            finally:
                os.close(fd)
            return lock
        raise TemporaryFailure("mailbox is locked by another program")

    @contextlib.contextmanager
    def _locked(self, username: str):
        """``(directory, name, file)``: the user's mbox open for reading and
        writing, holding its dotlock and an fcntl lock until the block ends."""
        with self._directory(username) as (directory, name):
            lock = self._dotlock(directory, name)
            try:
                f = self._open(username, directory, name, os.O_RDWR, "r+b")
                with f:  # closing drops the fcntl lock, before the dotlock goes
                    try:
                        fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError as exc:
                        if exc.errno in (errno.EACCES, errno.EAGAIN):
                            raise TemporaryFailure("mailbox is locked by another program") from None
                        raise
                    yield directory, name, f
            finally:
                os.unlink(lock, dir_fd=directory)

    # -- index --------------------------------------------------------------

    def _scan(self, f, begin: int) -> List[int]:
        """Offsets of the separator lines at or after ``begin``, in one pass."""
        starts: List[int] = []
        if begin:
            f.seek(begin - 2)
            prev_tail = f.read(2)
        else:
            f.seek(0)
            prev_tail = b"\n\n"  # file start counts as "after an empty line"
        pos = begin
        while True:
            chunk = f.read(self.chunk_size)
            if not chunk:
                return starts
            data = prev_tail + chunk
            i = data.find(b"\n\nFrom ")
            while i >= 0:
                starts.append(pos - len(prev_tail) + i + 2)
                i = data.find(b"\n\nFrom ", i + 1)
            pos += len(chunk)
            prev_tail = data[-6:]

    def measure(self, f, start: int, body: int, end: int, pin: str) -> _Entry:
        """Hash and wire size of one message: the only place the index reads
        message bodies.  Subclasses (and the tests) can wrap it."""
        f.seek(start)
        digest = hashlib.sha1(f.readline(4096))  # the From_ line; a pin line would change on rewrite
        size, dots = measure_stream(_Unquote(f, body, end, self.chunk_size, digest=digest, closefd=False),
                                    self.chunk_size)
        return _Entry(start, body, end, digest.hexdigest(), size, pin, dots)

    def _entries(self, f, starts: List[int], size: int, known: Dict[Tuple[int, int, int], _Entry]) -> List[_Entry]:
        entries = []
        for k, start in enumerate(starts):
            f.seek(start)
            body = start + len(f.readline(4096))
            if k + 1 < len(starts):
                end = starts[k + 1] - 1
            else:
                end = size
                f.seek(max(size - 2, body))
                if f.read(2) == b"\n\n":
                    end = size - 1
            end = max(body, end)
            f.seek(body)
            line = f.readline(80)
            pinned = _PIN.fullmatch(line) if body + len(line) <= end else None
            pin = pinned.group(1).decode() if pinned else ""
            body += len(line) if pinned else 0
            entries.append(known.get((start, body, end)) or self.measure(f, start, body, end, pin))
        return entries

    def _index(self, path: str, f) -> _Index:
        """The index of the open, locked mbox ``f``: cached, extended or made anew."""
        st = os.fstat(f.fileno())
        ident = (st.st_dev, st.st_ino)
        with self._mutex:
            cached = self._cache.get(path, _EMPTY)
        if cached.ident == ident and (cached.size, cached.mtime_ns) == (st.st_size, st.st_mtime_ns):
            return cached
        old = cached.entries
        if (cached.ident == ident and old and cached.size < st.st_size
                and _starts_with_from(f, old[-1].start)):
            # Grown, and the last message is still where it was: mail was
            # appended.  The last message is kept if its extent did not change.
            last = old[-1]
            starts = [last.start] + self._scan(f, max(last.body, cached.size - 4))
            entries = old[:-1] + self._entries(f, starts, st.st_size, {last[:3]: last})
        else:
            entries = self._entries(f, self._scan(f, 0), st.st_size, {})
        index = _Index(ident, st.st_size, st.st_mtime_ns, entries)
        with self._mutex:
            self._cache[path] = index
        return index

    def list_messages(self, username: str) -> Sequence[MessageInfo]:
        path = self.path(username)
        try:
            with self._locked(username) as (_, _, f):
                index = self._index(path, f)
        except FileNotFoundError:
            index = _EMPTY
            with self._mutex:
                self._cache.pop(path, None)
        with self._mutex:
            self._sessions[username] = index
        return [MessageInfo(uid, entry.size, key=entry, dot_lines=entry.dots)
                for uid, entry in zip(_assign_uids(index.entries), index.entries)]

    def open_message(self, username: str, message: MessageInfo):
        entry: _Entry = message.key
        with self._mutex:
            index = self._sessions[username]
        with self._directory(username) as (directory, name):
            f = self._open(username, directory, name, os.O_RDONLY, "rb")

        def changed() -> bool:
            st = os.fstat(f.fileno())
            return (st.st_size, st.st_mtime_ns) != (index.size, index.mtime_ns)

        def unchanged() -> None:
            # RETR reads without the mailbox lock, and a program that rewrites
            # the mbox in place (or did since the listing) changes the bytes
            # under us.  An mbox as indexed is fine; one that changed (most
            # often mail was only appended) must still hold this message.
            if changed() and self.measure(f, entry.start, entry.body, entry.end, entry.pin).digest != entry.digest:
                raise TemporaryFailure("mailbox changed by another program while the message was read")

        def no_dot_lines(out: bytes, line_start: bool) -> None:
            # RETR sends this message unstuffed (the index found no line
            # starting with "."), so one that does now comes from a rewrite
            # made while it is read, and would end the reply early in a
            # terminator the client believes: refused before it goes out.
            # The search costs only after the mbox changed.
            if changed() and ((line_start and out[:1] == b".") or b"\n." in out):
                raise TemporaryFailure("mailbox changed by another program while the message was read")

        try:
            st = os.fstat(f.fileno())
            if (st.st_dev, st.st_ino) != index.ident or not _starts_with_from(f, entry.start):
                raise TemporaryFailure("mailbox changed by another program; try again")
            if (st.st_size, st.st_mtime_ns) != (index.size, index.mtime_ns):
                # Written since the listing (mutt rewrites in place): what
                # the index says of the lines may no longer hold, and a "."
                # line sent unstuffed would end the reply before unchanged()
                # could tell.
                message.dot_lines = None
            guard = no_dot_lines if message.dot_lines is False else None
            return io.BufferedReader(_Unquote(f, entry.body, entry.end, self.chunk_size, check=unchanged,
                                              guard=guard), self.chunk_size)
        except BaseException:
            f.close()
            raise

    def delete_messages(self, username: str, messages: Sequence[MessageInfo]) -> None:
        path = self.path(username)
        with self._mutex:
            index = self._sessions[username]
        with self._locked(username) as (directory, name, f):
            st = os.fstat(f.fileno())
            if ((st.st_dev, st.st_ino) != index.ident or st.st_size < index.size
                    or any(not _starts_with_from(f, e.start) for e in index.entries)):
                raise TemporaryFailure("mailbox changed by another program; nothing deleted")
            rewritten = self._rewrite(path, directory, name, f, st, index, {m.key.start for m in messages})
        with self._mutex:
            self._cache[path] = rewritten

    def _rewrite(self, path: str, directory: int, name: str, f, st: os.stat_result, index: _Index,
                 doomed: Set[int]) -> _Index:
        """Replace the mbox ``name`` in ``directory`` by a copy without ``doomed``; return the copy's index."""
        # One name per mbox, so the copy a rewrite killed part-way left
        # behind (as large as the mbox, in the mail spool) is found by the
        # next one: the dotlock held here excludes a live rewrite of it.
        tmp = ".pop3frame-%s.tmp" % hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:20]
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
        try:
            fd = os.open(tmp, flags, 0o600, dir_fd=directory)
        except FileExistsError:
            logger.warning("removing %s, the copy of %s an interrupted rewrite left", tmp, path)
            os.unlink(tmp, dir_fd=directory)
            fd = os.open(tmp, flags, 0o600, dir_fd=directory)
        try:
            with os.fdopen(fd, "wb") as out:
                _give_owner(out.fileno(), st, path)
                _copy(f, out, 0, index.entries[0].start)  # whatever precedes the first From_ line
                entries = []
                for k, (entry, uid) in enumerate(zip(index.entries, _assign_uids(index.entries))):
                    if entry.start in doomed:
                        continue
                    # In file order, every message before this one keeps its
                    # unique-id, so an unpinned one still gets its digest.
                    pin = uid if entry.pin or uid != entry.digest else ""
                    start = out.tell()
                    f.seek(entry.start)
                    out.write(f.readline(4096) + _pin_line(pin))
                    body = out.tell()
                    stop = index.entries[k + 1].start if k + 1 < len(index.entries) else index.size
                    _copy(f, out, entry.body, stop)
                    entries.append(entry._replace(start=start, body=body, end=body + entry.end - entry.body, pin=pin))
                kept = out.tell()
                # Mail an MDA appended during the session stays.
                _copy(f, out, index.size, st.st_size)
                out.flush()
                os.fsync(out.fileno())
                new = os.fstat(out.fileno())
            # Only over the file that was read: a name swapped since (for a
            # symlink, say) is left as it is, and nothing is deleted.
            now = os.stat(name, dir_fd=directory, follow_symlinks=False)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise TemporaryFailure("mailbox changed by another program; nothing deleted")
            os.replace(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=directory)
            except FileNotFoundError:
                pass
            raise
        # Indexed up to `kept`: appended mail is picked up as growth at the next login.
        return _Index((new.st_dev, new.st_ino), kept, new.st_mtime_ns, entries)

    def close_mailbox(self, username: str) -> None:
        with self._mutex:
            self._sessions.pop(username, None)


def _give_owner(fd: int, st: os.stat_result, path: str) -> None:
    """Give the new mbox the old one's owner, group and mode, or refuse."""
    mine = os.fstat(fd)
    if (mine.st_uid, mine.st_gid) != (st.st_uid, st.st_gid):
        try:
            os.fchown(fd, st.st_uid, st.st_gid)
        except OSError as exc:
            # A spool file that changed hands would lock out its MDA or user.
            logger.error("cannot give the rewritten %s its owner %d:%d (%s); nothing deleted",
                         path, st.st_uid, st.st_gid, exc.strerror)
            raise PermanentFailure("cannot keep the mailbox's owner; nothing deleted") from None
    os.fchmod(fd, st.st_mode & 0o7777)  # after fchown, which may clear set-id bits


def _starts_with_from(f, offset: int) -> bool:
    """Whether a separator line still starts at ``offset``: a cheap check
    that another program did not rewrite the file."""
    begin = max(offset - 2, 0)  # the file's start counts as an empty line
    f.seek(begin)
    return f.read(offset + 5 - begin) == b"\n\nFrom "[begin - offset + 2:]


def _copy(src, dst, start: int, stop: int) -> None:
    src.seek(start)
    left = stop - start
    while left > 0:
        data = src.read(min(CHUNK_SIZE, left))
        if not data:
            break
        dst.write(data)
        left -= len(data)
