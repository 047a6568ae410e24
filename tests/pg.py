"""A throwaway PostgreSQL for the tests, and a pop3frame server process on it.

Fixtures (import them into a test module: ``from tests.pg import pg_dsn, pg_db  # noqa: F401``):

``pg_dsn`` (session)
    libpq connection string of a PostgreSQL server the tests may create
    databases on.  ``POP3FRAME_TEST_PG_DSN`` names an existing server (its
    role needs CREATEDB); otherwise a private cluster is started once per
    process from Debian's ``/usr/lib/postgresql/*/bin`` (or ``initdb`` on
    PATH) in a temporary directory, on 127.0.0.1 and a free port plus a unix
    socket in that directory, with ``fsync=off``; it is stopped by its PID
    at exit.  PostgreSQL refuses to run as root, so under root the cluster
    belongs to the ``postgres`` system user (or ``nobody``).  When no
    server can be had the test skips, or fails under ``CI=true``.

``pg_db`` (function)
    a fresh, empty database on that server for one test, dropped after it.

The conformance harness gets only ``tmp_path``, so the same machinery is
reachable without pytest: :func:`server_dsn` and :func:`fresh_database`.

Run as a program (``python -m tests.pg serve DSN [--hold before-commit|after-commit]``)
this module is one pop3frame instance for the multi-process tests: a
PostgresStore with a PostgresLockManager on 127.0.0.1, port chosen by the
OS, printed as ``PORT <n>``; it serves until its standard input closes.
``--hold`` makes UPDATE print ``HOLD <where>`` and block forever at that
point of the deletion transaction, so a test can SIGKILL it there.
"""
from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from typing import List, Optional

import pytest

from tests import reaper
from tests.helpers import free_port, wait_ready

ENV_DSN = "POP3FRAME_TEST_PG_DSN"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Unavailable(RuntimeError):
    """No PostgreSQL server can be used here; the message says why."""


