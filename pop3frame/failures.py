"""Expected failures in one line: what went wrong, without a traceback.

A mail server's ordinary bad days (the network is down, an upstream server
refuses, the store is unavailable) are not bugs: the operator needs one
log line with the cause, once per event, not forty lines of chained
traceback.  :func:`reason` reduces an exception to that cause;
:func:`log_failure` logs it, and adds the traceback only when the logger is
at DEBUG.  Bugs (any exception nobody expected) keep ``logger.exception``.
"""
from __future__ import annotations

import logging
from typing import Any

__all__ = ["reason", "log_failure"]


def reason(exc: BaseException) -> str:
    """The cause of ``exc`` in one line, e.g. ``Connection refused``.

    A wrapper that carries the underlying error (``urllib.error.URLError``'s
    ``reason``) is looked through; an ``OSError`` gives its ``strerror``;
    anything else the first line of its text, or its type's name.  The text
    may quote what a peer sent (a database echoes the value it refused, an
    upstream server its own reply), so characters that are not printable
    (ESC, NUL, bidirectional controls) come escaped as ``repr()`` does.
    """
    for _ in range(8):  # wrappers of wrappers, bounded
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            break
        exc = inner
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    return line if line.isprintable() else repr(line)[1:-1]


def log_failure(logger: logging.Logger, level: int, message: str, *args: Any, exc: BaseException) -> None:
    """Log ``message % args`` plus ``: <reason>`` at ``level``; the traceback only at DEBUG."""
    logger.log(level, message + ": %s", *args, reason(exc),
               exc_info=exc if logger.isEnabledFor(logging.DEBUG) else None)
