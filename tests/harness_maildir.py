"""Conformance harness for the Maildir adapter (with a passwd-file)."""
import itertools
import os

from pop3frame.adapters.maildir import MaildirAdapter
from pop3frame.adapters.passwdfile import PasswdFile, set_password

_counter = itertools.count()


def deliver_like_an_mda(root, user, data, flags=None):
    """Write into tmp/ and rename into new/ (or cur/ with flags), as Postfix does."""
    home = os.path.join(root, user)
    for sub in ("new", "cur", "tmp"):
        os.makedirs(os.path.join(home, sub), exist_ok=True)
    name = "%d.M%dP%d.testhost" % (1700000000 + next(_counter), next(_counter), os.getpid())
    tmp = os.path.join(home, "tmp", name)
    with open(tmp, "wb") as f:
        f.write(data)
    if flags is None:
        os.rename(tmp, os.path.join(home, "new", name))
    else:
        os.rename(tmp, os.path.join(home, "cur", name + ":2," + flags))
    return name


class Harness:
    name = "maildir"

    def __init__(self, tmp_path):
        self.root = str(tmp_path / "mail")
        self.passwd = str(tmp_path / "passwd")
        os.makedirs(self.root)
        open(self.passwd, "w").close()
        self.adapter = MaildirAdapter(self.root, PasswdFile(self.passwd))

    def make_adapter(self):
        return self.adapter

    def add_user(self, user, password):
        set_password(self.passwd, user, password, scheme="PLAIN")

    def deliver(self, user, data):
        return deliver_like_an_mda(self.root, user, data)

    def _path(self, user, name):
        for sub in ("new", "cur"):
            for entry in os.listdir(os.path.join(self.root, user, sub)):
                if entry.split(":", 1)[0] == name:
                    return os.path.join(self.root, user, sub, entry)
        raise FileNotFoundError(name)

    def remove(self, user, name):
        os.unlink(self._path(user, name))

    def replace(self, user, name, data):
        """As Maildir tools change a message: a new file renamed over the name."""
        path = self._path(user, name)
        tmp = os.path.join(self.root, user, "tmp", name)
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, path)

    def close(self):
        pass
