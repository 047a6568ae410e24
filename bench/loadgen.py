"""Load generation shared by the benchmarks: raw sockets, separate processes.

Every loop is bounded twice, by a count and by a deadline, and talks only to
127.0.0.1.  Replies are recognised by framing (CRLF counts, the CRLF.CRLF
terminator), never by their text, so the same code drives pop3frame,
Dovecot and Twisted.  Clients are separate processes (multiprocessing,
fork), so the load generator does not share a GIL with the server, nor
its client processes with each other.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import statistics
import time
from typing import Dict, List, Sequence, Tuple

HOST = "127.0.0.1"
#: Socket timeout: a server that stops answering fails the step, never hangs it.
TIMEOUT = 60.0


class Failed(Exception):
    """The server answered -ERR or closed the connection."""


def read_until(sock: socket.socket, end: bytes, buf: bytearray) -> int:
    """Read until the stream ends with ``end`` (checked across recv boundaries); return bytes read."""
    total, tail, keep = 0, b"", len(end)
    view = memoryview(buf)
    while True:
        n = sock.recv_into(view)
        if not n:
            raise Failed("server closed the connection")
        total += n
        tail = (tail + bytes(view[max(0, n - keep):n]))[-keep:]
        if tail == end:
            return total


def read_lines(sock: socket.socket, count: int, buf: bytearray) -> bytes:
    """Read exactly enough to hold ``count`` CRLF-terminated reply lines."""
    data = b""
    while data.count(b"\r\n") < count:
        n = sock.recv_into(buf)
        if not n:
            raise Failed("server closed the connection")
        data += bytes(buf[:n])
    return data


def command(sock: socket.socket, line: bytes, buf: bytearray) -> bytes:
    """One single-line command, lock-step (send, wait for the reply line)."""
    sock.sendall(line + b"\r\n")
    reply = read_lines(sock, 1, buf)
    if not reply.startswith(b"+OK"):
        raise Failed("%r -> %r" % (line.split()[0], reply[:200]))
    return reply


def connect() -> Tuple[socket.socket, bytearray]:
    return socket.create_connection((HOST, _port), timeout=TIMEOUT), bytearray(1 << 16)


_port = 0


def set_port(port: int) -> None:
    """The port every function below talks to (kept global so forked workers inherit it)."""
    global _port
    _port = port


def login(user: str, password: str, pipelined: bool = False) -> socket.socket:
    """A connection in the TRANSACTION state."""
    s, buf = connect()
    read_lines(s, 1, buf)
    if pipelined:  # idle-connection setup only: two commands, one send
        s.sendall(b"USER %s\r\nPASS %s\r\n" % (user.encode(), password.encode()))
        reply = read_lines(s, 2, buf)
        if reply.count(b"+OK") != 2:
            raise Failed("login %s: %r" % (user, reply[:200]))
    else:
        command(s, b"USER " + user.encode(), buf)
        command(s, b"PASS " + password.encode(), buf)
    return s


# -- sessions per second ------------------------------------------------------

def _session_worker(users, password, count, offset, stride, deadline, go, out) -> None:
    buf = bytearray(4096)
    done = 0
    errors: List[str] = []
    go.wait(30)
    for i in range(count):
        if time.monotonic() > deadline:
            break
        # Client k uses users k, k+stride, ...: no two clients share a mailbox
        # at the same moment, so nobody waits for a mailbox lock.
        user = users[(offset + i * stride) % len(users)].encode()
        try:
            with socket.create_connection((HOST, _port), timeout=TIMEOUT) as s:
                read_lines(s, 1, buf)
                # Lock-step, as fetchmail, mpop and mail clients talk.
                command(s, b"USER " + user, buf)
                command(s, b"PASS " + password.encode(), buf)
                command(s, b"STAT", buf)
                command(s, b"QUIT", buf)
            done += 1
        except (OSError, Failed) as exc:
            errors.append(repr(exc))
            if len(errors) >= 3:  # a broken setup: fail fast, not after minutes
                break
    out.put((done, time.monotonic(), errors[:3], len(errors)))


def sessions_per_second(users: Sequence[str], password: str, clients: int, total: int,
                        max_seconds: float = 60.0) -> Dict[str, float]:
    """Full sessions (connect, greeting, USER, PASS, STAT, QUIT) per second.

    ``clients`` processes run at once, ``total`` sessions in all, or fewer
    if ``max_seconds`` runs out; the rate is completed sessions over the
    time from the common start to the last finisher.
    """
    queue: multiprocessing.Queue = multiprocessing.Queue()
    go = multiprocessing.Event()
    each = max(1, total // clients)
    start_deadline = time.monotonic() + max_seconds + 2
    procs = [multiprocessing.Process(target=_session_worker,
                                     args=(users, password, each, k, clients, start_deadline, go, queue))
             for k in range(clients)]
    for p in procs:
        p.start()
    time.sleep(0.3)  # let every worker reach go.wait()
    start = time.monotonic()
    go.set()
    results = [queue.get(timeout=max_seconds + 60) for _ in procs]
    for p in procs:
        p.join(30)
    done = sum(r[0] for r in results)
    end = max(r[1] for r in results)
    errors = sum(r[3] for r in results)
    if errors:
        print("\n    %d failed sessions, e.g. %s" % (errors, [e for r in results for e in r[2]][:2]))
    return {"value": done / (end - start), "done": done, "errors": errors, "seconds": end - start}


# -- RETR throughput ---------------------------------------------------------

def find_message(sock: socket.socket, size: int, buf: bytearray) -> Tuple[int, int]:
    """(number, listed size) of the message whose LIST size is closest to ``size``.

    Servers number the same Maildir in their own order; LIST tells.
    """
    sock.sendall(b"LIST\r\n")
    data = b""
    while not data.endswith(b"\r\n.\r\n"):
        n = sock.recv_into(buf)
        if not n:
            raise Failed("closed during LIST")
        data += bytes(buf[:n])
    entries = [tuple(map(int, line.split()[:2])) for line in data.split(b"\r\n")[1:] if line and line != b"."]
    return min(entries, key=lambda e: abs(e[1] - size))


def retr_mb_per_s(user: str, password: str, size: int, repeat: int, max_seconds: float = 60.0) -> Dict[str, float]:
    """RETR of the message closest to ``size`` bytes, ``repeat`` times on one connection.

    MB/s of wire bytes (status line to terminating dot), median of the
    repeats (best also recorded), read with recv_into into one buffer.
    """
    s = login(user, password)
    buf = bytearray(1 << 20)
    number, listed = find_message(s, size, bytearray(1 << 16))
    times, deadline = [], time.monotonic() + max_seconds
    nbytes = 0
    for _ in range(repeat):
        if times and time.monotonic() > deadline:
            break
        start = time.perf_counter()
        s.sendall(b"RETR %d\r\n" % number)
        nbytes = read_until(s, b"\r\n.\r\n", buf)
        times.append(time.perf_counter() - start)
    if nbytes < listed:
        raise Failed("RETR %d returned %d bytes, LIST said %d" % (number, nbytes, listed))
    s.sendall(b"QUIT\r\n")
    s.close()
    median, best = statistics.median(times), min(times)
    return {"value": nbytes / median / 1e6, "best": nbytes / best / 1e6, "per_s": 1 / median, "best_per_s": 1 / best,
            "done": len(times), "bytes": nbytes}


# -- STAT latency under concurrency -------------------------------------------

def _stat_worker(user, password, count, deadline, ready, go, out) -> None:
    times: List[float] = []
    try:
        s = login(user, password)
        buf = bytearray(4096)
        ready.put(1)
        go.wait(60)
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            start = time.perf_counter()
            command(s, b"STAT", buf)
            times.append(time.perf_counter() - start)
        s.sendall(b"QUIT\r\n")
        s.close()
    except (OSError, Failed) as exc:
        ready.put(0)
        out.put(("error", repr(exc)))
        return
    out.put(("ok", times))


def stat_latency_ms(users: Sequence[str], password: str, clients: int, count: int,
                    max_seconds: float = 60.0) -> Dict[str, float]:
    """p50/p99 of STAT round trips, ``clients`` logged-in sessions sending STAT back to back."""
    out: multiprocessing.Queue = multiprocessing.Queue()
    ready: multiprocessing.Queue = multiprocessing.Queue()
    go = multiprocessing.Event()
    deadline = time.monotonic() + max_seconds + 10
    procs = [multiprocessing.Process(target=_stat_worker,
                                     args=(users[k % len(users)], password, count, deadline, ready, go, out))
             for k in range(clients)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=60)
    start = time.monotonic()
    go.set()
    times: List[float] = []
    errors = []
    for _ in procs:
        kind, data = out.get(timeout=max_seconds + 60)
        if kind == "ok":
            times += data
        else:
            errors.append(data)
    elapsed = time.monotonic() - start
    for p in procs:
        p.join(30)
    if errors:
        print("\n    %d clients failed, e.g. %s" % (len(errors), errors[0]))
    times.sort()
    if not times:
        raise Failed("no STAT completed")
    return {"p50": times[len(times) // 2] * 1e3, "p99": times[min(len(times) - 1, int(len(times) * 0.99))] * 1e3,
            "done": len(times), "stat_per_s": len(times) / elapsed, "errors": len(errors)}


# -- raw loopback --------------------------------------------------------------

def _sink(port, out) -> None:
    with socket.create_connection((HOST, port), timeout=TIMEOUT) as c:
        buf, n = bytearray(1 << 20), 0
        start = time.perf_counter()
        while True:
            k = c.recv_into(buf)
            if not k:
                break
            n += k
    out.put((n, time.perf_counter() - start))


def loopback_mb_per_s(total_mb: int = 1000) -> Dict[str, float]:
    """A plain sender/receiver pair on loopback, two processes: the ceiling for RETR."""
    listener = socket.create_server((HOST, 0))
    queue: multiprocessing.Queue = multiprocessing.Queue()
    p = multiprocessing.Process(target=_sink, args=(listener.getsockname()[1], queue))
    p.start()
    listener.settimeout(30)
    conn, _ = listener.accept()
    chunk = b"z" * (1 << 20)
    for _ in range(total_mb):
        conn.sendall(chunk)
    conn.close()
    listener.close()
    n, seconds = queue.get(timeout=120)
    p.join(30)
    return {"value": n / seconds / 1e6, "bytes": n}


# -- memory per idle session --------------------------------------------------

def _tree(pid: int) -> List[int]:
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by ``pid``, its live descendants and
    the children it has reaped (Dovecot's finished session processes)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in _tree(pid):
        try:
            with open("/proc/%d/stat" % p) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[11..14]: utime, stime, cutime, cstime (man 5 proc, counted from field 3)
        total += sum(int(x) for x in fields[11:15]) if p == pid else int(fields[11]) + int(fields[12])
    return total / tick


def memory_kb(pid: int) -> Tuple[int, int]:
    """(VmRSS, Pss) in KB of ``pid`` and all its descendants (Dovecot forks per session).

    RSS counts shared pages once per process; Pss splits them between the
    processes sharing them, so its sum is the honest total for a process tree.
    """
    rss = pss = 0
    for p in _tree(pid):
        try:
            with open("/proc/%d/status" % p) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
            with open("/proc/%d/smaps_rollup" % p) as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            pass
    return rss, pss


def idle_kb_per_session(pid: int, users: Sequence[str], password: str, count: int,
                        max_seconds: float = 120.0) -> Dict[str, float]:
    """Growth of the server's memory per idle logged-in connection: (after - before) / N."""
    time.sleep(0.5)
    rss0, pss0 = memory_kb(pid)
    socks = []
    deadline = time.monotonic() + max_seconds
    try:
        for i in range(count):
            if time.monotonic() > deadline:
                break
            socks.append(login(users[i % len(users)], password, pipelined=True))
        time.sleep(1.0)  # let threads / forked processes settle
        rss1, pss1 = memory_kb(pid)
    finally:
        for s in socks:
            s.close()
    n = len(socks)
    return {"value": (rss1 - rss0) / n, "pss": (pss1 - pss0) / n, "done": n,
            "rss_before": rss0, "rss_after": rss1}
