"""The smallest adapter: a Python function that returns the mail.

::

    from pop3frame import serve_function

    def mail():
        return [("report-1", b"Subject: hello\\r\\n\\r\\nfrom a function\\r\\n")]

    serve_function(mail, user="me", password="secret")     # 127.0.0.1:1100

The function is called once per login (``fn()``, or ``fn(username)`` if it
takes an argument) and returns a list of ``(uid, message)`` where message
is ``bytes`` (a complete RFC 5322 message), ``str`` (UTF-8) or an
:class:`email.message.EmailMessage`.  Unique-ids that are not valid POP3
unique-ids (spaces, too long, non-ASCII) are hashed into valid ones; a
duplicate uid keeps its first message.

Read-only, unless ``on_delete`` is given: a callable
``on_delete(username, [uid, ...])`` run after QUIT with the original uids
of the deleted messages; if it raises, the client gets ``-ERR [SYS/TEMP]``.

Thread-safety: the function may be called from several threads at once
(one per login); make it safe for that or cheap enough not to care.  An
exception in it is logged and the client sees ``-ERR [SYS/TEMP]``.
"""
from __future__ import annotations

import email.policy
import inspect
import logging
import threading
from email.message import Message
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from pop3frame import AdapterBase, MessageInfo, POP3Error, PermanentFailure, TemporaryFailure
from pop3frame.clientlog import quoted
from pop3frame.config import ServerConfig
from pop3frame.passwords import table_check
from pop3frame.protocol import valid_uid, wire_size
from pop3frame.server import POP3Server

from ._build import stable_uid

__all__ = ["FunctionAdapter", "serve_function", "make_function_server"]

logger = logging.getLogger("pop3frame.adapters.function")

MessageValue = Union[bytes, str, Message]
MailFunction = Callable[..., Iterable[Tuple[Any, MessageValue]]]


def _to_bytes(value: MessageValue) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, Message):
        return value.as_bytes(policy=email.policy.SMTP)
    raise TypeError("a message must be bytes, str or an EmailMessage, not %s" % type(value).__name__)


def _takes_user(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params
    )


class FunctionAdapter(AdapterBase):
    """Serve whatever ``fn`` returns.

    Credentials: ``user`` and ``password`` for one user, or ``users``
    (``{name: password}``: ``{SCHEME}hash``, a bare crypt hash or plain
    text, read by :func:`pop3frame.passwords.stored_password`), or
    ``authenticate`` (a callable ``(user, password) -> bool``).
    """

    def __init__(
        self,
        fn: MailFunction,
        *,
        user: Optional[str] = None,
        password: Optional[str] = None,
        users: Optional[Dict[str, str]] = None,
        authenticate: Optional[Callable[[str, str], bool]] = None,
        on_delete: Optional[Callable[[str, List[Any]], None]] = None,
    ) -> None:
        table = dict(users or {})
        if user is not None:
            if password is None:
                raise ValueError("user needs a password")
            table[user] = password
        if not table and authenticate is None:
            raise ValueError("give user= and password=, users=, or authenticate=")
        self._table = table_check(table) if table else None
        self._check = authenticate
        self._fn = fn
        self._pass_user = _takes_user(fn)
        self._on_delete = on_delete
        self.read_only = on_delete is None
        self._mutex = threading.Lock()
        self._sessions: Dict[str, Dict[str, bytes]] = {}

    def authenticate(self, username: str, password: str) -> bool:
        if self._check is not None and self._check(username, password):
            return True
        return self._table is not None and self._table(username, password)

    def list_messages(self, username: str) -> Sequence[MessageInfo]:
        try:
            items = list(self._fn(username) if self._pass_user else self._fn())
            messages: List[MessageInfo] = []
            cache: Dict[str, bytes] = {}
            for original, value in items:
                uid = str(original) if valid_uid(str(original)) else stable_uid(original)
                if uid in cache:
                    logger.warning("duplicate uid %r from the mail function skipped", uid)
                    continue
                data = _to_bytes(value)
                cache[uid] = data
                messages.append(MessageInfo(uid, wire_size(data), key=original))
        except POP3Error:
            raise
        except Exception:
            logger.exception("the mail function failed for %s", quoted(username))
            raise TemporaryFailure("mail source failed") from None
        with self._mutex:
            self._sessions[username] = cache
        return messages

    def open_message(self, username: str, message: MessageInfo) -> bytes:
        with self._mutex:
            data = self._sessions.get(username, {}).get(message.uid)
        if data is None:
            raise TemporaryFailure("message no longer available")
        return data

    def delete_messages(self, username: str, messages: Sequence[MessageInfo]) -> None:
        if self._on_delete is None:
            raise PermanentFailure("this mailbox is read-only")
        try:
            self._on_delete(username, [m.key for m in messages])
        except POP3Error:
            raise
        except Exception:
            logger.exception("on_delete failed for %s", quoted(username))
            raise TemporaryFailure("could not delete messages") from None

    def close_mailbox(self, username: str) -> None:
        with self._mutex:
            self._sessions.pop(username, None)


def make_function_server(
    fn: MailFunction,
    *,
    user: Optional[str] = None,
    password: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 1100,
    config: Optional[ServerConfig] = None,
    **adapter_options: Any,
) -> POP3Server:
    """A bound, not yet serving :class:`~pop3frame.POP3Server` for ``fn``.

    Call ``serve_forever()`` (``serve()`` in a thread for tests; ``port=0``
    lets the OS pick, ``server.port`` tells which) and ``shutdown()`` to stop.
    """
    adapter = FunctionAdapter(fn, user=user, password=password, **adapter_options)
    return POP3Server((host, port), adapter, config or ServerConfig())


def serve_function(
    fn: MailFunction,
    *,
    user: Optional[str] = None,
    password: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 1100,
    ready: Optional[Callable[[POP3Server], None]] = None,
    **options: Any,
) -> None:
    """Serve ``fn``'s mail over POP3 until interrupted (Ctrl-C); blocks.

    For one-file scripts; also importable as ``pop3frame.serve_function``.
    Keyword options are those of :func:`make_function_server`.
    ``ready(server)``, if given, is called in the serving thread once the
    port is bound, just before serving: ``server.port`` is the port (the
    one the OS picked with ``port=0``), and ``server.shutdown()`` from
    another thread makes ``serve_function`` return.  The listening socket
    is closed on every way out.
    """
    server = make_function_server(fn, user=user, password=password, host=host, port=port, **options)
    try:
        if ready is not None:
            ready(server)
        server.serve_forever()  # logs where it listens; returns on Ctrl-C
    finally:
        server.server_close()
