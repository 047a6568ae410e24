"""Server options: one plain dataclass, validated on construction."""
from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import socket
import time
from typing import Callable, List, Optional, Sequence, Union

__all__ = ["ServerConfig", "RFC1939_MIN_AUTOLOGOUT", "LOOPBACK", "parse_networks", "in_networks", "decimal"]

#: The networks trusted by default, for plaintext passwords and PROXY headers.
LOOPBACK = ("127.0.0.0/8", "::1/128")

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def decimal(text: str) -> bool:
    """Whether ``text`` is a number in ASCII digits.  ``str.isdigit()`` is not
    the test: it takes "１１００" (fullwidth), which int() reads as 1100, and
    "²", which int() refuses with a message about base 10."""
    return text.isascii() and text.isdigit()


def parse_networks(cidrs: Sequence[str], what: str) -> List[Network]:
    """``["10.0.0.0/8", ...]`` as networks; ValueError ``what: <reason>`` for a bad one."""
    try:
        return [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]
    except (TypeError, ValueError) as exc:
        raise ValueError("%s: %s" % (what, exc)) from None


@functools.lru_cache(maxsize=4096)
def _address(address: str) -> Optional[IPAddress]:
    """``address`` as an IP address (an IPv6 zone dropped, an IPv4-mapped IPv6
    address as its IPv4 address), None if it is not one.  Cached: every
    connection asks about its address several times (limits, trust, failed
    logins), and parsing one costs microseconds."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def in_networks(address: str, networks: Sequence[Network]) -> bool:
    """Whether an IP address is in one of ``networks``; an IPv6 zone is
    ignored and an IPv4-mapped IPv6 address counts as its IPv4 address."""
    ip = _address(address)
    return ip is not None and any(ip in net for net in networks)


@functools.lru_cache(maxsize=4096)
def client_key(address: str) -> str:
    """What per-address limits count a client under.

    An IPv4 address is itself (also written IPv4-mapped); an IPv6 address
    counts as its /64, the smallest block a subscriber is given (RFC 6177),
    so one client cannot pose as 2**64 others.  Anything else is itself.
    """
    ip = _address(address)
    if ip is None:
        return address
    if ip.version == 4:
        return str(ip)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


#: RFC 1939 section 3: an autologout timer "MUST be of at least 10 minutes".
RFC1939_MIN_AUTOLOGOUT = 600.0
#: threading.stack_size() refuses anything smaller (POSIX PTHREAD_STACK_MIN).
MIN_STACK_SIZE = 32 * 1024


@dataclasses.dataclass
class ServerConfig:
    """Everything a server needs to know besides the adapter and the sockets."""

    #: Host name in the APOP timestamp ``<pid.clock@hostname>``.
    hostname: str = dataclasses.field(default_factory=socket.gethostname)
    #: Name used in the sign-off line; defaults to ``hostname``.
    server_name: Optional[str] = None
    #: Greeting text after ``+OK`` (the APOP timestamp is appended to it).
    greeting: str = "POP3 server ready"
    #: RFC 2449 IMPLEMENTATION capability; empty to hide it.
    implementation: str = "pop3frame"
    #: RFC 2449 EXPIRE capability: "NEVER" or days as a string.
    expire: str = "NEVER"
    #: Minimum seconds between two logins to one mailbox, enforced with
    #: ``-ERR [LOGIN-DELAY]``; CAPA announces it (RFC 2449 section 6.5) only
    #: when it is above 0.
    login_delay: int = 0

    #: Inactivity autologout in the TRANSACTION state, seconds (>= 600).
    timeout: float = RFC1939_MIN_AUTOLOGOUT
    #: Inactivity timeout before login, seconds (may be short).
    auth_timeout: float = 60.0
    #: Seconds from connect to a successful login, whatever the client does
    #: meanwhile (commands, TLS, waiting for a password check or a withheld
    #: reply); then the connection is closed without a reply.  Room for a
    #: TLS handshake (30 s), one failed-login delay at its cap (60 s) and a
    #: client's own pace.
    login_timeout: float = 120.0
    #: How often an idle connection re-reads ``clock``: bounds how late a
    #: timeout fires when the clock is not the wall clock (tests).
    poll_interval: float = 30.0
    #: Seconds allowed for writing one chunk to a client that stopped reading.
    send_timeout: float = 60.0

    #: Concurrent connections in total; excess ones get ``-ERR [SYS/TEMP]``.
    max_connections: int = 1000
    #: Concurrent connections per client address outside
    #: ``trusted_networks`` (those have none; an IPv6 client counts as its
    #: /64); 0 means no limit.  One address
    #: cannot take every connection, and ten is room for a few people behind
    #: one NAT address (Dovecot's mail_max_userip_connections).
    max_connections_per_ip: int = 10
    #: Log lines a minute about one client address outside
    #: ``trusted_networks`` (its sessions' lines and summaries, refusals of
    #: its connections); further ones are dropped and counted, and one line
    #: says how many once the minute is over.  0 means no limit.  A real
    #: session writes one line (a few with failed logins): room for dozens
    #: of sessions a minute behind one NAT address.
    max_log_lines_per_ip: int = 60
    #: Failed logins on one connection before it is closed.
    max_auth_failures: int = 3
    #: Other commands answered ``-ERR`` before login (unknown, invalid,
    #: refused) before the connection is closed (Dovecot's pop3-login: 3).
    max_bad_commands: int = 3
    #: Commands of any kind before login (a client needs a handful: CAPA,
    #: STLS, CAPA, AUTH ...); the next one is answered ``-ERR`` and the
    #: connection closed, so a stream of cheap commands cannot take a CPU
    #: for the whole ``login_timeout``.
    max_login_commands: int = 50
    #: Failed logins per client address (across connections) answered at
    #: once; the answer to each further one is withheld 1, 2, 4 ... seconds,
    #: up to ``max_auth_failure_delay``.  The password is still checked, so
    #: the real user gets in; guessing just costs time.
    free_auth_failures: int = 3
    max_auth_failure_delay: float = 60.0
    #: Optional lockout, off at 0: after this many failed logins from one
    #: address, every login from it is refused for ``auth_lockout_duration``
    #: seconds with ``-ERR [SYS/TEMP]``, right password or not.
    auth_lockout_failures: int = 0
    auth_lockout_duration: float = 900.0
    #: Password checks running at once, server-wide; more wait their turn
    #: (within ``login_timeout``).  Peak memory for hashing is this many
    #: times one check's cost (Argon2: 64 MiB).  Default: the CPU count.
    max_password_checks: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)

    #: Allow USER/PASS and SASL PLAIN/LOGIN on unencrypted connections from
    #: anywhere.  Off by default, as Dovecot's disable_plaintext_auth.
    allow_plaintext_auth: bool = False
    #: Networks where plaintext authentication is allowed without TLS.
    trusted_networks: Sequence[str] = LOOPBACK
    #: Seconds a client gets to finish a TLS handshake.
    tls_handshake_timeout: float = 30.0

    #: DELE refused for every mailbox (``-ERR [SYS/PERM]``).
    read_only: bool = False
    #: Offer APOP: None means "if the adapter overrides apop_secret".
    apop: Optional[bool] = None

    #: Stack size of connection threads in bytes (at least 32 KiB, the
    #: smallest threading.stack_size() takes); 0 keeps the interpreter default.
    stack_size: int = 512 * 1024
    #: Seconds a connection thread whose connection ended waits for the
    #: next one before it ends (0: at once); reuse saves starting a thread.
    thread_keepalive: float = 5.0
    #: Monotonic clock in seconds; injectable so tests can move time.
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        if self.timeout < RFC1939_MIN_AUTOLOGOUT:
            raise ValueError(
                "timeout must be at least %d seconds (RFC 1939 section 3)" % RFC1939_MIN_AUTOLOGOUT
            )
        for name in ("auth_timeout", "login_timeout", "poll_interval", "send_timeout", "tls_handshake_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError("%s must be positive" % name)
        for name in ("max_connections", "max_auth_failures", "max_bad_commands", "max_login_commands",
                     "max_password_checks"):
            if getattr(self, name) < 1:
                raise ValueError("%s must be at least 1" % name)
        for name in ("max_connections_per_ip", "max_log_lines_per_ip", "login_delay", "stack_size", "free_auth_failures", "thread_keepalive",
                     "max_auth_failure_delay", "auth_lockout_failures", "auth_lockout_duration"):
            if getattr(self, name) < 0:
                raise ValueError("%s must not be negative" % name)
        if self.auth_lockout_failures and self.auth_lockout_duration <= 0:
            raise ValueError("auth_lockout_duration must be positive when auth_lockout_failures is set")
        if 0 < self.stack_size < MIN_STACK_SIZE:
            # threading.stack_size() would refuse it only when the first
            # client connects, and then for every client.
            raise ValueError("stack_size must be 0 or at least %d bytes" % MIN_STACK_SIZE)
        if self.expire != "NEVER" and not decimal(self.expire):
            raise ValueError("expire must be NEVER or a number of days")
        parse_networks(self.trusted_networks, "trusted_networks")
        if self.server_name is None:
            self.server_name = self.hostname
