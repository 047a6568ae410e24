"""The ``pop3frame`` command (also ``python -m pop3frame``)."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import List, Optional, Sequence, Tuple

from . import __version__
from .config import ServerConfig
from .server import ServerGroup

__all__ = ["main", "parse_address"]

logger = logging.getLogger("pop3frame.cli")

DEFAULT_LISTEN = "127.0.0.1:1100"


def parse_address(text: str) -> Tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError("expected HOST:PORT, got %r" % text)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pop3frame", description="A POP3 server framework.")
    parser.add_argument("--version", action="version", version="pop3frame " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    serve = commands.add_parser("serve", help="run the POP3 server")
    serve.add_argument("--listen", action="append", type=parse_address, metavar="HOST:PORT",
                       help="plain POP3 listener (repeatable; default %s)" % DEFAULT_LISTEN)
    serve.add_argument("--demo", action="store_true",
                       help="serve an in-memory demo mailbox (user demo, password demo)")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(func=cmd_serve)
    return parser


def make_adapter(args: argparse.Namespace):
    if args.demo:
        from pop3frame.adapters.memory import demo_adapter

        return demo_adapter()
    raise SystemExit("pop3frame: no mail store given (try --demo)")


def serve_until_signalled(group: ServerGroup) -> None:
    """Serve until SIGINT/SIGTERM; then end sessions without applying deletions."""
    stop = threading.Event()

    def on_signal(signum, frame):
        logger.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    group.start()
    for host, port in group.addresses:
        logger.info("listening on %s port %d", host, port)
    # Event.wait with a timeout keeps the main thread responsive to signals.
    while not stop.wait(3600):
        pass
    group.shutdown()


def cmd_serve(args: argparse.Namespace) -> int:
    adapter = make_adapter(args)
    group = ServerGroup(adapter, ServerConfig())
    for address in args.listen or [parse_address(DEFAULT_LISTEN)]:
        try:
            group.add_listener(address)
        except OSError as exc:
            print("pop3frame: cannot listen on %s:%d: %s" % (address[0], address[1], exc.strerror), file=sys.stderr)
            return 2
    serve_until_signalled(group)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    return args.func(args)
