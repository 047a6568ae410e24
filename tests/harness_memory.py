"""Conformance harness for the in-memory adapter."""
from pop3frame import MessageInfo
from pop3frame.adapters.memory import MemoryAdapter


class Harness:
    name = "memory"
    #: open_message hands out the stored bytes object itself, which nothing
    #: can change; and the adapter has no way to replace a message.
    replace = None

    def __init__(self, tmp_path):
        self.adapter = MemoryAdapter(apop=False)

    def make_adapter(self):
        return self.adapter

    def add_user(self, user, password):
        self.adapter.add_user(user, password)

    def deliver(self, user, data):
        return self.adapter.deliver(user, data)

    def remove(self, user, uid):
        self.adapter.delete_messages(user, [MessageInfo(uid, 0, key=uid)])

    def close(self):
        pass
