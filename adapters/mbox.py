"""mbox: one file per user, as ``/var/mail/<user>``.

- Messages start at a ``From `` line at the beginning of the file or after
  an empty line; the separator line is not part of the message, nor is the
  empty line before the next one.
- Quoting is undone on RETR, mboxrd style: ``>From `` becomes ``From ``
  and ``>>From `` becomes ``>From `` (a regular expression per chunk, with the
  line start carried across chunk boundaries).
- The file is indexed by byte offsets in one streaming pass; nothing is
  loaded whole.  UIDL is a hash of the separator line and the message's
  first bytes, stable while the message is unchanged.
- Locking follows Debian's mutt/procmail/Dovecot convention: a dotlock
  ``<mbox>.lock`` created with O_EXCL, plus ``fcntl.lockf`` on the mbox,
  held while indexing and while rewriting.  A dotlock older than
  ``stale_lock_after`` seconds (by the injectable clock) is broken.
- Deletion rewrites the mbox into a temporary file in the same directory,
  copies any mail appended since the session started, fsyncs and renames
  over the original: the file is always either the old or the new one.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from pop3frame import AdapterBase, MessageInfo, TemporaryFailure
from pop3frame.protocol import CHUNK_SIZE

from .maildir import safe_user_name

__all__ = ["MboxAdapter"]

logger = logging.getLogger("pop3frame.adapters.mbox")

_QUOTED = re.compile(rb"\n>(>*From )")


class _Unquote:
    """Streaming mboxrd unquoting of one message's byte range."""

    def __init__(self, f, start: int, end: int, chunk_size: int) -> None:
        self._f = f
        self._left = end - start
        self._chunk_size = chunk_size
        # A sentinel LF makes the first line a line start for the regex; it
        # is removed from the first bytes returned.
        self._carry = b"\n"
        self._sentinel = True
        f.seek(start)

    def read(self, n: int = -1) -> bytes:
        while True:
            if self._left <= 0:
                data, self._carry = self._carry, b""
                return self._emit(_QUOTED.sub(rb"\n\1", data)) if data else b""
            chunk = self._f.read(min(self._chunk_size, self._left))
            if not chunk:
                self._left = 0
                continue
            self._left -= len(chunk)
            data = self._carry + chunk
            cut = data.rfind(b"\n")
            # A short last line waits for the next chunk: it may be a quoted
            # From_ line split across the boundary.
            if cut >= 0 and len(data) - cut <= 64 and self._left > 0:
                data, self._carry = data[:cut], data[cut:]
            else:
                self._carry = b""
            out = self._emit(_QUOTED.sub(rb"\n\1", data))
            if out:
                return out

    def _emit(self, out: bytes) -> bytes:
        if self._sentinel and out:
            self._sentinel = False
            out = out[1:]
        return out

    def close(self) -> None:
        self._f.close()


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
        self.auth = auth
        self.stale_lock_after = stale_lock_after
        self.clock = clock
        self.chunk_size = chunk_size
        self._mutex = threading.Lock()
        self._index: Dict[str, Tuple[int, List[Tuple[int, int, int]]]] = {}

    def path(self, username: str) -> str:
        if not safe_user_name(username):
            raise TemporaryFailure("invalid mailbox name")
        return self.path_template.format(user=username)

    def authenticate(self, username: str, password: str) -> bool:
        return safe_user_name(username) and bool(self.auth.authenticate(username, password))

    # -- locking --------------------------------------------------------------

    def _dotlock(self, path: str) -> str:
        lock = path + ".lock"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                try:
                    age = self.clock() - os.stat(lock).st_mtime
                except FileNotFoundError:
                    continue
                if age > self.stale_lock_after:
                    logger.warning("breaking stale dotlock %s (%.0f s old)", lock, age)
                    try:
                        os.unlink(lock)
                    except FileNotFoundError:
                        pass
                    continue
                raise TemporaryFailure("mailbox is locked by another program")
            os.write(fd, b"%d\n" % os.getpid())
            os.close(fd)
            return lock
        raise TemporaryFailure("mailbox is locked by another program")

    def _locked(self, path: str, mode: str):
        """Open ``path`` holding the dotlock and an fcntl lock; caller must _unlock."""
        lock = self._dotlock(path)
        try:
            f = open(path, mode)
            try:
                fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                f.close()
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    raise TemporaryFailure("mailbox is locked by another program") from None
                raise
        except BaseException:
            os.unlink(lock)
            raise
        return f, lock

    @staticmethod
    def _unlock(f, lock: str) -> None:
        try:
            f.close()  # closing drops the fcntl lock
        finally:
            os.unlink(lock)

    # -- index --------------------------------------------------------------

    def _scan(self, f) -> Tuple[int, List[Tuple[int, int, int]]]:
        """(indexed size, [(separator offset, body start, body end)]) in one pass."""
        starts: List[int] = []
        pos, prev_tail = 0, b"\n\n"  # file start counts as "after an empty line"
        while True:
            chunk = f.read(self.chunk_size)
            if not chunk:
                break
            data = prev_tail + chunk
            i = data.find(b"\n\nFrom ")
            while i >= 0:
                starts.append(pos - len(prev_tail) + i + 2)
                i = data.find(b"\n\nFrom ", i + 1)
            pos += len(chunk)
            prev_tail = data[-6:]
        size = pos
        messages = []
        for k, start in enumerate(starts):
            f.seek(start)
            separator = f.readline(4096)
            body = start + len(separator)
            end = starts[k + 1] - 1 if k + 1 < len(starts) else size
            if k + 1 == len(starts):
                f.seek(max(size - 2, body))
                if f.read(2) == b"\n\n":
                    end = size - 1
            messages.append((start, body, max(body, end)))
        return size, messages

    def list_messages(self, username: str) -> Sequence[MessageInfo]:
        path = self.path(username)
        try:
            f, lock = self._locked(path, "r+b")
        except FileNotFoundError:
            with self._mutex:
                self._index[username] = (0, [])
            return []
        try:
            size, messages = self._scan(f)
            infos = []
            for start, body, end in messages:
                f.seek(start)
                head = f.read(min(end - start, 4096))
                uid = hashlib.sha1(head + b"%d" % (end - body)).hexdigest()
                stream = _Unquote(open(path, "rb"), body, end, self.chunk_size)
                wire = _wire_size(stream)
                infos.append(MessageInfo(uid, wire, key=(start, body, end)))
        finally:
            self._unlock(f, lock)
        with self._mutex:
            self._index[username] = (size, messages)
        return infos

    def open_message(self, username: str, message: MessageInfo):
        start, body, end = message.key
        f = open(self.path(username), "rb")
        f.seek(start)
        if not f.read(5) == b"From ":
            f.close()
            raise TemporaryFailure("mailbox changed by another program; try again")
        return _Unquote(f, body, end, self.chunk_size)

    def delete_messages(self, username: str, messages: Sequence[MessageInfo]) -> None:
        path = self.path(username)
        with self._mutex:
            size, index = self._index[username]
        doomed = {m.key[0] for m in messages}
        f, lock = self._locked(path, "r+b")
        try:
            st = os.fstat(f.fileno())
            if st.st_size < size or any(not _starts_with_from(f, s) for s, _, _ in index):
                raise TemporaryFailure("mailbox changed by another program; nothing deleted")
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".mbox-")
            try:
                with os.fdopen(fd, "wb") as out:
                    for k, (start, _, end) in enumerate(index):
                        if start in doomed:
                            continue
                        stop = index[k + 1][0] if k + 1 < len(index) else size
                        _copy(f, out, start, stop)
                    # Mail an MDA appended during the session stays.
                    _copy(f, out, size, st.st_size)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(tmp, st.st_mode & 0o7777)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        finally:
            self._unlock(f, lock)

    def close_mailbox(self, username: str) -> None:
        with self._mutex:
            self._index.pop(username, None)


def _starts_with_from(f, offset: int) -> bool:
    f.seek(offset)
    return f.read(5) == b"From "


def _copy(src, dst, start: int, stop: int) -> None:
    src.seek(start)
    left = stop - start
    while left > 0:
        data = src.read(min(CHUNK_SIZE, left))
        if not data:
            break
        dst.write(data)
        left -= len(data)


def _wire_size(stream: _Unquote) -> int:
    from pop3frame.protocol import stream_wire_size

    try:
        return stream_wire_size(stream)
    finally:
        stream.close()
