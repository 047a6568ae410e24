"""The ``pop3frame`` command (also ``python -m pop3frame``)."""
from __future__ import annotations

import argparse
import getpass
import logging
import os
import signal
import ssl
import sys
import threading
from typing import Optional, Sequence, Tuple

from . import __version__
from .config import ServerConfig
from .server import ServerGroup
from .tls import TLSCertificates

__all__ = ["main", "parse_address"]

logger = logging.getLogger("pop3frame.cli")

DEFAULT_LISTEN = "127.0.0.1:1100"
DEFAULT_DB = "pop3frame.db"


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
    store = serve.add_mutually_exclusive_group()
    store.add_argument("--demo", action="store_true",
                       help="serve an in-memory demo mailbox (user demo, password demo)")
    store.add_argument("--sqlite", metavar="PATH",
                       help="SQLite store (the default: %s, created and seeded with a demo user)" % DEFAULT_DB)
    store.add_argument("--maildir", metavar="ROOT", help="serve ROOT/<user>/ Maildirs (needs --passwd)")
    store.add_argument("--mbox", metavar="TEMPLATE",
                       help="serve mbox files: a directory, or a path with {user} (needs --passwd)")
    store.add_argument("--directory", metavar="ROOT",
                       help="serve every file in ROOT/<user>/ as a message (needs --passwd)")
    serve.add_argument("--passwd", metavar="FILE", help="Dovecot-style passwd-file with the users")
    serve.add_argument("--tls-listen", action="append", type=parse_address, metavar="HOST:PORT",
                       help="implicit-TLS (POP3S) listener (repeatable; needs --cert and --key)")
    serve.add_argument("--cert", metavar="FILE", help="TLS certificate chain (PEM); plain listeners then offer STLS")
    serve.add_argument("--key", metavar="FILE", help="TLS private key (PEM)")
    serve.add_argument("--allow-plaintext-auth", action="store_true",
                       help="allow passwords without TLS from any address (default: only trusted networks)")
    serve.add_argument("--trusted-network", action="append", metavar="CIDR",
                       help="network where passwords may travel without TLS (repeatable; default loopback)")
    serve.add_argument("--read-only", action="store_true", help="refuse DELE for every mailbox")
    serve.add_argument("--lock-dir", metavar="DIR",
                       help="file locks in DIR, so several server processes on one host exclude each other")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(func=cmd_serve)

    user = commands.add_parser("user", help="manage users of the SQLite store")
    user.add_argument("--sqlite", metavar="PATH", default=DEFAULT_DB)
    actions = user.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    for name, text in (("add", "create a user"), ("passwd", "change a password")):
        action = actions.add_parser(name, help=text)
        action.add_argument("name")
        action.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        action.add_argument("--scheme", default="", help="password scheme (default: strongest available)")
    actions.add_parser("del", help="delete a user and their mail").add_argument("name")
    actions.add_parser("list", help="list users with message counts")
    user.set_defaults(func=cmd_user)

    deliver = commands.add_parser("deliver", help="add a message (read from stdin) to a user's mailbox")
    deliver.add_argument("name")
    deliver.add_argument("--sqlite", metavar="PATH", default=DEFAULT_DB)
    deliver.set_defaults(func=cmd_deliver)

    passwd = commands.add_parser("passwd", help="add a user to a passwd-file or change their password")
    passwd.add_argument("file")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    passwd.add_argument("--scheme", default="", help="password scheme (default: strongest available)")
    passwd.set_defaults(func=cmd_passwd)
    return parser


class UsageError(Exception):
    """An operator mistake: reported as one line, exit code 2, no traceback."""


def make_adapter(args: argparse.Namespace):
    if args.demo:
        from pop3frame.adapters.memory import demo_adapter

        return demo_adapter()
    file_stores = {"maildir": "MaildirAdapter", "mbox": "MboxAdapter", "directory": "DirectoryAdapter"}
    for option, class_name in file_stores.items():
        location = getattr(args, option)
        if not location:
            continue
        if not args.passwd:
            raise UsageError("--%s needs --passwd FILE (the users and their passwords)" % option)
        if not os.path.isfile(args.passwd):
            raise UsageError("--passwd: no such file: %s" % args.passwd)
        import importlib

        from pop3frame.adapters.passwdfile import PasswdFile

        module = importlib.import_module("pop3frame.adapters." + option)
        return getattr(module, class_name)(location, PasswdFile(args.passwd))
    from pop3frame.adapters.sqlite import SQLiteStore

    store = SQLiteStore(args.sqlite or DEFAULT_DB)
    if store.ensure_demo():
        logger.info("new store %s: added user 'demo' (password 'demo') with sample mail", store.path)
    return store


