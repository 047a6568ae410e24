"""Running as a daemon: logging setup, pid file, privilege drop, signal loop.

Signal handlers only record which signal came; the main thread does the
work (a handler that took locks or logged could deadlock the thread it
interrupted).
"""
from __future__ import annotations

import copy
import datetime
import json
import logging
import logging.handlers
import os
import queue
import re
import resource
import select
import signal
import sys
import tempfile
import threading
import time
import weakref
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from .config import decimal

__all__ = ["JSONFormatter", "LogWriter", "setup_logging", "process_id", "PidFile", "PidFileError", "drop_privileges",
           "SignalLoop", "connections_open_files_allow"]

_SESSION_PREFIX = re.compile(r"\[([0-9a-f]+-[0-9a-f]+)\] ")
#: LogRecord attributes that are not user-supplied ``extra`` fields.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
#: This process's id, read once (and again in a forked child): getpid() is
#: a system call, glibc caches nothing.
_pid = os.getpid()


def process_id() -> int:
    """os.getpid() without the system call."""
    return _pid


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, message, session id and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: Dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "pid": _pid,
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
        elif record.exc_text:  # formatted before a hand-over (LogWriter)
            out["exception"] = record.exc_text
        return json.dumps(out, default=str, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class TextFormatter(logging.Formatter):
    """:data:`TEXT_FORMAT` lines; the date and time part of ``asctime`` is
    made once a second, not per line (localtime and strftime were a third of
    the cost of formatting a line)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        #: (second, its date and time), replaced whole: safe to share between threads.
        self._last: Tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: Optional[str] = None) -> str:
        if datefmt:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        last = self._last
        if last[0] != second:
            last = self._last = (second, time.strftime(self.default_time_format, self.converter(second)))
        return self.default_msec_format % (last[1], record.msecs)


class LogWriter(logging.handlers.QueueHandler):
    """A handler that hands records to one writer thread, which formats and writes them.

    Connection threads never wait for the stream or its lock, nor make the
    ``write(2)`` themselves: each record goes into a queue, and the writer
    thread writes whatever has gathered, in as few ``write`` calls as
    pieces of whole lines of at most ``PIPE_BUF`` octets take (the
    processes of ``serve --workers`` share the stream; see :func:`_pieces`).  Woken by a
    record, the writer lets more gather for :attr:`GATHER` seconds before it
    writes (unless a batch was full), so a busy server writes one batch per
    interval and its connection threads hardly ever wake the writer: a
    wake-up per line cost a session about 40 us of CPU, most of the cost of
    its one INFO line.  ``target`` (a StreamHandler) supplies the
    formatter, level and stream.

    :meth:`flush` returns once everything logged before it is written (it
    cuts a gathering short); :meth:`close` (also run by :func:`logging.shutdown` at exit) writes the
    rest and ends the thread, so no line is lost at a normal exit or
    SIGTERM.  Memory stays bounded: with ``limit`` records waiting (a stream
    that blocks, such as a pipe nobody reads), further records are dropped
    and counted, and once the stream takes lines again one WARNING says how
    many were lost.  A thread that logs never waits: a log sink that stalls
    must not stop every connection thread (it did, once 10,000 records
    waited), and a log that misses lines is the lesser harm.  Fork-safe: a
    child process (``--workers``) gets a fresh queue and writer thread of
    its own, and never a half-written line of the parent's (forks wait until
    a write in progress is done).
    """

    #: Most records written with one write().
    BATCH = 512
    #: Seconds records gather before a write: how late a line may appear.
    GATHER = 0.05

    def __init__(self, target: logging.StreamHandler, limit: int = 10_000) -> None:
        super().__init__(queue.SimpleQueue())
        self.target = target
        self.limit = limit
        self.setLevel(target.level)
        self._writing = threading.Lock()
        #: Records dropped since the last write, and the lock of that count.
        self._dropped = 0
        self._counting = threading.Lock()
        self._closed = False
        #: Set by flush() and close(): write what has gathered now.
        self._hurry = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._start()
        _writers.add(self)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pop3frame-log-writer", daemon=True)
        self._thread.start()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """Resolve in the logging thread what may not outlive the call: the
        arguments (mutable objects) and the traceback (its frames)."""
        # Other handlers see the record unchanged.  A plain LogRecord is
        # copied by its __dict__ alone: copy.copy's reduce protocol took
        # twice as long.
        if type(record) is logging.LogRecord:
            copied = logging.LogRecord.__new__(logging.LogRecord)
            copied.__dict__.update(record.__dict__)
            record = copied
        else:
            record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = (self.target.formatter or logging.Formatter()).formatException(record.exc_info)
            record.exc_info = None
        return record

    def _run(self) -> None:
        get, get_nowait = self.queue.get, self.queue.get_nowait
        full = False
        while True:
            batch = [get()]
            if not full and isinstance(batch[0], logging.LogRecord):
                self._hurry.wait(self.GATHER)
            self._hurry.clear()
            try:
                while len(batch) < self.BATCH:
                    batch.append(get_nowait())
            except queue.Empty:
                pass
            full = len(batch) == self.BATCH
            if not self._write(batch):
                return

    def _write(self, batch: List[object]) -> bool:
        """Write a batch; False once the close marker (None) came."""
        target = self.target
        lines: List[str] = []
        done: List[threading.Event] = []
        going = True
        for item in batch:
            if item is None:
                going = False
            elif isinstance(item, threading.Event):
                done.append(item)
            else:
                try:
                    if item.levelno >= target.level and target.filter(item):
                        lines.append(target.format(item) + target.terminator)
                except Exception:
                    target.handleError(item)
        if self._dropped:
            with self._counting:
                dropped, self._dropped = self._dropped, 0
            lines.append(self._note_dropped(dropped))
        if lines:
            with self._writing:
                try:
                    for piece in _pieces(lines, PIPE_BUF):
                        target.stream.write(piece)
                        target.stream.flush()
                except Exception:
                    target.handleError(batch[0])
        for event in done:
            event.set()
        return going

    def _note_dropped(self, dropped: int) -> str:
        """The line that says ``dropped`` records were lost."""
        record = logging.LogRecord(
            "pop3frame.lifecycle", logging.WARNING, __file__, 0,
            "%d log records dropped: the log's stream did not take them (%d waiting at most)",
            (dropped, self.limit), None)
        return self.target.format(record) + self.target.terminator

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every record handed over so far is written (at most ``timeout`` s)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        written = threading.Event()
        self.queue.put_nowait(written)
        self._hurry.set()
        written.wait(timeout)

    def close(self) -> None:
        """Write what is queued, end the writer thread; records after this are dropped."""
        self.acquire()
        try:
            closed, self._closed = self._closed, True
        finally:
            self.release()
        if not closed:
            thread = self._thread
            if thread is not None and thread.is_alive():
                self.queue.put_nowait(None)
                self._hurry.set()
                thread.join(10.0)
        super().close()

    def handle(self, record: logging.LogRecord):
        """As Handler.handle, without the handler lock: the queue is thread-safe,
        and connection threads must not queue up on a lock to log.  With
        ``limit`` records waiting, the record is counted instead (before
        the cost of preparing it)."""
        rv = self.filter(record)
        if isinstance(rv, logging.LogRecord):  # Python 3.12: a filter may replace it
            record = rv
        if rv:
            if self.queue.qsize() < self.limit:
                self.emit(record)
            else:
                with self._counting:
                    self._dropped += 1
        return rv

    def enqueue(self, record: logging.LogRecord) -> None:
        if not self._closed:
            self.queue.put_nowait(record)

    # -- fork (pop3frame serve --workers) --------------------------------------

    def _before_fork(self) -> None:
        self._writing.acquire()

    def _after_fork_in_parent(self) -> None:
        self._writing.release()

    def _after_fork_in_child(self) -> None:
        # The writer thread did not survive the fork, and the queue holds the
        # parent's records, which the parent writes.
        self._writing = threading.Lock()
        self._hurry = threading.Event()
        self._counting = threading.Lock()
        self._dropped = 0
        self.queue = queue.SimpleQueue()
        if not self._closed:
            self._start()


#: Octets a write(2) to a pipe puts in whole, never interleaved with another process's.
PIPE_BUF = getattr(select, "PIPE_BUF", 512)


def _pieces(lines: List[str], size: int) -> Iterator[str]:
    """``lines`` joined into pieces of whole lines, each at most ``size`` octets
    (UTF-8) unless a single line is longer.

    The workers of ``serve --workers`` and their supervisor share one stderr:
    a longer write to a pipe (journald's, a pager's) that finds it full goes
    in part by part, and another process's write lands in the middle of its
    lines.
    """
    piece: List[str] = []
    octets = 0
    for line in lines:
        n = len(line) if line.isascii() else len(line.encode("utf-8", "surrogatepass"))
        if piece and octets + n > size:
            yield "".join(piece)
            piece, octets = [], 0
        piece.append(line)
        octets += n
    if piece:
        yield "".join(piece)


_writers: "weakref.WeakSet[LogWriter]" = weakref.WeakSet()


def _before_fork() -> None:
    for writer in list(_writers):
        writer._before_fork()


def _after_fork_in_parent() -> None:
    for writer in list(_writers):
        writer._after_fork_in_parent()


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()
    for writer in list(_writers):
        writer._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


def setup_logging(level: str = "INFO", json_lines: bool = False, stream=None) -> LogWriter:
    """Configure the root logger once: text or JSON lines on stderr, written by one thread.

    Returns the :class:`LogWriter`; ``close()`` it (or let the interpreter's
    exit do so) to write the last lines.  Records no longer look up what the
    two formats never print: the process id, thread and process names, the
    caller's file and line (``sys._getframe``), each a cost per line.
    """
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    if hasattr(logging, "logAsyncioTasks"):  # Python 3.12
        logging.logAsyncioTasks = False
    logging._srcfile = None  # the logging HOWTO's "Optimization" section
    root = logging.getLogger()
    target = logging.StreamHandler(stream or sys.stderr)
    target.setFormatter(JSONFormatter() if json_lines else TextFormatter())
    for old in list(root.handlers):
        if isinstance(old, LogWriter) or (
                isinstance(old, logging.StreamHandler) and not isinstance(old, logging.FileHandler)):
            root.removeHandler(old)
            if isinstance(old, LogWriter):
                old.close()
    writer = LogWriter(target)
    root.addHandler(writer)
    root.setLevel(level)
    return writer


class PidFileError(Exception):
    """The pid file names a running process, or cannot be written."""


class PidFile:
    """Write our pid to ``path`` (refusing if it names a live process); remove it at exit.

    ``serve`` writes it as root into a directory the serving user may write
    (that user removes it at exit), so nothing here follows a link or waits
    for a FIFO's writer planted there: the pid goes into a new temporary
    file (``O_EXCL``, a random name) renamed over ``path``, and :meth:`chown`
    hands over that very file, by descriptor.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()
        #: (device, inode) of the file write() made.
        self._written: Optional[Tuple[int, int]] = None

    def _open(self) -> int:
        """A descriptor of ``path`` itself: OSError for a link; a FIFO does not block."""
        return os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)

    def _read(self) -> Optional[str]:
        """The pid text in the file, or None if there is none (or no regular file)."""
        try:
            fd = self._open()
            try:
                return os.read(fd, 64).decode("ascii").strip()
            finally:
                os.close(fd)
        except (OSError, ValueError):
            return None

    def _running(self) -> Optional[int]:
        text = self._read()
        if not text or not text.isdigit():
            return None
        pid = int(text)
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
        directory, name = os.path.split(os.path.abspath(self.path))
        try:
            fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=directory)
        except OSError as exc:
            raise PidFileError("%s: %s" % (self.path, exc.strerror or exc)) from None
        try:
            with os.fdopen(fd, "w") as f:
                os.fchmod(fd, 0o644)
                f.write("%d\n" % self.pid)
                f.flush()
                st = os.fstat(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise PidFileError("%s: %s" % (self.path, exc.strerror or exc)) from None
        self._written = (st.st_dev, st.st_ino)

    def chown(self, uid: int, gid: int) -> None:
        """Hand the file write() made to the serving user; never another file now at ``path``."""
        try:
            fd = self._open()
        except OSError:
            fd = None
        try:
            st = os.fstat(fd) if fd is not None else None
            if st is None or (st.st_dev, st.st_ino) != self._written:
                logging.getLogger("pop3frame.lifecycle").warning(
                    "pid file %s was replaced since it was written: not handed to uid %d", self.path, uid)
                return
            os.fchown(fd, uid, gid)
        except OSError:
            pass
        finally:
            if fd is not None:
                os.close(fd)

    def remove(self) -> None:
        """Remove the file if it is still ours."""
        if self._read() != str(self.pid):
            return
        try:
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
            entry = pwd.getpwuid(int(user)) if decimal(user) else pwd.getpwnam(user)
        except KeyError:
            if not decimal(user):
                raise ValueError("user: no such user %r" % user) from None
            uid = int(user)
        else:
            uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
    if group:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if decimal(group) else grp.getgrnam(group).gr_gid
        except KeyError:
            if not decimal(group):
                raise ValueError("group: no such group %r" % group) from None
            gid = int(group)
    if uid is not None and gid is None:
        # Else the switch would keep root's group and supplementary groups.
        raise ValueError("user: uid %d has no passwd entry to take a group from; name the group too" % uid)
    return uid, gid, name


#: Descriptors one connection may hold at once: its socket, the duplicate a
#: TLS handshake wraps, and the store's (a SQLite session holds the database
#: and its WAL; a Maildir session new/ and cur/, and a message during RETR;
#: an mbox its directory, the file and a dot-lock).
FILES_PER_CONNECTION = 6
#: Descriptors the server keeps besides connections: standard streams,
#: listeners, the log, the stats endpoint, a store's own, passwd-file reads.
FILES_RESERVED = 64


def connections_open_files_allow(max_connections: int) -> Tuple[int, int]:
    """Raise the soft open-files limit to what ``max_connections`` need, as far
    as the hard limit allows; return the limit and how many connections it
    leaves room for (``max_connections`` when it is enough).

    The usual soft limit (1024) is far below what the default 1000
    connections need: unauthenticated TLS connections alone (two descriptors
    each) could use up every descriptor, and then a logged-in user's store
    could open nothing.  A server that cannot raise it far enough must
    admit fewer connections, so the excess is refused at the door.
    """
    wanted = max_connections * FILES_PER_CONNECTION + FILES_RESERVED
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft, max_connections
    return soft, max(1, (soft - FILES_RESERVED) // FILES_PER_CONNECTION)


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
