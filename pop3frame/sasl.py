"""SASL mechanisms for the AUTH command (RFC 5034), with no I/O.

Each mechanism is a generator: it yields server challenges (raw bytes, the
session base64-encodes them) and receives the client's decoded responses;
when done it returns ``(username, verify)``, where ``verify(adapter)``
answers whether the credentials are right.  A malformed response raises
:class:`SASLError`.  The session owns everything else: base64, ``*``
aborts, the mailbox lock.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Callable, Dict, Generator, Optional, Tuple

__all__ = ["SASLError", "MECHANISMS", "PLAINTEXT_MECHANISMS", "plain", "login", "cram_md5", "parse_plain"]

Verify = Callable[[object], bool]
Exchange = Generator[bytes, bytes, Tuple[str, Verify]]


class SASLError(ValueError):
    """A client response that does not follow the mechanism."""


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError("credentials are not UTF-8") from None


def parse_plain(message: bytes) -> Tuple[str, str]:
    """RFC 4616 section 2: ``[authzid] NUL authcid NUL passwd`` -> (authcid, passwd).

    Acting as another user is not supported, so an authzid must be empty or
    equal to the authcid.
    """
    parts = message.split(b"\0")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise SASLError("malformed PLAIN response")
    authzid, authcid, password = (_text(p) for p in parts)
    if authzid and authzid != authcid:
        raise SASLError("authorization identity not supported")
    return authcid, password


def plain(initial: Optional[bytes]) -> Exchange:
    """RFC 4616 PLAIN: one response, sent at once or after an empty challenge."""
    response = initial if initial is not None else (yield b"")
    user, password = parse_plain(response)
    return user, lambda adapter: adapter.authenticate(user, password)


def login(initial: Optional[bytes]) -> Exchange:
    """The LOGIN mechanism (draft-murchison-sasl-login): user name, then password."""
    user = _text(initial if initial is not None else (yield b"Username:"))
    password = _text((yield b"Password:"))
    if not user or not password:
        raise SASLError("empty user name or password")
    return user, lambda adapter: adapter.authenticate(user, password)


def cram_md5(challenge: str) -> Callable[[Optional[bytes]], Exchange]:
    """RFC 2195 CRAM-MD5 with the given challenge (a unique ``<...>`` string).

    The adapter's shared secret comes from ``apop_secret``: both mechanisms
    need the same plaintext secret on the server.
    """

    def exchange(initial: Optional[bytes]) -> Exchange:
        if initial is not None:
            raise SASLError("CRAM-MD5 takes no initial response")
        response = _text((yield challenge.encode("ascii")))
        user, sep, digest = response.rpartition(" ")
        if not sep or not user or len(digest) != 32:
            raise SASLError("malformed CRAM-MD5 response")

        def verify(adapter) -> bool:
            secret = adapter.apop_secret(user)
            if secret is None:
                return False
            expected = hmac.new(secret.encode("utf-8"), challenge.encode("ascii"), hashlib.md5).hexdigest()
            return hmac.compare_digest(expected, digest.lower())

        return user, verify

    return exchange


#: Mechanisms that carry the password itself: offered only where plaintext
#: authentication is allowed (TLS, or a trusted network).
PLAINTEXT_MECHANISMS = ("PLAIN", "LOGIN")

MECHANISMS: Dict[str, Callable[[Optional[bytes]], Exchange]] = {"PLAIN": plain, "LOGIN": login}
