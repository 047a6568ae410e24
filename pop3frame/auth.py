"""Login bookkeeping shared by all sessions of a server.

Every decision here reads an injected clock, never ``time`` directly, so
tests can move time in any thread without sleeping.
"""
from __future__ import annotations

import collections
import threading
from typing import TYPE_CHECKING, Callable, ContextManager, Deque, Dict, List, Optional

from .config import client_key

if TYPE_CHECKING:
    from .config import ServerConfig

__all__ = ["LoginDelayTracker", "FailureThrottle", "PasswordChecks", "Records"]


#: When a record stops deciding anything (clock seconds), from its values.
Expiry = Callable[[List[float]], float]


class Records:
    """Records of floats by key (client address, mailbox), in this process.

    The storage behind :class:`FailureThrottle` and
    :class:`LoginDelayTracker`; :class:`pop3frame.hostwide.SharedRecords`
    has the same methods over memory shared by pre-forked workers.  Callers
    hold ``mutex`` around every call.  Past ``limit`` records the expired
    ones go, and with ``bounded``, if that is not enough, the older half (by
    expiry): each insertion costs O(1) on average.
    """

    def __init__(self, limit: int, bounded: bool = True) -> None:
        self.limit = limit
        self.bounded = bounded
        self.mutex: ContextManager = threading.Lock()
        self._records: Dict[str, List[float]] = {}

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str, now: float, expires: Expiry) -> Optional[List[float]]:
        """The record of ``key`` (a copy to change and :meth:`put` back), or None if none is alive."""
        record = self._records.get(key)
        if record is not None and expires(record) < now:
            del self._records[key]
            return None
        return None if record is None else list(record)

    def put(self, key: str, record: List[float], now: float, expires: Expiry) -> None:
        self._records[key] = record
        if len(self._records) > self.limit:
            records = {k: r for k, r in self._records.items() if expires(r) >= now}
            if self.bounded and len(records) > self.limit // 2:
                records = dict(sorted(records.items(), key=lambda item: expires(item[1]))[-(self.limit // 2):])
            self._records = records


class LoginDelayTracker:
    """RFC 2449 section 6.5 LOGIN-DELAY: minimum seconds between logins to a mailbox.

    ``records``: where the last login times live (default: this process,
    unbounded: only mailboxes that logged in have one).
    """

    def __init__(self, delay: float, clock: Callable[[], float], records: Optional[Records] = None) -> None:
        self.delay = delay
        self._clock = clock
        self._records = records if records is not None else Records(10000, bounded=False)

    @classmethod
    def for_config(cls, config: "ServerConfig", records: Optional[Records] = None) -> "LoginDelayTracker":
        return cls(config.login_delay, config.clock, records)

    def check_and_record(self, mailbox: str) -> bool:
        """Record a login now; return False if the previous one was too recent."""
        if self.delay <= 0:
            return True
        now = self._clock()
        with self._records.mutex:
            last = self._records.get(mailbox, now, self._expires)
            if last is not None and now - last[0] < self.delay:
                return False
            self._records.put(mailbox, [now], now, self._expires)
        return True

    def _expires(self, record: List[float]) -> float:
        return record[0] + self.delay


class FailureThrottle:
    """Failed logins per client address, across connections: how long to withhold answers.

    Guessing passwords must cost time, but the real user must still get in.
    So nothing is ever refused here; instead the answer to an authentication
    attempt is *withheld* until a "not before" time:

    * the first ``free`` failures of an address are answered at once (people
      mistype); each further one is answered 1, 2, 4 ... seconds later,
      capped at ``max_delay``;
    * a success is withheld until the address's latest failure has been
      answered.  Otherwise a client could tell a right guess from a wrong one
      by the speed of the answer and hang up on every slow one, skipping the
      delay altogether.  A real user who logs in after the guessing stopped
      waits for nothing.

    The key is the client address (an IPv6 one's /64, see
    :func:`~pop3frame.config.client_key`), so reconnecting does not reset
    anything.
    A success does not clear the record either (an attacker holding any valid
    account could otherwise reset its count between guesses); a record is
    forgotten ``FORGET_AFTER`` seconds after its last failure.

    Optional lockout: with ``lockout_failures`` > 0, an address that reaches
    that many failures is shut out for ``lockout_duration`` seconds, during
    which :meth:`locked_for` is positive and the session refuses every login
    from it without checking the password.  Off by default: it lets an
    attacker lock out a user who shares the attacker's address (NAT).
    """

    #: Records this long without a failure are forgotten.
    FORGET_AFTER = 3600.0

    def __init__(
        self,
        free: int,
        max_delay: float,
        clock: Callable[[], float],
        lockout_failures: int = 0,
        lockout_duration: float = 0.0,
        max_records: int = 100000,
        records: Optional[Records] = None,
    ) -> None:
        #: Addresses remembered at most (about 250 bytes each).  Past it,
        #: forgotten records go, and if that is not enough, the older half
        #: by last failure: guessing from that many addresses at once is
        #: spread thin anyway, and the memory stays bounded.
        self.max_records = max_records
        self.free = free
        self.max_delay = max_delay
        self.lockout_failures = lockout_failures
        self.lockout_duration = lockout_duration
        self._clock = clock
        # address -> [failures, last failure, answer not before, locked until]
        self._records = records if records is not None else Records(max_records)

    @classmethod
    def for_config(cls, config: "ServerConfig", records: Optional[Records] = None) -> "FailureThrottle":
        return cls(config.free_auth_failures, config.max_auth_failure_delay, config.clock,
                   lockout_failures=config.auth_lockout_failures, lockout_duration=config.auth_lockout_duration,
                   records=records)

    def delay(self, failures: int) -> float:
        """Seconds the answer to an address's ``failures``-th failure is withheld."""
        over = failures - self.free
        if over <= 0:
            return 0.0
        # 2.0 ** n overflows past n = 1023; the cap has won long before 64.
        return min(2.0 ** min(over - 1, 64), self.max_delay)

    def failure(self, address: str) -> float:
        """Record a failed authentication now; return when its ``-ERR`` may be sent."""
        now = self._clock()
        address = client_key(address)
        with self._records.mutex:
            record = self._records.get(address, now, self._expires) or [0, now, now, 0.0]
            record[0] += 1
            record[1] = now
            record[2] = now + self.delay(int(record[0]))
            if self.lockout_failures and record[0] >= self.lockout_failures and record[3] <= now:
                record[3] = now + self.lockout_duration
            self._records.put(address, record, now, self._expires)
            return record[2]

    def __len__(self) -> int:
        """Addresses remembered now."""
        with self._records.mutex:
            return len(self._records)

    def not_before(self, address: str) -> float:
        """When the answer to a successful authentication from ``address`` may be sent."""
        now = self._clock()
        with self._records.mutex:
            record = self._records.get(client_key(address), now, self._expires)
        return max(now, record[2]) if record else now

    def locked_for(self, address: str) -> float:
        """Seconds ``address`` stays locked out (0 if it is not; always 0 without lockout)."""
        now = self._clock()
        with self._records.mutex:
            record = self._records.get(client_key(address), now, self._expires)
        return max(0.0, record[3] - now) if record else 0.0

    def _expires(self, record: List[float]) -> float:
        """When a record stops mattering: an hour after its last failure, or when its delay or lockout ends."""
        return max(record[1] + self.FORGET_AFTER, record[2], record[3])


class PasswordChecks:
    """At most ``limit`` password checks at once, server-wide; the rest wait in line.

    A memory-hard hash (Argon2 at 64 MiB) costs its memory for every check
    running, and anyone can start one before logging in, with any user
    name (the store checks a dummy hash for unknown names).  So checks take
    a place here first: peak memory is ``limit`` checks, whatever the number
    of connections, and running more checks than there are cores would not
    finish them sooner anyway.

    Places are handed out first come, first served.  A waiter gives up at
    its ``deadline`` (on ``clock``, the connection's login deadline) or as
    soon as ``gone()`` says its client hung up, checked every ``poll``
    seconds; either way its place in line goes to the next.

    Thread-safe.  The interface is :meth:`acquire` and :meth:`release`;
    the pool of places behind it is :meth:`_take` and :meth:`_give`, which
    :class:`pop3frame.hostwide.HostPasswordChecks` shares between the
    workers of ``serve --workers``.
    """

    def __init__(self, limit: int, clock: Callable[[], float], poll: float = 1.0) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.poll = poll
        self._clock = clock
        self._mutex = threading.Lock()
        self._free = limit
        # One event per waiter, oldest first; release() sets the oldest one's
        # after handing its place over.
        self._line: Deque[threading.Event] = collections.deque()

    @classmethod
    def for_config(cls, config: "ServerConfig") -> "PasswordChecks":
        return cls(config.max_password_checks, config.clock, poll=min(1.0, config.poll_interval))

    #: Seconds between the first waiter's own tries for a place: never for
    #: this class, whose places come back only through :meth:`release`.
    retry = float("inf")

    def acquire(self, deadline: float, gone: Callable[[], bool] = lambda: False) -> bool:
        """Wait for a place; True once this thread holds one (then :meth:`release` it).

        False if ``deadline`` passed or ``gone()`` answered True first.
        """
        with self._mutex:
            if not self._line and self._take():
                return True
            turn = threading.Event()
            self._line.append(turn)
        try:
            while True:
                remaining = deadline - self._clock()
                if remaining <= 0 or gone():
                    break
                wait = min(remaining, self.poll)
                if self._line and self._line[0] is turn:
                    wait = min(wait, self.retry)
                if turn.wait(wait):
                    return True
                with self._mutex:
                    if self._line and self._line[0] is turn and self._take():
                        self._line.popleft()
                        return True
        except BaseException:
            self._leave(turn)
            raise
        self._leave(turn)
        return False

    def _take(self) -> bool:
        """Take a free place from the pool, if there is one (mutex held)."""
        if self._free:
            self._free -= 1
            return True
        return False

    def _give(self) -> None:
        """Put a place back into the pool (mutex held)."""
        self._free += 1

    def _leave(self, turn: threading.Event) -> None:
        with self._mutex:
            if not turn.is_set():
                self._line.remove(turn)
                return
        # The place was handed over just as the waiter gave up: pass it on.
        self.release()

    def release(self) -> None:
        """Give a place back: to the oldest waiter, or to the pool."""
        with self._mutex:
            if self._line:
                self._line.popleft().set()
            else:
                self._give()

    @property
    def running(self) -> int:
        """Checks holding a place now."""
        with self._mutex:
            return self.limit - self._free

    @property
    def waiting(self) -> int:
        """Checks waiting for a place now."""
        with self._mutex:
            return len(self._line)
