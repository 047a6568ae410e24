"""Core benchmark: sessions/s, RETR throughput, idle-session memory.

Run by hand (not in CI):  .venv/bin/python bench/bench_core.py

The server runs in its own process (memory adapter) and the load comes from
other processes, so client and server do not share a GIL.  Every loop is
bounded by a count; everything talks to 127.0.0.1 on OS-chosen ports.
Results are printed and written to bench/results/core.csv.
"""
from __future__ import annotations

import csv
import multiprocessing
import os
import resource
import socket
import subprocess
import sys
import time

SERVER = r"""
import resource, sys, threading
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
from pop3frame import ServerConfig
from pop3frame.adapters.memory import MemoryAdapter
from pop3frame.server import ServerGroup
store = MemoryAdapter(apop=False)
for i in range(6000):
    store.add_user("u%d" % i, "pw")
    store.deliver("u%d" % i, b"Subject: hello\r\n\r\n" + b"x" * 1000 + b"\r\n")
store.add_user("big", "pw")
for size in (1_000, 100_000, 10_000_000, 20_000_000):
    line = b"y" * 76 + b"\n"
    store.deliver("big", b"Subject: %d\n\n" % size + line * (size // len(line)))
group = ServerGroup(store, ServerConfig(max_connections=10000))
server = group.add_listener(("127.0.0.1", 0))
print(server.port, flush=True)
group.start()
threading.Event().wait()
"""

RETR_SIZES = (1_000, 100_000, 10_000_000, 20_000_000)


def read_until(sock: socket.socket, end: bytes, buf: bytearray) -> int:
    total, tail, keep = 0, b"", len(end)
    view = memoryview(buf)
    while True:
        n = sock.recv_into(view)
        if not n:
            raise EOFError
        total += n
        tail = (tail + bytes(view[max(0, n - keep):n]))[-keep:]
        if tail == end:
            return total


def session_worker(port: int, sessions: int, offset: int, out) -> None:
    buf = bytearray(1 << 16)
    for i in range(sessions):
        s = socket.create_connection(("127.0.0.1", port))
        read_until(s, b"\r\n", buf)
        s.sendall(b"USER u%d\r\nPASS pw\r\nSTAT\r\nQUIT\r\n" % ((offset + i) % 6000))
        read_until(s, b"signing off (1 message left)\r\n", buf)
        s.close()
    out.put(sessions)


def sessions_per_second(port: int, clients: int, total: int) -> float:
    queue = multiprocessing.Queue()
    each = total // clients
    procs = [multiprocessing.Process(target=session_worker, args=(port, each, k * each, queue)) for k in range(clients)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    done = sum(queue.get(timeout=300) for _ in procs)
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join(30)
    return done / elapsed


def retr_mb_per_s(port: int, number: int, repeat: int) -> float:
    buf = bytearray(1 << 20)
    s = socket.create_connection(("127.0.0.1", port))
    read_until(s, b"\r\n", buf)
    s.sendall(b"USER big\r\nPASS pw\r\n")
    read_until(s, b"octets)\r\n", buf)
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        s.sendall(b"RETR %d\r\n" % number)
        n = read_until(s, b"\r\n.\r\n", buf)
        best = max(best, n / (time.perf_counter() - start) / 1e6)
    s.sendall(b"QUIT\r\n")
    s.close()
    return best


def loopback_mb_per_s(total_mb: int = 1000) -> float:
    listener = socket.create_server(("127.0.0.1", 0))

    def sink(port, q):
        c = socket.create_connection(("127.0.0.1", port))
        buf, n = bytearray(1 << 20), 0
        start = time.perf_counter()
        while True:
            k = c.recv_into(buf)
            if not k:
                break
            n += k
        q.put(n / (time.perf_counter() - start) / 1e6)

    q = multiprocessing.Queue()
    p = multiprocessing.Process(target=sink, args=(listener.getsockname()[1], q))
    p.start()
    conn, _ = listener.accept()
    chunk = b"z" * (1 << 20)
    for _ in range(total_mb):
        conn.sendall(chunk)
    conn.close()
    result = q.get(timeout=120)
    p.join(30)
    return result


def rss_kb(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def idle_kb_per_session(port: int, pid: int, count: int) -> float:
    socks = []
    buf = bytearray(4096)
    before = rss_kb(pid)
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        read_until(s, b"\r\n", buf)
        s.sendall(b"USER u%d\r\nPASS pw\r\n" % i)
        read_until(s, b"octets)\r\n", buf)
        socks.append(s)
    after = rss_kb(pid)
    for s in socks:
        s.close()
    return (after - before) / count


def main() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    rows = []
    try:
        port = int(server.stdout.readline())
        steps = [("sessions/s, 1 client", lambda: sessions_per_second(port, 1, 3000))]
        steps += [("sessions/s, %d clients" % c, lambda c=c: sessions_per_second(port, c, 6000)) for c in (16, 32)]
        steps += [("RETR MB/s, %s" % _size(n), lambda i=i: retr_mb_per_s(port, i, 5 if n > 1e6 else 200))
                  for i, n in enumerate(RETR_SIZES, 1)]
        steps.append(("raw loopback MB/s", loopback_mb_per_s))
        steps += [("RSS KB per idle session, %d" % n, lambda n=n: idle_kb_per_session(port, server.pid, n))
                  for n in (1000, 5000)]
        for k, (name, run) in enumerate(steps, 1):
            print("[%d/%d] %s ..." % (k, len(steps), name), end=" ", flush=True)
            value = run()
            print("%.1f" % value)
            rows.append((name, round(value, 1)))
    finally:
        server.kill()
        server.wait()
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "core.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("metric", "value"), *rows])
    width = max(len(n) for n, _ in rows)
    print("\n%s  %s" % ("metric".ljust(width), "value"))
    for name, value in rows:
        print("%s  %10.1f" % (name.ljust(width), value))
    print("\ncores: %d (client and server share them)" % os.cpu_count())


def _size(n: int) -> str:
    return "%d MB" % (n // 1_000_000) if n >= 1_000_000 else "%d KB" % (n // 1000)


if __name__ == "__main__":
    main()
