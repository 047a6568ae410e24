"""What the workers of ``serve --workers N`` share: one host, one set of rules.

A client must not escape a limit by landing on another worker, so these
hold for the host, not per process:

* mailbox locks: ``flock`` files in a private directory the supervisor
  makes (:meth:`HostState.locks`), unless ``[locks]`` names a directory or
  PostgreSQL.  The kernel drops a killed worker's locks;
* the connection limits, total and per client address
  (:class:`HostConnectionTracker`);
* failed-login delays and lockouts per address, and LOGIN-DELAY per
  mailbox (:class:`SharedRecords` under the classes of :mod:`pop3frame.auth`);
* the number of password checks running at once (:class:`HostPasswordChecks`);
* the counters of ``/metrics`` (:class:`SharedStats`).

All of it lives in one :class:`SharedMemory` region that the supervisor
creates before the first fork, with the same interfaces as the
single-process classes.  Its tables have a fixed size (:class:`SharedTable`;
addresses and mailbox names come from clients): a full table of failure
records drops the one that expires first near the new key's slot, and a
full connection table refuses the connection.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import mmap
import os
import shutil
import struct
import tempfile
import threading
import time
import weakref
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

from .auth import Expiry, FailureThrottle, LoginDelayTracker, PasswordChecks
from .config import ServerConfig, client_key
from .locks import FileLockManager
from .server import ConnectionTracker
from .session import SessionContext
from .stats import COUNTERS, Stats

__all__ = ["HostState", "SharedMemory", "SharedTable", "SharedRecords", "SharedStats", "HostConnectionTracker",
           "HostPasswordChecks", "table_key", "private_directory"]

logger = logging.getLogger("pop3frame.hostwide")

#: Octets of a table key: the text itself up to KEY_SIZE - 1 octets, else its SHA-256.
KEY_SIZE = 64
_HASHED = 0xFF


def table_key(text: str) -> bytes:
    """The fixed-size key of ``text``; distinct texts give distinct keys.

    The first octet is 1 + the text's length, or 255 for a text too long
    to store, which is stored as its SHA-256; 0 marks an empty slot.
    """
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) < KEY_SIZE:
        return bytes((len(raw) + 1,)) + raw.ljust(KEY_SIZE - 1, b"\0")
    return bytes((_HASHED,)) + hashlib.sha256(raw).digest().ljust(KEY_SIZE - 1, b"\0")


#: The first octet of the memory's file that stands for a password-check
#: place; those before it lock the tables.
PLACES = 8


def _align(n: int) -> int:
    return (n + 7) & ~7


_regions: "weakref.WeakSet[SharedMemory]" = weakref.WeakSet()
_locks: "weakref.WeakSet[SharedLock]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A thread of the parent may have held a thread lock at the fork; that
    # thread does not exist here to release it.
    for region in _regions:
        region._octets = threading.Lock()
        region._mine = set()  # record locks are not inherited
    for lock in _locks:
        lock._threads = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class SharedMemory:
    """``size`` zeroed octets shared by this process and every process it forks afterwards.

    The octets of the region's file also serve as locks between the
    processes (``fcntl`` record locks, which the kernel drops when their
    process dies, so a worker killed holding one blocks nobody): a
    :class:`SharedLock` waits for one, :meth:`try_lock` takes one if free.
    """

    def __init__(self, size: int) -> None:
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("pop3frame-shared", os.MFD_CLOEXEC)
        else:  # pragma: no cover (not Linux)
            with tempfile.TemporaryFile() as f:
                fd = os.dup(f.fileno())
        try:
            os.ftruncate(fd, max(size, 8))
            self.buffer = mmap.mmap(fd, max(size, 8))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._octets = threading.Lock()
        self._mine: Set[int] = set()  # octets this process has locked (try_lock)
        _regions.add(self)

    def try_lock(self, octet: int) -> bool:
        """Lock octet ``octet`` of the file, without waiting; False if it is locked.

        Locked here or in any other process: the kernel's record locks
        belong to a process, and would let it lock an octet twice, so this
        process's own are kept apart here.  The kernel drops them when the
        process dies.
        """
        with self._octets:
            if octet in self._mine:
                return False
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, octet)
            except OSError:  # EAGAIN or EACCES: another process holds it
                return False
            self._mine.add(octet)
            return True

    def unlock(self, octet: int) -> None:
        with self._octets:
            self._mine.discard(octet)
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, octet)


class SharedLock:
    """A lock between the threads of every process sharing ``memory``, as a context manager.

    A threading lock excludes this process's threads, the record lock on
    octet ``octet`` of the memory's file the other processes (at worst a
    worker killed holding it leaves one record half-updated).  One lock per
    table, so looking up failed logins never waits for a connection's
    admission in another worker.

    No thread waits for a second lock while it holds one of these (they are
    taken around single table operations; password-check places are only
    ever tried, never waited for), so no deadlock exists to detect.  The
    kernel detects one anyway: it owns record locks by process, so worker A
    waiting for the failures table while another of its threads holds the
    connections table, and worker B, holding the failures table, asking for
    the connections table, look like a cycle, and B's request fails with
    EDEADLK.  That request is tried again every :attr:`retry` seconds until
    A's thread lets go (it waits for nothing).
    """

    retry = 0.001

    def __init__(self, memory: SharedMemory, octet: int) -> None:
        self._fd = memory._fd
        self._octet = octet
        self._threads = threading.Lock()
        _locks.add(self)

    def __enter__(self) -> "SharedLock":
        self._threads.acquire()
        try:
            while True:
                try:
                    fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, self._octet)
                    break
                except OSError as exc:
                    if exc.errno != errno.EDEADLK:
                        raise
                time.sleep(self.retry)
        except BaseException:
            self._threads.release()
            raise
        return self

    def try_acquire(self) -> bool:
        """Take the lock only if no thread or process holds it now (then leave it
        with ``__exit__``); never waits.

        For the supervisor, which must go on reaping, forking and answering
        signals while a worker stopped in the middle of a table operation
        (SIGSTOP, a debugger) holds the lock.
        """
        if not self._threads.acquire(blocking=False):
            return False
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self._octet)
        except OSError as exc:
            self._threads.release()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self._octet)
        finally:
            self._threads.release()


class SharedTable:
    """A fixed-size hash table of keys and struct-packed values in shared memory.

    Open addressing with linear probing and backward-shift deletion (no
    tombstones), keys from :func:`table_key` stored whole, slots chosen by
    the interpreter's keyed hash (the same in every forked worker, and
    unknown to clients).  At most three quarters of the slots are used.
    Not locked itself: callers hold :attr:`lock` around every call.
    """

    #: How many slots from a key's own slot are searched for a victim when the table is full.
    EVICTION_WINDOW = 16

    def __init__(self, memory: SharedMemory, offset: int, capacity: int, values: str, lock_octet: int = 0) -> None:
        if capacity < 4 or capacity & (capacity - 1):
            raise ValueError("capacity must be a power of two, at least 4")
        self.memory = memory
        self.lock = SharedLock(memory, lock_octet)
        self.capacity = capacity
        self.limit = capacity * 3 // 4
        self._values = struct.Struct(values)
        self._head = offset  # the count of used slots, then the slots
        self._slots = offset + 8
        self._slot_size = self.slot_size(values)
        self._mask = capacity - 1

    @staticmethod
    def slot_size(values: str) -> int:
        return _align(8 + KEY_SIZE + struct.calcsize(values))

    @classmethod
    def size(cls, capacity: int, values: str) -> int:
        """Octets of shared memory a table of ``capacity`` slots takes."""
        return 8 + capacity * cls.slot_size(values)

    def __len__(self) -> int:
        return struct.unpack_from("q", self.memory.buffer, self._head)[0]

    def _add(self, n: int) -> None:
        struct.pack_into("q", self.memory.buffer, self._head, len(self) + n)

    def _find(self, key: bytes) -> Tuple[int, int]:
        """(slot of ``key`` or -1, the empty slot it would go to)."""
        buf = self.memory.buffer
        h = hash(key) & 0xFFFFFFFFFFFFFFFF
        i = h & self._mask
        for _ in range(self.capacity):
            offset = self._slots + i * self._slot_size
            if buf[offset + 8] == 0:
                return -1, i
            if struct.unpack_from("Q", buf, offset)[0] == h and buf[offset + 8:offset + 8 + KEY_SIZE] == key:
                return i, i
            i = (i + 1) & self._mask
        return -1, -1  # pragma: no cover (the table is never full)

    def get(self, key: bytes) -> Optional[tuple]:
        """The values stored under ``key``, or None."""
        i, _ = self._find(key)
        if i < 0:
            return None
        return self._values.unpack_from(self.memory.buffer, self._slots + i * self._slot_size + 8 + KEY_SIZE)

    def put(self, key: bytes, values: tuple, expires: Optional[Callable[[tuple], float]] = None) -> bool:
        """Store ``values`` under ``key``; False if the table is full.

        With ``expires`` (when a record stops mattering), a full table first
        drops the record that expires first among the
        :attr:`EVICTION_WINDOW` slots from the key's own.
        """
        i, empty = self._find(key)
        if i < 0:
            if len(self) >= self.limit:
                if expires is None:
                    return False
                self._evict(key, expires)
                i, empty = self._find(key)
            i = empty
            offset = self._slots + i * self._slot_size
            struct.pack_into("Q", self.memory.buffer, offset, hash(key) & 0xFFFFFFFFFFFFFFFF)
            self.memory.buffer[offset + 8:offset + 8 + KEY_SIZE] = key
            self._add(1)
        self._values.pack_into(self.memory.buffer, self._slots + i * self._slot_size + 8 + KEY_SIZE, *values)
        return True

    def _evict(self, key: bytes, expires: Callable[[tuple], float]) -> None:
        i = (hash(key) & 0xFFFFFFFFFFFFFFFF) & self._mask
        window = [(i + k) & self._mask for k in range(self.EVICTION_WINDOW)]
        used = [j for j in window if self.memory.buffer[self._slots + j * self._slot_size + 8]]
        if used:
            self._remove(min(used, key=lambda j: expires(self._values.unpack_from(
                self.memory.buffer, self._slots + j * self._slot_size + 8 + KEY_SIZE))))

    def delete(self, key: bytes) -> None:
        i, _ = self._find(key)
        if i >= 0:
            self._remove(i)

    def _remove(self, i: int) -> None:
        buf, size = self.memory.buffer, self._slot_size
        j = i
        while True:
            j = (j + 1) & self._mask
            offset = self._slots + j * size
            if buf[offset + 8] == 0:
                break
            home = struct.unpack_from("Q", buf, offset)[0] & self._mask
            # The entry at j may fill the hole at i if i is no nearer to j
            # than its own slot is: probing for it from home still meets it.
            if (j - home) & self._mask >= (j - i) & self._mask:
                hole = self._slots + i * size
                buf[hole:hole + size] = buf[offset:offset + size]
                i = j
        hole = self._slots + i * size
        buf[hole:hole + size] = bytes(size)
        self._add(-1)

    def items(self) -> Iterator[Tuple[bytes, tuple]]:
        """Every (key, values), in slot order (a snapshot: safe to change the table meanwhile)."""
        out = []
        buf = self.memory.buffer
        for i in range(self.capacity):
            offset = self._slots + i * self._slot_size
            if buf[offset + 8]:
                out.append((bytes(buf[offset + 8:offset + 8 + KEY_SIZE]),
                            self._values.unpack_from(buf, offset + 8 + KEY_SIZE)))
        return iter(out)


class SharedRecords:
    """:class:`pop3frame.auth.Records` over a :class:`SharedTable`: the same records for every worker."""

    def __init__(self, table: SharedTable) -> None:
        self._table = table
        #: The lock callers hold around every call (the table's).
        self.mutex = table.lock

    def __len__(self) -> int:
        return len(self._table)

    def get(self, key: str, now: float, expires: Expiry) -> Optional[List[float]]:
        k = table_key(key)
        values = self._table.get(k)
        if values is None:
            return None
        record = list(values)
        if expires(record) < now:
            self._table.delete(k)
            return None
        return record

    def put(self, key: str, record: List[float], now: float, expires: Expiry) -> None:
        self._table.put(table_key(key), tuple(record), lambda values: expires(list(values)))


class SharedStats(Stats):
    """Counters of every process, summed: each adds to its own row, any can read the total.

    Rows are only ever added to (a worker forked again continues its
    predecessor's row), so the sums never go down, as Prometheus counters
    must not.  ``active`` gives the host's live connections.
    """

    def __init__(self, counts: memoryview, rows: int, row: int, active: Callable[[], int]) -> None:
        super().__init__(active)
        self._counts = counts
        self._rows = rows
        self._names = {name: i for i, name in enumerate(COUNTERS)}
        self._row = row * len(COUNTERS)

    def add(self, name: str, n: int = 1) -> None:
        i = self._names[name]
        with self._mutex:
            self._counts[self._row + i] += n

    def counters(self) -> Dict[str, int]:
        width = len(COUNTERS)
        # Aligned 8-octet reads: each value is whole, if a moment old.
        return {name: sum(self._counts[r * width + i] for r in range(self._rows))
                for name, i in self._names.items()}


class HostConnectionTracker(ConnectionTracker):
    """A :class:`~pop3frame.server.ConnectionTracker` whose limits count every worker's connections.

    The live connections of this worker stay in this process (to wait for
    and close them); their counts, in total and per address key, are kept
    per worker in shared memory, so a dead worker's counts can be cleared
    (:meth:`HostState.release`).  Lock order: this tracker's mutex, then
    the table's.
    """

    def __init__(self, table: SharedTable, totals: memoryview, slot: int, max_total: int, max_per_ip: int,
                 exempt: Callable[[str], bool]) -> None:
        super().__init__(max_total, max_per_ip, exempt)
        self._table = table
        self._totals = totals
        self._slot = slot

    def set_limits(self, max_total: int, max_per_ip: int) -> None:
        """As in one process (SIGHUP), but ``max_total`` at most what the table holds.

        The table's size was fixed before the first fork; a limit above it
        would refuse the connections of new addresses once the table is full,
        whatever the limit, so the limit is kept to it (and a WARNING says so)
        until a restart.
        """
        if max_total > self._table.limit:
            logger.warning("max_connections %d: the table the workers share holds %d connections until a restart; "
                           "limiting to %d", max_total, self._table.limit, self._table.limit)
            max_total = self._table.limit
        super().set_limits(max_total, max_per_ip)

    def _count_in(self, ip: Optional[str], new: bool) -> Optional[str]:
        key = None if ip is None else table_key(client_key(ip))
        with self._table.lock:
            counts = list(self._table.get(key) or (0,) * len(self._totals)) if key is not None else []
            refusal = self.refusal(sum(self._totals) if new else None, ip, sum(counts))
            if refusal is not None:
                return refusal
            if key is not None:
                counts[self._slot] += 1
                if not self._table.put(key, tuple(counts)):
                    return "too many connections"
            if new:
                self._totals[self._slot] += 1
            return None

    def _count_out(self, ip: Optional[str]) -> None:
        key = None if ip is None else table_key(client_key(ip))
        with self._table.lock:
            self._totals[self._slot] -= 1
            counts = list(self._table.get(key) or ()) if key is not None else []
            if not counts:
                return
            counts[self._slot] = max(0, counts[self._slot] - 1)
            if any(counts):
                self._table.put(key, tuple(counts))
            else:
                self._table.delete(key)

    def count_ip(self, ip: str) -> int:
        """Live connections counted under ``ip``'s key, on every worker."""
        with self._table.lock:
            return sum(self._table.get(table_key(client_key(ip))) or ())

    def count_host(self) -> int:
        """Live connections on every worker."""
        return sum(self._totals)


class HostPasswordChecks(PasswordChecks):
    """:class:`~pop3frame.auth.PasswordChecks` whose ``limit`` places are shared by every worker.

    A place is a record lock on one octet of the shared memory's file,
    taken without waiting; the kernel drops it if its worker dies, so a
    worker killed in the middle of a check takes no place with it.  This
    worker's threads wait in its own line, first come first served, as in
    one process; a place given back here goes to this line's first waiter,
    and that waiter also tries for places freed by other workers every
    :attr:`retry` seconds (places are not handed between processes).
    """

    retry = 0.01

    def __init__(self, memory: SharedMemory, first_octet: int, limit: int, clock: Callable[[], float],
                 poll: float = 1.0) -> None:
        super().__init__(limit, clock, poll)
        self._memory = memory
        self._octets = range(first_octet, first_octet + limit)
        self._held: List[int] = []
        self._next = 0

    def _take(self) -> bool:
        for k in range(self.limit):
            # Start where the last search ended: the places early in the
            # range are the likeliest to be taken.
            octet = self._octets[(self._next + k) % self.limit]
            if self._memory.try_lock(octet):
                self._held.append(octet)
                self._next = (self._next + k + 1) % self.limit
                return True
        return False

    def _give(self) -> None:
        self._memory.unlock(self._held.pop())

    @property
    def running(self) -> int:
        """Checks holding a place now, in this worker."""
        with self._mutex:
            return len(self._held)


def private_directory(uid: Optional[int] = None, gid: Optional[int] = None) -> str:
    """A new 0700 directory for one server's lock files, owned by ``uid``/``gid`` if given.

    Under ``$RUNTIME_DIRECTORY`` (systemd's ``RuntimeDirectory=``) if set,
    else the temporary directory.  Private to one server: two servers on one
    host that must exclude each other name a common ``--lock-dir``.
    """
    base = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
    path = tempfile.mkdtemp(prefix="pop3frame-locks-", dir=base)
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    return path


def _capacity(at_least: int) -> int:
    """The power of two whose three quarters hold ``at_least`` entries."""
    n = 4
    while n * 3 // 4 < at_least:
        n *= 2
    return n


class HostState:
    """Everything ``workers`` worker processes share; made by the supervisor before the first fork.

    Each worker then asks for its views: :meth:`locks`, :meth:`stats`,
    :meth:`tracker`, :meth:`share`.  :meth:`release` (in the supervisor)
    clears what a dead worker held; :meth:`close` removes the lock
    directory.  Sizes are fixed here: the connection table holds twice
    the ``max_connections`` of the start-up configuration, at least (a
    reload cannot raise the limit beyond that:
    :meth:`HostConnectionTracker.set_limits`), the failure table :attr:`FAILURE_RECORDS`
    address keys, the LOGIN-DELAY table :attr:`LOGIN_RECORDS` mailboxes,
    and ``max_password_checks`` is the limit for all workers together.
    """

    FAILURE_RECORDS = 16384
    LOGIN_RECORDS = 65536

    def __init__(self, config: ServerConfig, workers: int, *, uid: Optional[int] = None,
                 gid: Optional[int] = None) -> None:
        self.workers = workers
        #: Password checks at once, on all workers together.
        self.password_checks = config.max_password_checks
        self._owner = os.getpid()
        connection_values = "%di" % workers
        layout = [
            ("stats", 8 * (workers + 1) * len(COUNTERS)),
            ("totals", 8 * workers),
            ("connections", SharedTable.size(_capacity(2 * config.max_connections), connection_values)),
            ("failures", SharedTable.size(_capacity(self.FAILURE_RECORDS), "4d")),
            ("logins", SharedTable.size(_capacity(self.LOGIN_RECORDS), "d") if config.login_delay > 0 else 0),
        ]
        offsets, size = {}, 0
        for name, length in layout:
            offsets[name] = size
            size += _align(length)
        self.memory = SharedMemory(size)
        view = memoryview(self.memory.buffer)
        self._stats = view[offsets["stats"]:offsets["totals"]].cast("q")
        self._totals = view[offsets["totals"]:offsets["connections"]].cast("q")
        self.connections = SharedTable(self.memory, offsets["connections"], _capacity(2 * config.max_connections),
                                       connection_values, lock_octet=0)
        self.failure_records = SharedRecords(SharedTable(self.memory, offsets["failures"],
                                                         _capacity(self.FAILURE_RECORDS), "4d", lock_octet=1))
        self.login_records = None
        if config.login_delay > 0:
            self.login_records = SharedRecords(SharedTable(self.memory, offsets["logins"],
                                                           _capacity(self.LOGIN_RECORDS), "d", lock_octet=2))
        self.lock_dir = private_directory(uid, gid)

    def locks(self) -> FileLockManager:
        """The host's mailbox locks (call in each worker)."""
        return FileLockManager(self.lock_dir)

    def stats(self, slot: Optional[int]) -> SharedStats:
        """The counters for worker ``slot`` (None: the supervisor's own row)."""
        row = self.workers if slot is None else slot
        return SharedStats(self._stats, self.workers + 1, row, lambda: sum(self._totals))

    def tracker(self, slot: int, context: SessionContext) -> HostConnectionTracker:
        """The connection tracker of worker ``slot``."""
        config = context.config
        return HostConnectionTracker(self.connections, self._totals, slot, config.max_connections,
                                     config.max_connections_per_ip, context.is_trusted)

    def share(self, context: SessionContext) -> SessionContext:
        """Give ``context`` the host's failed-login and LOGIN-DELAY records and password-check places."""
        config = context.config
        context.failures = FailureThrottle.for_config(config, self.failure_records)
        if self.login_records is not None:
            context.login_delays = LoginDelayTracker.for_config(config, self.login_records)
        context.password_checks = HostPasswordChecks(self.memory, PLACES, self.password_checks, config.clock,
                                                     poll=min(1.0, config.poll_interval))
        return context

    def release(self, slot: int) -> bool:
        """Forget the connections of worker ``slot``, which is gone (its sockets closed with it).

        Never waits: False, with nothing done, while another process holds
        the connection table's lock (a worker stopped in the middle of an
        admission); call again later, and fork no worker for ``slot`` before
        this returned True, or it would lose its own counts.
        """
        lock = self.connections.lock
        if not lock.try_acquire():
            return False
        try:
            self._totals[slot] = 0
            for key, counts in self.connections.items():
                if counts[slot]:
                    rest = counts[:slot] + (0,) + counts[slot + 1:]
                    if any(rest):
                        self.connections.put(key, rest)
                    else:
                        self.connections.delete(key)
        finally:
            lock.__exit__()
        return True

    def close(self) -> None:
        """Remove the lock directory (in the process that made it, once the workers are gone)."""
        if os.getpid() == self._owner:
            shutil.rmtree(self.lock_dir, ignore_errors=True)
