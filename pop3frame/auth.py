"""Login bookkeeping shared by all sessions of a server.

Every decision here reads an injected clock, never ``time`` directly, so
tests can move time in any thread without sleeping.
"""
from __future__ import annotations

import threading
from typing import Callable, Dict

__all__ = ["LoginDelayTracker"]


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
