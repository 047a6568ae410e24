"""pop3frame.failures: an expected failure is one printable log line."""
from __future__ import annotations

import logging

from pop3frame.failures import log_failure, reason


def test_reason_is_the_first_line_escaped():
    """Text a peer put in an exception (ESC sequences, a right-to-left override, NUL)
    reaches the log escaped: it cannot drive the terminal of whoever reads the log."""
    exc = ValueError('invalid input syntax for type integer: "\x1b]0;pwned\x07\u202eevil\x00"\nLINE 1: ...')
    assert reason(exc) == 'invalid input syntax for type integer: "\\x1b]0;pwned\\x07\\u202eevil\\x00"'
    assert reason(ConnectionRefusedError(111, "Connection refused")) == "Connection refused"
    assert reason(RuntimeError("Größe 100% erreicht")) == "Größe 100% erreicht"
    assert reason(RuntimeError("")) == "RuntimeError"


def test_log_failure_is_one_printable_line_without_traceback(caplog):
    logger = logging.getLogger("pop3frame.test")
    caplog.set_level(logging.INFO)
    log_failure(logger, logging.ERROR, "query failed for %s", "'alice'", exc=RuntimeError("bad \x1b[2J\r\nmore"))
    (record,) = caplog.records
    assert record.getMessage() == "query failed for 'alice': bad \\x1b[2J"
    assert record.exc_info is None
