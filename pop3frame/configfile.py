"""The TOML configuration file of ``pop3frame serve --config FILE``.

Every key is documented in ``docs/example.toml``.  The ``[server]`` table
maps generically onto :class:`~pop3frame.config.ServerConfig`: each
dataclass field is a key of the same name and type, so a field added there
is configurable here with no change.  Errors are :class:`ConfigError`,
whose text names the file, the line (when it can be found) and the key.

Python 3.11+ reads TOML with :mod:`tomllib`; older versions need ``tomli``
(``pip install 'pop3frame[toml]'``).
"""
from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import difflib
import importlib
import importlib.util
import ipaddress
import os
import re
import sys
import typing
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .config import LOOPBACK, ServerConfig, decimal, parse_networks
from .extras import install_hint

__all__ = [
    "ConfigError",
    "Listener",
    "AdapterSpec",
    "Settings",
    "load",
    "read",
    "text_of",
    "parse",
    "parse_address",
    "server_config",
    "dump",
    "BUNDLED_ADAPTERS",
    "adapter_problems",
    "resolve_factory",
    "adapter_factory",
    "locks_factory",
    "make_adapter",
    "make_locks",
]

DEFAULT_LISTEN = ("127.0.0.1", 1100)
DEFAULT_DB = "pop3frame.db"

#: type name -> (module, class, what ``path`` means, needs passwd)
BUNDLED_ADAPTERS: Dict[str, Tuple[str, str, str, bool]] = {
    "sqlite": ("pop3frame.adapters.sqlite", "SQLiteStore", "database file", False),
    "maildir": ("pop3frame.adapters.maildir", "MaildirAdapter", "root directory", True),
    "mbox": ("pop3frame.adapters.mbox", "MboxAdapter", "directory or path template with {user}", True),
    "directory": ("pop3frame.adapters.directory", "DirectoryAdapter", "root directory", True),
    "postgres": ("pop3frame.adapters.postgres", "PostgresStore", "", False),
    "demo": ("pop3frame.adapters.memory", "demo_adapter", "", False),
}

#: ServerConfig fields a config file cannot set.
NOT_CONFIGURABLE = {"clock"}


class ConfigError(Exception):
    """A mistake in the configuration: ``FILE:LINE: key: message``.

    ``also``: further mistakes found in the same pass; :attr:`problems` is
    this one and those, each a ConfigError of its own (one line each).
    """

    def __init__(self, message: str, key: str = "", line: Optional[int] = None, source: Optional[str] = None,
                 also: Sequence["ConfigError"] = ()) -> None:
        self.message = message
        self.key = key
        self.line = line
        self.source = source
        self.also = list(also)
        super().__init__(str(self))

    @property
    def problems(self) -> List["ConfigError"]:
        return [self] + self.also

    @classmethod
    def of(cls, problems: Sequence["ConfigError"]) -> "ConfigError":
        """One error carrying every problem (in the order of the file's lines)."""
        ordered = sorted(problems, key=lambda p: p.line or 0)
        first = ordered[0]
        return cls(first.message, first.key, first.line, first.source, ordered[1:])

    def __str__(self) -> str:
        where = self.source or ""
        if where and self.line:
            where += ":%d" % self.line
        parts = [p for p in (where, self.key) if p]
        return ": ".join(parts + [self.message])


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?$")


