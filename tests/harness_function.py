"""Conformance harness for the function adapter, with ``on_delete``.

The mail function returns the bytes it was given, so every byte-exact test
of the suite applies.  Users are checked by a callable rather than a fixed
table because the suite adds users while the server runs.
"""
import itertools
import threading

from pop3frame.adapters.function import FunctionAdapter


class Harness:
    name = "function"

    def __init__(self, tmp_path):
        self._lock = threading.Lock()
        self._passwords = {}
        self._boxes = {}  # user -> [(uid, bytes)], in delivery order
        self._ids = itertools.count(1)

    def make_adapter(self):
        return FunctionAdapter(self._mail, authenticate=self._check, on_delete=self._delete)

    def _check(self, user, password):
        with self._lock:
            return self._passwords.get(user) == password

    def _mail(self, user):
        with self._lock:
            return list(self._boxes.get(user, ()))

    def _delete(self, user, uids):
        gone = set(uids)
        with self._lock:
            self._boxes[user] = [item for item in self._boxes.get(user, ()) if item[0] not in gone]

    def add_user(self, user, password):
        with self._lock:
            self._passwords[user] = password
            self._boxes.setdefault(user, [])

    def deliver(self, user, data):
        uid = "fn-%d" % next(self._ids)
        with self._lock:
            self._boxes.setdefault(user, []).append((uid, data))
        return uid

    def remove(self, user, uid):
        self._delete(user, [uid])

    def replace(self, user, uid, data):
        with self._lock:
            self._boxes[user] = [(u, data if u == uid else d) for u, d in self._boxes[user]]

    def close(self):
        pass
