"""Conformance harness for the directory adapter (multi-user)."""
import itertools
import os

from pop3frame.adapters.directory import DirectoryAdapter
from pop3frame.adapters.passwdfile import PasswdFile, set_password

_names = itertools.count()


class Harness:
    name = "directory"

    def __init__(self, tmp_path):
        self.root = str(tmp_path / "reports")
        os.makedirs(self.root)
        self.passwd = str(tmp_path / "passwd")
        open(self.passwd, "w").close()
        self.adapter = DirectoryAdapter(self.root, PasswdFile(self.passwd))
        self.mtime = 1_700_000_000

    def make_adapter(self):
        return self.adapter

    def add_user(self, user, password):
        set_password(self.passwd, user, password, scheme="PLAIN")
        os.makedirs(os.path.join(self.root, user), exist_ok=True)

    def deliver(self, user, data):
        path = os.path.join(self.root, user, "report-%06d.eml" % next(_names))
        with open(path, "wb") as f:
            f.write(data)
        # Distinct, increasing mtimes give the delivery order on any filesystem.
        self.mtime += 1
        os.utime(path, (self.mtime, self.mtime))
        return path

    def remove(self, user, path):
        os.unlink(path)

    def replace(self, user, path, data):
        """Rewritten in place (same inode), as a report generator reopening its file does."""
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate()

    def close(self):
        pass
