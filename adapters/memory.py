"""Users and messages in dicts: the demo store, and the adapter tests use.

Also the shortest complete example of an adapter: thread-safety comes from
one mutex around the dicts, deletion is all-or-none because it happens
under that mutex in one step.  Passwords are read by
:func:`pop3frame.passwords.stored_password` like every store's: plain text
(which APOP, CRAM-MD5 and SCRAM need), or a hash; ``*``, ``!...`` and empty
values never match.
"""
from __future__ import annotations

import itertools
import threading
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from pop3frame import AdapterBase, MessageInfo, TemporaryFailure
from pop3frame.passwords import plaintext_secret, table_check
from pop3frame.protocol import wire_size

__all__ = ["MemoryAdapter", "demo_adapter"]


class MemoryAdapter(AdapterBase):
    """An in-memory store.  ``deliver()`` adds mail, even while sessions run."""

    def __init__(self, users: Optional[Dict[str, str]] = None, *, apop: bool = True) -> None:
        self._mutex = threading.Lock()
        self._passwords: Dict[str, str] = dict(users or {})
        self._boxes: Dict[str, List[Tuple[str, bytes]]] = {u: [] for u in self._passwords}
        self._uids = itertools.count(1)
        self._apop = apop
        self._check = table_check(self._passwords)

    def add_user(self, username: str, password: str) -> None:
        with self._mutex:
            self._passwords[username] = password
            self._boxes.setdefault(username, [])

    def deliver(self, username: str, message: bytes, uid: Optional[str] = None) -> str:
        """Append a message; returns its unique-id."""
        with self._mutex:
            uid = uid or "m%06d" % next(self._uids)
            self._boxes[username].append((uid, bytes(message)))
            return uid

    def messages(self, username: str) -> List[bytes]:
        """The stored bytes of every message, for assertions."""
        with self._mutex:
            return [body for _, body in self._boxes.get(username, [])]

    def authenticate(self, username: str, password: str) -> bool:
        return self._check(username, password)

    def apop_secret(self, username: str) -> Optional[str]:
        return plaintext_secret(self._passwords.get(username)) if self._apop else None

    def offers_apop(self) -> bool:
        return self._apop

    def list_messages(self, username: str) -> Sequence[MessageInfo]:
        with self._mutex:
            box = self._boxes.get(username, [])
            return [MessageInfo(uid, wire_size(body), key=uid) for uid, body in box]

    def open_message(self, username: str, message: MessageInfo) -> bytes:
        with self._mutex:
            for uid, body in self._boxes.get(username, []):
                if uid == message.key:
                    return body
        raise TemporaryFailure("message no longer exists")

    def delete_messages(self, username: str, messages: Sequence[MessageInfo]) -> None:
        doomed = {m.key for m in messages}
        with self._mutex:
            self._boxes[username] = [(u, b) for u, b in self._boxes[username] if u not in doomed]


DEMO_MESSAGES: Iterable[bytes] = (
    b"From: pop3frame <demo@localhost>\r\nTo: demo@localhost\r\nSubject: Welcome to pop3frame\r\n"
    b"Date: Wed, 25 Nov 2026 09:00:00 +0000\r\nMessage-ID: <welcome@pop3frame>\r\n\r\n"
    b"This mailbox lives in memory. Try LIST, RETR 1, UIDL, TOP 2 0, DELE 1, RSET, QUIT.\r\n",
    b"From: pop3frame <demo@localhost>\r\nTo: demo@localhost\r\nSubject: Byte-stuffing\r\n"
    b"Date: Wed, 25 Nov 2026 09:01:00 +0000\r\nMessage-ID: <dots@pop3frame>\r\n\r\n"
    b".A line that starts with a dot is sent as ..A line\r\n.\r\nThe lone dot above was stuffed too.\r\n",
    b"From: =?utf-8?q?J=C3=BCrgen?= <j@localhost>\nTo: demo@localhost\nSubject: LF line endings\n"
    b"Date: Wed, 25 Nov 2026 09:02:00 +0000\nMessage-ID: <lf@pop3frame>\n\n"
    b"Stored with bare LF; RETR sends CRLF.\n",
)


def demo_adapter() -> MemoryAdapter:
    """A store with user ``demo``, password ``demo`` and three messages."""
    adapter = MemoryAdapter({"demo": "demo"})
    for message in DEMO_MESSAGES:
        adapter.deliver("demo", message)
    return adapter
