"""Listeners, connection threads and connection limits.

:class:`POP3Server` is a ``socketserver.ThreadingTCPServer``: one listening
socket, one thread per accepted connection.  :class:`ServerGroup` runs
several of them (IPv4, IPv6, plain and TLS ports) over one shared
:class:`~pop3frame.session.SessionContext` and one connection budget.

A listener with ``proxy_protocol=True`` expects a HAProxy PROXY v1/v2 header
first (:mod:`pop3frame.proxy`), and only from a trusted proxy's address; the
real client address from it is what limits, the failed-login throttle,
login delay and logs see.  Each session ends with one summary log line at
INFO (peer, user, messages retrieved and deleted, octets sent, duration, how
it ended, failed logins, TLS version); per-event lines are DEBUG.  Lines
about a client address outside the trusted networks, summaries and
refusals included, are bounded per minute
(:class:`~pop3frame.clientlog.LogBudget`).  With a
:class:`~pop3frame.stats.Stats` the same
numbers are counted.
"""
from __future__ import annotations

import functools
import logging
import signal
import socket
import socketserver
import ssl
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from . import protocol
from .adapter import AdapterBase
from .clientlog import clipped, quoted
from .config import LOOPBACK, ServerConfig, client_key, in_networks, parse_networks
from .handler import POP3Handler, kernel_timeval
from .locks import LockManager
from .proxy import ProxyError, read_header
from .session import Reply, SessionContext, State
from .stats import Stats
from .tls import TLSCertificates

__all__ = ["POP3Server", "ServerGroup", "ConnectionTracker", "SessionHandler", "Workers", "bind_socket"]

logger = logging.getLogger("pop3frame.server")

# threading.stack_size() is process-wide; this lock keeps our temporary
# change from racing with another of our servers starting a thread.
_stack_size_lock = threading.Lock()


