"""The POP3 state machine of one connection, with no socket in sight.

A :class:`Session` takes one command line at a time and returns the bytes
to send back (an iterable, so RETR can stream).  The connection handler owns
the socket; this module owns the protocol: states, the dispatch table,
argument checking, the mailbox lock and the RFC 1939 UPDATE rules.
"""
from __future__ import annotations

import base64
import binascii
import enum
import functools
import io
import itertools
import logging
import re
import secrets
import ssl
import time
from typing import Callable, Dict, FrozenSet, Iterable, Iterator, List, NamedTuple, Optional, Set, Tuple, Union

from . import __version__, protocol, sasl
from .adapter import (
    AdapterBase,
    AuthenticationFailed,
    LoginDelayed,
    MailboxInUse,
    MessageInfo,
    POP3Error,
    PermanentFailure,
    TemporaryFailure,
)
from .auth import FailureThrottle, LoginDelayTracker, PasswordChecks
from .clientlog import LogBudget, quoted
from .config import ServerConfig, in_networks, parse_networks
from .lifecycle import process_id
from .locks import Lock, LockManager
from .tls import TLSCertificates

__all__ = ["Session", "SessionContext", "State", "COMMANDS"]

logger = logging.getLogger("pop3frame.session")

#: What a command answers: bytes to send in order, and for RETR possibly a
#: protocol.FileSpan (the handler sends it from the file).
Reply = Iterable[protocol.Chunk]


class State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


AUTHORIZATION = frozenset({State.AUTHORIZATION})
TRANSACTION = frozenset({State.TRANSACTION})
BOTH = AUTHORIZATION | TRANSACTION


class CommandSpec(NamedTuple):
    """One row of the dispatch table."""

    method: str
    states: FrozenSet[State]
    min_args: int
    max_args: int


#: The dispatch table: command -> (Session method, states it is valid in,
#: argument count).  Subclasses extend it by copying and adding rows.
COMMANDS: Dict[str, CommandSpec] = {
    "USER": CommandSpec("do_user", AUTHORIZATION, 1, 1),
    # PASS takes its whole argument verbatim (spaces included), so no max.
    "PASS": CommandSpec("do_pass", AUTHORIZATION, 1, 255),
    "APOP": CommandSpec("do_apop", AUTHORIZATION, 2, 2),
    "CAPA": CommandSpec("do_capa", BOTH, 0, 0),
    "QUIT": CommandSpec("do_quit", BOTH, 0, 0),
    "STAT": CommandSpec("do_stat", TRANSACTION, 0, 0),
    "LIST": CommandSpec("do_list", TRANSACTION, 0, 1),
    "RETR": CommandSpec("do_retr", TRANSACTION, 1, 1),
    "DELE": CommandSpec("do_dele", TRANSACTION, 1, 1),
    "NOOP": CommandSpec("do_noop", TRANSACTION, 0, 0),
    "RSET": CommandSpec("do_rset", TRANSACTION, 0, 0),
    "TOP": CommandSpec("do_top", TRANSACTION, 2, 2),
    "UIDL": CommandSpec("do_uidl", TRANSACTION, 0, 1),
    "AUTH": CommandSpec("do_auth", AUTHORIZATION, 0, 2),
    "STLS": CommandSpec("do_stls", AUTHORIZATION, 0, 0),
    "UTF8": CommandSpec("do_utf8", AUTHORIZATION, 0, 0),
    "LANG": CommandSpec("do_lang", BOTH, 0, 1),
}

#: RFC 5034 section 4: SASL responses are not bound by the 255-octet limit.
MAX_SASL_LINE = 8192


