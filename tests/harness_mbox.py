"""Conformance harness for the mbox adapter."""
import os
import re

from pop3frame.adapters.mbox import MboxAdapter
from pop3frame.adapters.passwdfile import PasswdFile, set_password


#: One fixed From_ line date: mail delivered within one second carries the
#: same date in real mboxes, and tests must not depend on the clock.
FROM_DATE = b"Wed Nov 25 12:00:00 2026"


def append_like_an_mda(path, data):
    """Append with mboxrd quoting, as procmail/postfix local do."""
    quoted = re.sub(rb"(?m)^(>*From )", rb">\1", data)
    if not quoted.endswith(b"\n"):
        quoted += b"\n"
    with open(path, "ab") as f:
        f.write(b"From sender@example.org " + FROM_DATE + b"\n" + quoted + b"\n")


class Harness:
    name = "mbox"

    def __init__(self, tmp_path):
        self.root = str(tmp_path / "spool")
        os.makedirs(self.root)
        self.passwd = str(tmp_path / "passwd")
        open(self.passwd, "w").close()
        self.adapter = MboxAdapter(self.root, PasswdFile(self.passwd))

    def make_adapter(self):
        return self.adapter

    def add_user(self, user, password):
        set_password(self.passwd, user, password, scheme="PLAIN")

    def deliver(self, user, data):
        append_like_an_mda(os.path.join(self.root, user), data)

    def close(self):
        pass
