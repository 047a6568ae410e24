"""pop3frame: serve mail from anywhere over POP3 by writing one adapter class.

The public API is small::

    from pop3frame import AdapterBase, MessageInfo, POP3Server

See :mod:`pop3frame.adapter` for the contract an adapter keeps.
"""
__version__ = "0.1.0"

from .adapter import (  # noqa: E402
    AdapterBase,
    AuthenticationFailed,
    LoginDelayed,
    MailboxInUse,
    MessageInfo,
    PermanentFailure,
    POP3Error,
    TemporaryFailure,
)
from .config import ServerConfig  # noqa: E402
from .server import POP3Server, ServerGroup  # noqa: E402

__all__ = [
    "__version__",
    "AdapterBase",
    "MessageInfo",
    "POP3Error",
    "AuthenticationFailed",
    "MailboxInUse",
    "LoginDelayed",
    "TemporaryFailure",
    "PermanentFailure",
    "ServerConfig",
    "POP3Server",
    "ServerGroup",
]