class ConnectionTracker:
    """Counts live connections (in total and per client address) and can close them.

    Shared by every listener of a server group, so the limits are global.
    Addresses for which ``exempt(ip)`` is true (the trusted networks) have
    no per-address limit.  Thread-safe.
    """

    def __init__(self, max_total: int, max_per_ip: int = 0,
                 exempt: Callable[[str], bool] = lambda ip: False) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.exempt = exempt
        self._mutex = threading.Condition()
        self._live: Dict[socket.socket, Tuple[Optional[str], "POP3Server"]] = {}
        self._per_ip: Dict[str, int] = {}

    @classmethod
    def for_context(cls, context: SessionContext) -> "ConnectionTracker":
        config = context.config
        return cls(config.max_connections, config.max_connections_per_ip, context.is_trusted)

    def admit(self, sock: socket.socket, ip: Optional[str], server: "POP3Server") -> Optional[str]:
        """Register a connection, or return why it must be refused.

        ``ip=None`` counts the connection in the total only; :meth:`assign_ip`
        adds the address later (a PROXY listener learns it from the header).
        """
        with self._mutex:
            refusal = self._count_in(ip, new=True)
            if refusal is None:
                self._live[sock] = (ip, server)
            return refusal

    def assign_ip(self, sock: socket.socket, ip: str) -> Optional[str]:
        """Give an admitted connection its client address, or say why it must be refused."""
        with self._mutex:
            entry = self._live.get(sock)
            if entry is None or entry[0] is not None:
                raise ValueError("connection not admitted, or its address is already known")
            refusal = self._count_in(ip, new=False)
            if refusal is None:
                self._live[sock] = (ip, entry[1])
            return refusal

    def refusal(self, total: Optional[int], ip: Optional[str], from_ip: int) -> Optional[str]:
        """Why one more connection must be refused, or None.

        ``total``: connections counted now (None: this one is counted
        already, only its address is new); ``from_ip``: those counted under
        ``ip``'s key.
        """
        if total is not None and total >= self.max_total:
            return "too many connections"
        if ip is not None and self.max_per_ip and from_ip >= self.max_per_ip and not self.exempt(ip):
            return "too many connections from your address"
        return None

    def _count_in(self, ip: Optional[str], new: bool) -> Optional[str]:
        """Count a connection (``new``: in the total too) from ``ip``, or say why not.

        Called with the mutex held; :class:`pop3frame.hostwide.HostConnectionTracker`
        counts in memory the workers of ``serve --workers`` share instead.
        """
        key = None if ip is None else client_key(ip)
        refusal = self.refusal(len(self._live) if new else None, ip, self._per_ip.get(key, 0) if key is not None else 0)
        if refusal is None and key is not None:
            self._per_ip[key] = self._per_ip.get(key, 0) + 1
        return refusal

    def _count_out(self, ip: Optional[str]) -> None:
        """Undo :meth:`_count_in` for a connection that ended (mutex held)."""
        if ip is not None:
            key = client_key(ip)
            left = self._per_ip[key] - 1
            if left:
                self._per_ip[key] = left
            else:
                del self._per_ip[key]

    def set_limits(self, max_total: int, max_per_ip: int) -> None:
        """Change the limits for new connections (SIGHUP); live ones stay."""
        with self._mutex:
            self.max_total = max_total
            self.max_per_ip = max_per_ip

    def release(self, sock: socket.socket) -> None:
        with self._mutex:
            entry = self._live.pop(sock, None)
            if entry is not None:
                self._count_out(entry[0])
                self._mutex.notify_all()

    def count(self) -> int:
        with self._mutex:
            return len(self._live)

    def count_ip(self, ip: str) -> int:
        """Live connections counted under ``ip``'s key (an IPv6 address's /64)."""
        with self._mutex:
            return self._per_ip.get(client_key(ip), 0)

    def wait_until_at_most(self, n: int, timeout: float) -> bool:
        """Block until at most ``n`` connections are live; False on timeout.

        A connection counts until its session has finished and released its
        lock, so tests use this to wait for server-side cleanup without sleeping.
        """
        with self._mutex:
            return self._mutex.wait_for(lambda: len(self._live) <= n, timeout)

    def close_all(self, server: Optional["POP3Server"] = None, timeout: float = 10.0) -> None:
        """Disconnect live sessions (of one server, or all) and wait until they ended.

        Shutting the socket down makes the session's next read see end of
        stream, so it ends the way a dropped connection does: the lock is
        released and no deletion is applied.  A session already in UPDATE
        finishes its deletions first, because nothing interrupts the adapter.
        """
        with self._mutex:
            victims = [sock for sock, (_, srv) in self._live.items() if server is None or srv is server]
        for sock in victims:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        # A session's thread releases its entry after Session.finish(): the
        # lock is free and the adapter was told once the entry is gone.
        with self._mutex:
            self._mutex.wait_for(lambda: not any(sock in self._live for sock in victims), timeout)


class SessionHandler(POP3Handler):
    """:class:`POP3Handler` plus the end-of-session summary line and the stats counters."""

    server: "POP3Server"

    def setup(self) -> None:
        self.started = time.monotonic()
        super().setup()
        if self.server.stats is not None:
            self.server.stats.add("sessions")

    def answer(self, line: bytes) -> Reply:
        stats, session = self.server.stats, self.session
        if stats is None:
            return session.handle(line)
        before, failures = session.state, getattr(session, "_failures", 0)
        reply = session.handle(line)
        if before is State.AUTHORIZATION and session.state is State.TRANSACTION:
            stats.add("logins_ok")
        failed = getattr(session, "_failures", 0) - failures
        if failed > 0:
            stats.add("logins_failed", failed)
        return reply

    def finish(self) -> None:
        session, conn = self.session, self.conn
        duration = time.monotonic() - self.started
        retrieved = getattr(session, "retrieved", 0)
        deleted = getattr(session, "deleted_count", 0)
        sent = conn.bytes_out
        stats = self.server.stats
        if stats is not None:
            stats.add("messages_retrieved", retrieved)
            stats.add("messages_deleted", deleted)
            stats.add("bytes_out", sent)
        host, port = self.client_address[:2]
        if not self.server.context.log_budget.allow(host):
            return
        failures = getattr(session, "_failures", 0)
        # The one INFO line of a session: what the DEBUG lines said one by
        # one (login, TLS, quit, how it ended), failed logins included.
        logger.info(
            "[%s] session end: peer %s port %s, user %s, %d retrieved, %d deleted, %d octets sent, %.3f s, %s%s%s",
            session.id, host, port, quoted(session.user) if session.user else "-", retrieved, deleted, sent,
            duration, self.ended, ", " + protocol.plural(failures, "failed login") if failures else "",
            ", " + self.tls_version if self.tls_version else "",
            extra={"session": session.id, "peer": host, "port": port,
                   "user": clipped(session.user) if session.user else None,
                   "retrieved": retrieved, "deleted": deleted, "bytes_out": sent,
                   "duration": round(duration, 3), "ended": self.ended, "failed_logins": failures,
                   "tls": self.tls_version},
        )


