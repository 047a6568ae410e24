"""TLS material for implicit-TLS listeners (RFC 8314) and STLS (RFC 2595).

:class:`TLSCertificates` owns the server's ``ssl.SSLContext``: one built
from a certificate and key file with modern defaults, or one the caller
made.  ``reload()`` re-reads the files (SIGHUP): connections already
running keep the context they shook hands with; new handshakes get the new
one.
"""
from __future__ import annotations

import ssl
import threading
from typing import Optional

__all__ = ["TLSCertificates", "server_context"]


def server_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server-side context with modern defaults: TLS 1.2 or newer, no compression."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(certfile, keyfile)
    return context


class TLSCertificates:
    """A server certificate; safe to share between threads.

    ``TLSCertificates(certfile, keyfile)`` builds the context with
    :func:`server_context` and can :meth:`reload` the files.
    ``TLSCertificates(context=ctx)`` serves a context the caller built (its
    protocol versions, ciphers and certificates are used as they are);
    ``reload()`` then does nothing, since there are no files to re-read:
    the caller changes certificates on its own context, e.g. with
    ``ctx.load_cert_chain()``, which affects new handshakes only.
    """

    def __init__(
        self,
        certfile: Optional[str] = None,
        keyfile: Optional[str] = None,
        *,
        context: Optional[ssl.SSLContext] = None,
    ) -> None:
        if context is None:
            if not certfile or not keyfile:
                raise ValueError("TLSCertificates needs certfile and keyfile, or context")
            context = server_context(certfile, keyfile)
        else:
            if certfile or keyfile:
                raise ValueError("TLSCertificates takes certfile and keyfile, or context, not both")
            if not isinstance(context, ssl.SSLContext):
                raise TypeError("context must be an ssl.SSLContext")
            # Checked now: it would fail every handshake, once clients
            # connect.  (Before Python 3.10 create_default_context() made a
            # PROTOCOL_TLS context; check_hostname still marks it a client's.)
            if context.protocol is ssl.PROTOCOL_TLS_CLIENT or context.check_hostname:
                raise ValueError("context is a client context; use ssl.PROTOCOL_TLS_SERVER")
        self.certfile = certfile
        self.keyfile = keyfile
        self._mutex = threading.Lock()
        self._context = context

    @property
    def context(self) -> ssl.SSLContext:
        with self._mutex:
            return self._context

    def reload(self) -> None:
        """Re-read certificate and key; on error the old ones stay in use.

        Does nothing for a context supplied by the caller.
        """
        if self.certfile is None or self.keyfile is None:
            return
        context = server_context(self.certfile, self.keyfile)
        with self._mutex:
            self._context = context
