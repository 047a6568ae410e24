"""pop3frame: serve mail from anywhere over POP3 by writing one adapter class.

The public API is small::

    from pop3frame import AdapterBase, MessageInfo, POP3Server

See :mod:`pop3frame.adapter` for the contract an adapter keeps.  For a
one-file script, ``pop3frame.serve_function(fn, user=..., password=...)``
serves whatever ``fn()`` returns (:mod:`pop3frame.adapters.function`).
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
    "serve_function",
]


def __getattr__(name: str):
    # serve_function lives with the adapters, which import pop3frame: it is
    # imported on first use, so "import pop3frame" stays light and cycle-free.
    if name == "serve_function":
        from pop3frame.adapters.function import serve_function

        return serve_function
    raise AttributeError("module 'pop3frame' has no attribute %r" % name)
