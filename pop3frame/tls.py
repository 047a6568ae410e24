"""TLS material for implicit-TLS listeners (RFC 8314) and STLS (RFC 2595).

:class:`TLSCertificates` owns the server's ``ssl.SSLContext``.  ``reload()``
re-reads the certificate and key (SIGHUP): connections already running keep
the context they shook hands with; new handshakes get the new one.
"""
from __future__ import annotations

import ssl
import threading

__all__ = ["TLSCertificates", "server_context"]


def server_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server-side context with modern defaults: TLS 1.2 or newer, no compression."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(certfile, keyfile)
    return context


class TLSCertificates:
    """A reloadable server certificate; safe to share between threads."""

    def __init__(self, certfile: str, keyfile: str) -> None:
        self.certfile = certfile
        self.keyfile = keyfile
        self._mutex = threading.Lock()
        self._context = server_context(certfile, keyfile)

    @property
    def context(self) -> ssl.SSLContext:
        with self._mutex:
            return self._context

    def reload(self) -> None:
        """Re-read certificate and key; on error the old ones stay in use."""
        context = server_context(self.certfile, self.keyfile)
        with self._mutex:
            self._context = context