class SessionContext:
    """What every session of one server shares: adapter, locks, options.

    ``session_class`` is the override point for protocol behaviour: set it
    to a :class:`Session` subclass to add commands or change replies.
    """

    def __init__(
        self,
        adapter: AdapterBase,
        config: Optional[ServerConfig] = None,
        locks: Optional[LockManager] = None,
        session_class: Optional[type] = None,
        tls: Union[TLSCertificates, ssl.SSLContext, None] = None,
    ) -> None:
        from .locks import InProcessLockManager

        self.session_class = session_class or Session
        if isinstance(tls, ssl.SSLContext):
            tls = TLSCertificates(context=tls)
        #: Certificates for STLS and implicit-TLS listeners, or None.
        self.tls = tls
        self.adapter = adapter
        self.config = config or ServerConfig()
        self.locks = locks or InProcessLockManager()
        self.login_delays = LoginDelayTracker.for_config(self.config)
        self.failures = FailureThrottle.for_config(self.config)
        #: Places for password checks, shared by every session of the server.
        self.password_checks = PasswordChecks.for_config(self.config)
        self.trusted_networks = parse_networks(self.config.trusted_networks, "trusted_networks")
        #: Log lines per client address (outside the trusted networks).
        self.log_budget = LogBudget(self.config.max_log_lines_per_ip, self.config.clock, self.is_trusted)
        apop = self.config.apop
        if apop is None:
            apop = adapter.offers_apop()
        self.apop = apop
        self.read_only = self.config.read_only or adapter.read_only

    def is_trusted(self, address: str) -> bool:
        return in_networks(address, self.trusted_networks)


class CommandError(POP3Error):
    """A bad argument: plain ``-ERR``, no response code applies."""

    code = None


_session_ids = itertools.count(1)
_NUMBER = re.compile(r"[0-9]{1,18}\Z")
#: RFC 4647 section 2.1: a basic language range (besides "*").
_LANGUAGE_RANGE = re.compile(r"[A-Za-z]{1,8}(-[A-Za-z0-9]{1,8})*\Z")

#: RFC 6856 section 3: the languages replies come in, tag -> its name in itself.
LANGUAGES = {"en": "English"}
#: What "LANG *" selects.
DEFAULT_LANGUAGE = "en"
#: RFC 6856 section 2.2: with "UTF8 USER" announced, the client may use UTF-8
#: in these before (or without) the UTF8 command.
UTF8_CREDENTIAL_COMMANDS = frozenset({"USER", "PASS", "APOP"})


class SessionLog(logging.LoggerAdapter):
    """Prefixes every record with the session id, so one grep finds a session.

    A line is written only if ``allow()`` says so (the client address's
    :class:`~pop3frame.clientlog.LogBudget`).
    """

    def __init__(self, logger: logging.Logger, session_id: str, allow: Callable[[], bool]) -> None:
        super().__init__(logger, {"session": session_id})
        self._allow = allow

    def process(self, msg, kwargs):
        return "[%s] %s" % (self.extra["session"], msg), kwargs

    def log(self, level, msg, *args, **kwargs):
        if self.isEnabledFor(level) and self._allow():
            msg, kwargs = self.process(msg, kwargs)
            self.logger.log(level, msg, *args, **kwargs)


