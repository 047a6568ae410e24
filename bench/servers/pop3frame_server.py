"""pop3frame serving the benchmark Maildir, for bench_core.py and peers.py.

Usage::

    python bench/servers/pop3frame_server.py --root MAILDIR_ROOT --passwd FILE \
        [--port 0] [--adapter maildir|memory] [--lifetime 3600] [--cprofile OUT]

``--adapter maildir`` (default) serves ROOT/<user>/ with
``pop3frame.adapters.maildir.MaildirAdapter`` and the passwd-file;
``--adapter memory`` loads the same messages into a ``MemoryAdapter`` first,
which isolates the framework's own cost from the file system's.

Listens on 127.0.0.1 only, prints the port on stdout, logs at WARNING and
stops on SIGTERM/SIGINT or after ``--lifetime`` seconds, whichever is
first.  ``--cprofile OUT`` profiles every connection thread and the accept
loop with cProfile and writes the merged stats to OUT at exit (slower; use
it to find hot spots, not for the figures).
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
import threading


def memory_store(root: str, passwd: str):
    from pop3frame.adapters.memory import MemoryAdapter

    users = {}
    with open(passwd) as f:
        for line in f:
            user, _, value = line.strip().partition(":")
            if user and value.startswith("{PLAIN}"):
                users[user] = value[len("{PLAIN}"):].split(":")[0]
    store = MemoryAdapter(users, apop=False)
    for user in users:
        home = os.path.join(root, user)
        names = []
        for sub in ("new", "cur"):
            path = os.path.join(home, sub)
            if os.path.isdir(path):
                names += [(name, os.path.join(path, name)) for name in os.listdir(path)]
        for name, path in sorted(names):
            with open(path, "rb") as fh:
                store.deliver(user, fh.read(), uid=name.split(":")[0])
    return store


def install_cprofile():
    """Profile each connection thread and the accept loop; returns the list of profiles."""
    import cProfile
    import socketserver

    from pop3frame.server import POP3Server

    profiles = []
    lock = threading.Lock()

    def profiled(method):
        def run(*args, **kwargs):
            prof = cProfile.Profile()
            with lock:
                profiles.append(prof)
            prof.enable()
            try:
                return method(*args, **kwargs)
            finally:
                prof.disable()
        return run

    POP3Server.process_request_thread = profiled(POP3Server.process_request_thread)
    socketserver.BaseServer.serve_forever = profiled(socketserver.BaseServer.serve_forever)
    return profiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--passwd", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--adapter", choices=("maildir", "memory"), default="maildir")
    parser.add_argument("--max-connections", type=int, default=12000)
    parser.add_argument("--stack-size", type=int, default=None,
                        help="ServerConfig.stack_size for connection threads, bytes (default: pop3frame's)")
    parser.add_argument("--lifetime", type=float, default=3600.0, help="exit after this many seconds")
    parser.add_argument("--cprofile", help="write merged cProfile stats here at exit")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from pop3frame import ServerConfig
    from pop3frame.server import ServerGroup

    profiles = install_cprofile() if args.cprofile else None
    if args.adapter == "memory":
        adapter = memory_store(args.root, args.passwd)
    else:
        from pop3frame.adapters.maildir import MaildirAdapter
        from pop3frame.adapters.passwdfile import PasswdFile

        adapter = MaildirAdapter(args.root, PasswdFile(args.passwd))
    options = {} if args.stack_size is None else {"stack_size": args.stack_size}
    group = ServerGroup(adapter, ServerConfig(max_connections=args.max_connections, **options))
    server = group.add_listener(("127.0.0.1", args.port))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    group.start()
    print(server.port, flush=True)
    stop.wait(args.lifetime)
    group.shutdown()
    if profiles is not None:
        import pstats

        stats = None
        for prof in profiles:
            try:
                stats = pstats.Stats(prof) if stats is None else stats.add(prof)
            except TypeError:  # a profile that never ran
                continue
        if stats is not None:
            stats.dump_stats(args.cprofile)


if __name__ == "__main__":
    main()
