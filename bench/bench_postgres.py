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

Prints sessions/s for each configuration and the ratio 2 instances / 1.
On one small host the instances, PostgreSQL and the load generator share
the same cores: the ratio shows how much a single instance leaves on the
table there, not the scaling across machines.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MESSAGE = b"Subject: bench\r\nFrom: a@example.org\r\n\r\n" + (b"x" * 76 + b"\r\n") * 50  # ~4 KB


def serve(dsn: str, pool_size: int) -> int:
    """One instance: print the port, serve until stdin closes."""
    from pop3frame.adapters.postgres import PostgresLockManager, PostgresStore
    from pop3frame.config import ServerConfig
    from pop3frame.server import ServerGroup

    store = PostgresStore(dsn, pool_size=pool_size, pool_min_size=pool_size)
    locks = PostgresLockManager(dsn)
    group = ServerGroup(store, ServerConfig(hostname="localhost"), locks=locks)
    server = group.add_listener(("127.0.0.1", 0))
    group.start(poll_interval=0.5)
    print("PORT %d" % server.server_address[1], flush=True)
    sys.stdin.buffer.read()
    group.shutdown()
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
    def __init__(self, dsn: str, pool_size: int) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", dsn,
                                      "--pool-size", str(pool_size)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError("instance did not start: %r" % line)
        self.port = int(line.split()[1])

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by PID
            self.proc.wait()
        self.proc.stdout.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="server to create the bench database on (default: throwaway cluster)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--sessions", type=int, default=60, help="sessions per client")
    parser.add_argument("--pool-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternating 1/2-instance runs; best of each kept")
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
        print("%d clients x %d sessions, %d client processes, pool_size %d, %d CPUs"
              % (args.clients, args.sessions, args.client_procs, args.pool_size, os.cpu_count() or 0))
        best = {1: 0.0, 2: 0.0}
        for rnd in range(args.rounds):
            for count in (1, 2):
                instances = [Instance(dsn, args.pool_size) for _ in range(count)]
                try:
                    measure([i.port for i in instances], args.clients, args.client_procs, 3)  # warm-up
                    rate = measure([i.port for i in instances], args.clients, args.client_procs, args.sessions)
                finally:
                    for i in instances:
                        i.stop()
                best[count] = max(best[count], rate)
                print("round %d: %d instance%s: %7.1f sessions/s" % (rnd + 1, count, "s" if count > 1 else " ", rate))
        print("best: 1 instance %.1f sessions/s, 2 instances %.1f sessions/s, ratio %.2f"
              % (best[1], best[2], best[2] / best[1]))
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
