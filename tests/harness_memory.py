"""Conformance harness for the in-memory adapter."""
from pop3frame.adapters.memory import MemoryAdapter


class Harness:
    name = "memory"

    def __init__(self, tmp_path):
        self.adapter = MemoryAdapter(apop=False)

    def make_adapter(self):
        return self.adapter

    def add_user(self, user, password):
        self.adapter.add_user(user, password)

    def deliver(self, user, data):
        self.adapter.deliver(user, data)

    def close(self):
        pass