#: Listen backlog.  A burst of connects beyond it is not refused but silently
#: stalled (Linux drops the handshake's last ACK), and a POP3 client then
#: waits for a greeting that never comes.  The kernel caps this at somaxconn.
BACKLOG = 1024


def bind_socket(address: Tuple[str, int], backlog: int = BACKLOG) -> socket.socket:
    """A listening TCP socket on ``address``, as :class:`POP3Server` binds one.

    For binding before the listener exists: a daemon binds port 110 as root,
    drops privileges, and only then opens its mail store and builds the
    server around the socket (``POP3Server(..., sock=...)``).  An IPv6
    address gives an IPv6-only socket, so ``::`` and ``0.0.0.0`` can share
    a port.
    """
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class _Waiting:
    """An idle connection thread's place in :class:`Workers`: the job handed
    to it, and the lock it sleeps on (held while it waits; released to wake it)."""

    __slots__ = ("job", "wake")

    def __init__(self) -> None:
        self.job: Optional[Callable[[], None]] = None
        self.wake = threading.Lock()
        self.wake.acquire()


class Workers:
    """The connection threads of a server, kept for reuse.

    Each thread serves one connection at a time, start to end.  Starting a
    thread costs a clone(), a fresh stack and a hand-shake with the
    accepting thread, about a third of a short session's CPU time, so a
    thread whose connection ended waits ``keepalive`` seconds for the next
    one before it ends (0: it ends at once).  The thread idle the shortest
    gets the next connection (its stack is warm, and a surplus of threads
    after a burst ends by itself); each idle thread sleeps on a lock of its
    own, so handing over a connection wakes that one thread and no other.
    Idle threads hold no socket, lock or file; :meth:`close` ends them.
    """

    def __init__(self, stack_size: int = 0, keepalive: float = 5.0) -> None:
        self.stack_size = stack_size
        self.keepalive = keepalive
        #: The idle threads' places, the most recently idle last.
        self._waiting: List[_Waiting] = []
        self._mutex = threading.Condition()
        self._closed = False

    @classmethod
    def for_config(cls, config: ServerConfig) -> "Workers":
        return cls(config.stack_size, config.thread_keepalive)

    def submit(self, job: Callable[[], None], name: str) -> None:
        """Run ``job`` in an idle thread, or in a new one (OSError if none can start)."""
        with self._mutex:
            if self._waiting:
                waiting = self._waiting.pop()
                waiting.job = job
                waiting.wake.release()
                return
        thread = threading.Thread(target=self._run, args=(job,), name=name, daemon=True)
        if self.stack_size:
            with _stack_size_lock:
                previous = threading.stack_size(self.stack_size)
                try:
                    thread.start()
                finally:
                    threading.stack_size(previous)
        else:
            thread.start()

    def _run(self, job: Optional[Callable[[], None]]) -> None:
        waiting = _Waiting()
        while job is not None:
            job()
            job = self._next(waiting)

    def _next(self, waiting: _Waiting) -> Optional[Callable[[], None]]:
        with self._mutex:
            if self._closed or self.keepalive <= 0:
                return None
            waiting.job = None
            self._waiting.append(waiting)
            self._mutex.notify_all()
        if not waiting.wake.acquire(timeout=self.keepalive):
            with self._mutex:
                if waiting in self._waiting:
                    self._waiting.remove(waiting)
                    return None
            # submit() or close() took this place just as the wait ran out:
            # the lock is released already, the job set.
            waiting.wake.acquire()
        return waiting.job

    @property
    def idle(self) -> int:
        """Threads waiting for a connection."""
        with self._mutex:
            return len(self._waiting)

    def wait_idle(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until at least ``count`` threads wait for a connection (tests)."""
        with self._mutex:
            return self._mutex.wait_for(lambda: len(self._waiting) >= count, timeout)

    def close(self) -> None:
        """End the idle threads now; busy ones end when their connection does."""
        with self._mutex:
            self._closed = True
            waiting, self._waiting = self._waiting, []
            for place in waiting:
                place.job = None
                place.wake.release()


def listening(address, secure: bool, stls: bool, proxy_networks: Optional[Sequence] = None) -> str:
    """The log line of a listener on ``address``: where, and how (TLS, STLS, PROXY from where)."""
    how = " (TLS)" if secure else " (STLS offered)" if stls else ""
    if proxy_networks is not None:
        how += " (PROXY protocol from %s)" % ", ".join(map(str, proxy_networks))
    return "listening on %s port %d%s" % (address[0], address[1], how)


def _context(
    adapter: Union[AdapterBase, SessionContext],
    config: Optional[ServerConfig],
    locks: Optional[LockManager],
    tls: Union[TLSCertificates, ssl.SSLContext, None],
) -> SessionContext:
    """Servers accept a ready context (shared between listeners) or its parts."""
    if isinstance(adapter, SessionContext):
        return adapter
    return SessionContext(adapter, config, locks, tls=tls)


def _interrupt_once(signum, frame) -> None:
    """SIGINT during serve_forever: stop, and ignore further ones until stopped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


class POP3Server(socketserver.ThreadingTCPServer):
    """A POP3 listener.

    ``POP3Server(("127.0.0.1", 1100), MyAdapter())`` then ``serve_forever()``.
    With ``tls=TLSCertificates(cert, key)`` the listener offers STLS, or,
    with ``secure=True`` as well, speaks implicit TLS (POP3S, RFC 8314).
    The address family follows the host: an IPv6 literal gives an IPv6
    socket (IPv6-only, so ``::`` and ``0.0.0.0`` can share a port).
    Override points: ``handler_class`` (socket I/O) and
    ``SessionContext.session_class`` (protocol).

    With ``proxy_protocol=True`` every connection must start with a PROXY
    v1 or v2 header, read in the connection's thread within
    ``proxy_timeout`` seconds; without a valid one the connection is closed.
    Only peers in ``proxy_trusted_networks`` (CIDR strings; loopback by
    default, as Dovecot's ``haproxy_trusted_networks``) may send one: a
    connection from anywhere else is closed at once, with nothing read and
    nothing sent, since its header would name whatever address it liked.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = BACKLOG
    handler_class = SessionHandler

    def __init__(
        self,
        address: Tuple[str, int],
        adapter: Union[AdapterBase, SessionContext],
        config: Optional[ServerConfig] = None,
        *,
        locks: Optional[LockManager] = None,
        tls: Union[TLSCertificates, ssl.SSLContext, None] = None,
        tracker: Optional[ConnectionTracker] = None,
        workers: Optional[Workers] = None,
        secure: bool = False,
        proxy_protocol: bool = False,
        proxy_timeout: float = 5.0,
        proxy_trusted_networks: Sequence[str] = LOOPBACK,
        stats: Optional[Stats] = None,
        bind_and_activate: bool = True,
        sock: Optional[socket.socket] = None,
    ) -> None:
        self.context = _context(adapter, config, locks, tls)
        self.tracker = tracker or ConnectionTracker.for_context(self.context)
        #: Connection threads; shared by the listeners of a ServerGroup.
        self.workers = workers or Workers.for_config(self.context.config)
        self._own_workers = workers is None
        #: Whether connections on this listener are encrypted from the start.
        self.secure = secure
        #: Whether connections start with a PROXY protocol header.
        self.proxy_protocol = proxy_protocol
        self.proxy_timeout = proxy_timeout
        self.proxy_networks = parse_networks(proxy_trusted_networks, "proxy_trusted_networks")
        self.stats = stats
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, self.handler_class, bind_and_activate and sock is None)
        if sock is not None:
            # A listening socket bound earlier (bind_socket, systemd socket
            # activation) replaces the unbound one socketserver made.
            self.socket.close()
            self.socket = sock
            self.address_family = sock.family
            self.server_address = sock.getsockname()
        listener = self.socket
        #: What socket.accept() asks the listener for every connection, as
        #: plain ints: its family and type properties are enum conversions,
        #: thousands of instructions each in the thread all connections wait on.
        self._accepted_as = (int(listener.family), int(listener.type), listener.proto)
        self._pass_on_options()

    def _pass_on_options(self) -> None:
        """Set once, on the listening socket, what every connection needs.

        Linux (like the BSDs) copies TCP_NODELAY, SO_RCVTIMEO and SO_SNDTIMEO
        from a listening socket into each socket it accepts, which saves
        three system calls per connection.  Replies are gathered by us, so
        Nagle's algorithm would only add a 40 ms stall when a small reply
        follows one not yet acknowledged; the timeouts are the
        ``poll_interval`` connections wait in blocking calls.  On the
        listening socket SO_RCVTIMEO also bounds accept(), which socketserver
        calls only once poll() saw a connection waiting.
        :meth:`inherits_options` checks accepted connections until one inherited.
        """
        #: None until the first connection showed whether it inherited.
        self._inherited: Optional[bool] = None
        self._passed_on: Optional[Tuple[bytes, bytes]] = None
        listener = self.socket
        if listener.family not in (socket.AF_INET, socket.AF_INET6):
            self._inherited = False
            return
        timeval = kernel_timeval(self.context.config.poll_interval)
        try:
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            # Read back: the kernel rounds the timeouts to its clock ticks.
            self._passed_on = (listener.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, len(timeval)),
                               listener.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, len(timeval)))
        except OSError:
            self._inherited = False

    def inherits_options(self, sock: socket.socket) -> bool:
        """Whether connections accepted here come with TCP_NODELAY and the
        kernel timeouts (see :meth:`_pass_on_options`); if not, the handler
        sets them on it.  Asked until a connection inherited them.

        A connection that was already queued when the listener got its
        options (socket activation, a client early at start-up, or one
        queued while ``serve --workers`` forked) did not inherit, but the
        ones after it do: only a listener that could not take the options
        settles the answer at no.  (A kernel that never passes them on
        costs three getsockopt() per connection more; Linux and the BSDs do.)
        """
        if self._inherited is None:
            passed_on = self._passed_on
            try:
                inherited = passed_on is not None and bool(
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)) and (
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, len(passed_on[0])),
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, len(passed_on[1]))) == passed_on
            except OSError:
                inherited = False
            if inherited:
                self._inherited = True
                logger.debug("listener %s port %s: accepted sockets inherit its options", *self.server_address[:2])
            return inherited
        return self._inherited

    def get_request(self) -> Tuple[socket.socket, object]:
        """socket.accept(), less its conversions of the listener's family and type."""
        fd, address = self.socket._accept()
        sock = socket.socket(*self._accepted_as, fileno=fd)
        if socket.getdefaulttimeout() is None and self.socket.gettimeout():
            sock.setblocking(True)
        return sock, address

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def listening(self) -> str:
        """``listening on HOST port PORT`` and how (TLS, STLS, PROXY): the log line."""
        return listening(self.server_address, self.secure, self.context.tls is not None,
                         self.proxy_networks if self.proxy_protocol else None)

    def serve(self, poll_interval: float = 0.5) -> None:
        """Accept connections until :meth:`shutdown`; for a thread of its own."""
        super().serve_forever(poll_interval)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until :meth:`shutdown` is called from another thread, or Ctrl-C.

        For a script's main thread: logs where it listens, at INFO; a
        program that set up no logging gets pop3frame's log on stderr at
        INFO first, as ``pop3frame serve`` writes it.  Ctrl-C (SIGINT) ends
        it cleanly: the listener closes, live sessions end as if their
        client had gone (their deletions are not applied), and it returns,
        so a script whose last call it is exits with status 0 and no
        traceback.
        """
        if not logging.getLogger().handlers:
            from .lifecycle import setup_logging

            setup_logging("INFO")
        logger.info("%s", self.listening())
        # The first Ctrl-C stops; one more must not cut the stopping short
        # (sessions half closed, a traceback from the log's flush at exit).
        previous = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            previous = signal.signal(signal.SIGINT, _interrupt_once)
        try:
            self.serve(poll_interval)
        except KeyboardInterrupt:
            logger.info("interrupted: stopped listening on %s port %d", *self.server_address[:2])
            self.tracker.close_all(self)
            self.server_close()
            for handler in logging.getLogger().handlers:
                handler.flush()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _refuse(self, request: socket.socket, ip: str, refusal: str) -> None:
        if self.context.log_budget.allow(ip):
            logger.warning("refusing %s: %s", ip, refusal)
        if self.stats is not None:
            self.stats.add("refused")
        try:
            request.settimeout(1.0)
            request.sendall(protocol.err(refusal, protocol.SYS_TEMP))
        except OSError:
            pass

    def process_request(self, request: socket.socket, client_address) -> None:
        if self.proxy_protocol and not in_networks(client_address[0], self.proxy_networks):
            if self.context.log_budget.allow(client_address[0]):
                logger.warning("refusing %s port %s: not a trusted proxy; closed unread", *client_address[:2])
            if self.stats is not None:
                self.stats.add("refused")
            self.shutdown_request(request)
            return
        # Behind a proxy the peer is the proxy: per-address admission waits
        # for the header, in the connection's thread.
        refusal = self.tracker.admit(request, None if self.proxy_protocol else client_address[0], self)
        if refusal is not None:
            self._refuse(request, client_address[0], refusal)
            self.shutdown_request(request)
            return
        try:
            self.workers.submit(functools.partial(self.process_request_thread, request, client_address),
                                "pop3-%s:%s" % client_address[:2])
        except BaseException:
            self.tracker.release(request)
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request: socket.socket, client_address) -> None:
        try:
            if self.proxy_protocol:
                client_address = self._read_proxy_header(request, client_address)
                if client_address is None:
                    return
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self.tracker.release(request)

    def _read_proxy_header(self, request: socket.socket, proxy_address):
        """The real client address from the PROXY header, or None if refused."""
        try:
            header = read_header(request, self.proxy_timeout)
        except ProxyError as exc:
            if self.context.log_budget.allow(proxy_address[0]):
                logger.warning("refusing %s port %s: bad PROXY header: %s", proxy_address[0], proxy_address[1], exc)
            if self.stats is not None:
                self.stats.add("refused")
            return None
        client_address = header.source if header.has_address else proxy_address[:2]
        refusal = self.tracker.assign_ip(request, client_address[0])
        if refusal is not None:
            self._refuse(request, client_address[0], refusal)
            return None
        return client_address

    def service_actions(self) -> None:
        """Between connections (at least every ``poll_interval`` of serve()): the
        log budget's summaries of addresses that went quiet."""
        super().service_actions()
        self.context.log_budget.sweep()

    def handle_error(self, request, client_address) -> None:
        logger.exception("error serving %s", client_address)

    def shutdown(self) -> None:
        """Stop accepting, then end every live session of this listener.

        Sessions end as if disconnected: pending deletions are not applied,
        so no mail is lost.  Must not be called from the serving thread.
        """
        super().shutdown()
        self.tracker.close_all(self)
        if self._own_workers:
            self.workers.close()

    def server_close(self) -> None:
        super().server_close()
        if self._own_workers:
            self.workers.close()


class ServerGroup:
    """Several listeners sharing one adapter, lock manager and connection budget.

    ``tracker``: the connection budget, if not this group's own (the
    workers of ``serve --workers`` share one for the host).
    """

    def __init__(
        self,
        adapter: Union[AdapterBase, SessionContext],
        config: Optional[ServerConfig] = None,
        *,
        locks: Optional[LockManager] = None,
        tls: Union[TLSCertificates, ssl.SSLContext, None] = None,
        stats: Optional[Stats] = None,
        tracker: Optional[ConnectionTracker] = None,
    ) -> None:
        self.context = _context(adapter, config, locks, tls)
        self.tracker = tracker or ConnectionTracker.for_context(self.context)
        self.workers = Workers.for_config(self.context.config)
        self.stats = stats
        if stats is not None and stats.active is None:
            stats.active = self.tracker.count
        self.servers: List[POP3Server] = []
        self._threads: List[threading.Thread] = []

    def add_listener(
        self,
        address: Tuple[str, int],
        *,
        secure: bool = False,
        proxy_protocol: bool = False,
        proxy_timeout: float = 5.0,
        proxy_trusted_networks: Sequence[str] = LOOPBACK,
        server_class=POP3Server,
        sock: Optional[socket.socket] = None,
    ) -> POP3Server:
        """Bind a listening socket now (so errors surface at once); serve it on start().

        ``sock``: a listening socket bound earlier (:func:`bind_socket`) to use
        instead; ``address`` then only names it in logs.
        """
        options = {}
        if proxy_protocol:
            options.update(proxy_protocol=True, proxy_timeout=proxy_timeout,
                           proxy_trusted_networks=proxy_trusted_networks)
        if self.stats is not None:
            options["stats"] = self.stats
        server = server_class(address, self.context, tracker=self.tracker, workers=self.workers, secure=secure,
                              sock=sock, **options)
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
                target=server.serve,
                args=(poll_interval,),
                name="pop3-listen-%s:%s" % server.server_address[:2],
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def stop_accepting(self) -> None:
        """Stop and close every listener; live sessions go on."""
        for server in self.servers:
            if self._threads:
                # The base class's shutdown: stop the accept loop only.
                socketserver.BaseServer.shutdown(server)
            server.server_close()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        # No connection will come: idle threads go, busy ones after theirs.
        self.workers.close()

    def graceful_shutdown(self, grace: float, wait: Optional[Callable[[float], bool]] = None) -> bool:
        """Stop accepting, give sessions ``grace`` seconds to finish, then cut the rest.

        A session that QUITs within the grace period has its deletions
        applied; one cut afterwards ends like a dropped connection (no
        deletions).  ``wait(grace)`` blocks until the sessions are gone or
        the grace is over and says whether they are gone; the default waits
        on the connection tracker, and tests inject their own.  Returns True
        if no session had to be cut.
        """
        self.stop_accepting()
        live = self.tracker.count()
        if live and grace > 0:
            logger.info("shutting down: waiting up to %g s for %d session(s) to finish", grace, live)
            (wait or self._wait_for_sessions)(grace)
        left = self.tracker.count()
        if left:
            logger.info("closing %d session(s) still open; their deletions are not applied", left)
        self.tracker.close_all()
        return left == 0

    def _wait_for_sessions(self, grace: float) -> bool:
        return self.tracker.wait_until_at_most(0, grace)

    def apply_limits(self, config: ServerConfig) -> None:
        """Take new connection limits (SIGHUP) for connections accepted from now on."""
        self.tracker.set_limits(config.max_connections, config.max_connections_per_ip)

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
        self.workers.close()
