"""The ``pop3frame`` command (also ``python -m pop3frame``).

``serve`` runs the server (settings from ``--config FILE``, then flags on
top); ``user`` and ``deliver`` manage the SQLite or PostgreSQL store;
``passwd`` edits a passwd-file; ``check-config`` validates a config file;
``client`` talks to a server by hand or checks it (:mod:`pop3frame.client`).
Operator mistakes end with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import getpass
import ipaddress
import logging
import os
import ssl
import sys
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

from . import __version__
from . import configfile, passwords, preflight
from . import client
from .config import ServerConfig, decimal, parse_networks
from .configfile import DEFAULT_DB, ConfigError, Listener, Settings
from .failures import reason
from .protocol import plural, wire_size

__all__ = ["main", "parse_address", "build_parser"]

logger = logging.getLogger("pop3frame.cli")

DEFAULT_LISTEN = "127.0.0.1:1100"
STORE_FLAGS = ("demo", "sqlite", "maildir", "mbox", "directory", "postgres", "adapter")


def parse_address(text: str) -> Tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> (host, port)."""
    try:
        return configfile.parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_workers(text: str):
    """--workers: a number >= 1 or ``auto``."""
    try:
        return configfile.parse_workers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_option(text: str) -> Tuple[str, Any]:
    """``key=value`` for --adapter-option; true/false and integers are converted."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError("expected key=value, got %r" % text)
    converted: Any = value
    if value in ("true", "false"):
        converted = value == "true"
    elif decimal(value.lstrip("-")):
        converted = int(value)
    return key.strip(), converted


class UsageError(Exception):
    """An operator mistake: reported as one line, exit code 2, no traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line: ``pop3frame: <what was expected>``."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(2, "pop3frame: %s%s\n" % (command, message))


