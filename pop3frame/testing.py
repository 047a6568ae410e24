"""Run a real server in a background thread, for tests (like aiosmtpd's Controller).

::

    with Controller(MemoryAdapter({"alice": "pw"})) as server:
        client = server.pop3()          # a poplib.POP3, already connected
        client.user("alice"); client.pass_("pw")

The server listens on 127.0.0.1 (or ``host``) on a port the OS picks.
Clients it hands out (:meth:`Controller.pop3`, :meth:`Controller.connect`)
are closed when it stops, so a test need not close them itself.
"""
from __future__ import annotations

import contextlib
import dataclasses
import poplib
import socket
import ssl
from typing import Any, List, Optional, Tuple, Union

from .adapter import AdapterBase
from .config import ServerConfig
from .locks import LockManager
from .server import POP3Server, ServerGroup
from .session import SessionContext
from .tls import TLSCertificates

__all__ = ["Controller", "ManualClock"]


class ManualClock:
    """A clock that moves only when told to; pass it as ``ServerConfig.clock``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Controller:
    """Start a :class:`~pop3frame.server.ServerGroup` in threads; stop it on exit.

    Extra keyword arguments become :class:`ServerConfig` fields, e.g.
    ``Controller(adapter, login_delay=60, clock=clock)``.  ``server_class``:
    a :class:`~pop3frame.server.POP3Server` subclass (its ``handler_class``
    drives the connections).
    """

    def __init__(
        self,
        adapter: Union[AdapterBase, SessionContext],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        config: Optional[ServerConfig] = None,
        locks: Optional[LockManager] = None,
        secure: bool = False,
        tls: Union[TLSCertificates, ssl.SSLContext, None] = None,
        server_class: type = POP3Server,
        **options: Any,
    ) -> None:
        if options:
            config = dataclasses.replace(config or ServerConfig(hostname="localhost"), **options)
        self.group = ServerGroup(adapter, config or ServerConfig(hostname="localhost"), locks=locks, tls=tls)
        self.server: POP3Server = self.group.add_listener((host, port), secure=secure, server_class=server_class)
        #: What pop3() and connect() handed out; closed by stop().
        self._clients: List[Union[poplib.POP3, socket.socket]] = []

    @property
    def context(self) -> SessionContext:
        return self.group.context

    @property
    def address(self) -> Tuple[str, int]:
        return self.server.server_address[:2]

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        return self.address[1]

    def start(self) -> "Controller":
        self.group.start(poll_interval=0.05)
        return self

    def stop(self) -> None:
        """Close the clients handed out, then stop the server (sessions end without deletions)."""
        clients, self._clients = self._clients, []
        for client in clients:
            with contextlib.suppress(OSError):  # a test may have closed its socket behind poplib's back
                client.close()
        self.group.shutdown()

    def __enter__(self) -> "Controller":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pop3(self, timeout: float = 10.0) -> poplib.POP3:
        """A connected ``poplib.POP3`` client (greeting already read); closed by :meth:`stop`."""
        client = poplib.POP3(self.host, self.port, timeout=timeout)
        self._clients.append(client)
        return client

    def connect(self, timeout: float = 10.0) -> socket.socket:
        """A raw connected socket, the greeting still unread; closed by :meth:`stop`."""
        sock = socket.create_connection(self.address, timeout=timeout)
        self._clients.append(sock)
        return sock

    def wait_for_connections(self, at_most: int = 0, timeout: float = 10.0) -> bool:
        """Wait until at most ``at_most`` sessions are live (their locks released)."""
        return self.group.tracker.wait_until_at_most(at_most, timeout)
