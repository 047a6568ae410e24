"""Conformance harness for the IMAP upstream adapter, against a real Dovecot
(:mod:`tests.dovecot`, IMAP only, no TLS).  Messages are put in with IMAP APPEND.

When ``dovecot`` is not installed the harness skips, or fails under
``CI=true`` (``.ci/run`` installs ``dovecot-imapd``).
"""
from __future__ import annotations

import os

from pop3frame.adapters.imap import IMAPUpstreamAdapter
from tests.dovecot import Dovecot, missing_reason


class Harness:
    name = "imap"

    def __init__(self, tmp_path):
        self.skip_reason = missing_reason()
        if self.skip_reason and os.environ.get("CI") == "true":
            raise RuntimeError("CI=true but " + self.skip_reason)
        self.dovecot = None
        if not self.skip_reason:
            self.dovecot = Dovecot().start()

    def make_adapter(self):
        return IMAPUpstreamAdapter("127.0.0.1", self.dovecot.port, timeout=30)

    def add_user(self, user, password):
        self.dovecot.add_user(user, password)

    def deliver(self, user, data):
        self.dovecot.append(user, data)

    def close(self):
        if self.dovecot is not None:
            self.dovecot.cleanup()