def parse_address(text: str, key: str = "address") -> Tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> (host, port); ValueError otherwise.

    Every interface must be written out (``0.0.0.0:110``, ``[::]:110``): an
    empty host is a mistake, not a quiet "listen everywhere".  The error
    text is one line: ``expected HOST:PORT, got '...' (what is wrong)``.
    """
    if not isinstance(text, str):
        raise ValueError("expected HOST:PORT as a string, got %r" % (text,))

    def wrong(why: str) -> ValueError:
        return ValueError("expected HOST:PORT, got %r (%s)" % (text, why))

    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise wrong("no ']' closes the IPv6 address")
        if not rest.startswith(":"):
            raise wrong("a ':PORT' must follow the ']'")
        port = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise wrong("%r in brackets is not an IPv6 address" % host) from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise wrong("no ':PORT'")
        if ":" in host:
            raise wrong("write an IPv6 address in brackets, as [%s]:%s" % (host, port))
        if "]" in text:
            raise wrong("a ']' without '['")
        if not host:
            raise wrong("the host is empty; for all interfaces write 0.0.0.0:%s or [::]:%s" % (port, port))
        if not _HOSTNAME.match(host) or host.replace(".", "").isdigit() and not _is_ipv4(host):
            raise wrong("%r is not an IPv4 address or a host name" % host)
    if not decimal(port) or not 0 <= int(port) <= 65535:
        raise wrong("the port must be a number from 0 to 65535" if port else "the port is empty")
    return host, int(port)


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def format_address(address: Tuple[str, int]) -> str:
    host, port = address
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


@dataclasses.dataclass
class Listener:
    address: Tuple[str, int]
    #: Implicit TLS (POP3S) from the first byte.
    tls: bool = False
    #: Expect a HAProxy PROXY v1/v2 header first.
    proxy_protocol: bool = False


@dataclasses.dataclass
class AdapterSpec:
    #: A bundled name (see BUNDLED_ADAPTERS), ``module:Class`` or ``path/to/file.py:Class``.
    type: str = "sqlite"
    path: Optional[str] = None
    passwd: Optional[str] = None
    dsn: Optional[str] = None
    #: Keyword arguments for the class (custom adapters; extra ones for bundled).
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Settings:
    """Everything ``pop3frame serve`` needs, from the file and then the flags."""

    listeners: List[Listener] = dataclasses.field(default_factory=list)
    cert: Optional[str] = None
    key: Optional[str] = None
    adapter: AdapterSpec = dataclasses.field(default_factory=AdapterSpec)
    lock_backend: str = "memory"
    lock_dir: Optional[str] = None
    lock_dsn: Optional[str] = None
    #: ServerConfig keyword arguments (only the keys that were set).
    server: Dict[str, Any] = dataclasses.field(default_factory=dict)
    log_level: str = "INFO"
    log_json: bool = False
    pid_file: Optional[str] = None
    user: Optional[str] = None
    group: Optional[str] = None
    shutdown_grace: float = 10.0
    #: Server processes: a number, or "auto" for one per CPU (see worker_count).
    workers: Union[int, str] = 1
    proxy_timeout: float = 5.0
    #: Peers whose PROXY headers are believed (CIDR); others are closed unread.
    proxy_trusted_networks: Tuple[str, ...] = LOOPBACK
    stats_listen: Optional[Tuple[str, int]] = None
    #: The file these settings came from, if any.
    source: Optional[str] = None

    def effective_listeners(self) -> List[Listener]:
        return self.listeners or [Listener(DEFAULT_LISTEN)]

    def worker_count(self) -> int:
        """How many server processes ``workers`` asks for ("auto": one per CPU)."""
        if self.workers == "auto":
            return os.cpu_count() or 1
        return int(self.workers)


def check_workers(settings: Settings) -> None:
    """ValueError if the store cannot be shared by the settings' workers."""
    if settings.adapter.type == "demo" and settings.worker_count() > 1:
        raise ValueError("the demo store lives in one process's memory: it cannot be shared by %d workers"
                         % settings.worker_count())


