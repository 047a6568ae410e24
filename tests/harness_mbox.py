"""Conformance harness for the mbox adapter."""
import os
import re

from pop3frame.adapters.mbox import MboxAdapter
from pop3frame.adapters.passwdfile import PasswdFile, set_password


#: One fixed From_ line date: mail delivered within one second carries the
#: same date in real mboxes, and tests must not depend on the clock.
FROM_DATE = b"Wed Nov 25 12:00:00 2026"


def mbox_block(data):
    """``data`` as an MDA stores it: From_ line, mboxrd quoting, final line end, blank line."""
    quoted = re.sub(rb"(?m)^(>*From )", rb">\1", data)
    if not quoted.endswith(b"\n"):
        quoted += b"\n"
    return b"From sender@example.org " + FROM_DATE + b"\n" + quoted + b"\n"


def append_like_an_mda(path, data):
    """Append with mboxrd quoting, as procmail/postfix local do; returns what was appended."""
    block = mbox_block(data)
    with open(path, "ab") as f:
        f.write(block)
    return block


def rewrite_in_place(path, old, new):
    """Replace the first ``old`` in the mbox by ``new`` in place (same inode, then
    truncated), as a mail reader that rewrites the file itself does."""
    with open(path, "r+b") as f:
        content = f.read()
        assert old in content
        f.seek(0)
        f.write(content.replace(old, new, 1))
        f.truncate()


class Harness:
    name = "mbox"
    #: Unique-ids are digests of the message with its From_ line: a byte-identical
    #: message (same envelope sender, same second) delivered after the first was
    #: deleted gets the first one's unique-id, naming exactly the bytes it named.
    content_addressed_uids = True

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
        return append_like_an_mda(os.path.join(self.root, user), data)

    def remove(self, user, block):
        rewrite_in_place(os.path.join(self.root, user), block, b"")

    def replace(self, user, block, data):
        rewrite_in_place(os.path.join(self.root, user), block, mbox_block(data))

    def close(self):
        pass
