"""The paths a server will use, checked before it serves.

``pop3frame serve`` runs :func:`problems` after it dropped privileges and
before it opens the store, so every path is checked as the user that will
serve: pop3frame's own code, the mail root (Maildir, mbox, directory), the
passwd-file (readable, no malformed line), and what the server creates (the
SQLite store, the lock directory).  ``pop3frame check-config`` runs the same checks, as that user
too (:func:`problems_as`, in a child process when it runs as root), and
what ``serve`` reads or writes before the switch: the pid file's directory,
the TLS certificate and key (:func:`load_tls`).

Nothing is created or changed.  A problem is ``(key, message)``: ``key``
the config file key (``adapter.path``), ``message`` one line.
"""
from __future__ import annotations

import json
import os
import pwd
import ssl
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

from .configfile import DEFAULT_DB, Settings
from .failures import reason
from .regularfile import read_regular

if TYPE_CHECKING:
    from .tls import TLSCertificates

__all__ = ["Problem", "problems", "problems_as", "pid_file_problems", "load_tls", "tls_reason"]

Problem = Tuple[str, str]

#: Malformed passwd-file lines reported one by one; beyond, one summary line.
MAX_LINES_REPORTED = 5


def _who() -> str:
    uid = os.geteuid()
    try:
        return "user %s" % pwd.getpwuid(uid).pw_name
    except KeyError:
        return "uid %d" % uid


def _denied(path: str) -> str:
    return "%s: permission denied for %s" % (path, _who())


def _directory(key: str, path: str, what: str) -> List[Problem]:
    """An existing directory the server reads below."""
    if not os.path.exists(path):
        return [(key, "no such directory: %s (the %s)" % (path, what))]
    if not os.path.isdir(path):
        return [(key, "not a directory: %s (the %s)" % (path, what))]
    if not os.access(path, os.R_OK | os.X_OK):
        return [(key, _denied(path))]
    return []


def _creatable(key: str, path: str, what: str) -> List[Problem]:
    """A directory the server writes in, made (with its parents) if missing."""
    path = os.path.abspath(path)
    existing = path
    for _ in range(path.count(os.sep) + 1):  # up to the root, bounded
        if os.path.exists(existing):
            break
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return [(key, "cannot create %s (the %s): %s is not a directory" % (path, what, existing))]
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == path:
            return [(key, "%s (the %s): cannot write in it as %s" % (path, what, _who()))]
        return [(key, "cannot create %s (the %s): %s" % (path, what, _denied(existing)))]
    return []


def _sqlite(key: str, path: str) -> List[Problem]:
    if os.path.isdir(path):
        return [(key, "%s is a directory, not a SQLite file" % path)]
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        return [(key, _denied(path))]
    # SQLite writes its -wal and -shm files next to the database.
    return _creatable(key, os.path.dirname(os.path.abspath(path)), "directory of the SQLite store")


def _mbox(key: str, template: str) -> List[Problem]:
    if "{user}" not in template:
        return _directory(key, template, "mbox directory")
    # The directory above the first path component that names the user.
    head = template[: template.index("{user}")]
    return _directory(key, os.path.dirname(head) or ".", "directory of the mbox files")


def _read(key: str, path: str) -> Tuple[Optional[bytes], List[Problem]]:
    """The contents of a file the server reads, or the problem reading it."""
    try:
        return read_regular(path), []  # a FIFO or /dev/zero is refused, not read for ever
    except FileNotFoundError:
        return None, [(key, "no such file: %s" % path)]
    except OSError as exc:
        return None, [(key, "cannot read %s as %s: %s" % (path, _who(), exc.strerror or exc))]


def _passwd(key: str, path: str) -> List[Problem]:
    from pop3frame.adapters.passwdfile import malformed_lines

    data, found = _read(key, path)
    if data is None:
        return found
    bad = malformed_lines(data)
    found = [(key, "%s:%d: malformed line (expected user:{SCHEME}hash)" % (path, n))
             for n in bad[:MAX_LINES_REPORTED]]
    if len(bad) > MAX_LINES_REPORTED:
        found.append((key, "%s: %d more malformed lines" % (path, len(bad) - MAX_LINES_REPORTED)))
    return found


