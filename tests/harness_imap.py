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
    #: IMAP messages never change (RFC 3501 section 2.3.1.1): new content is
    #: a new message with a new UID.
    replace = None

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
        return self.dovecot.append(user, data)

    def remove(self, user, uid):
        """Expunged by another IMAP client while the adapter's session reads it."""
        conn = self.dovecot.imap(user)
        try:
            conn.select("INBOX")
            assert conn.uid("STORE", str(uid), "+FLAGS.SILENT", r"(\Deleted)")[0] == "OK"
            assert conn.expunge()[0] == "OK"
        finally:
            conn.logout()

    def close(self):
        if self.dovecot is not None:
            self.dovecot.cleanup()