def _find_binaries() -> Optional[str]:
    """Directory holding initdb and postgres: the newest Debian version, else PATH."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in p.split("/")[4].split(".")],
        reverse=True,
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(on_path)
    for initdb in candidates:
        bindir = os.path.dirname(initdb)
        if os.access(os.path.join(bindir, "postgres"), os.X_OK):
            return bindir
    return None


class Cluster:
    """One private PostgreSQL cluster in a temporary directory."""

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.base = tempfile.mkdtemp(prefix="pop3frame-pg-")
        reaper.remove(self.base)
        self.data = os.path.join(self.base, "data")
        self.logfile = os.path.join(self.base, "postgres.log")
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.user = "pop3frame"
        self._as = {}
        if os.geteuid() == 0:
            # postgres refuses to run as root: hand the directory to an
            # unprivileged user and start the binaries as that user.
            for owner in ("postgres", "nobody"):
                try:
                    pw = pwd.getpwnam(owner)
                except KeyError:
                    continue
                os.chown(self.base, pw.pw_uid, pw.pw_gid)
                self._as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
                break
            else:
                raise Unavailable("running as root and neither a postgres nor a nobody user exists")
        os.chmod(self.base, 0o755)

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [os.path.join(self.bindir, args[0]), *args[1:]],
            cwd=self.base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120, **self._as,
        )
        if result.returncode:
            raise Unavailable("%s failed: %s" % (args[0], result.stdout.decode(errors="replace")[-2000:]))

    def dsn(self, dbname: str = "postgres") -> str:
        return "host=127.0.0.1 port=%d user=%s dbname=%s" % (self.port, self.user, dbname)

    def start(self, attempts: int = 3) -> "Cluster":
        self._run("initdb", "-D", self.data, "-U", self.user, "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        for _ in range(attempts):
            self.port = free_port()  # a start that loses the race is retried
            with open(self.logfile, "ab") as log:
                self.proc = subprocess.Popen(
                    [os.path.join(self.bindir, "postgres"), "-D", self.data, "-p", str(self.port),
                     "-c", "listen_addresses=127.0.0.1",
                     "-c", "unix_socket_directories=" + self.base,
                     # Throwaway data: durability buys nothing here.
                     "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                     "-c", "max_connections=300", "-c", "shared_buffers=32MB"],
                    cwd=self.base, stdout=log, stderr=log, **self._as,
                )
            reaper.reap(self.proc.pid, signal.SIGINT)  # SIGINT: "fast" shutdown
            if self._wait_ready():
                return self
            self.stop()
        raise Unavailable("postgres did not start; its log:\n" + self.log()[-3000:])

    def _wait_ready(self, timeout: float = 60.0) -> bool:
        """Wait until our postgres answers; False at once if it exited.

        Another test run's cluster (the same user, trust) may have taken the
        port between free_port() and our bind: ours is the one serving our
        data directory."""
        import psycopg

        def ready() -> bool:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=5) as conn:
                    return conn.execute("SHOW data_directory").fetchone()[0] == self.data
            except psycopg.OperationalError:
                return False

        return wait_ready(self.proc, ready, timeout)

    def log(self) -> str:
        try:
            with open(self.logfile, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # our own child by PID; SIGINT = "fast" shutdown
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGQUIT)  # "immediate" shutdown
                proc.wait(timeout=30)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


_mutex = threading.Lock()
_cluster: Optional[Cluster] = None
_server_dsn: Optional[str] = None
_failure: Optional[str] = None
_db_numbers = itertools.count(1)


def server_dsn() -> str:
    """DSN of the test server's maintenance database; starts the cluster once per process.

    Raises :class:`Unavailable` (remembered: later calls fail fast).
    """
    global _cluster, _server_dsn, _failure
    with _mutex:
        if _server_dsn is not None:
            return _server_dsn
        if _failure is not None:
            raise Unavailable(_failure)
        try:
            try:
                import psycopg  # noqa: F401
            except ImportError:
                raise Unavailable("psycopg is not installed: pip install 'pop3frame[postgres]'") from None
            env = os.environ.get(ENV_DSN)
            if env:
                import psycopg

                try:
                    psycopg.connect(env, connect_timeout=10).close()
                except psycopg.OperationalError as exc:
                    raise Unavailable("%s is set but unusable: %s" % (ENV_DSN, str(exc).strip())) from None
                _server_dsn = env
                return env
            bindir = _find_binaries()
            if bindir is None:
                raise Unavailable("PostgreSQL server binaries not found (apt-get install postgresql)")
            cluster = Cluster(bindir)
            try:
                cluster.start()
            except BaseException:
                cluster.cleanup()
                raise
            _cluster = cluster
            atexit.register(cluster.cleanup)
            _server_dsn = cluster.dsn()
            return _server_dsn
        except Unavailable as exc:
            _failure = str(exc)
            raise


def _admin():
    import psycopg

    return psycopg.connect(server_dsn(), autocommit=True)


def fresh_database() -> str:
    """Create an empty database for one test; returns its DSN."""
    from psycopg.conninfo import make_conninfo

    name = "pop3frame_test_%d_%d" % (os.getpid(), next(_db_numbers))
    with _admin() as conn:
        conn.execute('CREATE DATABASE "%s" TEMPLATE template0' % name)
    return make_conninfo(server_dsn(), dbname=name)


def drop_database(dsn: str) -> None:
    """Drop a database made by :func:`fresh_database`, kicking out leftover sessions."""
    from psycopg.conninfo import conninfo_to_dict

    name = conninfo_to_dict(dsn)["dbname"]
    with _admin() as conn:
        conn.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)


def sql(dsn: str, query: str, params=()):
    """Rows of one autocommit statement on a connection of the caller's own (None if it returns none)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else None


