"""Listeners, connection threads and connection limits.

:class:`POP3Server` is a ``socketserver.ThreadingTCPServer``: one listening
socket, one thread per accepted connection.  :class:`ServerGroup` runs
several of them (IPv4, IPv6, plain and TLS ports) over one shared
:class:`~pop3frame.session.SessionContext` and one connection budget.
"""
from __future__ import annotations

import logging
import socket
import socketserver
import threading
from typing import Dict, List, Optional, Sequence, Tuple, Union

from . import protocol
from .adapter import AdapterBase
from .config import ServerConfig
from .handler import POP3Handler
from .locks import LockManager
from .session import SessionContext
from .tls import TLSCertificates

__all__ = ["POP3Server", "ServerGroup", "ConnectionTracker"]

logger = logging.getLogger("pop3frame.server")

# threading.stack_size() is process-wide; this lock keeps our temporary
# change from racing with another of our servers starting a thread.
_stack_size_lock = threading.Lock()


class ConnectionTracker:
    """Counts live connections (in total and per client address) and can close them.

    Shared by every listener of a server group, so the limits are global.
    """

    def __init__(self, max_total: int, max_per_ip: int = 0) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self._mutex = threading.Condition()
        self._live: Dict[socket.socket, Tuple[str, "POP3Server", Optional[threading.Thread]]] = {}
        self._per_ip: Dict[str, int] = {}

    @classmethod
    def for_config(cls, config: ServerConfig) -> "ConnectionTracker":
        return cls(config.max_connections, config.max_connections_per_ip)

    def admit(self, sock: socket.socket, ip: str, server: "POP3Server") -> Optional[str]:
        """Register a connection, or return why it must be refused."""
        with self._mutex:
            if len(self._live) >= self.max_total:
                return "too many connections"
            if self.max_per_ip and self._per_ip.get(ip, 0) >= self.max_per_ip:
                return "too many connections from your address"
            self._live[sock] = (ip, server, None)
            self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
            return None

    def attach(self, sock: socket.socket, thread: threading.Thread) -> None:
        with self._mutex:
            # The thread may already have finished and released the entry.
            entry = self._live.get(sock)
            if entry is not None:
                self._live[sock] = (entry[0], entry[1], thread)

    def release(self, sock: socket.socket) -> None:
        with self._mutex:
            entry = self._live.pop(sock, None)
            if entry is not None:
                ip = entry[0]
                left = self._per_ip[ip] - 1
                if left:
                    self._per_ip[ip] = left
                else:
                    del self._per_ip[ip]
                self._mutex.notify_all()

    def count(self) -> int:
        with self._mutex:
            return len(self._live)

    def wait_until_at_most(self, n: int, timeout: float) -> bool:
        """Block until at most ``n`` connections are live; False on timeout.

        A connection counts until its session has finished and released its
        lock, so tests use this to wait for server-side cleanup without sleeping.
        """
        with self._mutex:
            return self._mutex.wait_for(lambda: len(self._live) <= n, timeout)

    def close_all(self, server: Optional["POP3Server"] = None, timeout: float = 10.0) -> None:
        """Disconnect live sessions (of one server, or all) and wait for their threads.

        Shutting the socket down makes the session's next read see end of
        stream, so it ends the way a dropped connection does: the lock is
        released and no deletion is applied.  A session already in UPDATE
        finishes its deletions first, because nothing interrupts the adapter.
        """
        with self._mutex:
            victims = [(s, t) for s, (_, srv, t) in self._live.items() if server is None or srv is server]
        for sock, _ in victims:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, thread in victims:
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)


def _context(
    adapter: Union[AdapterBase, SessionContext],
    config: Optional[ServerConfig],
    locks: Optional[LockManager],
    tls: Optional[TLSCertificates],
) -> SessionContext:
    """Servers accept a ready context (shared between listeners) or its parts."""
    if isinstance(adapter, SessionContext):
        return adapter
    return SessionContext(adapter, config, locks, tls=tls)