def read_password(args: argparse.Namespace) -> str:
    if args.password_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise UsageError("passwords do not match")
    if not password:
        raise UsageError("empty password")
    return password


def serve_until_signalled(group: ServerGroup) -> None:
    """Serve until SIGINT/SIGTERM; then end sessions without applying deletions.

    SIGHUP re-reads the TLS certificate and key without dropping sessions.
    """
    stop = threading.Event()

    def on_signal(signum, frame):
        logger.info("signal %d: shutting down", signum)
        stop.set()

    def on_hangup(signum, frame):
        tls = group.context.tls
        if tls is None:
            return
        try:
            tls.reload()
            logger.info("SIGHUP: TLS certificate reloaded from %s", tls.certfile)
        except (OSError, ssl.SSLError) as exc:
            logger.error("SIGHUP: keeping the old TLS certificate: %s", exc)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    group.start()
    for server in group.servers:
        host, port = server.server_address[:2]
        logger.info("listening on %s port %d%s", host, port,
                    " (TLS)" if server.secure else " (STLS offered)" if group.context.tls else "")
    # Event.wait with a timeout keeps the main thread responsive to signals.
    while not stop.wait(3600):
        pass
    group.shutdown()


def cmd_serve(args: argparse.Namespace) -> int:
    from .locks import FileLockManager

    tls = None
    if args.cert or args.key or args.tls_listen:
        if not (args.cert and args.key):
            raise UsageError("TLS needs both --cert FILE and --key FILE")
        try:
            tls = TLSCertificates(args.cert, args.key)
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise UsageError("cannot load --cert/--key: %s" % reason) from None
    options = {"read_only": args.read_only, "allow_plaintext_auth": args.allow_plaintext_auth}
    if args.trusted_network:
        options["trusted_networks"] = tuple(args.trusted_network)
    try:
        config = ServerConfig(**options)
    except ValueError as exc:
        raise UsageError("--trusted-network: %s" % exc) from None
    adapter = make_adapter(args)
    locks = FileLockManager(args.lock_dir) if args.lock_dir else None
    group = ServerGroup(adapter, config, locks=locks, tls=tls)
    listeners = [(a, False) for a in args.listen or ([] if args.tls_listen else [parse_address(DEFAULT_LISTEN)])]
    listeners += [(a, True) for a in args.tls_listen or []]
    for address, secure in listeners:
        try:
            group.add_listener(address, secure=secure)
        except OSError as exc:
            raise UsageError("cannot listen on %s:%d: %s" % (address[0], address[1], exc.strerror)) from None
    serve_until_signalled(group)
    return 0


def cmd_user(args: argparse.Namespace) -> int:
    from pop3frame.adapters.sqlite import SQLiteStore, UnknownUser

    store = SQLiteStore(args.sqlite)
    try:
        if args.action == "add":
            store.add_user(args.name, read_password(args), args.scheme)
        elif args.action == "passwd":
            store.set_password(args.name, read_password(args), args.scheme)
        elif args.action == "del":
            store.delete_user(args.name)
        else:
            for name, count, size in store.list_users():
                print("%s\t%d messages\t%d octets" % (name, count, size))
    except UnknownUser:
        raise UsageError("no such user: %s" % args.name) from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return 0


def cmd_deliver(args: argparse.Namespace) -> int:
    from pop3frame.adapters.sqlite import SQLiteStore, UnknownUser

    message = sys.stdin.buffer.read()
    if not message:
        raise UsageError("no message on standard input")
    try:
        uid = SQLiteStore(args.sqlite).deliver(args.name, message)
    except UnknownUser:
        raise UsageError("no such user: %s" % args.name) from None
    logger.info("delivered %d octets to %s as %s", len(message), args.name, uid)
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    from pop3frame.adapters.passwdfile import set_password

    try:
        set_password(args.file, args.name, read_password(args), args.scheme)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        return args.func(args)
    except UsageError as exc:
        print("pop3frame: %s" % exc, file=sys.stderr)
        return 2
