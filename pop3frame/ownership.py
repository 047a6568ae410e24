"""Directories a server keeps its state in must be its own.

Names there are no secret (a store's ``-wal`` and ``-shm``, a lock file's
hash of the mailbox name), so whoever may create files in such a directory
could plant one first: a file of their own the server then uses, or a link
it follows.  A directory that others may write is refused, as OpenSSH's
StrictModes refuses a shared ``~/.ssh``.
"""
from __future__ import annotations

import errno
import os

__all__ = ["SharedDirectory", "refuse_shared"]


class SharedDirectory(PermissionError):
    """A directory users other than its owner may write; ``str()`` is ``<directory>: <why>``."""

    def __str__(self) -> str:
        return "%s: %s" % (self.filename, self.strerror)


def refuse_shared(directory: str) -> None:
    """Raise :class:`SharedDirectory` if group or others may create files in ``directory``."""
    if os.stat(directory).st_mode & 0o022:
        raise SharedDirectory(errno.EPERM, "others may write in it (chmod go-w, or a directory of its own)",
                              directory)
