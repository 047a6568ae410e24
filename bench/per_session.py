"""System calls and CPU instructions per session, for before/after comparisons.

Timings on a shared 2-core machine move by tens of percent with whatever
else runs; these two counts do not.  Run by hand (not in CI)::

    .venv/bin/python bench/per_session.py strace     # apt-get install strace
    .venv/bin/python bench/per_session.py callgrind  # apt-get install valgrind
    .venv/bin/python bench/per_session.py callgrind --retr "100KB"

``pop3frame serve`` (``--pop3frame`` names the executable, e.g. another
checkout's) serves the benchmark Maildir of bench/launch.py; one client
runs sessions of connect, USER, PASS, STAT, QUIT (``--retr LABEL`` adds a
RETR of that message of launch.SIZES, as user ``bench``), lock-step.

``strace``: after two warm-up sessions, ``strace -f`` attaches and the
first mailbox's session runs again; prints the system calls of the connection's thread (the one
that read the commands) and of the whole process, by name.

``callgrind``: the server runs under ``valgrind --tool=callgrind`` with
instrumentation off; after a warm-up session per mailbox ``callgrind_control`` switches it on
for ``--sessions`` sessions and dumps; prints instructions (Ir) per
session, every thread included (the log writer too).
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import launch

HERE = os.path.dirname(os.path.abspath(__file__))


def session(port: int, user: bytes, retr: int = 0, repeat: int = 1) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as c:
        f = c.makefile("rb")
        f.readline()
        commands = [b"USER " + user, b"PASS " + launch.PASSWORD.encode(), b"STAT"]
        for cmd in commands:
            c.sendall(cmd + b"\r\n")
            reply = f.readline()
            if not reply.startswith(b"+OK"):
                raise RuntimeError("%r refused: %r" % (cmd, reply))
        for _ in range(repeat if retr else 0):
            c.sendall(b"RETR %d\r\n" % retr)
            while f.readline() != b".\r\n":
                pass
        c.sendall(b"QUIT\r\n")
        f.readline()


def retr_number(port: int, label: str) -> int:
    import loadgen

    loadgen.set_port(port)
    s = loadgen.login(launch.BIG_USER, launch.PASSWORD)
    number, _ = loadgen.find_message(s, launch.SIZES[label][0], bytearray(1 << 16))
    s.sendall(b"QUIT\r\n")
    s.close()
    return number


def count_strace(path: str, show: bool = False) -> None:
    lines = open(path).read().splitlines()
    if show:
        print("\n".join(lines))
    by_tid: "collections.defaultdict[str, collections.Counter]" = collections.defaultdict(collections.Counter)
    for line in lines:
        m = re.match(r"(\d+)\s+(\w+)\(", line)
        if m:
            by_tid[m.group(1)][m.group(2)] += 1
    conn = next((tid for tid, calls in by_tid.items() if calls["recvfrom"] or calls["read"]), None)
    total: collections.Counter = sum(by_tid.values(), collections.Counter())
    if conn is not None:
        calls = by_tid[conn]
        print("connection thread: %d system calls: %s" % (sum(calls.values()), dict(calls.most_common())))
    print("whole process:     %d system calls: %s" % (sum(total.values()), dict(total.most_common())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("strace", "callgrind"))
    parser.add_argument("--pop3frame", default=os.path.join(os.path.dirname(sys.executable), "pop3frame"))
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--retr", choices=list(launch.SIZES), help="RETR this message in every session")
    parser.add_argument("--repeat", type=int, default=1,
                        help="callgrind: RETRs per session (one session of that many RETRs is measured:"
                             " instructions per RETR)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--show", action="store_true", help="strace: print the trace too")
    args = parser.parse_args()
    d = tempfile.mkdtemp(prefix="pop3frame-per-session-")
    try:
        launch.build_maildir(d, max(args.sessions, 10))
        time.sleep(2.1)  # files and directories older than the "changed just now" windows
        port = launch.free_port()
        cmd = [args.pop3frame, "serve", "--maildir", os.path.join(d, "mail"), "--passwd", os.path.join(d, "passwd"),
               "--listen", "127.0.0.1:%d" % port, "--log-level", args.log_level]
        out = os.path.join(d, "callgrind.out")
        if args.mode == "callgrind":
            cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--callgrind-out-file=" + out] + cmd
        with open(os.path.join(d, "server.log"), "wb") as log:
            server = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                      preexec_fn=launch._child_setup)
        try:
            launch.wait_for_port(port, server, 300)
            users = [b"bench%d" % i for i in range(args.sessions)]
            number = retr_number(port, args.retr) if args.retr else 0
            who = [launch.BIG_USER.encode()] * args.sessions if number else users
            # Warm-up, as the benchmark's: every mailbox once (size caches),
            # and a connection thread to reuse.
            for user in (who[:2] if args.mode == "strace" else who):
                session(port, user, number)
            if args.mode == "strace":
                trace = os.path.join(d, "strace.out")
                tracer = subprocess.Popen(["strace", "-f", "-qq", "-p", str(server.pid), "-o", trace])
                time.sleep(1.0)
                session(port, who[0], number)
                time.sleep(0.5)
                tracer.terminate()
                tracer.wait(30)
                count_strace(trace, args.show)
            else:
                subprocess.run(["callgrind_control", "-i", "on", str(server.pid)], check=True, capture_output=True)
                if args.repeat > 1:
                    who = who[:1]
                for user in who:
                    session(port, user, number, args.repeat)
                time.sleep(0.5)  # the log writer's last lines
                subprocess.run(["callgrind_control", "-d", str(server.pid)], check=True, capture_output=True)
                dumps = [p for p in glob.glob(out + "*") if os.path.getsize(p)]
                total = 0
                for path in dumps:
                    for line in open(path, errors="replace"):
                        if line.startswith("summary:") or line.startswith("totals:"):
                            total = max(total, int(line.split()[1]))
                if args.repeat > 1:
                    print("one session of %d RETR %s: %.0f instructions per RETR (%d in all)"
                          % (args.repeat, args.retr, total / args.repeat, total))
                else:
                    print("%d sessions%s: %.0f instructions per session (%d in all)"
                          % (len(who), " with RETR %s" % args.retr if number else "", total / len(who), total))
        finally:
            server.terminate()
            server.wait(120)
    finally:
        subprocess.run(["rm", "-rf", d], check=False)


if __name__ == "__main__":
    main()
