"""Reading a file the server is configured with: a regular file, or an error.

A passwd-file, certificate or key path that names a FIFO would block the
reader in ``open()`` until some process writes to it -- at start-up, or for
every login once the file is re-read -- and ``/dev/zero`` would be read
until memory runs out.  :func:`read_regular` opens without waiting
(``O_NONBLOCK``, which regular files ignore) and reads only what ``fstat``
calls a regular file, so the check and the read are of the same file.
"""
from __future__ import annotations

import errno
import os
import stat

__all__ = ["read_regular"]

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
#: What a file that is not regular is, for the error text.
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def read_regular(path: str) -> bytes:
    """The whole contents of the regular file ``path`` (a symlink to one is fine).

    Raises ``OSError``: the open's own (``FileNotFoundError``,
    ``PermissionError`` ...), ``EISDIR`` for a directory, ``EINVAL`` with
    ``strerror`` naming the kind for a FIFO, device or socket.  Never blocks
    on a FIFO.
    """
    fd = os.open(path, _FLAGS)
    with open(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise OSError(errno.EINVAL, "%s, not a regular file" % kind, path)
        return f.read()