def _store_options(parser: argparse.ArgumentParser, default=None) -> None:
    parser.add_argument("--sqlite", metavar="PATH", default=default,
                        help="SQLite store (default %s)" % DEFAULT_DB)
    parser.add_argument("--postgres", metavar="DSN", default=default, help="PostgreSQL store")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pop3frame", description="A POP3 server framework.")
    parser.add_argument("--version", action="version", version="pop3frame " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    serve = commands.add_parser("serve", help="run the POP3 server")
    serve.add_argument("--config", metavar="FILE", help="TOML config file (flags override it)")
    serve.add_argument("--listen", action="append", type=parse_address, metavar="HOST:PORT",
                       help="plain POP3 listener (repeatable; default %s while no listener of any kind is named)"
                            % DEFAULT_LISTEN)
    serve.add_argument("--tls-listen", action="append", type=parse_address, metavar="HOST:PORT",
                       help="implicit-TLS (POP3S) listener (repeatable; needs --cert and --key)")
    serve.add_argument("--proxy-listen", action="append", type=parse_address, metavar="HOST:PORT",
                       help="plain listener expecting a HAProxy PROXY v1/v2 header first (repeatable)")
    serve.add_argument("--proxy-trusted-network", action="append", metavar="CIDR",
                       help="network whose PROXY headers are believed (repeatable; default loopback); "
                            "other peers of a --proxy-listen port are closed unread")
    store = serve.add_mutually_exclusive_group()
    store.add_argument("--demo", action="store_true", default=None,
                       help="serve an in-memory demo mailbox (user demo, password demo; loopback listeners only)")
    store.add_argument("--sqlite", metavar="PATH",
                       help="SQLite store (the default: %s; when serve creates it with every listener on loopback, "
                            "it is seeded with user demo, password demo)" % DEFAULT_DB)
    store.add_argument("--maildir", metavar="ROOT", help="serve ROOT/<user>/ Maildirs (needs --passwd)")
    store.add_argument("--mbox", metavar="TEMPLATE",
                       help="serve mbox files: a directory, or a path with {user} (needs --passwd)")
    store.add_argument("--directory", metavar="ROOT",
                       help="serve every file in ROOT/<user>/ as a message (needs --passwd)")
    store.add_argument("--postgres", metavar="DSN", help="PostgreSQL store")
    store.add_argument("--adapter", metavar="MODULE:CLASS",
                       help="your own adapter: module:Class or path/to/file.py:Class")
    serve.add_argument("--adapter-option", action="append", type=parse_option, metavar="KEY=VALUE",
                       help="keyword argument for the --adapter class (repeatable)")
    serve.add_argument("--passwd", metavar="FILE", help="Dovecot-style passwd-file with the users")
    serve.add_argument("--cert", metavar="FILE", help="TLS certificate chain (PEM); plain listeners then offer STLS")
    serve.add_argument("--key", metavar="FILE", help="TLS private key (PEM)")
    serve.add_argument("--allow-plaintext-auth", action="store_true", default=None,
                       help="allow passwords without TLS from any address (default: only trusted networks)")
    serve.add_argument("--trusted-network", action="append", metavar="CIDR",
                       help="network where passwords may travel without TLS (repeatable; default loopback)")
    serve.add_argument("--max-connections", type=int, metavar="N",
                       help="concurrent connections in total (default %d)" % ServerConfig.max_connections)
    serve.add_argument("--max-connections-per-ip", type=int, metavar="N",
                       help="concurrent connections per client address outside the trusted networks, "
                            "0 for no limit (default %d)" % ServerConfig.max_connections_per_ip)
    serve.add_argument("--read-only", action="store_true", default=None, help="refuse DELE for every mailbox")
    serve.add_argument("--lock-dir", metavar="DIR",
                       help="file locks in DIR, so several server processes on one host exclude each other")
    serve.add_argument("--log-level", type=str.upper, choices=configfile.LOG_LEVELS, help="default INFO")
    serve.add_argument("--log-json", action="store_true", default=None, help="log JSON lines")
    serve.add_argument("--pid-file", metavar="FILE", help="write the process id here (removed at exit)")
    serve.add_argument("--user", help="switch to this user after binding the ports")
    serve.add_argument("--group", help="switch to this group after binding the ports")
    serve.add_argument("--shutdown-grace", type=float, metavar="SECONDS",
                       help="on SIGTERM, how long sessions may finish (default 10)")
    serve.add_argument("--workers", type=parse_workers, metavar="N",
                       help="server processes under one supervisor: a number, or auto (one per CPU); default 1")
    serve.add_argument("--stats-listen", type=parse_address, metavar="HOST:PORT",
                       help="serve Prometheus metrics on http://HOST:PORT/metrics")
    serve.set_defaults(func=cmd_serve)

    check = commands.add_parser("check-config", help="validate a config file and print the effective settings")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)

    user = commands.add_parser("user", help="manage users of the SQLite or PostgreSQL store")
    _store_options(user)
    actions = user.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    for name, text in (("add", "create a user"), ("passwd", "change a password")):
        action = actions.add_parser(name, help=text)
        action.add_argument("name")
        action.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        action.add_argument("--scheme", default="", help="password scheme (default: strongest available)")
        _store_options(action, argparse.SUPPRESS)
    action = actions.add_parser("del", help="delete a user and their mail")
    action.add_argument("name")
    _store_options(action, argparse.SUPPRESS)
    _store_options(actions.add_parser("list", help="list users with message counts"), argparse.SUPPRESS)
    user.set_defaults(func=cmd_user)

    deliver = commands.add_parser("deliver", help="add a message (read from stdin) to a user's mailbox")
    deliver.add_argument("name")
    _store_options(deliver)
    deliver.set_defaults(func=cmd_deliver)

    passwd = commands.add_parser("passwd", help="add a user to a passwd-file or change their password")
    passwd.add_argument("file")
    passwd.add_argument("name")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    passwd.add_argument("--scheme", default="", help="password scheme (default: strongest available)")
    passwd.set_defaults(func=cmd_passwd)

    client.add_parser(commands, parse_address)
    return parser


# -- settings: file, then flags -------------------------------------------------


