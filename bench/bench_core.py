"""Core benchmark of pop3frame: sessions/s, RETR throughput, STAT latency, memory per idle session.

Run by hand, never in CI (see bench/README.rst)::

    .venv/bin/python bench/bench_core.py [--adapter maildir|memory] [--quick]

The server (bench/servers/pop3frame_server.py) runs in its own process over
a generated Maildir; the load comes from other processes (bench/loadgen.py),
so client and server do not share a GIL.  On a small machine they do share
the CPU cores, and the output says how many there are.  Every loop is
bounded by a count and a deadline; everything talks to 127.0.0.1 on ports
the OS picks.  A table is printed and bench/results/core-<adapter>.csv
written.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

import launch
import loadgen

RESULTS = os.path.join(launch.HERE, "results")


class Plan:
    """Counts of one run; ``quick`` divides them for a smoke run."""

    def __init__(self, quick: bool = False, idle: Tuple[int, ...] = (1000, 3000)) -> None:
        q = 10 if quick else 1
        self.users = 5000
        self.sessions = {1: 3000 // q, 16: 6000 // q, 32: 6000 // q}
        self.session_seconds = 60.0
        self.quick = q
        self.stat_clients, self.stat_count = 32, 300 // q
        self.idle = tuple(n // q for n in idle)
        self.loopback_mb = 1000 // q

    def retr_repeat(self, size: int) -> int:
        """RETRs of a message of ``size`` bytes: the median of many when each is quick."""
        count = 500 if size < 10_000 else 100 if size < 1_000_000 else 7 if size < 15_000_000 else 5
        return max(3, count // self.quick)


def steps_for(server: launch.Server, plan: Plan, idle: Optional[Tuple[int, ...]] = None,
              sessions_only: bool = False) -> List[Tuple[str, str, Callable[[], Dict[str, float]]]]:
    """(metric, unit, run) for every measurement against one running server.

    ``sessions_only``: the warm-up, sessions/s and STAT latency only (what
    more worker processes change), not RETR or memory.
    """
    users = launch.user_names(plan.users)
    pw = launch.PASSWORD
    steps: List[Tuple[str, str, Callable[[], Dict[str, float]]]] = []
    steps.append(("warm-up (every mailbox once)", "sessions/s",
                  lambda: loadgen.sessions_per_second(users, pw, 4, plan.users, 120.0)))
    for clients, total in plan.sessions.items():
        steps.append(("sessions/s, %d client%s" % (clients, "s" if clients > 1 else ""), "sessions/s",
                      lambda c=clients, t=total: loadgen.sessions_per_second(users, pw, c, t, plan.session_seconds)))
    for label, (size, _) in () if sessions_only else launch.SIZES.items():
        # A 1 KB RETR measures the round trip: RETRs per second, not MB/s.
        steps.append(("RETR %s" % label, "RETR/s" if size < 10_000 else "MB/s",
                      lambda s=size: loadgen.retr_mb_per_s(launch.BIG_USER, pw, s, plan.retr_repeat(s))))
    steps.append(("STAT latency, %d clients" % plan.stat_clients, "ms",
                  lambda: loadgen.stat_latency_ms(users, pw, plan.stat_clients, plan.stat_count)))
    for n in () if sessions_only else plan.idle if idle is None else idle:
        steps.append(("memory per idle session, %d" % n, "KB",
                      lambda n=n: loadgen.idle_kb_per_session(server.pid, users, pw, n)))
    return steps


def rows_of(metric: str, unit: str, result: Dict[str, float]) -> List[Tuple[str, str, float, str]]:
    """Table rows (metric, unit, value, detail) of one step's result."""
    if metric.startswith("STAT latency"):
        detail = "%d STATs, %.0f STAT/s" % (result["done"], result["stat_per_s"])
        return [(metric.replace("latency", "p50"), unit, result["p50"], detail),
                (metric.replace("latency", "p99"), unit, result["p99"], detail)]
    if metric.startswith("memory"):
        return [(metric + " (RSS)", unit, result["value"],
                 "%d conns, VmRSS %d -> %d KB" % (result["done"], result["rss_before"], result["rss_after"])),
                (metric + " (PSS)", unit, result["pss"], "process tree Pss")]
    if metric.startswith("RETR") and unit == "RETR/s":
        return [(metric, unit, result["per_s"], "median of %d, best %.0f" % (result["done"], result["best_per_s"]))]
    if metric.startswith("RETR"):
        return [(metric, unit, result["value"], "median of %d, best %.0f" % (result["done"], result["best"]))]
    if unit == "sessions/s":
        cpu_ms = result.get("server_cpu", 0.0) * 1e3 / result["done"] if result["done"] else float("nan")
        return [(metric, unit, result["value"], "%d sessions in %.1f s, %d errors, server CPU %.2f ms/session"
                 % (result["done"], result["seconds"], result["errors"], cpu_ms))]
    return [(metric, unit, result["value"], "")]


