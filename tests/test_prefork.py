"""``pop3frame serve --workers N``: the supervisor, its workers, and what holds host-wide.

Every test drives the real CLI in a subprocess.  Which worker served a
connection is read from the JSON log: each record carries the pid of the
process that wrote it, and a connection's first record names its port.
Host-wide properties are shown with connections that landed on different
workers.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import time
import urllib.request

import pytest

from pop3frame.hostwide import PLACES
from pop3frame.prefork import Backoff
from tests.helpers import RawClient, reachable_dir
from tests.pg import pg_db, pg_dsn, wait_until_unlocked  # noqa: F401  (fixtures)
from tests.processes import Daemon, pop3frame, write_config

def serve(tmp_path, *args, workers: str = "2", listeners: int = 1) -> Daemon:
    """A --workers daemon on the default SQLite store, new in ``tmp_path`` (so seeded with user
    demo/demo and three messages), JSON logs at DEBUG."""
    return Daemon("--workers", workers, "--log-json", "--log-level", "DEBUG", *args, listeners=listeners,
                  cwd=str(tmp_path))


def record(d: Daemon, pattern: str) -> dict:
    """The JSON log record whose line matches ``pattern`` (already read, or the next to come)."""
    m = d.saw(pattern) or d.wait_for(pattern)
    return json.loads(m.string)


def worker_of(d: Daemon, client: RawClient) -> int:
    """The pid of the worker serving ``client``."""
    host, port = client.sock.getsockname()[:2]
    return record(d, r'"message": "connect from %s port %d"' % (re.escape(host), port))["pid"]


def thread_states(pid: int):
    states = []
    for task in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/stat" % (pid, task)) as f:
            states.append(f.read().rsplit(")", 1)[1].split()[0])
    return states


@contextlib.contextmanager
def stopped(pid: int):
    """Worker ``pid`` stopped (SIGSTOP): it cannot accept, so another worker takes every new connection.

    A stop signal takes effect asynchronously: until each thread has
    stopped, the worker may still accept.  So this waits (bounded) until the
    kernel shows every thread stopped.
    """
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10
        while set(thread_states(pid)) != {"T"}:
            assert time.monotonic() < deadline, "worker %d did not stop" % pid
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed meanwhile
            os.kill(pid, signal.SIGCONT)


def on_two_workers(d: Daemon, port: int, source: str = ""):
    """Two open connections served by different workers: {pid: client}."""
    first = RawClient(("127.0.0.1", port), source=source)
    a = worker_of(d, first)
    with stopped(a):
        second = RawClient(("127.0.0.1", port), source=source)
    b = worker_of(d, second)
    assert a != b
    return {a: first, b: second}


def workers(d: Daemon, count: int = 2):
    """The pids of the first ``count`` workers, from their ready lines."""
    return [int(record(d, r'"message": "worker %d ready \(pid (\d+)\)"' % slot)["message"].split()[-1][:-1])
            for slot in range(count)]


def test_backoff_starts_at_once_doubles_while_young_and_resets_after_a_stable_run():
    backoff = Backoff(first=1.0, cap=8.0, stable=10.0)
    assert [backoff.delay(0, 0.5) for _ in range(6)] == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert backoff.delay(1, 0.5) == 0.0  # per slot
    assert backoff.delay(0, 10.0) == 0.0 and backoff.delay(0, 3.0) == 1.0


def test_workers_share_the_listener_and_the_parent_never_serves(tmp_path):
    with serve(tmp_path, "--listen", "127.0.0.1:0") as d:
        pids = workers(d)
        held = on_two_workers(d, d.port)
        assert sorted(held) == sorted(pids) and d.proc.pid not in held
        for client in held.values():
            assert client.login("demo", "demo").startswith(b"+OK demo's maildrop has 3 messages")
            break
        for client in held.values():
            client.close()
        assert d.stop() == 0
        # One stream: every line is one whole JSON record.
        d.wait_for(r'"pid": %d, "message": "stopped"' % d.proc.pid)
        assert all(json.loads(line)["pid"] in pids + [d.proc.pid] for line in d.seen)


def test_mailbox_lock_is_host_wide_and_dies_with_a_killed_worker(tmp_path):
    """RFC 1939 section 8: one session per maildrop, whichever worker serves the second login.

    A worker killed mid-session loses nothing (its DELE is not applied),
    releases its lock, and is forked again."""
    with serve(tmp_path, "--listen", "127.0.0.1:0") as d:
        (pid_a, a), (pid_b, b) = on_two_workers(d, d.port).items()
        assert a.login("demo", "demo").startswith(b"+OK")
        assert a.cmd("DELE 1") == b"+OK message 1 deleted\r\n"
        assert b.login("demo", "demo").startswith(b"-ERR [IN-USE]")
        os.kill(pid_a, signal.SIGKILL)
        assert a.read_all() == b""
        d.wait_for(r"worker \d \(pid %d\) was killed by SIGKILL after [\d.]+ s; forking a new one in 0 s" % pid_a)
        new = int(d.wait_for(r"worker \d ready \(pid (\d+)\)").group(1))
        assert new not in (pid_a, pid_b)
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("demo", "demo").startswith(b"+OK demo's maildrop has 3 messages")
        a.close()
        b.close()
        assert d.stop() == 0


def test_per_address_limit_is_host_wide(tmp_path):
    """The N+1th connection from one address is refused whichever worker takes it;
    other addresses are not affected."""
    limit = 3
    source = "127.0.0.7"
    # Loopback untrusted: trusted networks have no per-address limit.
    with serve(tmp_path, "--listen", "127.0.0.1:0", "--max-connections-per-ip", str(limit),
               "--trusted-network", "203.0.113.0/24") as d:
        held = list(on_two_workers(d, d.port, source).values())
        held.append(RawClient(("127.0.0.1", d.port), source=source))
        assert all(c.greeting.startswith(b"+OK") for c in held)
        pids = {worker_of(d, c) for c in held}
        assert len(pids) == 2  # each worker alone is below the limit
        for pid in pids:
            # The other worker stopped: this one takes the connection, and refuses it.
            with stopped(next(p for p in pids if p != pid)):
                with RawClient(("127.0.0.1", d.port), source=source) as extra:
                    assert extra.greeting == b"-ERR [SYS/TEMP] too many connections from your address\r\n"
            assert record(d, r'"message": "refusing %s: too many' % re.escape(source))["pid"] == pid
            d.seen.clear()
        with RawClient(("127.0.0.1", d.port), source="127.0.0.8") as other:
            assert other.greeting.startswith(b"+OK")
        for c in held:
            c.close()
        assert d.stop() == 0


def test_total_limit_is_host_wide_and_shown_in_metrics(tmp_path):
    with serve(tmp_path, "--listen", "127.0.0.1:0", "--max-connections", "2", "--stats-listen", "127.0.0.1:0") as d:
        held = on_two_workers(d, d.port)
        with RawClient(("127.0.0.1", d.port)) as extra:
            assert extra.greeting == b"-ERR [SYS/TEMP] too many connections\r\n"
        for client in held.values():
            assert client.login("demo", "demo").startswith((b"+OK", b"-ERR [IN-USE]"))
        # Summed over the workers, whichever answers.
        assert metric(d, "pop3frame_sessions_active") == 2
        assert metric(d, "pop3frame_sessions_total") == 2  # the refused one is not a session
        assert metric(d, "pop3frame_connections_refused_total") == 1
        assert metric(d, 'pop3frame_logins_total{result="ok"}') == 1
        for client in held.values():
            client.close()
        assert d.stop() == 0


def maildir(tmp_path):
    """A Maildir root with user alice (PLAIN password "pw": cheap to check, so only delays take time)."""
    passwd = str(tmp_path / "passwd")
    assert pop3frame("passwd", passwd, "alice", "--scheme", "PLAIN", "--password-stdin", input=b"pw\n").returncode == 0
    new = tmp_path / "mail" / "alice" / "new"
    new.mkdir(parents=True)
    for n in range(3):
        (new / ("170000000%d.M%dP1.host" % (n, n))).write_bytes(b"Subject: %d\n\nbody %d\n" % (n, n))
    return ("--maildir", str(tmp_path / "mail"), "--passwd", passwd)


def test_failed_login_delay_and_lockout_are_host_wide(tmp_path):
    """A failure on one worker makes the next failure on another wait (the delay is
    applied at all: measured, bounded), and a lockout holds on every worker.
    The exact delays are tested with an injected clock in test_hostwide."""
    config = write_config(tmp_path, """
        [server]
        free_auth_failures = 1
        max_auth_failure_delay = 1.0
        auth_lockout_failures = 3
        auth_lockout_duration = 900
    """)
    with Daemon(*maildir(tmp_path), "--config", config, "--listen", "127.0.0.1:0", "--workers", "2",
                "--log-json", "--log-level", "DEBUG") as d:
        (_, a), (_, b) = on_two_workers(d, d.port).items()
        assert a.login("alice", "wrong").startswith(b"-ERR [AUTH]")  # the address's free one
        started = time.monotonic()
        assert b.login("alice", "wrong").startswith(b"-ERR [AUTH]")  # its 2nd: withheld 1 s
        assert 0.95 <= time.monotonic() - started < 30
        assert a.login("alice", "wrong").startswith(b"-ERR")  # 3rd: locks the address out
        # Locked out on the other worker too, right password or not (RFC 3206: SYS/TEMP).
        assert b.login("alice", "pw").startswith(b"-ERR [SYS/TEMP]")
        a.close()
        b.close()
        assert d.stop() == 0


def test_login_delay_is_host_wide(tmp_path):
    """RFC 2449 section 8.1.1: LOGIN-DELAY holds whichever worker the next login lands on."""
    config = write_config(tmp_path, """
        [server]
        login_delay = 300
    """)
    with serve(tmp_path, "--config", config, "--listen", "127.0.0.1:0") as d:
        (_, a), (_, b) = on_two_workers(d, d.port).items()
        assert b"LOGIN-DELAY 300" in (b.cmd("CAPA") + b.multiline())
        assert a.login("demo", "demo").startswith(b"+OK")
        assert a.cmd("QUIT").startswith(b"+OK")
        assert b.login("demo", "demo").startswith(b"-ERR [LOGIN-DELAY]")
        a.close()
        b.close()
        assert d.stop() == 0


def stats_port(d: Daemon) -> int:
    return int(re.search(r"127\.0\.0\.1:(\d+)/metrics", record(d, r"stats on http://")["message"]).group(1))


def metric(d: Daemon, name: str) -> int:
    text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % stats_port(d), timeout=10).read().decode()
    return int(re.search(r"^%s (\d+)$" % re.escape(name), text, re.M).group(1))


def test_crashed_workers_are_forked_again_with_backoff(tmp_path):
    with serve(tmp_path, "--listen", "127.0.0.1:0", "--stats-listen", "127.0.0.1:0") as d:
        first = workers(d)[0]
        os.kill(first, signal.SIGKILL)
        d.wait_for(r"worker 0 \(pid %d\) was killed by SIGKILL after [\d.]+ s; forking a new one in 0 s" % first)
        second = int(d.wait_for(r"worker 0 ready \(pid (\d+)\)").group(1))
        assert metric(d, "pop3frame_errors_total") == 1  # the supervisor's report, counted once
        os.kill(second, signal.SIGKILL)  # dies young: the next one waits
        d.wait_for(r"worker 0 \(pid %d\) was killed by SIGKILL after [\d.]+ s; forking a new one in 1 s" % second)
        third = int(d.wait_for(r"worker 0 ready \(pid (\d+)\)").group(1))
        assert len({first, second, third}) == 3
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("demo", "demo").startswith(b"+OK")
        assert d.stop() == 0


@contextlib.contextmanager
def tables_held(supervisor: int):
    """Every table lock of the memory ``supervisor`` shares with its workers, held by this process:
    what a worker stopped (SIGSTOP, a debugger) in the middle of a table operation holds."""
    fd_dir = "/proc/%d/fd" % supervisor
    name = next(n for n in os.listdir(fd_dir) if "memfd:pop3frame-shared" in os.readlink(os.path.join(fd_dir, n)))
    fd = os.open(os.path.join(fd_dir, name), os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX, PLACES, 0)
        yield
    finally:
        os.close(fd)  # and with it the locks


def test_a_worker_stopped_holding_the_shared_tables_does_not_stop_the_supervisor(tmp_path):
    """The supervisor cleared a dead worker's connection counts under the table's lock,
    waiting for it: with the holder stopped, it logged no death, forked no worker and
    ignored SIGTERM.  Now it goes on, and clears the counts once the lock is free."""
    with serve(tmp_path, "--listen", "127.0.0.1:0", "--shutdown-grace", "0.2") as d:
        first, _ = workers(d)
        with tables_held(d.proc.pid):
            os.kill(first, signal.SIGKILL)
            d.wait_for(r"worker 0 \(pid %d\) was killed by SIGKILL after [\d.]+ s; forking a new one in 0 s, "
                       r"once another process \(a stopped worker\?\) lets go" % first)
        second = int(d.wait_for(r"worker 0 ready \(pid (\d+)\)").group(1))
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("demo", "demo").startswith(b"+OK")
        with tables_held(d.proc.pid):
            os.kill(second, signal.SIGKILL)
            d.wait_for(r"worker 0 \(pid %d\) was killed by SIGKILL" % second)
            assert d.stop() == 0  # SIGTERM: the other worker stops, and so does the supervisor


def test_workers_stop_when_the_supervisor_is_killed_and_cut_their_sessions_at_once(tmp_path):
    """RFC 1939 section 8: a server started in a killed supervisor's place has a
    lock directory of its own, so an orphaned worker must not keep a session
    (for the grace period, 60 s here) that could still QUIT and delete while
    the new server hands the same maildrop out again.  It is cut at once,
    its DELE not applied, as if a single-process server had been killed."""
    with serve(tmp_path, "--listen", "127.0.0.1:0", "--shutdown-grace", "60") as d:
        pids = workers(d)
        lock_dir = record(d, r"mailbox locks in ")["message"].split(" in ", 1)[1]
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("demo", "demo").startswith(b"+OK demo's maildrop has 3 messages")
            assert c.cmd("DELE 1").startswith(b"+OK")
            os.kill(d.proc.pid, signal.SIGKILL)
            assert c.read_all() == b""  # within RawClient's 10 s, not the 60 s grace
        # Both log their stop, then close the log pipe for good: they exited.
        rest = [json.loads(line) for line in iter(lambda: d.lines.get(timeout=30), "")]
        assert {r["pid"] for r in rest if r["message"] == "stopped"} == set(pids)
        assert {r["pid"] for r in rest if r["message"].startswith("the supervisor is gone")} == set(pids)
    # Nobody was left to remove the killed supervisor's lock directory.
    shutil.rmtree(lock_dir)
    with serve(tmp_path, "--listen", "127.0.0.1:0") as d, RawClient(("127.0.0.1", d.port)) as c:
        assert c.login("demo", "demo").startswith(b"+OK demo's maildrop has 3 messages")
        assert d.stop() == 0


def test_sigterm_stops_every_worker_and_a_session_in_retr_finishes_within_the_grace(tmp_path):
    """A RETR under way when SIGTERM comes is sent whole; its QUIT applies its DELE (RFC 1939 section 6)."""
    args = maildir(tmp_path)
    big = tmp_path / "mail" / "alice" / "new" / "1800000000.M9P9.host"
    big.write_bytes(b"Subject: big\n\n" + b"a line of mail, not too long, with a dot.\n" * 800_000)
    with Daemon(*args, "--listen", "127.0.0.1:0", "--workers", "2", "--shutdown-grace", "60") as d:
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("alice", "pw").startswith(b"+OK alice's maildrop has 4 messages")
            number = next(line.split()[0] for line in (c.cmd("LIST") + c.multiline()).split(b"\r\n")[1:-2]
                          if int(line.split()[1]) > 1_000_000)
            c.send(b"RETR %s\r\n" % number)
            assert c.line().startswith(b"+OK")
            d.signal(signal.SIGTERM)
            d.wait_for(r"stopping 2 worker\(s\); sessions get 60 s to finish")
            body = c.multiline()
            assert len(body) == 14 + 2 + 43 * 800_000 + 3
            assert c.cmd("DELE %s" % number.decode()).startswith(b"+OK")
            assert c.cmd("QUIT").startswith(b"+OK")
        assert d.stop() == 0
    assert not big.exists()


def test_a_hung_worker_does_not_stop_the_others_and_is_killed_at_shutdown(tmp_path):
    with serve(tmp_path, "--listen", "127.0.0.1:0", "--shutdown-grace", "0.2") as d:
        hung, other = workers(d)
        with stopped(hung):
            for _ in range(5):  # the shared queue: everything goes to the live worker
                with RawClient(("127.0.0.1", d.port)) as c:
                    assert worker_of(d, c) == other
                    assert c.login("demo", "demo").startswith(b"+OK")
                    c.cmd("QUIT")
            d.signal(signal.SIGTERM)
            d.wait_for(r"worker \d \(pid %d\) did not stop in time: killing it" % hung)
            assert d.stop() == 0


def test_sighup_reloads_every_worker_without_dropping_sessions(tmp_path):
    config = write_config(tmp_path, """
        [[listener]]
        address = "127.0.0.1:0"
        [server]
        max_connections_per_ip = 10
        trusted_networks = ["203.0.113.0/24"]  # loopback untrusted: limited per address
        allow_plaintext_auth = true
        [logging]
        json = true
        level = "DEBUG"
    """)
    with Daemon("--config", config, "--workers", "2", cwd=str(tmp_path)) as d:
        pids = workers(d)
        held = on_two_workers(d, d.port)
        for client in held.values():
            client.login("demo", "demo")
            break
        with open(config) as f:
            text = f.read()
        with open(config, "w") as f:
            f.write(text.replace("max_connections_per_ip = 10", "max_connections_per_ip = 2"))
        for _ in range(20):  # a storm: coalesced or not, every worker ends on the new file
            d.signal(signal.SIGHUP)
        reloaded = set()
        while reloaded != set(pids):
            reloaded.add(record(d, r"SIGHUP: configuration reloaded .*max_connections_per_ip 2")["pid"])
            d.seen.clear()
        # Two connections from 127.0.0.1 are open, on two workers: the limit of 2 holds.
        with RawClient(("127.0.0.1", d.port)) as extra:
            assert extra.greeting == b"-ERR [SYS/TEMP] too many connections from your address\r\n"
        for client in held.values():
            assert client.cmd("NOOP").startswith((b"+OK", b"-ERR"))  # still served
            client.close()
        assert not d.saw(r"exited|was killed")
        assert d.stop() == 0


def test_a_store_that_cannot_open_in_the_workers_is_a_one_line_error(tmp_path):
    """Adapters are built in each worker after the fork: the first worker's failure
    stops the start with the single-process error line and exit code 2."""
    script = tmp_path / "broken.py"
    script.write_text(
        "from pop3frame import AdapterBase\n"
        "class Broken(AdapterBase):\n"
        "    def __init__(self):\n"
        "        raise RuntimeError('backend unreachable')\n")
    out = pop3frame("serve", "--adapter", "%s:Broken" % script, "--listen", "127.0.0.1:0", "--workers", "2")
    assert out.returncode == 2
    last = out.stderr.decode().strip().splitlines()[-1]
    assert last == "pop3frame: --adapter: %s:Broken failed: RuntimeError: backend unreachable" % script
    assert b"Traceback" not in out.stderr


@pytest.mark.parametrize("args,message", [
    (("--demo",), "--workers: the demo store lives in one process's memory"),
    (("--workers", "0"), "--workers: expected a number of processes >= 1"),
    (("--workers", "many"), "--workers: expected a number of processes >= 1"),
])
def test_workers_mistakes_are_one_line(tmp_path, args, message):
    out = pop3frame("serve", "--listen", "127.0.0.1:0", "--workers", "2", *args, cwd=str(tmp_path))
    assert out.returncode == 2 and message in out.stderr.decode()
    assert len(out.stderr.decode().strip().splitlines()) == 1


def test_workers_in_the_config_file(tmp_path):
    config = write_config(tmp_path, """
        workers = "auto"
        [[listener]]
        address = "127.0.0.1:0"
    """)
    out = pop3frame("check-config", config)
    assert out.returncode == 0 and 'workers = "auto"' in out.stdout.decode()
    bad = write_config(tmp_path, "workers = 0\n", "bad.toml")
    out = pop3frame("check-config", bad)
    assert out.returncode == 2 and "bad.toml:1: workers: expected a number" in out.stderr.decode()
    with Daemon("--config", config, cwd=str(tmp_path)) as d:
        assert d.saw(r"starting %d workers" % os.cpu_count()) or os.cpu_count() == 1
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("demo", "demo").startswith(b"+OK")
        assert d.stop() == 0


def tls_client(port: int, context) -> "ssl.SSLSocket":
    import socket

    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")


def test_tls_and_stls_on_every_worker_and_a_certificate_reload_reaches_them_all(tmp_path):
    import poplib
    import ssl

    import trustme

    ca = trustme.CA()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"

    def issue():
        issued = ca.issue_cert("localhost", "127.0.0.1")
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))

    issue()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with serve(tmp_path, "--listen", "127.0.0.1:0", "--tls-listen", "127.0.0.1:0", "--cert", str(cert),
               "--key", str(key), listeners=2) as d:
        pids = workers(d)
        stls = poplib.POP3("127.0.0.1", d.ports[0], timeout=10)
        stls.stls(context)
        stls.user("demo")
        stls.pass_("demo")

        def certificates():
            """The certificate each worker presents on the POP3S port."""
            first = tls_client(d.ports[1], context)
            a = record(d, r'"message": "connect from 127\.0\.0\.1 port %d"' % first.getsockname()[1])["pid"]
            with stopped(a):
                second = tls_client(d.ports[1], context)
            seen = {}
            for sock in (first, second):
                sock.sendall(b"CAPA\r\n")
                assert sock.recv(100).startswith(b"+OK")
                seen[record(d, r'"message": "connect from 127\.0\.0\.1 port %d"'
                            % sock.getsockname()[1])["pid"]] = sock.getpeercert(binary_form=True)
                sock.close()
            assert sorted(seen) == sorted(pids)
            return set(seen.values())

        old = certificates()
        assert len(old) == 1
        issue()
        d.signal(signal.SIGHUP)
        assert {record(d, r"TLS certificate reloaded")["pid"], record(d, r"TLS certificate reloaded")["pid"]} \
            <= set(pids)
        while {json.loads(line)["pid"] for line in d.seen if "TLS certificate reloaded" in line} != set(pids):
            d.wait_for(r"TLS certificate reloaded")
        new = certificates()
        assert len(new) == 1 and new != old
        assert stls.stat()[0] == 3  # the STLS session survived the reload
        stls.quit()
        assert d.stop() == 0


def test_proxy_listener_limits_the_real_address_across_workers(tmp_path):
    from pop3frame.proxy import build_v2

    # No demo account behind a proxy: the store gets its user first.
    db = str(tmp_path / "store.db")
    assert pop3frame("user", "--sqlite", db, "add", "demo", "--password-stdin", input=b"demo\n").returncode == 0
    with serve(tmp_path, "--sqlite", db, "--proxy-listen", "127.0.0.1:0", "--max-connections-per-ip", "1",
               "--allow-plaintext-auth") as d:
        def connect(ip: str, port: int) -> RawClient:
            import socket

            client = RawClient.__new__(RawClient)
            client.sock, client.buf = socket.create_connection(("127.0.0.1", d.port), timeout=10), b""
            client.sock.sendall(build_v2((ip, port), ("127.0.0.1", d.port)))
            client.greeting = client.line()
            return client

        first = connect("198.51.100.7", 40001)
        a = record(d, r'"message": "connect from 198\.51\.100\.7 port 40001"')["pid"]
        assert first.login("demo", "demo").startswith(b"+OK demo's maildrop")
        with stopped(a):
            second = connect("198.51.100.7", 40002)
            assert second.greeting == b"-ERR [SYS/TEMP] too many connections from your address\r\n"
            assert record(d, r"refusing 198\.51\.100\.7: too many")["pid"] != a
            third = connect("198.51.100.8", 40003)
            assert third.greeting.startswith(b"+OK")
        for c in (first, second, third):
            c.close()
        assert d.stop() == 0


@pytest.mark.parametrize("locks", ["host", "postgres"])
def test_postgres_store_on_every_worker(pg_db, tmp_path, locks):
    """Each worker has its own pool (made after the fork); mailbox locks hold across workers,
    from the supervisor's lock directory or PostgreSQL's advisory locks, also when the
    worker holding one is killed (RFC 1939 section 6: its DELE is not applied)."""
    for args, data in ((("user", "add", "--postgres", pg_db, "alice", "--password-stdin"), b"pw\n"),
                       (("deliver", "--postgres", pg_db, "alice"), b"Subject: 1\n\none\n"),
                       (("deliver", "--postgres", pg_db, "alice"), b"Subject: 2\n\ntwo\n")):
        assert pop3frame(*args, input=data).returncode == 0
    config = write_config(tmp_path, "[locks]\nbackend = \"postgres\"\ndsn = \"%s\"\n" % pg_db if locks == "postgres"
                          else "")
    with Daemon("--config", config, "--postgres", pg_db, "--listen", "127.0.0.1:0", "--workers", "2",
                "--log-json", "--log-level", "DEBUG", "--max-connections", "20") as d:
        assert d.saw(r"store: postgres .* \(pool up to 20 connections per worker\)")
        assert bool(d.saw(r"mailbox locks in ")) is (locks == "host")
        (pid_a, a), (pid_b, b) = on_two_workers(d, d.port).items()
        assert a.login("alice", "pw") == b"+OK alice's maildrop has 2 messages (38 octets)\r\n"
        assert b.login("alice", "pw").startswith(b"-ERR [IN-USE]")
        assert a.cmd("DELE 1") == b"+OK message 1 deleted\r\n"
        os.kill(pid_a, signal.SIGKILL)
        assert a.read_all() == b""
        if locks == "postgres":
            wait_until_unlocked(pg_db, "alice")
        assert b.login("alice", "pw") == b"+OK alice's maildrop has 2 messages (38 octets)\r\n"
        assert b.cmd("DELE 1") == b"+OK message 1 deleted\r\n"
        assert b.cmd("QUIT").startswith(b"+OK")
        a.close()
        b.close()
        assert d.stop() == 0
    assert pop3frame("user", "list", "--postgres", pg_db).stdout == b"alice\t1 message\t19 octets\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")
def test_user_nobody_owns_workers_store_and_lock_directory(tmp_path):
    """Ports bound as root, privileges dropped in the supervisor before it forks: every
    process runs as nobody, the lock directory is nobody's, the pid file names the supervisor."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    with reachable_dir("pop3frame-nobody-", 0o700, owner=nobody) as path:
        pid_file = os.path.join(path, "pop3frame.pid")
        with Daemon("--listen", "127.0.0.1:0", "--workers", "2", "--user", "nobody", "--pid-file", pid_file,
                    "--log-json", "--log-level", "DEBUG", cwd=path) as d:
            with open(pid_file) as f:
                assert f.read() == "%d\n" % d.proc.pid
            pids = workers(d)
            for pid in [d.proc.pid] + pids:
                with open("/proc/%d/status" % pid) as f:
                    uids = next(l for l in f if l.startswith("Uid:")).split()[1:]
                assert set(uids) == {str(nobody.pw_uid)}
            lock_dir = record(d, r"mailbox locks in ")["message"].split(" in ", 1)[1]
            (_, a), (_, b) = on_two_workers(d, d.port).items()
            assert a.login("demo", "demo").startswith(b"+OK")
            assert b.login("demo", "demo").startswith(b"-ERR [IN-USE]")
            for name in [lock_dir] + [os.path.join(lock_dir, n) for n in os.listdir(lock_dir)]:
                assert os.stat(name).st_uid == nobody.pw_uid, name
            a.close()
            b.close()
            assert d.stop() == 0
        assert not os.path.exists(lock_dir) and not os.path.exists(pid_file)