def wait_until_unlocked(dsn: str, mailbox: str) -> None:
    """Block until nobody holds ``mailbox``'s advisory lock, then let go.

    A killed instance's backend releases its locks when PostgreSQL notices
    the closed socket; this waits inside PostgreSQL (``lock_timeout`` 30 s,
    an error after that), not in a polling loop.
    """
    import psycopg

    from pop3frame.adapters.postgres import lock_key

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '30s'")
        conn.execute("SELECT pg_advisory_lock(%s)", (lock_key(mailbox),))
        conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key(mailbox),))


def unavailable(reason: str):
    """Skip, or fail under CI=true (CI is expected to install PostgreSQL)."""
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but PostgreSQL is unavailable: " + reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    try:
        return server_dsn()
    except Unavailable as exc:
        unavailable(str(exc))


@pytest.fixture
def pg_db(pg_dsn) -> str:
    dsn = fresh_database()
    yield dsn
    drop_database(dsn)


# -- a pop3frame instance in its own process ---------------------------------------


class ServerProcess:
    """``python -m tests.pg serve`` as a child: ``port``, ``expect(line)``, ``kill()``, ``stop()``."""

    def __init__(self, dsn: str, *options: str, timeout: float = 60.0) -> None:
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.pg", "serve", dsn, *options],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.pid = self.proc.pid
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._stderr: List[bytes] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True).start()
        try:
            self.port = int(self.expect("PORT", timeout).split()[1])
            self.lock_backend_pid = int(self.expect("LOCKPID", timeout).split()[1])
        except BaseException:  # no with block will stop it
            self.stop()
            raise

    def _pump(self) -> None:
        for raw in self.proc.stdout:
            self._lines.put(raw.decode().strip())
        self._lines.put(None)

    def expect(self, prefix: str, timeout: float = 60.0) -> str:
        """The next output line, which must start with ``prefix`` (blocks on the pipe, no polling)."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("server %d printed nothing within %ss" % (self.pid, timeout)) from None
        if line is None or not line.startswith(prefix):
            raise AssertionError("server %d: expected %s, got %r; stderr:\n%s"
                                 % (self.pid, prefix, line, b"".join(self._stderr).decode(errors="replace")))
        return line

    @property
    def address(self):
        return ("127.0.0.1", self.port)

    def kill(self) -> None:
        """SIGKILL, by the PID of the child this object started."""
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # the server's cue to shut down cleanly
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        for pipe in (self.proc.stdout, self.proc.stderr, self.proc.stdin):
            if pipe is not None and not pipe.closed:
                try:
                    pipe.close()
                except OSError:
                    pass

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _serve(argv: List[str]) -> int:
    import argparse
    import logging

    from pop3frame.adapters.postgres import PostgresLockManager, PostgresStore
    from pop3frame.testing import Controller

    parser = argparse.ArgumentParser(prog="python -m tests.pg serve")
    parser.add_argument("dsn")
    parser.add_argument("--hold", choices=("before-commit", "after-commit"))
    parser.add_argument("--pool-size", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    def hold(where: str) -> None:
        print("HOLD " + where, flush=True)
        threading.Event().wait()  # never set: only SIGKILL ends this

    class Holding(PostgresStore):
        def _before_commit(self, conn, username, messages):
            if args.hold == "before-commit":
                hold("before-commit")

        def delete_messages(self, username, messages):
            super().delete_messages(username, messages)
            if args.hold == "after-commit":
                hold("after-commit")

    store = (Holding if args.hold else PostgresStore)(args.dsn, pool_size=args.pool_size)
    locks = PostgresLockManager(args.dsn)
    with Controller(store, locks=locks) as server:
        print("PORT %d" % server.port, flush=True)
        print("LOCKPID %d" % locks.backend_pid, flush=True)
        sys.stdin.buffer.read()  # serve until the parent closes our stdin (or goes away)
    locks.close()
    store.close()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        sys.exit(_serve(sys.argv[2:]))
    print(__doc__)
    sys.exit(2)