def run_steps(server: launch.Server, steps, progress: Callable[[str, str], None]) -> List[Tuple[str, str, float, str]]:
    loadgen.set_port(server.port)
    rows: List[Tuple[str, str, float, str]] = []
    for metric, unit, run in steps:
        progress(metric, server.name)
        started = time.monotonic()
        cpu0 = loadgen.cpu_seconds(server.pid)
        try:
            result = run()
            result["server_cpu"] = loadgen.cpu_seconds(server.pid) - cpu0
        except Exception as exc:  # one broken step must not cost the others
            print("FAILED: %r" % exc, flush=True)
            nan = float("nan")
            failed = dict.fromkeys(("value", "p50", "p99", "pss", "best", "stat_per_s", "seconds"), nan)
            failed.update(done=0, errors=0, rss_before=0, rss_after=0)
            rows += [(m, u, nan, "failed: %s" % exc) for m, u, _, _ in rows_of(metric, unit, failed)]
            continue
        if server.proc.poll() is not None:
            raise RuntimeError("%s exited during %r" % (server.name, metric))
        new = rows_of(metric, unit, result)
        print(", ".join("%.1f %s" % (r[2], r[1]) for r in new), "(%.1f s)" % (time.monotonic() - started), flush=True)
        if not metric.startswith("warm-up"):
            rows += new
    return rows


def machine() -> str:
    return "%d CPU cores (load generator and server share them), Python %s, %s" % (
        os.cpu_count() or 0, platform.python_version(), platform.platform())


def print_table(header: List[str], rows: List[List[object]]) -> None:
    cells = [[c if isinstance(c, str) else ("-" if c is None or c != c else "%.1f" % c) for c in r] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *cells)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join((c.ljust(w) if k == 0 or k == len(r) - 1 else c.rjust(w))
                        for k, (c, w) in enumerate(zip(r, widths))))


def write_csv(name: str, header: List[str], rows: List[List[object]]) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", choices=("maildir", "memory"), default="maildir")
    parser.add_argument("--quick", action="store_true", help="a tenth of the counts: a smoke run")
    parser.add_argument("--cprofile", metavar="OUT", help="run the server under cProfile, stats to OUT")
    parser.add_argument("--keep", action="store_true", help="keep the temporary Maildir and logs")
    parser.add_argument("--workers", help="pop3frame serve --workers (N or auto; default: the CLI's, 1)")
    args = parser.parse_args()
    launch.raise_fd_limit()
    plan = Plan(args.quick)
    print(machine())
    d = tempfile.mkdtemp(prefix="pop3frame-bench-")
    rows: List[Tuple[str, str, float, str]] = []
    try:
        print("building Maildir (%d users) in %s ..." % (plan.users, d), flush=True)
        launch.build_maildir(d, plan.users)
        extra = ("--cprofile", os.path.abspath(args.cprofile)) if args.cprofile else ()
        with launch.start("pop3frame", d, adapter=args.adapter, extra=extra, workers=args.workers) as server:
            steps = steps_for(server, plan)
            total = len(steps) + 1
            count = [0]

            def progress(metric: str, name: str) -> None:
                count[0] += 1
                print("[%d/%d] %s %s ..." % (count[0], total, metric, name), end=" ", flush=True)

            rows += run_steps(server, steps, progress)
        progress("raw loopback, %d MB" % plan.loopback_mb, "socket pair")
        result = loadgen.loopback_mb_per_s(plan.loopback_mb)
        print("%.1f MB/s" % result["value"])
        rows.append(("raw loopback %d MB" % plan.loopback_mb, "MB/s", result["value"], "plain sender/receiver processes"))
    finally:
        if not args.keep:
            subprocess.run(["rm", "-rf", d], check=False)
    header = ["metric", "unit", "pop3frame (%s)" % args.adapter, "detail"]
    table = [list(r[:3]) + [r[3]] for r in rows]
    print()
    print_table(header, table)
    print("\n" + machine())
    print("wrote", write_csv("core-%s.csv" % args.adapter, header, table))


if __name__ == "__main__":
    main()
