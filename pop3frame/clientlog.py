"""What a client can put into the log: its text, quoted and clipped.

Anything a client chose (a user name, up to 8 KiB in a SASL response; a
mechanism; a command) reaches a log line only through :func:`quoted`:
escaped as ``repr()`` escapes it, so it can hold no line break, control
character or terminal escape that forges or hides a line, and at most
:data:`CLIP` characters of it, so one failed login cannot write kilobytes.
"""
from __future__ import annotations

__all__ = ["CLIP", "quoted", "clipped"]

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