class POP3Server(socketserver.ThreadingTCPServer):
    """A POP3 listener.

    ``POP3Server(("127.0.0.1", 1100), MyAdapter())`` then ``serve_forever()``.
    With ``tls=TLSCertificates(cert, key)`` the listener offers STLS, or,
    with ``secure=True`` as well, speaks implicit TLS (POP3S, RFC 8314).
    The address family follows the host: an IPv6 literal gives an IPv6
    socket (IPv6-only, so ``::`` and ``0.0.0.0`` can share a port).
    Override points: ``handler_class`` (socket I/O) and
    ``SessionContext.session_class`` (protocol).
    """

    daemon_threads = True
    allow_reuse_address = True
    # A burst of connects beyond the backlog is not refused but silently
    # stalled (Linux drops the handshake's last ACK), and a POP3 client then
    # waits for a greeting that never comes.  The kernel caps this at somaxconn.
    request_queue_size = 1024
    handler_class = POP3Handler

    def __init__(
        self,
        address: Tuple[str, int],
        adapter: Union[AdapterBase, SessionContext],
        config: Optional[ServerConfig] = None,
        *,
        locks: Optional[LockManager] = None,
        tls: Optional[TLSCertificates] = None,
        tracker: Optional[ConnectionTracker] = None,
        secure: bool = False,
        bind_and_activate: bool = True,
    ) -> None:
        self.context = _context(adapter, config, locks, tls)
        self.tracker = tracker or ConnectionTracker.for_config(self.context.config)
        #: Whether connections on this listener are encrypted from the start.
        self.secure = secure
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, self.handler_class, bind_and_activate)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def process_request(self, request: socket.socket, client_address) -> None:
        refusal = self.tracker.admit(request, client_address[0], self)
        if refusal is not None:
            logger.warning("refusing %s: %s", client_address[0], refusal)
            try:
                request.settimeout(1.0)
                request.sendall(protocol.err(refusal, protocol.SYS_TEMP))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="pop3-%s:%s" % client_address[:2],
            daemon=True,
        )
        stack = self.context.config.stack_size
        try:
            if stack:
                with _stack_size_lock:
                    previous = threading.stack_size(stack)
                    try:
                        thread.start()
                    finally:
                        threading.stack_size(previous)
            else:
                thread.start()
        except BaseException:
            self.tracker.release(request)
            self.shutdown_request(request)
            raise
        self.tracker.attach(request, thread)

    def process_request_thread(self, request: socket.socket, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.tracker.release(request)

    def handle_error(self, request, client_address) -> None:
        logger.exception("error serving %s", client_address)

    def shutdown(self) -> None:
        """Stop accepting, then end every live session of this listener.

        Sessions end as if disconnected: pending deletions are not applied,
        so no mail is lost.  Must not be called from the serving thread.
        """
        super().shutdown()
        self.tracker.close_all(self)


class ServerGroup:
    """Several listeners sharing one adapter, lock manager and connection budget."""

    def __init__(
        self,
        adapter: Union[AdapterBase, SessionContext],
        config: Optional[ServerConfig] = None,
        *,
        locks: Optional[LockManager] = None,
        tls: Optional[TLSCertificates] = None,
    ) -> None:
        self.context = _context(adapter, config, locks, tls)
        self.tracker = ConnectionTracker.for_config(self.context.config)
        self.servers: List[POP3Server] = []
        self._threads: List[threading.Thread] = []

    def add_listener(self, address: Tuple[str, int], *, secure: bool = False, server_class=POP3Server) -> POP3Server:
        """Bind a listening socket now (so errors surface at once); serve it on start()."""
        server = server_class(address, self.context, tracker=self.tracker, secure=secure)
        self.servers.append(server)
        return server

    @property
    def addresses(self) -> Sequence[Tuple[str, int]]:
        return [s.server_address[:2] for s in self.servers]

    def start(self, poll_interval: float = 0.5) -> None:
        """Serve every listener in a background thread.

        ``poll_interval`` bounds how long ``shutdown()`` waits for a listener
        to notice; tests pass a small one.
        """
        for server in self.servers:
            thread = threading.Thread(
                target=server.serve_forever,
                args=(poll_interval,),
                name="pop3-listen-%s:%s" % server.server_address[:2],
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def shutdown(self) -> None:
        """Stop every listener, end every session (no deletions applied), close sockets."""
        for server in self.servers:
            if self._threads:
                server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        self.tracker.close_all()
