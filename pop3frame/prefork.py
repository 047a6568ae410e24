"""Pre-forked workers: ``pop3frame serve --workers N``.

The gunicorn model: a supervising parent forks N workers and never serves
a client itself.  Each worker is the single-process server, a
``ServerGroup`` of thread-per-connection listeners, so one process's GIL no
longer bounds the whole server.

Signals to the parent:

* SIGTERM, SIGINT: every worker gets SIGTERM and stops as a single process
  does (stop accepting, ``shutdown_grace`` seconds for sessions to QUIT,
  then cut the rest without applying their deletions).  A worker still
  alive ``STOP_MARGIN`` seconds after the grace period is killed.
* SIGHUP: relayed to every worker, which reloads its certificate and
  configuration in place, exactly as a single process does; no session is
  dropped and no process replaced.  (Replacing workers gunicorn-style
  would leave the old ones serving their sessions for up to the 10-minute
  autologout, double the processes meanwhile, and reopen every store, for
  nothing a restart would not do better.)
* A worker that exits without being told to (killed, crashed, or a failed
  start) is logged and forked again: at once the first time, then after
  1, 2, 4 ... seconds (``Backoff``) while it keeps dying young.

Workers die with the parent (``PR_SET_PDEATHSIG``: :data:`ORPHANED`) so a
killed supervisor leaves no orphan serving stale settings, and no orphan
keeps a session either: it stops at once, cutting its sessions without
applying their deletions, as the death of a single-process server would.
A server started in the supervisor's place has a lock directory of its
own and would hand out, again, the maildrops that sessions kept open for
a grace period still hold (RFC 1939 section 8).  A signal of its own, as
the parent's pid cannot tell: the kernel sends it when the supervisor's
main thread dies, and hands the orphans to the supervisor's log-writer
thread, same pid, until that thread is gone too.

Listening sockets are bound once, by the parent, before it drops
privileges (port 110 needs root at bind time, not after), and inherited
across ``fork``: every worker accepts from the same kernel queue.  Not
``SO_REUSEPORT``, which gives each worker a queue of its own and spreads
connections by a hash of their addresses: a worker busy with long sessions
gets its full share anyway, connections queued on a worker that dies are
reset, and a worker forked again would have to bind port 110 again,
unprivileged.  With one queue, whichever worker is idle first takes the
next connection, and a dead worker's queue is everyone's.  The listening
sockets are non-blocking: each worker's accept loop waits in ``poll()``,
all wake for a connection, one wins it and the others get ``EAGAIN``
instead of blocking in ``accept()`` (where they could not notice a
shutdown).  That wake-up of N processes per connection costs a few
microseconds each against a session's few hundred; ``EPOLLEXCLUSIVE``
would save it at the price of a private copy of socketserver's accept
loop.

The parent stays single-threaded, so every ``fork`` copies a process with
no lock held by another thread.  Everything a worker shares with the
others (mailbox locks, connection limits, failed-login records,
LOGIN-DELAY, counters) is set up before the first fork: see
:mod:`pop3frame.hostwide`.  Stores are built in each worker after the fork,
so no database connection, file or thread is shared between processes.
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import select
import signal
import time
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, Type

from .lifecycle import SignalLoop

__all__ = ["Supervisor", "Worker", "Backoff", "StartFailed", "STOP_MARGIN", "ORPHANED"]

logger = logging.getLogger("pop3frame.prefork")

#: Seconds a stopping worker gets beyond ``shutdown_grace`` to close its
#: store and exit before it is killed.
STOP_MARGIN = 5.0
_PR_SET_PDEATHSIG = 1
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
#: The signal a worker gets when the supervisor dies: stop now, no grace.
ORPHANED = signal.SIGUSR2


class StartFailed(Exception):
    """A worker could not start (its store, lock manager ...): the message says why."""


class Backoff:
    """How long to wait before forking a worker again.

    The first death of a worker that ran ``stable`` seconds or more is
    answered at once (a killed worker is replaced without delay); each
    further death of a worker that lived less than that doubles the wait,
    from ``first`` up to ``cap`` seconds, so a store that refuses every
    start is retried a few times a minute rather than in a busy loop.
    """

    def __init__(self, first: float = 1.0, cap: float = 30.0, stable: float = 10.0) -> None:
        self.first = first
        self.cap = cap
        self.stable = stable
        self._young: Dict[int, int] = {}

    def delay(self, slot: int, lived: float) -> float:
        """Seconds before forking ``slot`` again, after its worker lived ``lived`` seconds."""
        if lived >= self.stable:
            self._young[slot] = 0
        deaths = self._young.get(slot, 0)
        self._young[slot] = deaths + 1
        return 0.0 if deaths == 0 else min(self.first * 2.0 ** (deaths - 1), self.cap)


class Worker:
    """What the worker's code gets, in the child: its slot, its signals, a way to say it is ready.

    ``signals`` is installed before the worker's code runs, so a SIGTERM or
    SIGHUP that comes while the store is still opening waits in it.
    """

    #: What ``signals.run()`` returns when the supervisor died.
    ORPHANED = ORPHANED

    def __init__(self, slot: int, signals: SignalLoop, report_fd: int) -> None:
        #: 0 .. N-1; a worker forked again takes the slot of the one it replaces.
        self.slot = slot
        self.signals = signals
        self._report_fd = report_fd

    def ready(self, note: str = "") -> None:
        """Tell the parent this worker serves; ``note`` is passed to ``on_ready``."""
        self._report("ready " + note)

    def _report(self, line: str) -> None:
        if self._report_fd < 0:
            return
        data = (" ".join(line.split()) + "\n").encode("utf-8", "replace")
        try:
            os.write(self._report_fd, data[:4000])
        except OSError:
            pass  # the parent is gone; PR_SET_PDEATHSIG ends us
        os.close(self._report_fd)
        self._report_fd = -1


@dataclasses.dataclass
class _Child:
    slot: int
    pid: int
    started: float
    report: Optional[int]  # read end of the worker's report pipe, until it reported
    buffer: bytes = b""
    ready: bool = False
    failure: str = ""


class Supervisor:
    """Fork ``count`` workers running ``work(worker)`` and keep them running until SIGTERM.

    ``work`` runs in the child and returns its exit status; it calls
    ``worker.ready()`` once it serves, and ``worker.signals.run()`` to wait
    for its own SIGTERM.  An exception of a type in ``expected`` before that
    is a start failure reported by its message alone (an operator mistake);
    any other is logged with its traceback.  Callbacks, all in the parent:
    ``on_ready(slot, note)`` for each worker that reported ready,
    ``on_started()`` once the first set all did,
    ``on_exit(slot)`` after a worker is reaped (release what it held in
    shared state, before a new worker takes its slot; it must not wait for
    a lock a stopped worker may hold, and returns False if it could not
    finish: it is called again every :attr:`retry` seconds, and the slot
    stays empty until it returned True), ``on_reload()`` on
    SIGHUP before it is relayed, ``grace()`` the current shutdown grace.

    :meth:`run` returns 0 after a stop, or raises :class:`StartFailed` if a
    worker of the first set could not start (the others are stopped).  Not
    thread-safe: one parent thread calls :meth:`run`, and no other thread
    may exist in the parent while it forks.
    """

    def __init__(
        self,
        count: int,
        work: Callable[[Worker], int],
        *,
        grace: Callable[[], float] = lambda: 10.0,
        on_ready: Callable[[int, str], None] = lambda slot, note: None,
        on_started: Callable[[], None] = lambda: None,
        on_exit: Callable[[int], Optional[bool]] = lambda slot: None,
        on_reload: Callable[[], None] = lambda: None,
        expected: Tuple[Type[BaseException], ...] = (),
        backoff: Optional[Backoff] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self.count = count
        self.work = work
        self.grace = grace
        self.on_ready = on_ready
        self.on_started = on_started
        self.on_exit = on_exit
        self.on_reload = on_reload
        self.expected = expected
        self.backoff = backoff or Backoff()
        self.clock = clock
        self._children: Dict[int, _Child] = {}  # pid -> child
        self._due: Dict[int, float] = {}  # slot -> when to fork it again
        self._unreleased: Set[int] = set()  # slots whose on_exit must be called again
        self._stopping: Optional[float] = None  # deadline once stopping
        #: Why the first set of workers could not start (None: no failure yet).
        self._start_failure: Optional[str] = None
        self._starting = False
        self._wake: Tuple[int, int] = (-1, -1)
        self._previous: Dict[int, object] = {}
        self._pid = os.getpid()

    # -- the parent's loop -----------------------------------------------------

    def run(self) -> int:
        self._install()
        try:
            if self._start():
                self.on_started()
                self._supervise()
            return 0
        finally:
            self._kill_all()
            self._uninstall()

    @property
    def pids(self) -> List[int]:
        """Process ids of the live workers, by slot order."""
        return [c.pid for c in sorted(self._children.values(), key=lambda c: c.slot)]

    def _start(self) -> bool:
        """Fork the first set: slot 0 alone (it may create and seed the store), then the rest.

        False if a stop signal came meanwhile (the workers are stopped).
        """
        self._starting = True
        for slots in ([0], range(1, self.count)):
            for slot in slots:
                self._fork(slot)
            while self._stopping is None and self._start_failure is None \
                    and any(not c.ready for c in self._children.values()):
                self._step(None)
            if self._start_failure is not None:
                self._stop()
                self._finish()
                raise StartFailed(self._start_failure)
            if self._stopping is not None:
                self._finish()
                return False
        self._starting = False
        return True

    #: Seconds between calls of ``on_exit`` for a slot it could not clean up yet.
    retry = 0.1

    def _supervise(self) -> None:
        while True:
            now = self.clock()
            # A slot still to clean up is tried again every `retry` seconds, not when it is due.
            timers = [when for slot, when in self._due.items() if slot not in self._unreleased] \
                + ([self._stopping] if self._stopping else []) + ([now + self.retry] if self._unreleased else [])
            self._step(max(0.0, min(timers) - now) if timers else None)
            if self._stopping is not None:
                if not self._children:
                    return
                if self.clock() >= self._stopping:
                    self._finish()
                    return
                continue
            for slot in sorted(self._unreleased):
                if self._clean_up(slot):
                    self._unreleased.discard(slot)
            now = self.clock()
            for slot, when in sorted(self._due.items()):
                if when <= now and slot not in self._unreleased:
                    del self._due[slot]
                    self._fork(slot)

    def _step(self, timeout: Optional[float]) -> None:
        """Wait for a signal or a worker's report (at most ``timeout`` seconds), then handle all that came."""
        reports = {c.report: c for c in self._children.values() if c.report is not None}
        readable, _, _ = select.select([self._wake[0]] + list(reports), [], [], timeout)
        signals = b""
        if self._wake[0] in readable:
            try:
                signals = os.read(self._wake[0], 512)
            except BlockingIOError:
                pass
        for fd in readable:
            if fd in reports:
                self._read_report(reports[fd])
        self._reap()
        for signum in signals:
            if signum in (signal.SIGTERM, signal.SIGINT) and self._stopping is None:
                logger.info("signal %d: stopping %d worker(s); sessions get %g s to finish",
                            signum, len(self._children), self.grace())
                self._stop()
            elif signum == signal.SIGHUP and self._stopping is None:
                self._reload()

    def _reload(self) -> None:
        try:
            self.on_reload()
        except Exception:
            logger.exception("reload failed in the supervisor")
        for child in self._children.values():
            self._signal(child, signal.SIGHUP)

    def _read_report(self, child: _Child) -> None:
        assert child.report is not None
        try:
            data = os.read(child.report, 4096)
        except OSError:
            data = b""
        child.buffer += data
        if b"\n" not in child.buffer and data:
            return
        line = child.buffer.split(b"\n", 1)[0].decode("utf-8", "replace")
        os.close(child.report)
        child.report = None
        word, _, rest = line.partition(" ")
        if word == "ready":
            child.ready = True
            logger.info("worker %d ready (pid %d)", child.slot, child.pid)
            self.on_ready(child.slot, rest)
        elif word == "error":
            child.failure = rest

    def _reap(self) -> None:
        while self._children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self._children.pop(pid, None)
            if child is None:
                continue
            if child.report is not None:
                self._read_report(child)  # what it wrote before dying
                if child.report is not None:
                    os.close(child.report)
                    child.report = None
            self._exited(child, status)

    def _exited(self, child: _Child, status: int) -> None:
        lived = self.clock() - child.started
        how = _describe(status)
        released = self._clean_up(child.slot)
        if not released:
            self._unreleased.add(child.slot)
        if self._stopping is not None:
            logger.info("worker %d (pid %d) %s", child.slot, child.pid, how)
            return
        if self._start_failure is None and not child.ready and self._starting:
            self._start_failure = child.failure or "worker %d %s before it was ready" % (child.slot, how)
            return
        delay = self.backoff.delay(child.slot, lived)
        why = ": %s" % child.failure if child.failure else ""
        logger.error("worker %d (pid %d) %s after %.1f s%s; forking a new one in %g s%s",
                     child.slot, child.pid, how, lived, why, delay,
                     "" if released else ", once another process (a stopped worker?) lets go of the shared "
                     "memory it was counted in")
        self._due[child.slot] = self.clock() + delay

    def _clean_up(self, slot: int) -> bool:
        """``on_exit(slot)``; False if it must be called again."""
        try:
            return self.on_exit(slot) is not False
        except Exception:
            logger.exception("cleaning up after worker %d failed", slot)
            return True

    def _stop(self) -> None:
        self._stopping = self.clock() + self.grace() + STOP_MARGIN
        self._due.clear()
        for child in self._children.values():
            self._signal(child, signal.SIGTERM)

    def _finish(self) -> None:
        """Wait for the stopping workers until the deadline, then kill the rest."""
        while self._children and self.clock() < (self._stopping or 0):
            self._step(max(0.0, (self._stopping or 0) - self.clock()))
        for child in list(self._children.values()):
            logger.error("worker %d (pid %d) did not stop in time: killing it", child.slot, child.pid)
        self._kill_all()

    def _kill_all(self) -> None:
        for child in self._children.values():
            self._signal(child, signal.SIGKILL)
        for pid, child in list(self._children.items()):
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                status = 0
            del self._children[pid]
            if child.report is not None:
                os.close(child.report)
            self._exited(child, status)

    @staticmethod
    def _signal(child: _Child, signum: int) -> None:
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:  # exited; reaped on the next step
            pass

    # -- signals in the parent ---------------------------------------------------

    def _install(self) -> None:
        # Handlers only wake the loop: the signal numbers arrive on the pipe.
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake = (r, w)
        for signum in _SIGNALS:
            self._previous[signum] = signal.signal(signum, _ignore)
        self._previous_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def _uninstall(self) -> None:
        signal.set_wakeup_fd(self._previous_wakeup)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        for fd in self._wake:
            os.close(fd)
        self._wake = (-1, -1)

    # -- the child ---------------------------------------------------------------

    def _fork(self, slot: int) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        # Signals stay blocked from before the fork until the child has its
        # own handlers: the parent's would only write to the parent's pipe.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                os.close(r)
                self._child(slot, w, old)  # never returns
            os.close(w)
        except BaseException:
            os.close(r)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self._children[pid] = _Child(slot, pid, self.clock(), r)

    def _child(self, slot: int, report: int, mask) -> None:
        code = 1
        worker = None
        try:
            signal.set_wakeup_fd(-1)
            for fd in self._wake:
                os.close(fd)
            for child in self._children.values():
                if child.report is not None:
                    os.close(child.report)
            self._children.clear()
            _die_with_parent(self._pid)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            loop = SignalLoop(lambda: None)
            loop.STOP = SignalLoop.STOP + (ORPHANED,)
            loop.install()
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            worker = Worker(slot, loop, report)
            code = self.work(worker)
        except self.expected as exc:
            if worker is not None:
                worker._report("error %s" % exc)
            code = 2
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:
            logger.exception("worker %d failed", slot)
            if worker is not None:
                worker._report("error worker %d failed: %s: %s" % (slot, type(exc).__name__, exc))
        finally:
            for handler in logging.getLogger().handlers:
                try:
                    handler.flush()
                except Exception:
                    pass
            # Never back into the parent's stack, nor its atexit handlers.
            os._exit(code)


def _ignore(signum, frame) -> None:
    """A handler that does nothing: the wakeup fd carries the signal."""


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return "was killed by %s" % name
    return "exited with status %d" % os.WEXITSTATUS(status)


def _die_with_parent(parent: int) -> None:
    """Send :data:`ORPHANED` to this process when the parent dies (Linux); exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, ORPHANED, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        logger.warning("workers will not notice the supervisor's death: %s", exc)
    if os.getppid() != parent:
        raise SystemExit(0)
