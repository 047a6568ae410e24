"""Running as a daemon: logging setup, pid file, privilege drop, signal loop.

Signal handlers only record which signal came; the main thread does the
work (a handler that took locks or logged could deadlock the thread it
interrupted).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import re
import signal
import sys
import threading
from typing import Callable, Dict, List, Optional

__all__ = ["JSONFormatter", "setup_logging", "PidFile", "PidFileError", "drop_privileges", "SignalLoop"]

_SESSION_PREFIX = re.compile(r"\[([0-9a-f]+-[0-9a-f]+)\] ")
#: LogRecord attributes that are not user-supplied ``extra`` fields.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, session id and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: Dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
        }
        m = _SESSION_PREFIX.match(message)
        if m:
            out["session"] = m.group(1)
            message = message[m.end():]
        out["message"] = message
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def setup_logging(level: str = "INFO", json_lines: bool = False, stream=None) -> logging.Handler:
    """Configure the root logger once: text or JSON lines on stderr."""
    root = logging.getLogger()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JSONFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    for old in list(root.handlers):
        if isinstance(old, logging.StreamHandler) and not isinstance(old, logging.FileHandler):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


class PidFileError(Exception):
    """The pid file names a running process, or cannot be written."""


class PidFile:
    """Write our pid to ``path`` (refusing if it names a live process); remove it at exit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()

    def _running(self) -> Optional[int]:
        try:
            with open(self.path) as f:
                pid = int(f.read().strip() or "0")
        except (OSError, ValueError):
            return None
        if pid <= 0 or pid == self.pid:
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def write(self) -> None:
        other = self._running()
        if other is not None:
            raise PidFileError("%s: pop3frame already running as pid %d" % (self.path, other))
        tmp = "%s.%d.tmp" % (self.path, self.pid)
        try:
            with open(tmp, "w") as f:
                f.write("%d\n" % self.pid)
            os.replace(tmp, self.path)
        except OSError as exc:
            raise PidFileError("%s: %s" % (self.path, exc.strerror or exc)) from None

    def chown(self, uid: int, gid: int) -> None:
        try:
            os.chown(self.path, uid, gid)
        except OSError:
            pass

    def remove(self) -> None:
        """Remove the file if it is still ours."""
        try:
            with open(self.path) as f:
                if f.read().strip() != str(self.pid):
                    return
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logging.getLogger("pop3frame.lifecycle").warning("cannot remove pid file %s: %s", self.path, exc)

    def __enter__(self) -> "PidFile":
        self.write()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def resolve_ids(user: Optional[str], group: Optional[str]):
    """(uid, gid, name) for ``user``/``group`` (names or numbers); ValueError names the unknown one."""
    import grp
    import pwd

    uid = gid = None
    name = None
    if user:
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            if not user.isdigit():
                raise ValueError("user: no such user %r" % user) from None
            uid = int(user)
        else:
            uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
    if group:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            if not group.isdigit():
                raise ValueError("group: no such group %r" % group) from None
            gid = int(group)
    return uid, gid, name


def drop_privileges(user: Optional[str], group: Optional[str]) -> None:
    """Switch to ``user`` (and its primary group, or ``group``) for good; after binding ports.

    Supplementary groups are reset to the user's own (or none).  Raises
    PermissionError when not running as root and the ids differ.
    """
    uid, gid, name = resolve_ids(user, group)
    if gid is not None and gid != os.getgid():
        if name is not None:
            os.initgroups(name, gid)
        else:
            os.setgroups([gid])
        os.setgid(gid)
    elif name is not None and os.getuid() == 0:
        os.initgroups(name, os.getgid())
    if uid is not None and uid != os.getuid():
        os.setuid(uid)
    if uid is not None and uid != 0 and os.geteuid() == 0:
        raise PermissionError("privilege drop failed: still root")


class SignalLoop:
    """Run in the main thread until a stop signal; dispatch reload signals.

    ``on_stop()`` runs once for SIGTERM/SIGINT; ``on_reload()`` for each
    SIGHUP.  :meth:`request` does the same as a signal, for tests.
    """

    STOP = (signal.SIGTERM, signal.SIGINT)
    RELOAD = (signal.SIGHUP,)

    def __init__(self, on_reload: Callable[[], None]) -> None:
        self.on_reload = on_reload
        self._wake = threading.Condition()
        self._pending: List[int] = []
        self._previous: Dict[int, object] = {}

    def request(self, signum: int) -> None:
        with self._wake:
            self._pending.append(signum)
            self._wake.notify_all()

    def _on_signal(self, signum, frame) -> None:
        # Handlers run in the main thread between bytecodes; the condition's
        # RLock is either free (main thread waiting) or ours (re-entrant).
        self._pending.append(signum)
        if self._wake.acquire(blocking=False):
            try:
                self._wake.notify_all()
            finally:
                self._wake.release()

    def install(self) -> None:
        for signum in self.STOP + self.RELOAD:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def run(self) -> int:
        """Block until a stop signal; returns its number."""
        while True:
            with self._wake:
                # The timeout is only a safety net; handlers notify.
                self._wake.wait_for(lambda: bool(self._pending), timeout=1.0)
            while self._pending:
                # pop() is atomic against a handler appending meanwhile.
                signum = self._pending.pop(0)
                if signum in self.STOP:
                    return signum
                if signum in self.RELOAD:
                    try:
                        self.on_reload()
                    except Exception:
                        logging.getLogger("pop3frame.lifecycle").exception("reload failed")
