"""Exclusive mailbox locks shared by all sessions.

RFC 1939 section 8: once a client is authenticated the server acquires an
exclusive-access lock on the maildrop, and a second session for the same
maildrop must fail.  The lock manager is pluggable: the in-process manager
is right for one server process, :class:`FileLockManager` coordinates
several processes on one host, and a database-backed manager can span
hosts.  A manager only ever *tries* a lock; POP3 never waits for one.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from typing import Dict, Optional

from .ownership import refuse_shared

__all__ = ["Lock", "LockManager", "InProcessLockManager", "FileLockManager"]


class Lock:
    """A held mailbox lock.  ``release()`` is idempotent and thread-safe."""

    __slots__ = ("name", "_release", "_mutex")

    def __init__(self, name: str, release) -> None:
        self.name = name
        self._release = release
        self._mutex = threading.Lock()

    def release(self) -> None:
        with self._mutex:
            release, self._release = self._release, None
        if release is not None:
            release()

    @property
    def held(self) -> bool:
        return self._release is not None

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LockManager:
    """Interface: hand out at most one :class:`Lock` per mailbox name at a time."""

    def try_acquire(self, name: str) -> Optional[Lock]:
        """Return a held lock, or None at once if someone else holds it."""
        raise NotImplementedError

    def is_locked(self, name: str) -> bool:
        """Whether ``name`` is held right now (for tests and diagnostics)."""
        lock = self.try_acquire(name)
        if lock is None:
            return True
        lock.release()
        return False

    def close(self) -> None:
        """Release the manager's own resources (connections, files)."""


class InProcessLockManager(LockManager):
    """Locks in a dict, for a single server process (the default)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held: Dict[str, Lock] = {}

    def try_acquire(self, name: str) -> Optional[Lock]:
        with self._mutex:
            if name in self._held:
                return None
            lock = Lock(name, lambda: self._drop(name))
            self._held[name] = lock
            return lock

    def _drop(self, name: str) -> None:
        with self._mutex:
            self._held.pop(name, None)

    def held_names(self):
        """Names currently locked: a leak check for tests."""
        with self._mutex:
            return sorted(self._held)


class FileLockManager(LockManager):
    """``flock`` locks on files in a directory, for several processes on one host.

    The kernel drops a flock when its process dies, so a crashed server never
    leaves a mailbox locked.  The directory must be writable by its owner only
    (PermissionError otherwise).  Lock files are named by a hash of the mailbox
    name, so any name (with ``/`` or ``..``) is safe, and are left in place:
    unlinking a lock file races with another process opening it.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # Whoever could create a lock file here first could hold any
        # mailbox's lock for ever, or plant a link for us to follow.
        refuse_shared(directory)

    def _path(self, name: str) -> str:
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:32]
        return os.path.join(self.directory, digest + ".lock")

    def try_acquire(self, name: str) -> Optional[Lock]:
        fd = os.open(self._path(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # Closing the descriptor releases the flock.
        return Lock(name, lambda: os.close(fd))
