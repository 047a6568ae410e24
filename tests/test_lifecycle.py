"""Graceful shutdown, pid file, JSON log lines, signal loop and privilege drop."""
from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import pathlib
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from pop3frame import ServerConfig
from pop3frame.lifecycle import TEXT_FORMAT, JSONFormatter, PidFile, PidFileError, SignalLoop, TextFormatter, setup_logging
from pop3frame.server import ServerGroup
from tests import reaper
from tests.helpers import RawClient


@pytest.fixture
def group(adapter):
    adapter.add_user("carol", "carol-pw")
    adapter.deliver("carol", b"Subject: c1\r\n\r\nc1\r\n")
    adapter.deliver("carol", b"Subject: c2\r\n\r\nc2\r\n")
    g = ServerGroup(adapter, ServerConfig(hostname="localhost"))
    g.add_listener(("127.0.0.1", 0))
    g.start(poll_interval=0.05)
    yield g
    g.shutdown()


def test_grace_lets_a_quitting_session_delete_and_cuts_the_other(group, adapter):
    address = group.addresses[0]
    quitter, lingerer = RawClient(address), RawClient(address)
    assert quitter.login("alice", "alice-pw").startswith(b"+OK")
    assert lingerer.login("carol", "carol-pw").startswith(b"+OK")
    quitter.cmd("DELE 1")
    lingerer.cmd("DELE 1")
    grace_started = threading.Event()
    seen = {}

    def wait(grace):
        # Injected grace wait: no clock involved.  The grace "expires" once the
        # quitting session is gone; the lingering one is then cut.
        seen["grace"] = grace
        seen["refused"] = _connect_refused(address)
        grace_started.set()
        return group.tracker.wait_until_at_most(1, 10) and False

    done = {}
    t = threading.Thread(target=lambda: done.update(result=group.graceful_shutdown(10.0, wait=wait)))
    t.start()
    assert grace_started.wait(10)
    assert seen == {"grace": 10.0, "refused": True}  # no new connections during the grace
    assert quitter.cmd("QUIT").startswith(b"+OK")  # still served during the grace
    t.join(10)
    assert done["result"] is False  # someone had to be cut
    assert lingerer.read_all() == b""
    assert len(adapter.messages("alice")) == 2  # QUIT within the grace: deletion applied
    assert len(adapter.messages("carol")) == 2  # cut: no deletion
    assert not group.context.locks.held_names()
    quitter.close()
    lingerer.close()


def _connect_refused(address) -> bool:
    try:
        socket.create_connection(address, timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_no_sessions_means_no_wait(group):
    def wait(grace):
        raise AssertionError("nothing to wait for")

    assert group.graceful_shutdown(10.0, wait=wait) is True


def test_default_wait_returns_as_soon_as_sessions_end(group):
    client = RawClient(group.addresses[0])
    client.login("alice", "alice-pw")
    client.cmd("DELE 1")
    t = threading.Thread(target=group.graceful_shutdown, args=(60.0,))
    t.start()
    client.cmd("QUIT")
    t.join(30)
    assert not t.is_alive()
    client.close()


def test_pid_file(tmp_path):
    path = str(tmp_path / "p.pid")
    with PidFile(path):
        assert pathlib.Path(path).read_text() == "%d\n" % os.getpid()
    assert not os.path.exists(path)
    # A stale pid file (dead process) is taken over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pathlib.Path(path).write_text("%d\n" % dead.pid)
    with PidFile(path):
        pass
    # A live one refuses.
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        pathlib.Path(path).write_text("%d\n" % live.pid)
        with pytest.raises(PidFileError, match="already running as pid %d" % live.pid):
            PidFile(path).write()
        PidFile(path).remove()  # not ours: left alone
        assert os.path.exists(path)
    finally:
        live.stdin.close()
        live.wait(10)



def _serving_ids():
    """The ids ``serve --user`` hands the pid file to: nobody's as root, ours otherwise."""
    return (65534, 65534) if os.geteuid() == 0 else (os.getuid(), os.getgid())


def test_pid_file_is_never_written_or_handed_over_through_a_link(tmp_path):
    """serve writes the pid file as root into a directory the serving user
    may write (it removes the file at exit): a link planted there must not
    make root truncate, write or chown another file.  Before: root opened
    ``<file>.<pid>.tmp`` following a planted symlink (a root-owned 0600 file
    became the pid, owned by nobody), and chown() followed a link swapped in
    at ``<file>``."""
    victim = tmp_path / "shadow"
    victim.write_text("root:secret\n")
    victim.chmod(0o600)
    before = victim.stat()
    path = tmp_path / "run" / "p.pid"
    path.parent.mkdir()
    pid_file = PidFile(str(path))
    # The temporary name an attacker would predict (the pid is no secret).
    (path.parent / ("p.pid.%d.tmp" % os.getpid())).symlink_to(victim)
    pid_file.write()
    assert victim.read_text() == "root:secret\n"
    assert not path.is_symlink() and path.read_text() == "%d\n" % os.getpid()
    # Swapped for a link between the write and the hand-over to the serving user.
    path.unlink()
    path.symlink_to(victim)
    pid_file.chown(*_serving_ids())
    after = victim.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)
    assert victim.read_text() == "root:secret\n"


