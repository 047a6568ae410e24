"""What a client can put into the log: its text, quoted and clipped, and lines by the minute.

Anything a client chose (a user name, up to 8 KiB in a SASL response; a
mechanism; a command) reaches a log line only through :func:`quoted`:
escaped as ``repr()`` escapes it, so it can hold no line break, control
character or terminal escape that forges or hides a line, and at most
:data:`CLIP` characters of it, so one failed login cannot write kilobytes.

How many lines a client address causes is bounded by :class:`LogBudget`:
a client that connects and hangs up in a loop once wrote 2,900 session
lines a second, and one refused for too many connections 5,300.
"""
from __future__ import annotations

import collections
import logging
import math
import threading
from typing import Callable, List, Tuple

from .config import client_key
from .protocol import plural

__all__ = ["CLIP", "quoted", "clipped", "LogBudget"]

logger = logging.getLogger("pop3frame.clientlog")

#: Characters of a client's text a log line shows (the longest local part
#: of an address, RFC 5321 section 4.5.3.1.1); the rest becomes "...".
CLIP = 64


def clipped(text: str, limit: int = CLIP) -> str:
    """``text`` cut to ``limit`` characters, ``...`` after it if it was longer.

    For structured fields (the JSON log's ``user``), whose format escapes;
    a text line takes :func:`quoted`.
    """
    return text if len(text) <= limit else text[:limit] + "..."


def quoted(text: str, limit: int = CLIP) -> str:
    """``text`` as a log line shows it: ``'alice'``, escaped as ``repr()``
    does, at most ``limit`` of its characters, ``...`` after the quote if cut.

    The result holds printable characters only (no CR, LF, NUL, ESC, no
    Unicode line separator or bidirectional control) and is at most
    ``10 * limit + 5`` characters long, however long ``text`` is.
    """
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


class LogBudget:
    """At most ``lines`` log lines per ``window`` seconds about one client address.

    Every line a connection causes (its session's lines, its summary, the
    refusal of a connection over a limit, a bad PROXY header) asks
    :meth:`allow` first, with the client's address, and is dropped when it
    says no.  The count is per address key (an IPv6 client's /64, see
    :func:`~pop3frame.config.client_key`), in fixed windows that start at
    an address's first line, on ``clock`` (the server's injectable one).
    Once an address's window is over, one WARNING says how many of its
    lines were dropped, if any: at its next line, or from :meth:`sweep`,
    which the accepting thread calls between connections, so the summary
    also comes when the address has gone quiet.  ``exempt(address)``
    (the trusted networks) are never counted; nor is a connection with no
    address.  ``lines = 0`` turns the budget off.

    Memory: a few numbers per address with a window open, at most
    ``max_addresses`` of them; past that the oldest window ends early.
    Thread-safe; O(1) per line.
    """

    def __init__(self, lines: int, clock: Callable[[], float], exempt: Callable[[str], bool] = lambda ip: False,
                 window: float = 60.0, max_addresses: int = 10000) -> None:
        self.lines = lines
        self.window = window
        self.max_addresses = max_addresses
        self._clock = clock
        self._exempt = exempt
        self._mutex = threading.Lock()
        #: address key -> [window start, lines allowed, lines dropped], by window start.
        self._windows: "collections.OrderedDict[str, List[float]]" = collections.OrderedDict()

    def allow(self, address: str) -> bool:
        """Count a line about ``address``; False if it must not be logged."""
        if self.lines <= 0 or not address or self._exempt(address):
            return True
        key = client_key(address)
        now = self._clock()
        with self._mutex:
            ended = self._expire(now)
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = [now, 0, 0]
                if len(self._windows) > self.max_addresses:
                    ended.append(self._end(next(iter(self._windows)), now))
            allowed = window[1] < self.lines
            window[1 if allowed else 2] += 1
        self._report(ended)
        return allowed

    def sweep(self) -> None:
        """Say what was dropped in the windows that are over (cheap when none is)."""
        if self._windows:
            with self._mutex:
                ended = self._expire(self._clock())
            self._report(ended)

    def __len__(self) -> int:
        """Addresses with a window open."""
        return len(self._windows)

    def _expire(self, now: float) -> List[Tuple[str, int, float]]:
        """End the windows that are over (mutex held); (key, dropped, seconds) of each."""
        ended = []
        windows = self._windows
        while windows:
            key, window = next(iter(windows.items()))
            if now - window[0] < self.window:
                break
            ended.append(self._end(key, now))
        return ended

    def _end(self, key: str, now: float) -> Tuple[str, int, float]:
        start, _, dropped = self._windows.pop(key)
        return key, int(dropped), min(now - start, self.window)

    @staticmethod
    def _report(ended: List[Tuple[str, int, float]]) -> None:
        for key, dropped, seconds in ended:
            if dropped:
                logger.warning("%s about %s suppressed in the last %d s (max_log_lines_per_ip)",
                               plural(dropped, "more log line"), key, max(1, math.ceil(seconds)))