def parse_workers(value: Any) -> Union[int, str]:
    """A ``workers`` setting: an integer >= 1 or "auto"; ValueError otherwise."""
    if value == "auto":
        return value
    if isinstance(value, str) and decimal(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("expected a number of processes >= 1, or \"auto\", got %r" % (value,))
    return value


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# -- locating keys in the source, for line numbers -----------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def _key_pattern(key: str) -> "re.Pattern[str]":
    return re.compile(r"""^\s*(?:%s|"%s"|'%s')\s*=""" % ((re.escape(key),) * 3))


def locate(text: str, path: Sequence[Any]) -> Optional[int]:
    """Best-effort line number (1-based) of ``path`` such as ("server", "timeout") or ("listener", 1, "address")."""
    if not text:
        return None
    table = tuple(p for p in path[:-1] if isinstance(p, str))
    index = next((p for p in path if isinstance(p, int)), None)
    key = path[-1] if isinstance(path[-1], str) else None
    current: Tuple[str, ...] = ()
    counts: Dict[Tuple[str, ...], int] = {}
    pattern = _key_pattern(key) if key else None
    header_line = None
    #: The path itself as a table header ([extra] for an unknown table "extra").
    own_header = None
    for number, line in enumerate(text.splitlines(), 1):
        m = _HEADER.match(line)
        if m:
            current = tuple(part.strip().strip('"') for part in m.group(2).split("."))
            if m.group(1) == "[[":
                counts[current] = counts.get(current, -1) + 1
            if own_header is None and index is None and current == tuple(path):
                own_header = number
            if current == table and (index is None or counts.get(current) == index):
                header_line = number
                if key is None:
                    return number
            continue
        in_table = current == table and (index is None or counts.get(current) == index)
        if pattern and in_table and pattern.match(line):
            return number
        if pattern and not table and not current and pattern.match(line):
            return number
    # A dotted key (server.timeout = ...) at the top level, or inline table.
    if key and table:
        dotted = _key_pattern(".".join(table + (key,)))
        for number, line in enumerate(text.splitlines(), 1):
            if dotted.match(line):
                return number
    return header_line if header_line is not None else own_header


# -- reading -------------------------------------------------------------------


def _toml():
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli
    except ImportError:
        raise ConfigError("reading TOML needs Python 3.11 or the tomli package: %s" % install_hint("toml"))
    return tomli


class _Reader:
    """Reads the parsed TOML into Settings and keeps every mistake it meets."""

    def __init__(self, text: str, source: Optional[str]) -> None:
        self.text = text
        self.source = source
        self.problems: List[ConfigError] = []

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One independent check: its ConfigError is kept and reading goes on."""
        try:
            yield
        except ConfigError as exc:
            self.problems.append(exc)

    def error(self, path: Sequence[Any], message: str) -> ConfigError:
        key = ""
        for part in path:
            if isinstance(part, int):
                key += "[%d]" % part
            else:
                key += ("." if key else "") + part
        return ConfigError(message, key, locate(self.text, path), self.source)

    def table(self, data: Any, path: Sequence[Any], allowed: Sequence[str]) -> Dict[str, Any]:
        """The keys of ``data`` that are ``allowed``; each unknown one is a problem."""
        if not isinstance(data, dict):
            raise self.error(path, "expected a table")
        known = {}
        for name, value in data.items():
            if name in allowed:
                known[name] = value
            else:
                close = difflib.get_close_matches(name, allowed, 1)
                hint = " (did you mean %r?)" % close[0] if close else ""
                self.problems.append(self.error(tuple(path) + (name,), "unknown key%s" % hint))
        return known

    def typed(self, data: Dict[str, Any], path: Sequence[Any], name: str, kind: Any, default: Any = None) -> Any:
        if name not in data:
            return default
        value = data[name]
        here = tuple(path) + (name,)
        if kind is bool:
            if not isinstance(value, bool):
                raise self.error(here, "expected true or false, got %r" % (value,))
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.error(here, "expected an integer, got %r" % (value,))
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.error(here, "expected a number, got %r" % (value,))
            value = float(value)
        elif kind is str:
            if not isinstance(value, str):
                raise self.error(here, "expected a string, got %r" % (value,))
        elif kind == "address":
            try:
                value = parse_address(value)
            except ValueError as exc:
                raise self.error(here, str(exc)) from None
        elif kind == "strings":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.error(here, "expected a list of strings, got %r" % (value,))
            value = tuple(value)
        return value


def _server_field_types() -> Dict[str, Any]:
    hints = typing.get_type_hints(ServerConfig)
    out = {}
    for field in dataclasses.fields(ServerConfig):
        if field.name in NOT_CONFIGURABLE:
            continue
        hint = hints.get(field.name, Any)
        origin = typing.get_origin(hint)
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if origin is typing.Union and len(args) == 1:
            hint, origin = args[0], typing.get_origin(args[0])
        if hint in (bool, int, float, str):
            out[field.name] = hint
        elif origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
            out[field.name] = "strings"
        elif origin is typing.Union:
            out[field.name] = None  # any TOML value; ServerConfig validates
        else:
            out[field.name] = None
    return out


def _load_server_table(reader: _Reader, data: Any) -> Dict[str, Any]:
    """The [server] values; each key is checked on its own, so every bad one is reported."""
    types = _server_field_types()
    allowed = list(types) + ["max_connections_per_user"]
    table = reader.table(data, ("server",), allowed)
    values: Dict[str, Any] = {}
    for name in table:
        with reader.step():
            if name == "max_connections_per_user":
                per_user = reader.typed(table, ("server",), name, int)
                if per_user != 1:
                    raise reader.error(("server", name), "must be 1: the mailbox lock (RFC 1939 section 8) already "
                                       "allows one session per user; a second login gets -ERR [IN-USE]")
                continue
            value = reader.typed(table, ("server",), name, types[name])
            try:
                ServerConfig(**{name: value})
            except ValueError as exc:
                raise _server_error(reader, str(exc)) from None
            values[name] = value
    return values


def parse(text: str, source: Optional[str] = None) -> Settings:
    """Settings from TOML text; ``source`` names the file in errors.

    Raises ConfigError naming the first mistake, with every other one it
    found in :attr:`ConfigError.also`.
    """
    settings, problems = read(text, source)
    if problems:
        raise ConfigError.of(problems)
    return settings


def read(text: str, source: Optional[str] = None) -> Tuple[Settings, List[ConfigError]]:
    """Settings from TOML text, and every mistake found in it.

    A bad key leaves its default in the settings and is reported; the
    other keys are still read, so one pass finds every mistake.  Invalid
    TOML, which cannot be read on, raises ConfigError.
    """
    try:
        data = _toml().loads(text)
    except ValueError as exc:  # TOMLDecodeError is a ValueError; nothing more can be read
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError("invalid TOML: %s" % exc, "", int(m.group(1)) if m else None, source) from None
    r = _Reader(text, source)
    top = ("listener", "tls", "adapter", "locks", "server", "logging", "stats", "proxy",
           "shutdown_grace", "workers", "pid_file", "user", "group")
    data = r.table(data, (), top)
    s = Settings(source=source)

    listeners = data.get("listener", [])
    if not isinstance(listeners, list):
        r.problems.append(r.error(("listener",), "expected [[listener]] tables"))
        listeners = []
    for i, entry in enumerate(listeners):
        with r.step():
            path = ("listener", i)
            entry = r.table(entry, path, ("address", "tls", "proxy_protocol"))
            if "address" not in entry:
                raise r.error(path + ("address",), "missing (expected HOST:PORT)")
            s.listeners.append(Listener(r.typed(entry, path, "address", "address"),
                                        r.typed(entry, path, "tls", bool, False),
                                        r.typed(entry, path, "proxy_protocol", bool, False)))
    listeners_read = len(s.listeners) == len(listeners)

    tls_read = True
    if "tls" in data:
        tls_read = False
        with r.step():
            tls = r.table(data["tls"], ("tls",), ("cert", "key"))
            s.cert = r.typed(tls, ("tls",), "cert", str)
            s.key = r.typed(tls, ("tls",), "key", str)
            tls_read = True

    if "adapter" in data:
        with r.step():
            a = r.table(data["adapter"], ("adapter",), ("type", "path", "passwd", "dsn", "options"))
            spec = AdapterSpec(type=r.typed(a, ("adapter",), "type", str, "sqlite"))
            for name in ("path", "passwd", "dsn"):
                with r.step():
                    setattr(spec, name, r.typed(a, ("adapter",), name, str))
            if "options" in a:
                with r.step():
                    spec.options = dict(r.table(a["options"], ("adapter", "options"), list(a["options"])))
            for field, message in adapter_problems(spec):
                r.problems.append(r.error(("adapter", field), message))
            s.adapter = spec

    if "locks" in data:
        with r.step():
            locks = r.table(data["locks"], ("locks",), ("backend", "directory", "dsn"))
            s.lock_backend = r.typed(locks, ("locks",), "backend", str, "memory")
            s.lock_dir = r.typed(locks, ("locks",), "directory", str)
            s.lock_dsn = r.typed(locks, ("locks",), "dsn", str)
            if s.lock_backend not in ("memory", "file", "postgres"):
                raise r.error(("locks", "backend"), "expected memory, file or postgres, got %r" % s.lock_backend)
            if s.lock_backend == "file" and not s.lock_dir:
                raise r.error(("locks", "directory"), "missing: the file backend needs a directory")
            if s.lock_backend == "postgres" and not s.lock_dsn:
                raise r.error(("locks", "dsn"), "missing: the postgres backend needs a dsn")

    server_read = True
    if "server" in data:
        before = len(r.problems)
        with r.step():
            s.server = _load_server_table(r, data["server"])
        server_read = len(r.problems) == before

    if "logging" in data:
        with r.step():
            log = r.table(data["logging"], ("logging",), ("level", "json"))
            with r.step():
                level = r.typed(log, ("logging",), "level", str, "INFO").upper()
                if level not in LOG_LEVELS:
                    raise r.error(("logging", "level"),
                                  "expected one of %s, got %r" % (", ".join(LOG_LEVELS), log["level"]))
                s.log_level = level
            s.log_json = r.typed(log, ("logging",), "json", bool, False)

    if "stats" in data:
        with r.step():
            stats = r.table(data["stats"], ("stats",), ("listen",))
            s.stats_listen = r.typed(stats, ("stats",), "listen", "address")

    if "proxy" in data:
        with r.step():
            proxy = r.table(data["proxy"], ("proxy",), ("timeout", "trusted_networks"))
            with r.step():
                timeout = r.typed(proxy, ("proxy",), "timeout", float, 5.0)
                if timeout <= 0:
                    raise r.error(("proxy", "timeout"), "must be positive")
                s.proxy_timeout = timeout
            networks = r.typed(proxy, ("proxy",), "trusted_networks", "strings", LOOPBACK)
            try:
                parse_networks(networks, "trusted_networks")
            except ValueError as exc:
                raise r.error(("proxy", "trusted_networks"), str(exc).partition(": ")[2]) from None
            s.proxy_trusted_networks = networks

    with r.step():
        grace = r.typed(data, (), "shutdown_grace", float, 10.0)
        if grace < 0:
            raise r.error(("shutdown_grace",), "must not be negative")
        s.shutdown_grace = grace
    if "workers" in data:
        with r.step():
            try:
                s.workers = parse_workers(data["workers"])
                check_workers(s)
            except ValueError as exc:
                raise r.error(("workers",), str(exc)) from None
    for name in ("pid_file", "user", "group"):
        with r.step():
            setattr(s, name, r.typed(data, (), name, str))

    if server_read:
        with r.step():
            try:
                server_config(s)
            except ValueError as exc:
                raise _server_error(r, str(exc)) from None
    if tls_read:
        if listeners_read and any(l.tls for l in s.listeners) and not (s.cert and s.key):
            i = next(i for i, l in enumerate(s.listeners) if l.tls)
            r.problems.append(r.error(("listener", i, "tls"), "a TLS listener needs [tls] cert and key"))
        if bool(s.cert) != bool(s.key):
            r.problems.append(r.error(("tls", "key" if s.cert else "cert"), "missing: TLS needs both cert and key"))
    return s, r.problems


def _server_error(reader: _Reader, message: str) -> ConfigError:
    """Turn ServerConfig's ValueError ("timeout must be ...") into one naming the key and line."""
    names = sorted((f.name for f in dataclasses.fields(ServerConfig)), key=len, reverse=True)
    for name in names:
        if message.startswith(name + " ") or message.startswith(name + ":"):
            return reader.error(("server", name), message[len(name):].lstrip(": "))
    return ConfigError(message, "server", None, reader.source)


#: Larger is no config file (``/dev/zero`` would be read until memory ran out).
MAX_CONFIG_SIZE = 1 << 20


def text_of(path: str) -> str:
    """A config file's text; ConfigError if it cannot be read, is larger than
    :data:`MAX_CONFIG_SIZE` or is not UTF-8.  A pipe is fine (``<(...)``)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_SIZE + 1)
    except OSError as exc:
        raise ConfigError(exc.strerror or str(exc), "", None, path) from None
    if len(raw) > MAX_CONFIG_SIZE:
        raise ConfigError("larger than %d KiB: not a config file" % (MAX_CONFIG_SIZE >> 10), "", None, path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("not UTF-8 (%s)" % exc.reason, "", None, path) from None


def load(path: str) -> Settings:
    """Read and validate a config file."""
    return parse(text_of(path), path)


def server_config(settings: Settings, **extra: Any) -> ServerConfig:
    """The ServerConfig the settings describe (ValueError if ServerConfig refuses)."""
    return ServerConfig(**{**settings.server, **extra})


# -- adapters and locks ---------------------------------------------------------


def adapter_problems(spec: AdapterSpec) -> List[Tuple[str, str]]:
    """Every static mistake in an adapter spec, as (field, message).

    Static: nothing on disk is looked at (see :mod:`pop3frame.preflight`).
    """
    problems = []
    if spec.type in BUNDLED_ADAPTERS:
        _, _, path_means, needs_passwd = BUNDLED_ADAPTERS[spec.type]
        if path_means and spec.type != "sqlite" and not spec.path:
            problems.append(("path", "missing: the %s adapter needs its %s" % (spec.type, path_means)))
        if needs_passwd and not spec.passwd:
            problems.append(("passwd", "missing: the %s adapter needs a passwd-file" % spec.type))
        if spec.type == "postgres" and not spec.dsn:
            problems.append(("dsn", "missing: the postgres adapter needs a dsn"))
    elif ":" not in spec.type:
        problems.append(("type", "expected one of %s, or module:Class, or path/to/file.py:Class; got %r"
                         % (", ".join(BUNDLED_ADAPTERS), spec.type)))
    return problems


def check_adapter(spec: AdapterSpec) -> None:
    """Static checks of an adapter spec; ValueError("field: message") for the first mistake."""
    for field, message in adapter_problems(spec):
        raise ValueError("%s: %s" % (field, message))


def _split_target(target: str) -> Tuple[str, str]:
    module, sep, name = target.rpartition(":")
    if not sep or not module or not name:
        raise ValueError("expected module:Class or path/to/file.py:Class, got %r" % target)
    return module, name


def resolve_factory(target: str):
    """The class (or factory function) named by ``module:Class`` or ``path.py:Class``."""
    module_name, name = _split_target(target)
    if module_name.endswith(".py") or os.sep in module_name:
        if not os.path.isfile(module_name):
            raise ValueError("no such file: %s" % module_name)
        unique = "pop3frame_user_adapter_%d" % (abs(hash(os.path.abspath(module_name))))
        spec = importlib.util.spec_from_file_location(unique, module_name)
        if spec is None or spec.loader is None:
            raise ValueError("cannot load %s" % module_name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(unique, None)
            raise ValueError("%s failed to load: %s: %s" % (module_name, type(exc).__name__, exc)) from None
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError("cannot import %s: %s" % (module_name, exc)) from None
        except Exception as exc:
            raise ValueError("%s failed to load: %s: %s" % (module_name, type(exc).__name__, exc)) from None
    try:
        return getattr(module, name)
    except AttributeError:
        raise ValueError("%s has no attribute %r" % (module_name, name)) from None


def check_options(target: Callable[..., Any], options: Dict[str, Any], positional: int = 0) -> None:
    """ValueError ``options.KEY: ...`` for the first option ``target`` does not take.

    ``positional``: how many leading parameters the caller fills itself
    (a store's path, a passwd-file), which are therefore not options.
    """
    import inspect

    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return  # no signature to read: the call itself will complain
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    takes = [p.name for p in params[positional:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in options:
        if key not in takes:
            name = getattr(target, "__name__", str(target))
            raise ValueError("options.%s: not an option of %s (it takes: %s)"
                             % (key, name, ", ".join(takes) or "none"))


def adapter_factory(spec: AdapterSpec, log=None, threads: Optional[int] = None,
                    demo_hint: Optional[Callable[[], Optional[str]]] = None) -> Callable[[], Any]:
    """Import the adapter's code now; the returned call builds the adapter.

    ``pop3frame serve`` imports before dropping privileges (the code and
    the interpreter may be readable by root only) and builds after (files
    the store creates must belong to the user that serves them).  Both
    steps raise ValueError with a one-line reason on any operator mistake.
    ``threads``: the server's connection threads, which a pooled store
    sizes its pool to.

    ``demo_hint``: called when the store is built, it says how to reach the
    server (``pop3frame client localhost:1100``, for the log) when the embedded
    default may be seeded with user ``demo`` (password ``demo``), or None;
    without it nothing is ever seeded.  Where it says None, the ``demo``
    store is refused too.  Even then only a store at the
    implicit default path (no ``path`` given) that the build creates gets
    it: never a store the operator named, nor one that existed before
    (whatever its users).  ``pop3frame serve`` gives a hint only while
    every listener is loopback.
    """
    from .adapter import AdapterBase, POP3Error

    check_adapter(spec)
    options = dict(spec.options)
    if spec.type == "demo":
        from pop3frame.adapters.memory import demo_adapter

        def demo():
            # Its password is published: where serve says no demo may be
            # seeded, none may be served either.
            if demo_hint is not None and demo_hint() is None:
                raise ValueError("demo: user demo's password is public: serve it on loopback listeners only,"
                                 " none taking PROXY headers")
            return demo_adapter()

        return demo
    if spec.type == "sqlite":
        from pop3frame.adapters.sqlite import SQLiteStore

        check_options(SQLiteStore, options, 1)

        def sqlite():
            path = spec.path or DEFAULT_DB
            hint = demo_hint() if demo_hint is not None and spec.path is None else None
            new = False
            try:
                new = hint is not None and _create_new(path)
                store = SQLiteStore(path, **options)
                seeded = new and store.ensure_demo()
            except Exception as exc:
                if new:  # so that the next start creates (and seeds) it again
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                raise ValueError("sqlite: cannot open %s: %s" % (path, exc)) from None
            if seeded and log is not None:
                log.info("new store %s: added user 'demo' (password 'demo') with sample mail; try: %s",
                         store.path, hint)
            return store

        return sqlite
    if spec.type == "postgres":
        try:
            from pop3frame.adapters.postgres import PostgresStore, import_driver

            import_driver()
        except ImportError as exc:
            raise ValueError("postgres: adapter not available: %s" % exc) from None
        check_options(PostgresStore, options, 1)
        if threads is not None:
            options.setdefault("threads", threads)

        def postgres():
            try:
                return PostgresStore(spec.dsn, **options)
            except Exception as exc:
                raise ValueError("postgres: cannot connect: %s" % str(exc).strip().splitlines()[0]) from None

        return postgres
    if spec.type in BUNDLED_ADAPTERS:
        module_name, class_name, _, _ = BUNDLED_ADAPTERS[spec.type]
        from pop3frame.adapters.passwdfile import PasswdFile

        cls = getattr(importlib.import_module(module_name), class_name)
        check_options(cls, options, 2)

        def bundled():
            users = PasswdFile(spec.passwd)
            try:
                users.load()  # now, so its count and warnings are logged at start-up
                return cls(spec.path, users, **options)
            except (TypeError, ValueError, OSError) as exc:
                raise ValueError("%s: %s" % (spec.type, exc)) from None
            except POP3Error as exc:
                raise ValueError("passwd: %s" % exc.text) from None

        return bundled
    factory = resolve_factory(spec.type)
    check_options(factory, options)
    kwargs = dict(options)
    for name in ("path", "passwd", "dsn"):
        if getattr(spec, name) is not None:
            kwargs.setdefault(name, getattr(spec, name))

    def custom():
        try:
            adapter = factory(**kwargs)
        except TypeError as exc:
            raise ValueError("%s rejected the options %s: %s" % (spec.type, sorted(kwargs), exc)) from None
        except Exception as exc:
            raise ValueError("%s failed: %s: %s" % (spec.type, type(exc).__name__, exc)) from None
        if not isinstance(adapter, AdapterBase):
            raise ValueError("%s did not give a pop3frame.AdapterBase (got %s)" % (spec.type, type(adapter).__name__))
        return adapter

    return custom


def _create_new(path: str) -> bool:
    """Create ``path`` as an empty file (mode 0600) if nothing, not even a
    dangling symlink, is there; whether it was created by this call."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600))
    except FileExistsError:
        return False
    return True


def make_adapter(spec: AdapterSpec, log=None):
    """Build the adapter; ValueError with a one-line reason on any operator mistake."""
    return adapter_factory(spec, log)()


def locks_factory(settings: Settings) -> Callable[[], Any]:
    """Import the lock manager's code now; the returned call builds it (None: in-process)."""
    if settings.lock_backend == "file" and settings.lock_dir:
        from .locks import FileLockManager

        def file_locks():
            try:
                return FileLockManager(settings.lock_dir)
            except OSError as exc:
                raise ValueError("lock directory %s: %s" % (settings.lock_dir, exc.strerror or exc)) from None

        return file_locks
    if settings.lock_backend == "postgres":
        try:
            from pop3frame.adapters.postgres import PostgresLockManager, import_driver

            import_driver()
        except ImportError as exc:
            raise ValueError("postgres locks: not available: %s" % exc) from None

        def postgres_locks():
            try:
                return PostgresLockManager(settings.lock_dsn)
            except Exception as exc:
                raise ValueError("postgres locks: cannot connect: %s" % str(exc).strip().splitlines()[0]) from None

        return postgres_locks
    return lambda: None


def make_locks(settings: Settings):
    """The lock manager of the settings, or None for the in-process default."""
    return locks_factory(settings)()


# -- printing ------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join("%s = %s" % (_toml_key(k), _toml_value(v)) for k, v in value.items()) + "}"
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _toml_key(key: str) -> str:
    return key if re.match(r"^[A-Za-z0-9_-]+$", key) else _toml_value(key)


_SECRET_KEYS = re.compile(r"pass|secret|token|key", re.I)


def redact_dsn(dsn: str) -> str:
    """A DSN with its password replaced by ``***`` (URL and key=value forms)."""
    dsn = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", dsn)


def dump(settings: Settings) -> str:
    """The effective configuration as TOML (what check-config prints)."""
    out: List[str] = []

    def put(key: str, value: Any) -> None:
        if value is not None:
            out.append("%s = %s" % (_toml_key(key), _toml_value(value)))

    put("shutdown_grace", settings.shutdown_grace)
    put("workers", settings.workers)
    put("pid_file", settings.pid_file)
    put("user", settings.user)
    put("group", settings.group)
    for listener in settings.effective_listeners():
        out += ["", "[[listener]]"]
        put("address", format_address(listener.address))
        put("tls", listener.tls)
        put("proxy_protocol", listener.proxy_protocol)
    if settings.cert:
        out += ["", "[tls]"]
        put("cert", settings.cert)
        put("key", settings.key)
    out += ["", "[adapter]"]
    spec = settings.adapter
    put("type", spec.type)
    put("path", spec.path if spec.path or spec.type != "sqlite" else DEFAULT_DB)
    put("passwd", spec.passwd)
    put("dsn", redact_dsn(spec.dsn) if spec.dsn else None)
    if spec.options:
        out += ["", "[adapter.options]"]
        for k, v in spec.options.items():
            put(k, "***" if _SECRET_KEYS.search(k) and isinstance(v, str) else v)
    out += ["", "[locks]"]
    put("backend", settings.lock_backend)
    put("directory", settings.lock_dir)
    put("dsn", redact_dsn(settings.lock_dsn) if settings.lock_dsn else None)
    out += ["", "[server]"]
    config = server_config(settings)
    for field in dataclasses.fields(ServerConfig):
        if field.name not in NOT_CONFIGURABLE:
            put(field.name, getattr(config, field.name))
    out += ["", "[logging]"]
    put("level", settings.log_level)
    put("json", settings.log_json)
    out += ["", "[proxy]"]
    put("timeout", settings.proxy_timeout)
    put("trusted_networks", settings.proxy_trusted_networks)
    if settings.stats_listen:
        out += ["", "[stats]"]
        put("listen", format_address(settings.stats_listen))
    return "\n".join(out) + "\n"