class Session:
    """One POP3 conversation.  Not thread-safe: one connection thread drives it.

    Call :meth:`greeting` once, :meth:`handle` for each command line, and
    :meth:`finish` exactly once at the end whatever happened (it releases
    the lock and never deletes anything unless QUIT already did).
    """

    commands = COMMANDS

    def __init__(
        self,
        context: SessionContext,
        peer: Tuple[str, int] = ("", 0),
        *,
        secure: bool = False,
        session_id: Optional[str] = None,
    ) -> None:
        self.context = context
        self.adapter = context.adapter
        self.config = context.config
        self.peer = peer
        self.secure = secure
        self.id = session_id or "%x-%x" % (process_id(), next(_session_ids))
        # Not a lambda over self: a session that refers to itself lives on
        # until the cyclic garbage collector finds it.
        self.log = SessionLog(logger, self.id, functools.partial(context.log_budget.allow, peer[0]))
        self.state = State.AUTHORIZATION
        #: Set when the connection must close after the current reply.
        self.closing = False
        #: Set by STLS: the handler must start TLS after sending the reply.
        self.starttls = False
        #: Clock time (``config.clock``) before which the reply to the last
        #: command must not be sent, or None to send it at once: the
        #: failed-login delay of :class:`~pop3frame.auth.FailureThrottle`.
        self.reply_not_before: Optional[float] = None
        #: Clock time by which the client must have logged in
        #: (``config.login_timeout`` after the connection started).
        self.login_deadline = self.config.clock() + self.config.login_timeout
        #: Whether the client has hung up; the handler sets it, so a session
        #: waiting for a password check does not outlive its client.
        self.client_gone: Callable[[], bool] = _never
        self._sasl = None
        self.user: Optional[str] = None
        self.utf8 = False
        self._pending_user: Optional[str] = None
        self._previous_user: Optional[str] = None
        self._failures = 0
        #: Commands refused before login other than failed logins, and
        #: whether the current command checked credentials (see handle()).
        self._bad_commands = 0
        self._checked = False
        #: Lines handled before login, of any kind.
        self._login_lines = 0
        self._lock: Optional[Lock] = None
        self._messages: List[MessageInfo] = []
        self._deleted: Set[int] = set()
        self._timestamp = ""
        self.retrieved = 0
        self.deleted_count = 0

    # -- connection lifecycle -------------------------------------------------

    def greeting(self) -> bytes:
        """The ``+OK`` banner; carries the APOP timestamp when APOP is offered."""
        text = self.config.greeting
        if self.context.apop:
            self._timestamp = self.apop_timestamp()
            text = "%s %s" % (text, self._timestamp)
        return protocol.ok(text)

    def apop_timestamp(self) -> str:
        """RFC 1939 section 7: ``<process-ID.clock@hostname>``, unique per banner."""
        return "<%d.%d@%s>" % (process_id(), time.time_ns(), self.config.hostname)

    @property
    def timeout(self) -> float:
        """Inactivity limit for the current state, in seconds."""
        if self.state is State.TRANSACTION:
            return self.config.timeout
        return self.config.auth_timeout

    @property
    def deadline(self) -> Optional[float]:
        """Clock time at which the connection closes, whatever it is doing, or None.

        Before login, :attr:`login_deadline`; no such limit afterwards
        (only the inactivity :attr:`timeout`).
        """
        return self.login_deadline if self.state is State.AUTHORIZATION else None

    @property
    def max_line(self) -> int:
        """Longest command line accepted now, in octets including CRLF."""
        return MAX_SASL_LINE if self._sasl is not None else protocol.MAX_COMMAND_LINE

    def line_too_long(self) -> Reply:
        """The reply to a line over :attr:`max_line`, which the handler dropped unread.

        The line still counts as a (failed) command: a SASL exchange ends
        with it (RFC 5034 section 4: the ``-ERR`` rejects the AUTH command,
        so the next line is a command again, not a response), and a USER
        before it no longer counts for PASS.
        """
        self._sasl = None
        self._previous_user = self._pending_user = None
        return self._counted([protocol.err("line too long")])

    def finish(self) -> None:
        """End the session: close the mailbox and release its lock. Idempotent.

        Reached after QUIT, but also on disconnect, timeout, shutdown and
        errors; none of those apply deletions (RFC 1939 section 6).
        """
        if self._lock is None:
            return
        lock, self._lock = self._lock, None
        try:
            self.adapter.close_mailbox(self.user or "")
        except Exception:
            self.log.exception("adapter.close_mailbox failed")
        finally:
            lock.release()

    # -- dispatch -------------------------------------------------------------

    def handle(self, line: bytes) -> Reply:
        """Answer one command line; returns the bytes to send, in order."""
        self._previous_user, self._pending_user = self._pending_user, None
        self.reply_not_before = None
        if self.state is not State.AUTHORIZATION:
            return self._answer(line)
        self._login_lines += 1
        if self._login_lines > self.config.max_login_commands:
            # A real client logs in within a handful of commands; a stream
            # of cheap ones (CAPA) would cost CPU for the whole login_timeout.
            self.log.info("closing after %d commands without a login", self._login_lines - 1)
            self.closing = True
            return [protocol.err(TOO_MANY_COMMANDS)]
        self._checked = False
        reply = self._answer(line)
        return reply if self._checked else self._counted(reply)

    def _counted(self, reply: List[bytes]) -> List[bytes]:
        """Count an ``-ERR`` before login that no credentials check gave; close at the limit.

        Failed logins have their own limit (``max_auth_failures``); this
        one ends a client that only sends what the server refuses, as
        Dovecot's pop3-login does after three (RFC 1939 section 3 lets the
        server close the connection).
        """
        if not reply or not reply[0].startswith(b"-ERR"):
            return reply
        self._bad_commands += 1
        if self._bad_commands < self.config.max_bad_commands:
            return reply
        self.log.info("closing after %d refused commands before login", self._bad_commands)
        self.closing = True
        self._sasl = None
        return [protocol.err(TOO_MANY_BAD_COMMANDS)]

    def _answer(self, line: bytes) -> Reply:
        if self._sasl is not None:
            return self._sasl_continue(line)
        try:
            cmd = protocol.parse_command(line, utf8=self.utf8)
        except protocol.ProtocolError as exc:
            cmd = self._utf8_credentials(line)
            if cmd is None:
                return [protocol.err(str(exc))]
        spec = self.commands.get(cmd.name)
        if spec is None:
            return [protocol.err("unknown command")]
        if self.state not in spec.states:
            return [protocol.err("%s not valid in the %s state" % (cmd.name, self.state.value))]
        if len(cmd.args) < spec.min_args:
            return [protocol.err("missing argument")]
        if len(cmd.args) > spec.max_args:
            return [protocol.err("too many arguments")]
        failures = self._failures
        try:
            return getattr(self, spec.method)(cmd)
        except POP3Error as exc:
            if self._failures == failures:  # a refused login has its own line
                self.log.info("%s refused: %s", cmd.name, exc.text)
            return [protocol.err(exc.text, exc.code)]
        except Exception:
            self.log.exception("%s failed in the adapter", cmd.name)
            return [protocol.err("internal server error", protocol.SYS_TEMP)]

    def _utf8_credentials(self, line: bytes) -> Optional[protocol.Command]:
        """A USER, PASS or APOP line in UTF-8 before UTF8 mode, else None (RFC 6856 section 2.2)."""
        try:
            cmd = protocol.parse_command(line, utf8=True)
        except protocol.ProtocolError:
            return None
        return cmd if cmd.name in UTF8_CREDENTIAL_COMMANDS else None

    # -- AUTHORIZATION --------------------------------------------------------

    @property
    def plaintext_allowed(self) -> bool:
        """Whether passwords may travel on this connection (USER/PASS, PLAIN, LOGIN).

        Yes on TLS, from trusted networks, or when the operator allowed it
        everywhere; as Dovecot's ``disable_plaintext_auth``.
        """
        return self.secure or self.config.allow_plaintext_auth or self.context.is_trusted(self.peer[0])

    def do_user(self, cmd: protocol.Command) -> Reply:
        if not self.plaintext_allowed:
            return [protocol.err(PLAINTEXT_REFUSED, protocol.AUTH)]
        self._pending_user = cmd.args[0]
        # Same answer for every name: USER must not reveal which users exist.
        return [protocol.ok("send PASS")]

    def do_pass(self, cmd: protocol.Command) -> Reply:
        if self._previous_user is None:
            return [protocol.err("PASS must follow USER")]
        user, verify = sasl.credentials(self._previous_user, cmd.rest)
        return self._login(user, lambda: verify(self.adapter))

    def do_apop(self, cmd: protocol.Command) -> Reply:
        if not self.context.apop:
            return [protocol.err("APOP not supported")]
        user, verify = sasl.apop(self._timestamp, *cmd.args)
        return self._login(user, lambda: verify(self.adapter))

    def _login(self, user: str, check: Callable[[], Union[bool, bytes]]) -> Reply:
        """Shared tail of every authentication command: verify, lock, open.

        Every answer that depends on the password, whatever it is, is
        withheld until :attr:`reply_not_before` (the failed-login delay of
        the client's address): a fast answer must not tell a right guess.
        That includes a mechanism's success data (SCRAM's server-final
        message), which ``check`` returns instead of True: it goes out as a
        last challenge, and the mailbox opens after the client's empty
        response (RFC 5034 section 4).
        """
        verified = self._verify(user, check)
        if verified is None:
            return []
        if isinstance(verified, bytes):
            return self._sasl_step(sasl.success_data(user, verified), None)
        return self._open_mailbox(user)

    def _verify(self, user: str, check: Callable[[], Union[bool, bytes]]) -> Union[bool, bytes, None]:
        """Check the credentials; raise the refusal, or return ``check()``'s success.

        A locked-out address is refused before anything is verified.  The
        check waits for a place among :attr:`SessionContext.password_checks`;
        None means the login deadline passed or the client left meanwhile,
        and the connection is to close without a reply.
        """
        self._checked = True
        address = self.peer[0]
        throttle = self.context.failures
        if throttle.locked_for(address) > 0:
            self._failed(user, "address locked out")
            # Not [AUTH]: RFC 3206 section 5 says the credentials are the
            # problem, and they were not even checked, so a client would
            # wrongly ask its user for a new password.  Not [LOGIN-DELAY]: RFC
            # 2449 section 8.1.1 says the user logged in recently.  A lockout
            # is a temporary state of the server that ends by itself, which is
            # [SYS/TEMP] (RFC 3206 section 4: "no need to alarm the user,
            # unless the failure persists").
            raise TemporaryFailure(LOCKED_OUT)
        checks = self.context.password_checks
        if not checks.acquire(self.login_deadline, self.client_gone):
            # The deadline passed or the client left while others' checks
            # ran: end like an autologout, with no reply.
            self.log.info("no password check for %s before the login deadline or the client left; closing",
                          quoted(user))
            self.closing = True
            return None
        try:
            try:
                verified = check()
            finally:
                checks.release()
            if not verified:
                raise AuthenticationFailed()
        except AuthenticationFailed:
            self._withhold_until(throttle.failure(address))
            self._failed(user, "credentials rejected")
            raise
        self._withhold_until(throttle.not_before(address))
        return verified

    def _open_mailbox(self, user: str) -> Reply:
        """After the credentials were verified: lock, snapshot, TRANSACTION."""
        mailbox = self.adapter.mailbox_id(user)
        # The lock comes only after the password was verified, so nobody can
        # lock a victim out (or free the victim's lock) by naming it in USER.
        lock = self.context.locks.try_acquire(mailbox)
        if lock is None:
            raise MailboxInUse()
        try:
            if not self.context.login_delays.check_and_record(mailbox):
                raise LoginDelayed()
            messages = list(self.adapter.list_messages(user))
        except BaseException:
            lock.release()
            raise
        self._lock = lock
        self.user = user
        self._messages = messages
        self.state = State.TRANSACTION
        count, size = len(messages), sum(m.size for m in messages)
        # Its arguments cost more than the call: made only for a DEBUG log.
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("login %s from %s: %s, %s", quoted(user), self.peer[0], protocol.plural(count, "message"),
                           protocol.plural(size, "octet"))
        # RFC 6856 section 2.1: outside UTF-8 mode no non-ASCII string may
        # reach the client, and a UTF-8 name may log in before UTF8 (2.2).
        whose = "%s's maildrop" % user if self.utf8 or user.isascii() else "maildrop"
        return [protocol.ok("%s has %s (%d octets)" % (whose, protocol.plural(count, "message"), size))]

    def _failed(self, user: str, why: str) -> None:
        """Count a refused login on this connection; close it at the limit.

        Logged at INFO, one line each, unlike a successful login: the
        operator (and fail2ban) must see guessing as it happens.
        """
        self._failures += 1
        self.log.info("login failed for %s from %s: %s (%d on this connection)", quoted(user), self.peer[0], why,
                      self._failures)
        if self._failures >= self.config.max_auth_failures:
            self.closing = True

    def _withhold_until(self, when: float) -> None:
        self.reply_not_before = when if when > self.config.clock() else None

    # -- TRANSACTION ----------------------------------------------------------

    def _live(self) -> Iterator[Tuple[int, MessageInfo]]:
        """(1-based number, message) of every message not marked deleted."""
        deleted = self._deleted
        return ((i + 1, m) for i, m in enumerate(self._messages) if i not in deleted)

    def _message(self, arg: str) -> Tuple[int, MessageInfo]:
        """Resolve a message-number argument, refusing anything RFC 1939 forbids."""
        if not _NUMBER.match(arg):
            raise CommandError("invalid message number")
        number = int(arg)
        if not 1 <= number <= len(self._messages):
            raise CommandError("no such message")
        if number - 1 in self._deleted:
            raise CommandError("message %d already deleted" % number)
        return number, self._messages[number - 1]

    def _totals(self) -> Tuple[int, int]:
        count = size = 0
        for _, m in self._live():
            count += 1
            size += m.size
        return count, size

    def do_stat(self, cmd: protocol.Command) -> Reply:
        return [protocol.ok("%d %d" % self._totals())]

    def do_list(self, cmd: protocol.Command) -> Reply:
        if cmd.args:
            number, msg = self._message(cmd.args[0])
            return [protocol.ok("%d %d" % (number, msg.size))]
        count, size = self._totals()
        first = protocol.ok("%s (%d octets)" % (protocol.plural(count, "message"), size))
        return [protocol.multiline(first, ["%d %d" % (n, m.size) for n, m in self._live()])]

    def do_uidl(self, cmd: protocol.Command) -> Reply:
        if cmd.args:
            number, msg = self._message(cmd.args[0])
            return [protocol.ok("%d %s" % (number, msg.uid))]
        return [protocol.multiline(protocol.ok(), ["%d %s" % (n, m.uid) for n, m in self._live()])]

    def do_retr(self, cmd: protocol.Command) -> Reply:
        number, msg = self._message(cmd.args[0])
        stream = self._open(msg)
        self.retrieved += 1
        # dot_lines is read after open_message, which may have withdrawn it.
        chunks = protocol.iter_message(stream, msg.size, dot_lines=msg.dot_lines)
        return self._stream(protocol.ok("%d octets" % msg.size), chunks, stream, msg)

    def do_top(self, cmd: protocol.Command) -> Reply:
        number, msg = self._message(cmd.args[0])
        if not _NUMBER.match(cmd.args[1]):
            return [protocol.err("invalid number of lines")]
        stream = self._open(msg)
        if isinstance(stream, protocol.CheckedFile):
            # Stuffed line by line, and not vouched for by length: unchecked.
            stream = stream.file
        if isinstance(stream, io.RawIOBase):
            # TOP reads lines: through a buffer, not a read() per octet.
            stream = io.BufferedReader(stream)
        return self._stream(protocol.ok(), protocol.iter_top(stream, int(cmd.args[1])), stream)

    def _open(self, msg: MessageInfo):
        body = self.adapter.open_message(self.user or "", msg)
        if isinstance(body, (bytes, bytearray, memoryview)):
            return io.BytesIO(body)
        return body

    def _stream(self, first: bytes, chunks: Iterator[protocol.Chunk], stream,
                retrieved: Optional[MessageInfo] = None) -> Iterator[protocol.Chunk]:
        """Status line plus body; the stream is closed even if the client vanishes.

        ``retrieved``: the RETR's message, reported to the adapter once the
        whole of it went out (not for TOP, not after a broken connection).
        An error while streaming (the adapter's, a RETR body that is not
        the size LIST gave: :class:`~pop3frame.protocol.SizeMismatch`, or a
        file written while read: :class:`~pop3frame.protocol.MessageChanged`) is
        logged here and raised on, before the terminator: the handler then
        closes the connection, so the client knows the reply is incomplete.
        """
        try:
            # The status line goes out with the first chunk, in one send
            # (sendmsg(), or MSG_MORE before a FileSpan): the handler sends
            # what it gathered when a reply is done or 64 KiB are waiting.
            yield first
            yield from chunks
        except (protocol.SizeMismatch, protocol.MessageChanged) as exc:
            self.log.error("message %s: %s; closing without the terminator", retrieved.uid if retrieved else "?", exc)
            raise
        except Exception:
            self.log.exception("the adapter's message stream failed part-way; closing without the terminator")
            raise
        finally:
            stream.close()
        if retrieved is not None:
            try:
                self.adapter.message_retrieved(self.user or "", retrieved)
            except Exception:
                # The client has its message; a flag the adapter could not
                # set is not worth a broken connection.
                self.log.exception("adapter.message_retrieved failed")

    def do_dele(self, cmd: protocol.Command) -> Reply:
        if self.context.read_only:
            raise PermanentFailure("mailbox is read-only")
        number, _ = self._message(cmd.args[0])
        self._deleted.add(number - 1)
        return [protocol.ok("message %d deleted" % number)]

    def do_noop(self, cmd: protocol.Command) -> Reply:
        return [protocol.ok()]

    def do_rset(self, cmd: protocol.Command) -> Reply:
        self._deleted.clear()
        count, size = self._totals()
        return [protocol.ok("maildrop has %s (%d octets)" % (protocol.plural(count, "message"), size))]

    # -- both states ----------------------------------------------------------

    def capabilities(self) -> List[str]:
        """RFC 2449 section 5: the CAPA list for the current state.

        Each capability is announced alike in both states ("possible
        differences: no" in RFC 2449 section 6, RFC 5034 section 3 for SASL,
        RFC 6856 sections 2 and 3 for UTF8 and LANG), except STLS: RFC 2595
        section 4 lists it only where the command is permitted, i.e. in the
        AUTHORIZATION state of a connection without TLS.
        """
        caps = ["TOP"]
        if self.plaintext_allowed:
            caps.append("USER")
        mechanisms = self.mechanisms()
        if mechanisms:
            caps.append("SASL " + " ".join(mechanisms))
        if self.state is State.AUTHORIZATION and self.context.tls is not None and not self.secure:
            caps.append("STLS")
        caps += ["UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "EXPIRE %s" % self.config.expire]
        if self.config.login_delay > 0:
            # RFC 2449 section 6.5: the interval the server enforces; nothing
            # is announced when none is.
            caps.append("LOGIN-DELAY %d" % self.config.login_delay)
        # RFC 6856 section 2.2: USER says UTF-8 user names and passwords work.
        caps += ["UTF8 USER", "LANG"]
        if self.config.implementation:
            caps.append("IMPLEMENTATION %s-%s" % (self.config.implementation, __version__))
        if self.context.read_only:
            # No standard capability says this; RFC 2449 section 8 leaves
            # names starting with X for private use.
            caps.append("X-READ-ONLY")
        return caps

    # -- SASL (RFC 5034), STLS (RFC 2595), UTF8 and LANG (RFC 6856) ------------

    def mechanisms(self) -> List[str]:
        """SASL mechanisms usable on this connection now."""
        names = [n for n in sasl.MECHANISMS if self.plaintext_allowed or n not in sasl.PLAINTEXT_MECHANISMS]
        if self.context.apop:
            # Both need the shared secret that APOP uses.
            names += ["CRAM-MD5", "SCRAM-SHA-256"]
        return names

    def do_auth(self, cmd: protocol.Command) -> Reply:
        if not cmd.args:
            # Not in RFC 5034, but RFC 1734 clients (and Dovecot) list mechanisms so.
            return [protocol.multiline(protocol.ok(), self.mechanisms())]
        name = cmd.args[0].upper()
        if name in sasl.PLAINTEXT_MECHANISMS and not self.plaintext_allowed:
            return [protocol.err(PLAINTEXT_REFUSED, protocol.AUTH)]
        if name not in self.mechanisms():
            return [protocol.err("unsupported authentication mechanism")]
        initial = None
        if len(cmd.args) == 2:
            # RFC 5034 section 4: "=" is an initial response of zero length.
            initial = b"" if cmd.args[1] == "=" else _b64decode(cmd.args[1])
            if initial is None:
                return [protocol.err("invalid base64 in initial response")]
        if name == "CRAM-MD5":
            exchange = sasl.cram_md5(self.apop_timestamp())(initial)
        elif name == "SCRAM-SHA-256":
            exchange = sasl.scram_sha_256(
                self.adapter.apop_secret, lambda: secrets.token_urlsafe(18), lambda: secrets.token_bytes(16)
            )(initial)
        else:
            exchange = sasl.MECHANISMS[name](initial)
        return self._sasl_step(exchange, None)

    def _sasl_step(self, exchange, response: Optional[bytes]) -> Reply:
        try:
            challenge = exchange.send(response) if response is not None else next(exchange)
        except StopIteration as done:
            result = done.value
        except sasl.SASLError as exc:
            self._sasl = None
            return [protocol.err(str(exc))]
        else:
            self._sasl = exchange
            return [b"+ " + base64.b64encode(challenge) + protocol.CRLF]
        # The login runs outside the except block, so whatever it raises
        # does not carry the exchange's StopIteration as its context.
        self._sasl = None
        user, verify = result
        if verify is None:  # sasl.success_data(): verified before its last challenge
            return self._open_mailbox(user)
        return self._login(user, lambda: verify(self.adapter))

    def _sasl_continue(self, line: bytes) -> Reply:
        exchange = self._sasl
        text = line.rstrip(b"\r\n")
        if text == b"*":
            self._sasl = None
            return [protocol.err("authentication aborted")]
        response = _b64decode(text.decode("ascii", "replace"))
        if response is None:
            self._sasl = None
            return [protocol.err("invalid base64 in response")]
        try:
            return self._sasl_step(exchange, response)
        except POP3Error as exc:
            return [protocol.err(exc.text, exc.code)]
        except Exception:
            self.log.exception("AUTH failed in the adapter")
            return [protocol.err("internal server error", protocol.SYS_TEMP)]

    def do_stls(self, cmd: protocol.Command) -> Reply:
        if self.context.tls is None:
            return [protocol.err("TLS is not configured")]
        if self.secure:
            return [protocol.err("already using TLS")]
        self.starttls = True
        return [protocol.ok("Begin TLS negotiation")]

    def tls_started(self) -> None:
        """After STLS: RFC 2595 section 4, forget what the client said before."""
        self.starttls = False
        self.secure = True
        self._pending_user = self._previous_user = None

    def do_utf8(self, cmd: protocol.Command) -> Reply:
        self.utf8 = True
        return [protocol.ok("UTF8 enabled")]

    def do_lang(self, cmd: protocol.Command) -> Reply:
        """RFC 6856 section 3.2: list languages, or select one and say which."""
        if not cmd.args:
            listing = ["%s %s" % item for item in LANGUAGES.items()]
            return [protocol.multiline(protocol.ok("Language listing follows"), listing)]
        tag = _lookup_language(cmd.args[0])
        if tag is None:
            # The current language stays in effect.
            return [protocol.err("invalid language %s" % cmd.args[0])]
        # "+OK", a space, the exact tag selected, a space, text in that language.
        return [protocol.ok("%s Language changed" % tag)]

    def do_capa(self, cmd: protocol.Command) -> Reply:
        return [protocol.multiline(protocol.ok("Capability list follows"), self.capabilities())]

    def do_quit(self, cmd: protocol.Command) -> Reply:
        self.closing = True
        signoff = "%s POP3 server signing off" % self.config.server_name
        if self.state is State.AUTHORIZATION:
            return [protocol.ok(signoff)]
        self.state = State.UPDATE
        try:
            doomed = [self._messages[i] for i in sorted(self._deleted)]
            if doomed:
                try:
                    self.adapter.delete_messages(self.user or "", doomed)
                except POP3Error as exc:
                    self.log.warning("deletion failed: %s", exc.text)
                    return [protocol.err("some deleted messages not removed: %s" % exc.text, exc.code)]
                except Exception:
                    self.log.exception("adapter.delete_messages failed")
                    return [protocol.err("some deleted messages not removed", protocol.SYS_TEMP)]
                self.deleted_count = len(doomed)
            left = len(self._messages) - len(doomed)
        finally:
            self.finish()
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("quit %s: %d retrieved, %d deleted", quoted(self.user or ""), self.retrieved,
                           self.deleted_count)
        suffix = "maildrop empty" if left == 0 else "%s left" % protocol.plural(left, "message")
        return [protocol.ok("%s (%s)" % (signoff, suffix))]


PLAINTEXT_REFUSED = "Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
LOCKED_OUT = "too many failed logins from your address; try again later"
TOO_MANY_BAD_COMMANDS = "too many invalid commands, closing connection"
TOO_MANY_COMMANDS = "too many commands without a login, closing connection"


def _lookup_language(language_range: str) -> Optional[str]:
    """The tag of :data:`LANGUAGES` that a LANG argument selects, or None.

    RFC 4647 section 3.4 (Lookup): drop subtags from the end until a tag
    matches, so "en-GB" selects "en"; "*" selects the default.
    """
    if language_range == "*":
        return DEFAULT_LANGUAGE
    if not _LANGUAGE_RANGE.match(language_range):
        return None
    subtags = language_range.lower().split("-")
    while subtags:
        tag = "-".join(subtags)
        if tag in LANGUAGES:
            return tag
        subtags.pop()
        # A single-letter subtag (such as "x") is dropped with what follows it.
        if subtags and len(subtags[-1]) == 1:
            subtags.pop()
    return None


def _never() -> bool:
    return False


def _b64decode(text: str) -> Optional[bytes]:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