def test_pid_file_written_over_a_fifo_does_not_hang(tmp_path):
    """A FIFO planted at the pid file's name: reading the old pid must not
    wait for a writer (serve would hang as root before it listens)."""
    path = tmp_path / "p.pid"
    os.mkfifo(str(path))
    pid_file = PidFile(str(path))
    done = threading.Event()

    def write():
        pid_file.write()
        done.set()

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        assert done.wait(10), "PidFile.write() blocked on a FIFO"
    finally:
        if not done.is_set():
            # Give the blocked open() its writer so the thread ends.
            os.close(os.open(str(path), os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
    assert path.read_text() == "%d\n" % os.getpid()

def test_json_formatter_pulls_out_the_session_and_extras():
    record = logging.LogRecord("pop3frame.session", logging.INFO, "", 0, "[1a-2] login %r from %s", ("bob", "::1"), None)
    record.user = "bob"
    out = json.loads(JSONFormatter().format(record))
    assert out["session"] == "1a-2" and out["message"] == "login 'bob' from ::1" and out["user"] == "bob"
    assert out["level"] == "INFO" and out["logger"] == "pop3frame.session" and out["time"].endswith("Z")


@pytest.fixture
def root_logging():
    """Undo setup_logging(): root handlers and level, and the module's per-record switches."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    switches = {name: getattr(logging, name) for name in
                ("logProcesses", "logThreads", "logMultiprocessing", "_srcfile")}
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    for name, value in switches.items():
        setattr(logging, name, value)


def test_setup_logging_json_lines(root_logging):
    stream = io.StringIO()
    writer = setup_logging("DEBUG", json_lines=True, stream=stream)
    logging.getLogger("pop3frame.t").info("hello %s", "there")
    writer.flush()
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert line["message"] == "hello there" and line["pid"] == os.getpid()


def test_text_lines_are_the_standard_formatters(root_logging):
    """TextFormatter makes each second's date and time once; its lines are
    logging.Formatter(TEXT_FORMAT)'s, across second, day and year boundaries
    and with time going back.  LogWriter's copy of a record for the writer
    leaves the record other handlers see as it was."""
    standard, ours = logging.Formatter(TEXT_FORMAT), TextFormatter()
    base = time.mktime((2026, 12, 31, 23, 59, 58, 0, 0, -1))
    for offset in (0, 0.001, 0.999, 1.0, 1.5, 2.0, 2.25, 0.5, 3600.125):
        record = logging.LogRecord("pop3frame.t", logging.INFO, "(unknown file)", 0, "x %s", ("y",), None)
        record.created = base + offset
        record.msecs = (record.created - int(record.created)) * 1000
        assert ours.format(record) == standard.format(record)
    stream, seen = io.StringIO(), []
    writer = setup_logging("INFO", stream=stream)
    keeper = logging.Handler()
    keeper.emit = seen.append
    logging.getLogger().addHandler(keeper)
    logging.getLogger("pop3frame.t").info("hello %s", "there")
    writer.flush()
    assert seen[0].msg == "hello %s" and seen[0].args == ("there",)
    assert stream.getvalue().endswith(" INFO pop3frame.t hello there\n")

class ThreadStream(io.StringIO):
    """A stream that records which thread wrote and how often."""

    def __init__(self) -> None:
        super().__init__()
        self.writers = set()
        self.writes = 0

    def write(self, text):
        self.writers.add(threading.current_thread().name)
        self.writes += 1
        return super().write(text)


def test_connection_threads_hand_records_to_one_writer(root_logging):
    """Threads that log never touch the stream: one writer thread writes, several
    records per write when they queue up; close() writes all that was logged."""
    stream = ThreadStream()
    writer = setup_logging("INFO", stream=stream)
    log = logging.getLogger("pop3frame.t")
    gate = threading.Event()

    def busy(n):
        gate.wait(10)
        for i in range(500):
            log.info("thread %d line %d", n, i)

    threads = [threading.Thread(target=busy, args=(n,), name="conn-%d" % n) for n in range(4)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(30)
    log.debug("below the level: dropped")
    writer.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2000 and all(" INFO pop3frame.t thread " in line for line in lines)
    for n in range(4):  # each thread's lines in its order
        mine = [line for line in lines if " thread %d " % n in line]
        assert [int(line.rsplit(" ", 1)[1]) for line in mine] == list(range(500))
    assert stream.writers == {"pop3frame-log-writer"}
    assert stream.writes < 2000
    log.info("after close: dropped, not an error")
    assert len(stream.getvalue().splitlines()) == 2000


def test_records_that_come_while_the_writer_gathers_go_out_in_one_write(root_logging):
    """Connection threads do not wake the writer for every line: woken by a record,
    it lets more gather (GATHER seconds, cut short by flush() and close()) and
    writes them together, so a server logging a line per session makes one
    write() per interval instead of a wake-up and a write() per session."""
    stream = ThreadStream()
    writer = setup_logging("INFO", stream=stream)
    writer.GATHER = 60.0  # here only flush() ends the gathering
    log = logging.getLogger("pop3frame.t")
    log.info("line 0")
    pause = threading.Event()
    for _ in range(1000):  # until the writer has taken the first record, 10 s at most
        if writer.queue.empty():
            break
        pause.wait(0.01)
    assert writer.queue.empty()
    for i in range(1, 20):
        log.info("line %d", i)
    writer.flush(10)
    lines = stream.getvalue().splitlines()
    assert [line.rsplit(" ", 1)[1] for line in lines] == [str(i) for i in range(20)]
    assert stream.writes == 1
    writer.close()


class BlockedStream(io.StringIO):
    """A stream whose write waits until ``flowing`` is set (a pipe nobody reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.flowing = threading.Event()

    def write(self, text):
        assert self.flowing.wait(30)
        return super().write(text)


def test_a_stream_that_blocks_costs_records_not_threads_or_memory(root_logging):
    """A log stream that blocks (a pipe nobody reads) must not stop the threads
    that log: past ``limit`` waiting records, records are dropped and counted, and
    once the stream takes lines again one WARNING says how many.  Before, a thread
    that logged waited for the stream, so every connection thread stopped."""
    stream = BlockedStream()
    writer = setup_logging("INFO", stream=stream)
    writer.limit = 100
    log = logging.getLogger("pop3frame.t")

    def flood():
        for i in range(1000):
            log.info("line %d", i)

    thread = threading.Thread(target=flood)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()  # never waited for the stream
    assert writer.queue.qsize() <= writer.limit
    stream.flowing.set()
    writer.close()
    lines = stream.getvalue().splitlines()
    notes = [line for line in lines if "log records dropped" in line]
    written = [line for line in lines if " line " in line]
    assert len(notes) == 1 and " WARNING pop3frame.lifecycle " in notes[0]
    dropped = int(notes[0].split(" log records dropped")[0].rsplit(" ", 1)[1])
    assert len(written) + dropped == 1000 and dropped >= 1000 - writer.limit - writer.BATCH
    # The lines that got through are in order (the writer's gathering lets later
    # ones in as it takes a batch, so which are lost is not a single run).
    numbers = [int(line.rsplit(" ", 1)[1]) for line in written]
    assert numbers == sorted(set(numbers)) and numbers[:writer.limit] == list(range(writer.limit))


def pipe_reader(proc, timeout: float):
    """A function that reads what ``proc`` wrote to its stderr pipe so far, waiting at
    most ``timeout`` for the first octets ("" at the end of the pipe)."""
    fd = proc.stderr.fileno()

    def read() -> str:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, "no output within %s s" % timeout
        return os.read(fd, 1 << 16).decode()

    return read


def vm_rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def test_a_log_pipe_nobody_reads_is_no_outage(tmp_path):
    """pop3frame serve whose stderr is a pipe nobody reads (a stalled log sink):
    logins go on working and memory stays bounded once 10,000 records wait; when
    the pipe is read again, one line says how many records were dropped.  Before,
    every connection thread stopped at the 10,000th record: the server hung."""
    proc = subprocess.Popen([sys.executable, "-m", "pop3frame", "serve", "--demo", "--listen", "127.0.0.1:0",
                             "--log-level", "DEBUG"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reaper.reap(proc.pid)
    try:
        # The smallest pipe the kernel makes (one page): it fills after a few lines.
        fcntl.fcntl(proc.stderr.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)
        read = pipe_reader(proc, 20)
        seen = ""
        for _ in range(100):
            seen += read()
            port = re.search(r"listening on \S+ port (\d+)", seen)
            if port:
                break
        assert port, seen
        address = ("127.0.0.1", int(port.group(1)))
        # From here on the test does not read the pipe.  5 DEBUG lines a session.

        def sessions(n: int) -> None:
            for _ in range(n):
                with RawClient(address, timeout=10) as c:
                    assert c.login("demo", "demo").startswith(b"+OK")
                    assert c.cmd("QUIT").startswith(b"+OK")

        sessions(2200)  # the queue is full after about 2,000
        before = vm_rss_kib(proc.pid)
        sessions(2000)  # every record of these is dropped
        grown = vm_rss_kib(proc.pid) - before
        assert grown < 4 * 1024, "RSS grew by %d KiB while records were dropped" % grown
        note = None
        for _ in range(10000):  # the writer catches up as the pipe is read
            seen = read()
            assert seen, "stderr ended"
            note = re.search(r"WARNING pop3frame.lifecycle (\d+) log records dropped", seen) or note
            if note:
                break
        assert note and int(note.group(1)) > 5000  # 5 lines a session, 10,000 waiting
        proc.terminate()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_arguments_and_tracebacks_are_resolved_before_the_hand_over(root_logging):
    """A mutable argument changed right after the call, and a traceback whose
    frames are gone, still log what they were at the call."""
    stream = io.StringIO()
    writer = setup_logging("INFO", json_lines=True, stream=stream)
    log = logging.getLogger("pop3frame.t")
    state = ["before"]
    log.info("state %s", state)
    state[0] = "after"
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    writer.close()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "state ['before']"
    assert second["message"] == "failed" and "ValueError: boom" in second["exception"]


def test_forked_child_logs_through_a_writer_of_its_own(root_logging, tmp_path):
    """pop3frame serve --workers forks after logging is set up: the child's lines
    reach the stream, and the parent's queued ones are written once, by the parent."""
    path = tmp_path / "log"
    with open(path, "a") as stream:
        writer = setup_logging("INFO", stream=stream)
        log = logging.getLogger("pop3frame.t")
        log.info("parent before fork")
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                log.info("child %d", os.getpid())
                writer.close()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert status == 0
        log.info("parent after fork")
        writer.close()
    lines = path.read_text().splitlines()
    assert [line.split(" INFO pop3frame.t ")[1] for line in lines].count("parent before fork") == 1
    assert any(line.endswith("child %d" % pid) for line in lines)
    assert lines[-1].endswith("parent after fork")


def test_processes_sharing_a_log_pipe_never_split_each_others_lines(root_logging):
    """serve --workers: every process writes to the same stderr.  A write(2) of
    more than PIPE_BUF octets to a pipe is not atomic: two workers' batches
    blocked on a full pipe (a slow reader: journald, a pager) went in page by
    page, one's octets in the middle of the other's lines.  Each write is now
    whole lines of at most PIPE_BUF octets."""
    r, w = os.pipe()
    children = []
    for n in range(2):
        pid = os.fork()
        if pid == 0:  # never returns into pytest
            try:
                os.close(r)
                with os.fdopen(w, "w") as stream:
                    writer = setup_logging("INFO", stream=stream)
                    writer.GATHER = 60.0  # one batch per flush(): each far beyond the pipe's 64 KiB
                    log = logging.getLogger("pop3frame.t")
                    for batch in range(4):
                        for i in range(500):
                            log.info("process %d batch %d line %d %s", n, batch, i, "x" * 200)
                        writer.flush(60)
                    writer.close()
            finally:
                os._exit(0)
        children.append(pid)
    os.close(w)
    # Read only once both writers are blocked on the full pipe, so their writes overlap.
    pause = threading.Event()
    for pid in children:
        for _ in range(2000):  # 20 s at most
            if any("pipe_write" in pathlib.Path("/proc/%d/task/%s/wchan" % (pid, task)).read_text()
                   for task in os.listdir("/proc/%d/task" % pid)):
                break
            pause.wait(0.01)
        else:
            pytest.fail("process %d never blocked on the full pipe" % pid)
    with os.fdopen(r, "rb") as stream:
        out = stream.read()
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0
    lines = out.decode().splitlines()
    assert len(lines) == 2 * 4 * 500
    split = [line for line in lines if not re.fullmatch(r".* INFO pop3frame.t process [01] batch \d line \d+ x{200}", line)]
    assert split == []


def test_signal_loop_dispatches_reloads_and_stops():
    reloads = []
    loop = SignalLoop(lambda: reloads.append(1))
    loop.request(signal.SIGHUP)
    loop.request(signal.SIGHUP)
    loop.request(signal.SIGTERM)
    assert loop.run() == signal.SIGTERM
    assert reloads == [1, 1]


def test_signal_loop_with_real_signals():
    loop = SignalLoop(lambda: None)
    loop.install()
    try:
        threading.Timer(0, os.kill, (os.getpid(), signal.SIGINT)).start()
        assert loop.run() == signal.SIGINT
    finally:
        loop.restore()


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")
def test_drop_privileges_in_a_child():
    code = (
        "import os; from pop3frame.lifecycle import drop_privileges; "
        "drop_privileges('nobody', None); print(os.getuid(), os.getgid(), os.getgroups())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import pwd

    nobody = pwd.getpwnam("nobody")
    uid, gid, groups = out.stdout.split(" ", 2)
    assert (int(uid), int(gid)) == (nobody.pw_uid, nobody.pw_gid)
    assert "0" not in groups.strip("[]\n").replace(" ", "").split(",")
