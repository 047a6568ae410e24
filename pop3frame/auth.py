"""Login bookkeeping shared by all sessions of a server.

Every decision here reads an injected clock, never ``time`` directly, so
tests can move time in any thread without sleeping.
"""
from __future__ import annotations

import threading
from typing import Callable, Dict

__all__ = ["LoginDelayTracker", "FailureThrottle"]


class LoginDelayTracker:
    """RFC 2449 section 6.5 LOGIN-DELAY: minimum seconds between logins to a mailbox."""

    def __init__(self, delay: float, clock: Callable[[], float]) -> None:
        self.delay = delay
        self._clock = clock
        self._mutex = threading.Lock()
        self._last: Dict[str, float] = {}

    def check_and_record(self, mailbox: str) -> bool:
        """Record a login now; return False if the previous one was too recent."""
        if self.delay <= 0:
            return True
        now = self._clock()
        with self._mutex:
            last = self._last.get(mailbox)
            if last is not None and now - last < self.delay:
                return False
            self._last[mailbox] = now
            # Bound the table: entries older than the delay decide nothing.
            if len(self._last) > 10000:
                self._last = {k: v for k, v in self._last.items() if now - v < self.delay}
        return True


class FailureThrottle:
    """Failed logins per client address, across connections.

    The first ``free`` failures cost nothing (people mistype); after that
    each failure closes the address for 1, 2, 4 ... seconds, capped at
    ``max_delay``, during which every login attempt from it is refused
    without looking at the password.  Reconnecting does not help: the key is
    the address, not the connection.  A successful login clears the record.
    """

    #: Records this long without a failure are forgotten.
    FORGET_AFTER = 3600.0

    def __init__(self, free: int, max_delay: float, clock: Callable[[], float]) -> None:
        self.free = free
        self.max_delay = max_delay
        self._clock = clock
        self._mutex = threading.Lock()
        self._records: Dict[str, list] = {}  # address -> [failures, blocked until, last failure]

    def blocked_for(self, address: str) -> float:
        """Seconds until ``address`` may try again (0 if it may now)."""
        with self._mutex:
            record = self._records.get(address)
            return max(0.0, record[1] - self._clock()) if record else 0.0

    def failure(self, address: str) -> None:
        now = self._clock()
        with self._mutex:
            record = self._records.setdefault(address, [0, 0.0, now])
            if now - record[2] > self.FORGET_AFTER:
                record[0] = 0
            record[0] += 1
            record[2] = now
            over = record[0] - self.free
            if over > 0:
                record[1] = now + min(2.0 ** (over - 1), self.max_delay)
            if len(self._records) > 100000:
                self._records = {a: r for a, r in self._records.items() if now - r[2] < self.FORGET_AFTER}

    def success(self, address: str) -> None:
        with self._mutex:
            self._records.pop(address, None)
