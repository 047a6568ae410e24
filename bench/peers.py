"""pop3frame side by side with Twisted's twisted.mail.pop3 and Dovecot, over the same Maildir.

Run by hand (not in CI), as root on Debian/Ubuntu; see bench/README.rst::

    apt-get install -y dovecot-pop3d
    python3 -m venv /tmp/pf-peers
    /tmp/pf-peers/bin/pip install twisted matplotlib
    /tmp/pf-peers/bin/python bench/peers.py

Twisted and matplotlib live in a virtualenv of their own, never in the
project's.  pop3frame runs with the project's Python (``.venv/bin/python``
when it exists) and gets pop3frame from there.  Each server in turn serves
the same generated Maildir and passwd-file (bench/launch.py) and gets the
same measurements as bench_core.py.  Prints a table with pop3frame/peer
ratios, writes bench/results/peers.csv and, with matplotlib,
bench/results/peers.png.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

import bench_core
import launch
import loadgen

ORDER = ("pop3frame", "twisted", "dovecot")
LOWER_IS_BETTER = ("ms", "KB")


def project_python() -> str:
    venv = os.path.join(launch.REPO, ".venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def dovecot_pop3_installed() -> bool:
    if shutil.which("dovecot") is None:
        return False
    libexec = subprocess.run(["dovecot", "config", "-h", "libexec_dir"], capture_output=True, text=True).stdout.strip()
    return os.access(os.path.join(libexec or "/usr/lib/dovecot", "pop3"), os.X_OK)


def progress_bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // total
    return "[%s%s] %d/%d" % ("#" * filled, "." * (width - filled), done, total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", default=",".join(ORDER), help="comma-separated, from %s" % ", ".join(ORDER))
    parser.add_argument("--pop3frame-python", default=project_python())
    parser.add_argument("--twisted-python", default=sys.executable, help="a Python with Twisted installed")
    parser.add_argument("--baseline-python", metavar="PYTHON",
                        help="the Python of another pop3frame checkout (e.g. one made with 'git worktree add' at an"
                             " older commit): a column 'baseline' measured like pop3frame, compared like a peer")
    parser.add_argument("--adapter", choices=("maildir", "memory"), default="maildir", help="pop3frame's adapter")
    parser.add_argument("--dovecot-idle", type=int, default=1000,
                        help="idle sessions for Dovecot (one process each; default 1000)")
    parser.add_argument("--workers", default="1",
                        help="comma-separated pop3frame serve --workers values, e.g. 1,2,4,auto: the first gets"
                             " every measurement, the others sessions/s and STAT latency (default 1)")
    parser.add_argument("--quick", action="store_true", help="a tenth of the counts: a smoke run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary Maildir and logs")
    args = parser.parse_args()
    launch.raise_fd_limit()
    plan = bench_core.Plan(args.quick)
    servers = [s for s in args.servers.split(",") if s]
    workers = [w for w in args.workers.split(",") if w]
    #: Each pop3frame configuration is a column of its own: name -> --workers.
    variants = {("pop3frame" if k == 0 else "pop3frame --workers %s" % w): w for k, w in enumerate(workers)}
    if "pop3frame" in servers:
        at = servers.index("pop3frame")
        servers[at:at + 1] = list(variants) + (["baseline"] if args.baseline_python else [])
    if "dovecot" in servers and not dovecot_pop3_installed():
        # dovecot-imapd alone brings the dovecot binary but not its POP3 service.
        print("Dovecot's POP3 server not installed (apt-get install dovecot-pop3d): skipping it")
        servers.remove("dovecot")
    print(bench_core.machine())
    d = tempfile.mkdtemp(prefix="pop3frame-peers-")
    results: Dict[str, Dict[str, Tuple[str, float]]] = {}
    #: metric -> server -> detail (sessions and errors, best of, VmRSS before/after ...)
    details: Dict[str, Dict[str, str]] = {}
    order: List[str] = []
    try:
        print("building Maildir (%d users) in %s ..." % (plan.users, d), flush=True)
        launch.build_maildir(d, plan.users)
        python = {"pop3frame": args.pop3frame_python, "twisted": args.twisted_python, "baseline": args.baseline_python}
        idle = {"dovecot": (args.dovecot_idle // (10 if args.quick else 1),)}
        # Count the steps first, for the progress line.
        def steps(server: launch.Server):
            return bench_core.steps_for(server, plan, idle.get(server.name),
                                        sessions_only=server.name.startswith("pop3frame --workers"))

        per_server = {name: len(steps(launch.Server(name, None, 0))) for name in servers}
        total = sum(per_server.values()) + 1
        count = [0]

        def progress(metric: str, name: str) -> None:
            count[0] += 1
            print("%s %s: %s ..." % (progress_bar(count[0], total), name, metric), end=" ", flush=True)

        for name in servers:
            kind = "pop3frame" if name in variants or name == "baseline" else name
            # --workers 1 is the CLI's default: not passed, so the tools run
            # against a pop3frame without the option too.
            processes = variants.get(name)
            try:
                with launch.start(kind, d, python=python.get(name, python.get(kind)), adapter=args.adapter,
                                  workers=None if processes in (None, "1") else processes) as server:
                    server.name = name
                    rows = bench_core.run_steps(server, steps(server), progress)
            except RuntimeError as exc:  # one server that will not run must not cost the others' figures
                print("%s: %s; left out" % (name, exc), flush=True)
                count[0] += per_server[name]
                continue
            results[name] = {}
            for metric, unit, value, detail in rows:
                results[name][metric] = (unit, value)
                details.setdefault(metric, {})[name] = detail
                if metric not in order:
                    order.append(metric)
        progress("raw loopback, %d MB" % plan.loopback_mb, "socket pair")
        loop = loadgen.loopback_mb_per_s(plan.loopback_mb)["value"]
        print("%.1f MB/s" % loop)
    finally:
        if args.keep:
            print("kept", d)
        else:
            subprocess.run(["rm", "-rf", d], check=False)

    names = [n for n in list(variants) + ["baseline"] + [o for o in ORDER if o not in variants] if n in results]
    mine = [n for n in names if n in variants]
    peers = [n for n in names if n not in variants]
    pairs = [(m, p) for m in mine for p in peers]
    header = ["metric", "unit"] + names + ["%s/%s" % (m.replace("pop3frame --workers ", "w"), p) for m, p in pairs]
    table: List[List[object]] = []
    for metric in order:
        unit = next(results[n][metric][0] for n in names if metric in results[n])
        values = [results[n].get(metric, (unit, None))[1] for n in names]
        ratios = []
        for m, p in pairs:
            ours, theirs = results[m].get(metric, (unit, None))[1], results[p].get(metric, (unit, None))[1]
            ratios.append(ours / theirs if ours is not None and theirs else None)
        table.append([metric, unit + (" (lower is better)" if unit in LOWER_IS_BETTER else "")] + values + ratios)
    table.append(["raw loopback %d MB" % plan.loopback_mb, "MB/s", loop] + [None] * (len(header) - 3))
    print()
    bench_core.print_table(header + [""], [r + [""] for r in table])
    print("\nDetails:")
    for metric in order:
        for name in names:
            if details.get(metric, {}).get(name):
                print("  %-40s %-10s %s" % (metric, name, details[metric][name]))
    print("\n" + bench_core.machine())
    detail_rows = [r + [details.get(r[0], {}).get(n, "") for n in names] for r in table]
    print("wrote", bench_core.write_csv("peers.csv", header + ["detail %s" % n for n in names], detail_rows))
    chart(names, order, results, loop)


def chart(names: List[str], order: List[str], results, loop: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart")
        return
    metrics = [m for m in order if "(PSS)" not in m]
    cols = 4
    rows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows))
    colours = {"pop3frame": "#2a7", "twisted": "#e82", "dovecot": "#68c"}
    for ax, metric in zip(axes.flat, metrics):
        present = [n for n in names if metric in results[n] and results[n][metric][1] == results[n][metric][1]]
        unit = results[present[0]][metric][0] if present else ""
        ax.bar([n.replace("pop3frame --workers ", "w") for n in present], [results[n][metric][1] for n in present],
               color=[colours.get(n, "#5c9") for n in present])
        if metric.startswith("RETR") and unit == "MB/s" and "MB" in metric:  # big messages: bandwidth
            ax.axhline(loop, color="grey", linestyle="--", linewidth=1)
            ax.text(0, loop, "raw loopback", fontsize=7, va="bottom", color="grey")
        better = "lower" if unit in LOWER_IS_BETTER else "higher"
        ax.set_title("%s\n%s, %s is better" % (metric, unit, better), fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    path = os.path.join(bench_core.RESULTS, "peers.png")
    fig.savefig(path, dpi=110)
    print("wrote", path)


if __name__ == "__main__":
    main()
