"""Sessions per second: one pop3frame instance vs two on one PostgreSQL.

Run by hand::

    .venv/bin/python bench/bench_postgres.py                 # throwaway cluster (tests/pg.py)
    .venv/bin/python bench/bench_postgres.py --dsn "host=db user=bench dbname=postgres"

With ``--dsn`` the role needs CREATEDB: a database ``pop3frame_bench_<pid>``
is created and dropped.  Each instance is a separate process
(``--serve``) with a PostgresStore and a PostgresLockManager, listening on
127.0.0.1.  ``--clients`` concurrent clients (threads spread over
``--client-procs`` processes, so the load generator is not one GIL) each
run exactly ``--sessions`` sessions of USER, PASS, STAT, UIDL, RETR 1,
QUIT on a mailbox of their own, spread round-robin over the instances;
everything is bounded, nothing loops on time.  Passwords are PLAIN so the
measurement is the server and the database, not scrypt/argon2.

Prints sessions/s of every round, how far each instance's connection
pool grew (it may grow to the thread count, ``--pool-size`` caps it), and
the ratio 2 instances / 1 of the best and of the median rounds.
On one small host the instances, PostgreSQL and the load generator share
the same cores: the ratio shows how much a single instance leaves on the
table there, not the scaling across machines.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MESSAGE = b"Subject: bench\r\nFrom: a@example.org\r\n\r\n" + (b"x" * 76 + b"\r\n") * 50  # ~4 KB


def serve(dsn: str, pool_size: Optional[int]) -> int:
    """One instance: print the port, serve until stdin closes."""
    from pop3frame.adapters.postgres import PostgresLockManager, PostgresStore
    from pop3frame.config import ServerConfig
    from pop3frame.server import ServerGroup

    config = ServerConfig(hostname="localhost")
    # As ``pop3frame serve`` does: the pool follows the thread count unless capped.
    store = PostgresStore(dsn, threads=config.max_connections, pool_size=pool_size)
    locks = PostgresLockManager(dsn)
    group = ServerGroup(store, config, locks=locks)
    server = group.add_listener(("127.0.0.1", 0))
    group.start(poll_interval=0.5)
    print("PORT %d" % server.server_address[1], flush=True)
    sys.stdin.buffer.read()
    group.shutdown()
    # How far the pool grew, and how often a call found no idle connection
    # and waited (for a new one to open, or for one to come back).
    stats = store._pool.get_stats()
    print("POOL opened %d connections, %d calls waited" % (stats.get("connections_num", 0),
                                                          stats.get("requests_queued", 0)), flush=True)
    locks.close()
    store.close()
    return 0


def _session(port: int, user: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        f = sock.makefile("rb")

        def line() -> bytes:
            reply = f.readline()
            if not reply.startswith(b"+OK"):
                raise RuntimeError("%s: %r" % (user, reply))
            return reply

        def multiline() -> None:
            while f.readline() != b".\r\n":
                pass

        line()
        for cmd, multi in ((b"USER " + user.encode(), False), (b"PASS pw", False), (b"STAT", False),
                           (b"UIDL", True), (b"RETR 1", True), (b"QUIT", False)):
            sock.sendall(cmd + b"\r\n")
            line()
            if multi:
                multiline()
        f.close()


def _client_process(ports: List[int], first: int, threads: int, sessions: int, go, results) -> None:
    errors = []

    def run(n: int) -> None:
        port = ports[n % len(ports)]
        try:
            for _ in range(sessions):
                _session(port, "bench%03d" % n)
        except Exception as exc:
            errors.append(repr(exc))

    workers = [threading.Thread(target=run, args=(first + i,)) for i in range(threads)]
    go.wait()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    results.put(errors)


def measure(ports: List[int], clients: int, procs: int, sessions: int) -> float:
    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    results = ctx.Queue()
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    starts = [sum(per[:i]) for i in range(procs)]
    workers = [ctx.Process(target=_client_process, args=(ports, starts[i], per[i], sessions, go, results))
               for i in range(procs)]
    for w in workers:
        w.start()
    begin = time.perf_counter()
    go.set()
    errors = []
    for _ in workers:
        errors += results.get()
    elapsed = time.perf_counter() - begin
    for w in workers:
        w.join()
    if errors:
        raise RuntimeError("%d client errors, first: %s" % (len(errors), errors[0]))
    return clients * sessions / elapsed


class Instance:
    def __init__(self, dsn: str, pool_size: Optional[int]) -> None:
        cap = ["--pool-size", str(pool_size)] if pool_size else []
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", dsn, *cap],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError("instance did not start: %r" % line)
        self.port = int(line.split()[1])

    def stop(self) -> str:
        """Stop the instance; returns its pool report line."""
        self.proc.stdin.close()
        report = self.proc.stdout.readline().decode().strip()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by PID
            self.proc.wait()
        self.proc.stdout.close()
        return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="server to create the bench database on (default: throwaway cluster)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--sessions", type=int, default=60, help="sessions per client")
    parser.add_argument("--pool-size", type=int, help="cap each instance's pool (default: the thread count)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternating 1/2-instance runs; the best and the median are reported")
    parser.add_argument("--serve", metavar="DSN", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.pool_size)

    import psycopg
    from psycopg.conninfo import make_conninfo

    from pop3frame.adapters.postgres import PostgresStore

    if args.dsn:
        admin = args.dsn
    else:
        from tests import pg

        admin = pg.server_dsn()
    name = "pop3frame_bench_%d" % os.getpid()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute('CREATE DATABASE "%s"' % name)
    dsn = make_conninfo(admin, dbname=name)
    try:
        with PostgresStore(dsn) as store:
            for n in range(args.clients):
                store.add_user("bench%03d" % n, "pw", scheme="PLAIN")
                for _ in range(3):
                    store.deliver("bench%03d" % n, MESSAGE)
        print("%d clients x %d sessions, %d client processes, pool_size %s, %d CPUs"
              % (args.clients, args.sessions, args.client_procs, args.pool_size or "= thread count",
                 os.cpu_count() or 0))
        rates: dict = {1: [], 2: []}
        for rnd in range(args.rounds):
            for count in (1, 2):
                instances = [Instance(dsn, args.pool_size) for _ in range(count)]
                try:
                    measure([i.port for i in instances], args.clients, args.client_procs, 3)  # warm-up
                    rate = measure([i.port for i in instances], args.clients, args.client_procs, args.sessions)
                finally:
                    reports = [i.stop() for i in instances]
                rates[count].append(rate)
                print("round %d: %d instance%s: %7.1f sessions/s  (%s)"
                      % (rnd + 1, count, "s" if count > 1 else " ", rate, "; ".join(reports)))
        # Other processes on a shared host only ever slow a round down: the
        # best round is the least disturbed one; the median shows the spread.
        for label, pick in (("best", max), ("median", statistics.median)):
            one, two = pick(rates[1]), pick(rates[2])
            print("%s: 1 instance %.1f sessions/s, 2 instances %.1f sessions/s, ratio %.2f"
                  % (label, one, two, two / one))
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