def _own_code() -> List[Problem]:
    """pop3frame imports more of itself while it serves (the demo mail, SASL,
    a store's helpers): its packages must stay readable after the switch.  A
    checkout or venv in root's home (mode 0700) is not, and each late import
    failed at the first login that needed it, or at start with "sqlite:
    cannot open pop3frame.db: No module named 'pop3frame.adapters.memory'"."""
    from . import adapters

    for package in (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(adapters.__file__))):
        if not os.access(os.path.join(package, "__init__.py"), os.R_OK) or not os.access(package, os.R_OK | os.X_OK):
            return [("user", "%s cannot read pop3frame's code in %s, which it imports while serving: install "
                             "pop3frame where that user can read it (a venv under /opt, as docs/pop3frame.service "
                             "does)" % (_who(), package))]
    return []


def problems(settings: Settings) -> List[Problem]:
    """Every problem with the paths of ``settings``, checked as the current user."""
    found: List[Problem] = _own_code()
    spec = settings.adapter
    if spec.type == "sqlite":
        found += _sqlite("adapter.path", spec.path or DEFAULT_DB)
    elif spec.type in ("maildir", "directory") and spec.path:
        found += _directory("adapter.path", spec.path, "%s root" % spec.type)
    elif spec.type == "mbox" and spec.path:
        found += _mbox("adapter.path", spec.path)
    if spec.passwd:
        found += _passwd("adapter.passwd", spec.passwd)
    if settings.lock_backend == "file" and settings.lock_dir:
        found += _creatable("locks.directory", settings.lock_dir, "lock directory")
    return found


def tls_reason(exc: Exception) -> str:
    """Why a certificate and key did not load, in words (OpenSSL's own are cryptic)."""
    if isinstance(exc, ssl.SSLError):
        return "not a PEM certificate chain and its private key (OpenSSL: %s)" % (exc.reason or exc)
    return reason(exc)


def load_tls(settings: Settings) -> Tuple[Optional["TLSCertificates"], List[Problem]]:
    """The certificate and key of ``settings``, loaded as the current user
    (``serve`` reads them before it switches user), or the problems: each
    file that cannot be read under its own key (a missing key file is not
    the certificate's fault), then a pair that does not load."""
    if not (settings.cert and settings.key):
        return None, []  # one without the other: a mistake the settings already name
    found: List[Problem] = []
    for key, path in (("tls.cert", settings.cert), ("tls.key", settings.key)):
        found += _read(key, path)[1]
    if found:
        return None, found
    from .tls import TLSCertificates

    try:
        return TLSCertificates(settings.cert, settings.key), []
    except (OSError, ssl.SSLError) as exc:
        return None, [("tls.cert", "cannot load %s with the key %s: %s" % (settings.cert, settings.key,
                                                                         tls_reason(exc)))]


def pid_file_problems(settings: Settings) -> List[Problem]:
    """The pid file's directory, checked as the current user (``serve`` writes it before switching)."""
    if not settings.pid_file:
        return []
    directory = os.path.dirname(os.path.abspath(settings.pid_file))
    if not os.path.isdir(directory):
        return [("pid_file", "no such directory: %s" % directory)]
    if not os.access(directory, os.W_OK | os.X_OK):
        return [("pid_file", _denied(directory))]
    return []


def problems_as(settings: Settings, switch: Optional[Callable[[], None]]) -> List[Problem]:
    """:func:`problems` as the serving user: in a child process that calls
    ``switch()`` (dropping privileges) first; in this process if ``switch``
    is None.  A failing switch is itself reported, under the key ``user``."""
    if switch is None:
        return problems(settings)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: switch, check, report, and exit without cleanup
        status = 1
        try:
            os.close(read_end)
            try:
                switch()
                found = problems(settings)
            except (OSError, ValueError) as exc:
                found = [("user", "cannot switch to check the paths as that user: %s" % exc)]
            with os.fdopen(write_end, "wb") as out:
                out.write(json.dumps(found).encode("utf-8"))
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as report:
        data = report.read()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        return [("user", "the check as that user failed (exit status %d)" % status)]
    return [(key, message) for key, message in json.loads(data.decode("utf-8"))]