def apply_flags(settings: Settings, args: argparse.Namespace) -> Settings:
    """Put the command-line flags on top of the file's settings (returns a new object)."""
    s = dataclasses.replace(settings, server=dict(settings.server),
                            adapter=dataclasses.replace(settings.adapter, options=dict(settings.adapter.options)))
    listeners: List[Listener] = [Listener(a) for a in args.listen or []]
    listeners += [Listener(a, tls=True) for a in args.tls_listen or []]
    listeners += [Listener(a, proxy_protocol=True) for a in args.proxy_listen or []]
    if listeners:
        # Any listener flag replaces the file's listener list.
        s.listeners = listeners
    if args.cert or args.key:
        s.cert, s.key = args.cert, args.key
    chosen = [name for name in STORE_FLAGS if getattr(args, name)]
    if chosen:
        name = chosen[0]
        value = getattr(args, name)
        if name == "demo":
            s.adapter = configfile.AdapterSpec("demo")
        elif name == "postgres":
            s.adapter = configfile.AdapterSpec("postgres", dsn=value)
        elif name == "adapter":
            s.adapter = configfile.AdapterSpec(value, passwd=args.passwd)
        else:
            s.adapter = configfile.AdapterSpec(name, path=value, passwd=args.passwd)
    elif args.passwd:
        s.adapter.passwd = args.passwd
    if args.adapter_option:
        s.adapter.options.update(dict(args.adapter_option))
    if args.allow_plaintext_auth:
        s.server["allow_plaintext_auth"] = True
    if args.trusted_network:
        s.server["trusted_networks"] = tuple(args.trusted_network)
    if args.proxy_trusted_network:
        s.proxy_trusted_networks = tuple(args.proxy_trusted_network)
    if args.max_connections is not None:
        s.server["max_connections"] = args.max_connections
    if args.max_connections_per_ip is not None:
        s.server["max_connections_per_ip"] = args.max_connections_per_ip
    if args.read_only:
        s.server["read_only"] = True
    if args.lock_dir:
        s.lock_backend, s.lock_dir = "file", args.lock_dir
    for name in ("log_level", "pid_file", "user", "group", "stats_listen", "workers"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if args.log_json:
        s.log_json = True
    if args.shutdown_grace is not None:
        if args.shutdown_grace < 0:
            raise UsageError("--shutdown-grace: expected seconds >= 0, got %g" % args.shutdown_grace)
        s.shutdown_grace = args.shutdown_grace
    return s


def _flag_errors(s: Settings) -> None:
    """The checks a config file gets in configfile.parse, for flag-made settings."""
    spec = s.adapter
    if spec.type in ("maildir", "mbox", "directory") and not spec.passwd:
        raise UsageError("--%s needs --passwd FILE (the users and their passwords)" % spec.type)
    if any(l.tls for l in s.listeners) and not (s.cert and s.key) or bool(s.cert) != bool(s.key):
        raise UsageError("TLS needs both --cert FILE and --key FILE")
    try:
        configfile.check_workers(s)
    except ValueError as exc:
        raise UsageError("--workers: %s" % exc) from None
    try:
        parse_networks(s.proxy_trusted_networks, "--proxy-trusted-network")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def resolve_settings(args: argparse.Namespace) -> Settings:
    settings = configfile.load(args.config) if args.config else Settings()
    settings = apply_flags(settings, args)
    _flag_errors(settings)
    return settings


def load_tls(args: argparse.Namespace, settings: Settings):
    tls, found = preflight.load_tls(settings)
    _raise_problems(args, settings, found)
    return tls


# -- serve ------------------------------------------------------------------------


def _reload(args: argparse.Namespace, state: Dict[str, Any]) -> None:
    """SIGHUP: TLS material, log level, limits; other changes wait for a restart."""
    group = state["group"]
    tls = group.context.tls
    if tls is not None:
        try:
            tls.reload()
            logger.info("SIGHUP: TLS certificate reloaded from %s", tls.certfile)
        except (OSError, ssl.SSLError) as exc:
            logger.error("SIGHUP: keeping the old TLS certificate: %s", exc)
    if not args.config:
        return
    old: Settings = state["settings"]
    try:
        new = resolve_settings(args)
        config = _fit_open_files(configfile.server_config(new))
    except (ConfigError, UsageError, ValueError) as exc:
        logger.error("SIGHUP: keeping the old configuration: %s", exc)
        return
    logging.getLogger().setLevel(new.log_level)
    group.apply_limits(config)
    set_threads = getattr(group.context.adapter, "set_threads", None)
    if set_threads is not None:  # a pooled store follows the thread count
        set_threads(config.max_connections)
    applied = {"log_level", "max_connections", "max_connections_per_ip"}
    changed = [f.name for f in dataclasses.fields(Settings)
               if f.name not in ("server", "log_level", "source", "shutdown_grace") and getattr(old, f.name) != getattr(new, f.name)]
    changed += ["server." + k for k in sorted(set(old.server) | set(new.server))
                if k not in applied and old.server.get(k) != new.server.get(k)]
    state["settings"] = new
    logger.info("SIGHUP: configuration reloaded (log level %s, max_connections %d, max_connections_per_ip %d)",
                new.log_level, group.tracker.max_total, config.max_connections_per_ip)
    if changed:
        logger.warning("SIGHUP: changed settings that need a restart: %s", ", ".join(changed))


@dataclasses.dataclass
class _Prepared:
    """What ``serve`` sets up before it serves: as root, before any fork."""

    args: argparse.Namespace
    settings: Settings
    config: ServerConfig
    tls: Any
    build_adapter: Callable[[], Any]
    build_locks: Callable[[], Any]
    listeners: List[Listener]
    sockets: List[Any]
    stats_socket: Any


def cmd_serve(args: argparse.Namespace) -> int:
    from .lifecycle import PidFile, PidFileError, SignalLoop, drop_privileges, resolve_ids, setup_logging
    from .server import bind_socket

    settings = resolve_settings(args)
    log_writer = setup_logging(settings.log_level, settings.log_json)
    try:
        config = _fit_open_files(configfile.server_config(settings))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    uid = gid = None
    if settings.user or settings.group:
        try:
            uid, gid, _ = resolve_ids(settings.user, settings.group)
        except ValueError as exc:
            raise UsageError("--%s" % exc) from None
    tls = load_tls(args, settings)
    # Code is imported and ports are bound first (110 and 995 need root),
    # then privileges are dropped, and only then are the store and the lock
    # directory opened: files they create must belong to the user that
    # serves them.
    listeners = settings.effective_listeners()
    sockets: List[Any] = []
    try:
        # The demo hint is asked for when the store is built: after binding.
        build_adapter = configfile.adapter_factory(settings.adapter, logger, threads=config.max_connections,
                                                   demo_hint=lambda: _demo_hint(listeners, sockets))
        build_locks = configfile.locks_factory(settings)
    except ValueError as exc:
        raise UsageError(("--adapter: %s" if args.adapter else "%s") % exc) from None
    switching = bool(settings.user or settings.group)
    if not switching:
        # Already the user that serves: the paths are checked before any port is bound.
        _check_paths(args, settings)
    passwords.preload()
    for listener in listeners:
        try:
            sockets.append(bind_socket(listener.address))
        except OSError as exc:
            raise _cannot_listen(listener.address, exc) from None
    stats_socket = None
    if settings.stats_listen:
        try:
            stats_socket = bind_socket(settings.stats_listen)
        except OSError as exc:
            raise _cannot_listen(settings.stats_listen, exc, " for stats") from None
    prepared = _Prepared(args, settings, config, tls, build_adapter, build_locks, listeners, sockets, stats_socket)
    pid_file = PidFile(settings.pid_file) if settings.pid_file else None
    if pid_file is not None:
        try:
            pid_file.write()
        except PidFileError as exc:
            raise UsageError("--pid-file: %s" % exc) from None
    host = None
    try:
        if settings.worker_count() > 1:
            # Imported and made before the privilege drop: the lock
            # directory may have to be made where only root can.
            from . import prefork  # noqa: F401
            from .hostwide import HostState

            host = HostState(config, settings.worker_count(), uid=uid, gid=gid)
        if switching:
            if pid_file is not None and uid is not None:
                pid_file.chown(uid, gid if gid is not None else -1)
            try:
                drop_privileges(settings.user, settings.group)
            except (OSError, ValueError) as exc:
                raise UsageError("--user/--group: cannot switch: %s" % exc) from None
            _check_paths(args, settings)
            logger.info("running as uid %d gid %d", os.getuid(), os.getgid())
        if host is not None:
            return _supervise(prepared, host)
        loop = SignalLoop(lambda: None)
        loop.install()
        return _serve(prepared, loop)
    finally:
        if host is not None:
            host.close()
        if pid_file is not None:
            pid_file.remove()
        log_writer.close()  # every line written before the process ends


def _serve(prepared: _Prepared, loop, host=None, worker=None) -> int:
    """Serve until ``loop`` sees SIGTERM: the whole server, or one worker of ``--workers``."""
    from .server import ServerGroup
    from .session import SessionContext
    from .stats import ErrorCounter, Stats, StatsServer

    settings, args = prepared.settings, prepared.args
    try:
        adapter = prepared.build_adapter()
        locks = prepared.build_locks()
    except ValueError as exc:
        raise UsageError(("--adapter: %s" if args.adapter else "%s") % exc) from None
    context = SessionContext(adapter, prepared.config, locks or (host.locks() if host else None), tls=prepared.tls)
    if host is None:
        stats, tracker = Stats(), None
    else:
        # Everything a client could escape by landing on another worker is host-wide.
        host.share(context)
        stats, tracker = host.stats(worker.slot), host.tracker(worker.slot, context)
    logging.getLogger().addHandler(ErrorCounter(stats))
    group = ServerGroup(context, stats=stats, tracker=tracker)
    for listener, sock in zip(prepared.listeners, prepared.sockets):
        group.add_listener(listener.address, secure=listener.tls, proxy_protocol=listener.proxy_protocol,
                           proxy_timeout=settings.proxy_timeout,
                           proxy_trusted_networks=settings.proxy_trusted_networks, sock=sock)
    stats_server = None if prepared.stats_socket is None else StatsServer(stats, sock=prepared.stats_socket)
    state = {"group": group, "settings": settings}
    loop.on_reload = lambda: _reload(args, state)
    group.start()
    if stats_server is not None:
        stats_server.start()
    pool = getattr(adapter, "pool_size", None)
    if worker is None:
        _announce(prepared, pool, [server.listening() for server in group.servers])
    else:
        worker.ready(str(pool or ""))
    signum = loop.run()
    grace = state["settings"].shutdown_grace
    if worker is None:
        logger.info("signal %d: stopping; sessions get %g s to finish", signum, grace)
    elif signum == worker.ORPHANED:
        # A server started in the supervisor's place does not see our
        # mailbox locks (see pop3frame.prefork).
        logger.warning("the supervisor is gone: stopping; open sessions are cut now, their deletions not applied")
        grace = 0.0
    # The handlers stay installed: a second SIGTERM during the grace
    # period must not kill the process before the locks are released.
    group.graceful_shutdown(grace)
    if stats_server is not None:
        stats_server.stop()
    context.locks.close()
    adapter.close()
    logger.info("stopped")
    return 0


def _announce(prepared: _Prepared, pool: Optional[int], listening: Sequence[str], workers: int = 1) -> None:
    """The start-up lines: stats, store, listeners."""
    if prepared.stats_socket is not None:
        logger.info("stats on http://%s/metrics", configfile.format_address(prepared.stats_socket.getsockname()[:2]))
    logger.info("store: %s%s", _describe(prepared.settings.adapter),
                " (pool up to %s%s)" % (plural(pool, "connection"), " per worker" if workers > 1 else "")
                if pool else "")
    for line in listening:
        logger.info("%s", line)


def _supervise(prepared: _Prepared, host) -> int:
    """``--workers N``: fork the workers and supervise them until SIGTERM (see :mod:`pop3frame.prefork`)."""
    from .config import parse_networks
    from .prefork import StartFailed, Supervisor
    from .server import listening
    from .stats import ErrorCounter

    counter = ErrorCounter(host.stats(None))
    logging.getLogger().addHandler(counter)
    settings = prepared.settings
    state = {"settings": settings}
    for sock in prepared.sockets + ([prepared.stats_socket] if prepared.stats_socket is not None else []):
        # Every worker waits on these; the losers of each accept race must
        # get EAGAIN, not block in accept() (see pop3frame.prefork).
        sock.setblocking(False)

    def work(worker) -> int:
        # The log writer is the worker's own already (lifecycle.LogWriter
        # forks); its errors count in its own row.
        logging.getLogger().removeHandler(counter)
        return _serve(prepared, worker.signals, host, worker)

    def ready(slot: int, note: str) -> None:
        if slot == 0:
            state["pool"] = int(note) if note.isdigit() else None

    def started() -> None:
        proxies = parse_networks(settings.proxy_trusted_networks, "proxy_trusted_networks")
        _announce(prepared, state.get("pool"), [
            listening(sock.getsockname(), l.tls, prepared.tls is not None, proxies if l.proxy_protocol else None)
            for l, sock in zip(prepared.listeners, prepared.sockets)], count)

    def reload() -> None:
        # The workers reload (and report) for themselves; the supervisor
        # needs only its log level and the grace period it waits for.
        try:
            new = resolve_settings(prepared.args) if prepared.args.config else state["settings"]
        except (ConfigError, UsageError):
            return
        logging.getLogger().setLevel(new.log_level)
        state["settings"] = new

    count = settings.worker_count()
    if settings.lock_backend == "memory":
        logger.info("mailbox locks in %s", host.lock_dir)
    supervisor = Supervisor(count, work, grace=lambda: state["settings"].shutdown_grace, on_ready=ready,
                            on_started=started, on_exit=host.release, on_reload=reload,
                            expected=(UsageError, ConfigError))
    logger.info("starting %d workers", count)
    try:
        supervisor.run()
    except StartFailed as exc:
        raise UsageError(str(exc)) from None
    logger.info("stopped")
    return 0


def _fit_open_files(config: ServerConfig) -> ServerConfig:
    """``config`` with max_connections as many as the open-files limit has room for,
    after raising that limit as far as it goes."""
    from .lifecycle import connections_open_files_allow

    limit, room = connections_open_files_allow(config.max_connections)
    if room >= config.max_connections:
        return config
    logger.warning("open files limit %d (the hard limit) has room for max_connections %d instead of %d; "
                   "raise the hard limit (systemd: LimitNOFILE=) to serve more", limit, room, config.max_connections)
    return dataclasses.replace(config, max_connections=room)


def _demo_hint(listeners: Sequence[Listener], sockets: Sequence[Any]) -> Optional[str]:
    """How to reach the demo account, or None where it must not exist.

    Only while every listener is bound to a loopback address and none takes
    PROXY headers (a proxy in front would carry other hosts' clients to it).
    """
    bound = [sock.getsockname()[:2] for sock in sockets]
    if any(l.proxy_protocol for l in listeners) or not all(_loopback(host) for host, _ in bound):
        return None
    names = ["localhost" if host in ("127.0.0.1", "::1") else host for host, _ in bound]
    # The client first: on a fresh machine it is there and telnet often is not.
    # Named as it was started (.venv/bin/pop3frame in the README), so the line can be copied.
    prog = sys.argv[0] if os.path.basename(sys.argv[0]) == "pop3frame" else "pop3frame"
    for listener, name, (_, port) in zip(listeners, names, bound):
        if not listener.tls:
            return "%s client %s:%d (or telnet %s %d)" % (prog, name, port, name, port)
    return "%s client --tls --insecure %s" % (prog, configfile.format_address((names[0], bound[0][1])))


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


#: The flag that sets a config key, for naming a problem with it.
_FLAGS = {"adapter.passwd": "passwd", "locks.directory": "lock_dir", "pid_file": "pid_file", "user": "user",
          "tls.cert": "cert", "tls.key": "key"}


def _check_paths(args: argparse.Namespace, settings: Settings) -> None:
    """As the user that serves, what it must read and what it will create (:mod:`preflight`)."""
    _raise_problems(args, settings, preflight.problems(settings))


def _raise_problems(args: argparse.Namespace, settings: Settings, found: List[preflight.Problem]) -> None:
    """ConfigError with every problem found, each named as the operator wrote
    it: by the flag, else by the config file's key and line."""
    if not found:
        return
    text = configfile.text_of(settings.source) if settings.source else ""
    errors = []
    for key, message in found:
        flag = _FLAGS.get(key)
        if key == "adapter.path":
            flag = next((name for name in ("sqlite", "maildir", "mbox", "directory") if getattr(args, name)), None)
        if flag and getattr(args, flag):
            errors.append(ConfigError(message, "--" + flag.replace("_", "-")))
        elif settings.source:
            errors.append(ConfigError(message, key, configfile.locate(text, key.split(".")), settings.source))
        else:
            errors.append(ConfigError(message))
    raise ConfigError.of(errors)


#: What to do about the usual reasons a port cannot be bound.
_BIND_HINTS = {
    errno.EADDRINUSE: "another program listens there: stop it, or choose another port",
    errno.EACCES: "ports below 1024 need root (with --user USER to drop it after binding) "
                  "or the CAP_NET_BIND_SERVICE capability",
    errno.EADDRNOTAVAIL: "no network interface of this machine has that address",
}


def _cannot_listen(address: Tuple[str, int], exc: OSError, what: str = "") -> UsageError:
    hint = _BIND_HINTS.get(exc.errno or 0)
    return UsageError("cannot listen on %s%s: %s%s" % (configfile.format_address(address), what, reason(exc),
                                                     " (%s)" % hint if hint else ""))


def _describe(spec: configfile.AdapterSpec) -> str:
    if spec.type == "sqlite":
        return "sqlite %s" % (spec.path or DEFAULT_DB)
    if spec.type == "postgres":
        return "postgres %s" % configfile.redact_dsn(spec.dsn or "")
    return " ".join(p for p in (spec.type, spec.path or "", "passwd %s" % spec.passwd if spec.passwd else "") if p)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Everything ``serve`` would check before serving, every problem at once, with file and line."""
    from .lifecycle import drop_privileges, resolve_ids

    text = configfile.text_of(args.file)
    settings, errors = configfile.read(text, args.file)

    def error(key: str, message: str) -> ConfigError:
        path = tuple(key.split("."))
        return ConfigError(message, key, configfile.locate(text, path), args.file)

    spec = settings.adapter
    if not configfile.adapter_problems(spec):  # else already reported, and nothing to import
        try:
            # Imports the adapter and checks its options; builds nothing (a
            # check must not create a database).
            configfile.adapter_factory(spec)
        except ValueError as exc:
            field, _, message = str(exc).partition(": ")
            if field not in ("path", "passwd", "dsn") and not field.startswith("options."):
                field, message = "type", str(exc)  # module:Class not importable, a missing extra
            errors.append(error("adapter." + field, message))
    switch = None
    if settings.user or settings.group:
        try:
            resolve_ids(settings.user, settings.group)
        except ValueError as exc:
            field, _, message = str(exc).partition(": ")
            errors.append(error(field, message))
        else:
            if os.geteuid() == 0:
                switch = lambda: drop_privileges(settings.user, settings.group)  # noqa: E731
    found = preflight.load_tls(settings)[1] + preflight.pid_file_problems(settings)
    found += preflight.problems_as(settings, switch)
    errors += [error(key, message) for key, message in found]
    if errors:
        raise ConfigError.of(errors)
    sys.stdout.write(configfile.dump(settings))
    return 0


# -- user, deliver, passwd --------------------------------------------------------


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


def open_store(args: argparse.Namespace, create: bool = False):
    """The SQLite (default) or PostgreSQL store for user/deliver.

    Only a command that adds a user may ``create`` a SQLite store: any
    other finding no file means a wrong path, not an empty store.
    """
    dsn = getattr(args, "postgres", None)
    if dsn:
        try:
            from pop3frame.adapters.postgres import PostgresStore, import_driver

            import_driver()
        except ImportError as exc:
            raise UsageError("--postgres: %s" % exc) from None
        try:
            return PostgresStore(dsn, threads=1)  # one command, one connection
        except Exception as exc:
            raise UsageError("--postgres: cannot connect: %s" % reason(exc)) from None
    from pop3frame.adapters.sqlite import SQLiteStore

    path = getattr(args, "sqlite", None) or DEFAULT_DB
    shown = path if os.path.dirname(path) else os.path.join(".", path)
    if not create and not os.path.exists(path):
        raise UsageError("no store at %s (pop3frame user add NAME creates one; --sqlite PATH names another)" % shown)
    try:
        return SQLiteStore(path)
    except Exception as exc:
        raise UsageError("--sqlite: cannot open %s: %s" % (shown, reason(exc))) from None


def cmd_user(args: argparse.Namespace) -> int:
    store = open_store(args, create=args.action == "add")
    try:
        if args.action == "add":
            store.add_user(args.name, read_password(args), args.scheme)
        elif args.action == "passwd":
            store.set_password(args.name, read_password(args), args.scheme)
        elif args.action == "del":
            store.delete_user(args.name)
        else:
            for name, count, size in store.list_users():
                print("%s\t%s\t%s" % (name, plural(count, "message"), plural(size, "octet")))
    except LookupError:
        raise UsageError("no such user: %s" % args.name) from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    finally:
        store.close()
    return 0


def cmd_deliver(args: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        raise UsageError("deliver reads the message from standard input: pop3frame deliver USER < message.eml")
    message = sys.stdin.buffer.read()
    if not message:
        raise UsageError("no message on standard input")
    store = open_store(args)
    try:
        uid = store.deliver(args.name, message)
    except LookupError:
        raise UsageError("no such user: %s" % args.name) from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    finally:
        store.close()
    logger.info("delivered %s to %s as %s", plural(wire_size(message), "octet"), args.name, uid)
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    from pop3frame.adapters.passwdfile import set_password

    try:
        set_password(args.file, args.name, read_password(args), args.scheme)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError("%s: %s" % (args.file, exc.strerror or exc)) from None
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return args.func(args)
    except UsageError as exc:
        print("pop3frame: %s" % exc, file=sys.stderr)
        return 2
    except ConfigError as exc:
        for problem in exc.problems:
            print("pop3frame: %s" % problem, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
