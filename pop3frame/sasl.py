"""SASL mechanisms for the AUTH command (RFC 5034) and credential checks, with no I/O.

Each mechanism is a generator: it yields server challenges (raw bytes, the
session base64-encodes them) and receives the client's decoded responses;
when done it returns ``(username, verify)``, where ``verify(adapter)``
answers whether the credentials are right.  A malformed response raises
:class:`SASLError`.  The session owns everything else: base64, ``*``
aborts, the mailbox lock.  :func:`credentials` and :func:`apop` give the
same ``(username, verify)`` pair for USER/PASS and APOP.

User names and passwords are prepared with SASLprep (RFC 4013) before they
reach the adapter, so a name typed in another Unicode normal form is still
the same name; credentials that SASLprep refuses fail authentication.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import stringprep
import unicodedata
from typing import Callable, Dict, Generator, Optional, Tuple, Union

__all__ = ["SASLError", "MECHANISMS", "PLAINTEXT_MECHANISMS", "plain", "login", "cram_md5", "scram_sha_256",
           "parse_plain", "saslprep", "credentials", "apop", "success_data"]

#: True or False; or, for a mechanism whose server proves itself on
#: success (SCRAM's server-final message), those bytes instead of True.
Verify = Callable[[object], Union[bool, bytes]]
Exchange = Generator[bytes, bytes, Tuple[str, Optional[Verify]]]


class SASLError(ValueError):
    """A client response that does not follow the mechanism, or credentials SASLprep refuses."""


#: RFC 4013 section 2.3 (with RFC 3454 tables C.1.2 to C.9): prohibited output.
_PROHIBITED = (
    stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3, stringprep.in_table_c4,
    stringprep.in_table_c5, stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
    stringprep.in_table_c9,
)


def saslprep(text: str, stored: bool = False) -> str:
    """RFC 4013 SASLprep of a user name or password; SASLError if it is refused.

    A query string (the default) may hold unassigned code points; a
    ``stored`` string may not (RFC 3454 section 7).  A non-empty string that
    prepares to nothing is refused too (RFC 5034 section 4, RFC 5802
    section 5.1).
    """
    if text.isascii() and text.isprintable():
        # Printable ASCII (most names and passwords) is left as it is: no
        # mapping, form KC or prohibited table (ASCII controls aside) and
        # no bidirectional character touches it.  The tables below cost
        # about 20 us for a short string.
        return text
    # Section 2.1: non-ASCII spaces become SPACE; "commonly mapped to nothing" goes.
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c))
    # Section 2.2: form KC, of Unicode 3.2 like the stringprep tables.
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    for c in prepared:
        if any(table(c) for table in _PROHIBITED) or (stored and stringprep.in_table_a1(c)):
            raise SASLError("prohibited character in credentials")
    # Section 2.4, RFC 3454 section 6: right-to-left text is all RandALCat
    # between RandALCat ends, and never mixed with LCat.
    if any(stringprep.in_table_d1(c) for c in prepared):
        if any(stringprep.in_table_d2(c) for c in prepared) or not (
            stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])
        ):
            raise SASLError("invalid bidirectional text in credentials")
    if text and not prepared:
        raise SASLError("credentials prepare to an empty string")
    return prepared


def _refused(adapter) -> bool:
    return False


def _shared_secret(lookup: Callable[[str], Optional[str]], user: str) -> Optional[str]:
    """The user's plaintext secret SASLprep'd as a stored string, or None.

    APOP, CRAM-MD5 and SCRAM all hash this one value (the adapter's
    ``apop_secret``); a secret SASLprep refuses matches nothing.
    """
    secret = lookup(user)
    if secret is None:
        return None
    try:
        return saslprep(secret, stored=True)
    except SASLError:
        return None


def credentials(user: str, password: str) -> Tuple[str, Verify]:
    """``(user, verify)`` for a user name and password (USER/PASS, PLAIN, LOGIN).

    Both are SASLprep'd as query strings (RFC 6856 section 2.2, RFC 4616
    section 2, RFC 5034 section 4); if either is refused, ``verify`` fails
    without asking the adapter.
    """
    try:
        user, password = saslprep(user), saslprep(password)
    except SASLError:
        return user, _refused
    # bool(): whatever the adapter returns is a yes or no, never data for the client.
    return user, lambda adapter: bool(adapter.authenticate(user, password))


_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{32}\Z")


def _digest_matches(expected: str, given: str) -> bool:
    """Constant-time check of a hex MD5 digest; anything but 32 hex digits just fails."""
    return bool(_HEX_DIGEST.match(given)) and hmac.compare_digest(
        expected.encode("ascii"), given.lower().encode("ascii")
    )


def apop(timestamp: str, user: str, digest: str) -> Tuple[str, Verify]:
    """RFC 1939 section 7 APOP: ``digest`` is MD5(timestamp + shared secret) in hex.

    RFC 6856 section 2.2: the user name is SASLprep'd as a query string and
    the secret (the adapter's ``apop_secret``) as a stored string.
    """
    return _proved_by_digest(user, digest, lambda secret: hashlib.md5((timestamp + secret).encode("utf-8")).hexdigest())


def _proved_by_digest(user: str, given: str, digest_of: Callable[[str], str]) -> Tuple[str, Verify]:
    """``(user, verify)`` for a login proved by a hex MD5 digest of the shared secret.

    A digest that is not 32 hex digits is a wrong answer, counted as a
    failed login like any other.
    """
    try:
        user = saslprep(user)
    except SASLError:
        return user, _refused

    def verify(adapter) -> bool:
        secret = _shared_secret(adapter.apop_secret, user)
        return secret is not None and _digest_matches(digest_of(secret), given)

    return user, verify


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
    return credentials(*parse_plain(response))


def login(initial: Optional[bytes]) -> Exchange:
    """The LOGIN mechanism (draft-murchison-sasl-login): user name, then password."""
    user = _text(initial if initial is not None else (yield b"Username:"))
    password = _text((yield b"Password:"))
    if not user or not password:
        raise SASLError("empty user name or password")
    return credentials(user, password)


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
        if not sep or not user:
            raise SASLError("malformed CRAM-MD5 response")
        return _proved_by_digest(
            user, digest,
            lambda secret: hmac.new(secret.encode("utf-8"), challenge.encode("ascii"), hashlib.md5).hexdigest())

    return exchange


def _scram_attributes(text: str) -> Dict[str, str]:
    attributes = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or len(key) != 1 or key in attributes:
            raise SASLError("malformed SCRAM message")
        attributes[key] = value
    return attributes


def _saslname(name: str) -> str:
    """RFC 5802 section 5.1: '=2C' is ',' and '=3D' is '='; any other '=' is invalid."""
    if "=" in name.replace("=2C", "").replace("=3D", ""):
        raise SASLError("malformed SCRAM user name")
    return name.replace("=2C", ",").replace("=3D", "=")


def scram_sha_256(
    secret: Callable[[str], Optional[str]],
    nonce: Callable[[], str],
    salt: Callable[[], bytes],
    iterations: int = 4096,
) -> Callable[[Optional[bytes]], Exchange]:
    """RFC 7677 SCRAM-SHA-256 (RFC 5802 message flow), without channel binding.

    ``secret(user)`` gives the plaintext secret (the adapter's apop_secret)
    or None; an unknown user still gets a full exchange and fails at the
    proof, so the exchange does not reveal which names exist.  ``nonce`` and
    ``salt`` are injectable for the RFC test vector.

    The exchange ends after the client-final message, before anything
    depends on the secret: its ``verify`` looks the secret up and checks
    the proof, and returns the server-final message (``v=...``) on success.
    The session sends that only when the failed-login delay and the lockout
    allow an answer (:func:`success_data`).
    """

    def exchange(initial: Optional[bytes]) -> Exchange:
        client_first = _text(initial if initial is not None else (yield b""))
        cbind, _, rest = client_first.partition(",")
        authzid, _, bare = rest.partition(",")
        if cbind not in ("n", "y") or not bare:
            raise SASLError("channel binding is not supported")
        first = _scram_attributes(bare)
        if "m" in first or not first.get("n") or not first.get("r"):
            raise SASLError("malformed SCRAM client-first message")
        # RFC 5802 section 5.1: the name is prepared for lookups only; the
        # hash below uses it as received.
        user = saslprep(_saslname(first["n"]))
        if authzid and saslprep(_saslname(authzid[2:])) != user:
            raise SASLError("authorization identity not supported")
        combined = first["r"] + nonce()
        user_salt = salt()
        server_first = "r=%s,s=%s,i=%d" % (combined, base64.b64encode(user_salt).decode(), iterations)
        final = _text((yield server_first.encode()))
        without_proof, sep, proof = final.rpartition(",p=")
        attributes = _scram_attributes(without_proof)
        if not sep or attributes.get("r") != combined or "c" not in attributes:
            raise SASLError("malformed SCRAM client-final message")
        try:
            given = base64.b64decode(proof, validate=True)
        except (binascii.Error, ValueError):
            raise SASLError("malformed SCRAM proof") from None
        auth_message = ("%s,%s,%s" % (bare, server_first, without_proof)).encode("utf-8")

        def verify(adapter) -> Union[bool, bytes]:
            # RFC 5802 section 2.2, Normalize(): SASLprep as a stored string.
            password = _shared_secret(secret, user)
            key_source = password if password is not None else base64.b64encode(user_salt).decode()
            salted = hashlib.pbkdf2_hmac("sha256", key_source.encode("utf-8"), user_salt, iterations)
            client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
            signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, hashlib.sha256).digest()
            expected = bytes(a ^ b for a, b in zip(client_key, signature))
            if password is None or not hmac.compare_digest(given, expected):
                return False
            server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
            return b"v=" + base64.b64encode(hmac.new(server_key, auth_message, hashlib.sha256).digest())

        return user, verify

    return exchange


def success_data(user: str, data: bytes) -> Exchange:
    """RFC 5034 section 4: data the server sends with a success go in a last
    challenge, which the client answers with an empty response.

    Ends with ``(user, None)``: the credentials were verified before.
    """
    if (yield data):
        raise SASLError("unexpected data after the server's last challenge")
    return user, None


#: Mechanisms that carry the password itself: offered only where plaintext
#: authentication is allowed (TLS, or a trusted network).
PLAINTEXT_MECHANISMS = ("PLAIN", "LOGIN")

MECHANISMS: Dict[str, Callable[[Optional[bytes]], Exchange]] = {"PLAIN": plain, "LOGIN": login}
