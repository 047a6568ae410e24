"""Password hashes in Dovecot's ``{SCHEME}data`` notation.

No cryptography is implemented here: every scheme delegates to a
well-kept library, and this module only parses the notation and picks the
library.  Schemes:

========================  ==================================  =================
scheme                    format after ``{SCHEME}``           needs
========================  ==================================  =================
``ARGON2ID``              ``$argon2id$v=19$m=...``            argon2-cffi
``BLF-CRYPT``/``BCRYPT``  ``$2y$...`` / ``$2b$...``           bcrypt
``SHA512-CRYPT``          ``$6$rounds=...$salt$hash``         libpass (passlib)
``SHA256-CRYPT``          ``$5$rounds=...$salt$hash``         libpass (passlib)
``MD5-CRYPT`` (weak)      ``$1$salt$hash``                    libpass (passlib)
``SCRYPT``                ``$scrypt$ln=14,r=8,p=1$salt$hash`` stdlib hashlib
``PLAIN``                 the password itself                 -
========================  ==================================  =================

``SCRYPT`` (OpenSSL's scrypt through :func:`hashlib.scrypt`) is pop3frame's
standard-library scheme, so the embedded default store works with no extra
installed.  The optional libraries come with ``pip install pop3frame[passwords]``.

What a stored value means is one rule for every store
(:func:`stored_password`): an empty value, ``x``, and anything starting
with ``!`` or ``*`` (``/etc/shadow``'s placeholders and locked markers)
never match; a value without ``{SCHEME}`` that looks like a crypt(3) hash
(``$1$``, ``$5$``, ``$6$``, ``$2y$``, ``$argon2id$``, ``$scrypt$`` ...) is
verified as that hash, as Dovecot does, or never matches if its kind is
unknown; anything else without a scheme is a plaintext password where the
store allows those (SQL tables, dicts), and never matches in a passwd-file.
:class:`PasswordCheck` applies it with a dummy check of the same cost for
users that do not exist.
"""
from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import itertools
import os
import re
import secrets
import threading
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

from .extras import install_hint

__all__ = [
    "hash_password",
    "verify_password",
    "split_scheme",
    "stored_password",
    "plaintext_secret",
    "PasswordCheck",
    "table_check",
    "default_scheme",
    "preload",
    "UnsupportedScheme",
    "SCHEMES",
]


class UnsupportedScheme(ValueError):
    """Unknown scheme, or its library is not installed."""


_SCHEME_PREFIX = re.compile(r"\{([A-Za-z0-9.-]+)\}")


def split_scheme(hashed: str) -> Tuple[str, str]:
    """``"{ARGON2ID}$argon2id$..."`` -> ``("ARGON2ID", "$argon2id$...")``.

    A value without a ``{SCHEME}`` prefix is treated as PLAIN, as Dovecot
    does with ``default_pass_scheme = PLAIN``.
    """
    m = _SCHEME_PREFIX.match(hashed)
    if not m:
        return "PLAIN", hashed
    return m.group(1).upper(), hashed[m.end():]


def _need(module: str, extra: str = "passwords"):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise UnsupportedScheme(
            "this scheme needs the %r package: %s" % (module, install_hint(extra))
        ) from None


# -- scheme implementations: (hash, verify) ----------------------------------


def _plain_hash(password: str) -> str:
    return password


def _plain_verify(data: str, password: str) -> bool:
    return hmac.compare_digest(data.encode("utf-8"), password.encode("utf-8"))


_SCRYPT_LOG_N, _SCRYPT_R, _SCRYPT_P = 14, 8, 1


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _scrypt_hash(password: str) -> str:
    salt = os.urandom(16)
    key = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=1 << _SCRYPT_LOG_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32
    )
    return "$scrypt$ln=%d,r=%d,p=%d$%s$%s" % (_SCRYPT_LOG_N, _SCRYPT_R, _SCRYPT_P, _b64(salt), _b64(key))


def _scrypt_verify(data: str, password: str) -> bool:
    m = re.match(r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)\Z", data)
    if not m:
        return False
    ln, r, p = (int(m.group(i)) for i in (1, 2, 3))
    salt, expected = _unb64(m.group(4)), _unb64(m.group(5))
    if ln > 20 or not 0 < r * p <= 64 or not expected:
        return False  # refuse parameters that would let a hash file exhaust memory
    key = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=1 << ln, r=r, p=p, dklen=len(expected), maxmem=1 << 30
    )
    return hmac.compare_digest(key, expected)


def _argon2_hash(password: str) -> str:
    return _need("argon2").PasswordHasher().hash(password)


def _argon2_verify(data: str, password: str) -> bool:
    argon2 = _need("argon2")
    try:
        return argon2.PasswordHasher().verify(data, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def _bcrypt_hash(password: str) -> str:
    bcrypt = _need("bcrypt")
    # Dovecot writes $2y$; the bcrypt library reads both and writes $2b$.
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds=12)).decode("ascii")


def _bcrypt_verify(data: str, password: str) -> bool:
    bcrypt = _need("bcrypt")
    try:
        return bcrypt.checkpw(password.encode("utf-8"), data.encode("ascii"))
    except ValueError:
        return False


def _sha512_crypt_hash(password: str) -> str:
    return _need("passlib.hash").sha512_crypt.hash(password)


def _passlib(name: str) -> Tuple[Callable[[str], str], Callable[[str, str], bool]]:
    """(hash, verify) of one of passlib's crypt(3) handlers."""

    def hash_(password: str) -> str:
        return getattr(_need("passlib.hash"), name).hash(password)

    def verify(data: str, password: str) -> bool:
        try:
            return getattr(_need("passlib.hash"), name).verify(password, data)
        except ValueError:
            return False

    return hash_, verify


SCHEMES: Dict[str, Tuple[Callable[[str], str], Callable[[str, str], bool]]] = {
    "ARGON2ID": (_argon2_hash, _argon2_verify),
    "BLF-CRYPT": (_bcrypt_hash, _bcrypt_verify),
    "BCRYPT": (_bcrypt_hash, _bcrypt_verify),
    "SHA512-CRYPT": _passlib("sha512_crypt"),
    "SHA256-CRYPT": _passlib("sha256_crypt"),
    "MD5-CRYPT": _passlib("md5_crypt"),
    "SCRYPT": (_scrypt_hash, _scrypt_verify),
    "PLAIN": (_plain_hash, _plain_verify),
}

#: Crypt(3) hashes recognised without a {SCHEME} prefix (Dovecot's CRYPT).
CRYPT_PREFIXES: Tuple[Tuple[str, str], ...] = (
    ("$1$", "MD5-CRYPT"),
    ("$5$", "SHA256-CRYPT"),
    ("$6$", "SHA512-CRYPT"),
    ("$2y$", "BLF-CRYPT"),
    ("$2b$", "BLF-CRYPT"),
    ("$2a$", "BLF-CRYPT"),
    ("$argon2id$", "ARGON2ID"),
    ("$scrypt$", "SCRYPT"),
)
#: Any other "$id$..." is a crypt(3) hash of a kind not checked here
#: (yescrypt "$y$", "$7$", "$argon2i$" ...): never a plaintext password.
_CRYPT_LIKE = re.compile(r"\$[A-Za-z0-9_-]{1,32}\$")
#: shadow(5): "x" stands for a password kept elsewhere; "!" (locked, "!!"
#: never set) and "*" ("*LK*", "*NP*") start values no password matches.
_PLACEHOLDER = "x"
_LOCKED = ("!", "*")


def stored_password(value: Optional[str], *, plaintext: bool = True) -> Optional[str]:
    """The ``{SCHEME}data`` a stored password field stands for, or None if no password can match it.

    The rule of the module docstring.  ``plaintext``: whether a value with
    no scheme that does not look like a crypt hash is the password itself
    (True: SQL tables, dicts) or matches nothing (False: passwd-files,
    where such a value is a placeholder copied from ``/etc/shadow``).  A
    ``{SCHEME}`` not in :data:`SCHEMES`, or with nothing after it, matches
    nothing; ``{CRYPT}`` takes a crypt hash as above.
    """
    if not value or value == _PLACEHOLDER or value.startswith(_LOCKED):
        return None
    m = _SCHEME_PREFIX.match(value)
    if m:
        scheme, data = m.group(1).upper(), value[m.end():]
        if scheme == "CRYPT":
            return stored_password(data, plaintext=False)
        return "{%s}%s" % (scheme, data) if data and scheme in SCHEMES else None
    for prefix, scheme in CRYPT_PREFIXES:
        if value.startswith(prefix):
            return "{%s}%s" % (scheme, value)
    if not plaintext or _CRYPT_LIKE.match(value):
        return None
    return "{PLAIN}" + value


def plaintext_secret(value: Optional[str]) -> Optional[str]:
    """The password itself if a stored value holds it in clear, else None.

    For APOP, CRAM-MD5 and SCRAM, which need the shared secret: a hash, a
    locked marker or an empty value gives None, so they fail for that user.
    """
    hashed = stored_password(value)
    return hashed[len("{PLAIN}"):] if hashed is not None and hashed.startswith("{PLAIN}") else None


#: Stored values :meth:`PasswordCheck.learn` looks at, at most.
SAMPLE_SIZE = 1000


class PasswordCheck:
    """Password checks of one store that cost the same whether the user exists or not.

    ``check(stored, password)``: ``stored`` is the user's stored field,
    None for a user that does not exist.  A value that can match nothing
    (no user, a locked marker, a hash of an unknown kind; see
    :func:`stored_password`) is answered False only after ``password`` was
    verified against a dummy: the latest usable value of the scheme seen
    most, so the answer takes what a wrong password for a real user takes
    (same scheme, same rounds and memory) and timing does not tell which
    names exist.  Before any real value was seen, ``sample()`` (called
    once, lazily) offers some of the store's values; without any, the dummy
    is a hash of :func:`default_scheme`, what stores write.

    One instance serves every connection of its store (thread-safe).
    Verifying the dummy raises :class:`UnsupportedScheme` exactly when a
    real check would.
    """

    def __init__(self, *, plaintext: bool = True,
                 sample: Optional[Callable[[], Iterable[Optional[str]]]] = None) -> None:
        self.plaintext = plaintext
        self._sample = sample
        self._mutex = threading.Lock()
        self._seen: "collections.Counter[str]" = collections.Counter()
        self._latest: Dict[str, str] = {}
        self._fallback: Optional[str] = None

    def learn(self, values: Iterable[Optional[str]]) -> None:
        """Take (up to :data:`SAMPLE_SIZE` of) the store's stored values as
        what the dummy must cost, replacing what was learnt before."""
        usable = [stored_password(v, plaintext=self.plaintext) for v in itertools.islice(values, SAMPLE_SIZE)]
        with self._mutex:
            self._seen.clear()
            self._latest.clear()
            for hashed in usable:
                if hashed is not None:
                    self._remember(hashed)

    def _remember(self, hashed: str) -> Tuple[str, str]:
        """Count the scheme of ``hashed`` (under the mutex); returns its split_scheme()."""
        split = split_scheme(hashed)
        self._seen[split[0]] += 1
        self._latest[split[0]] = hashed
        return split

    def _dummy(self) -> str:
        with self._mutex:
            sample, self._sample = (self._sample, None) if not self._seen else (None, self._sample)
        if sample is not None:
            self.learn(sample())
        with self._mutex:
            if self._seen:
                return self._latest[self._seen.most_common(1)[0][0]]
        if self._fallback is None:
            self._fallback = hash_password(secrets.token_hex(16))
        return self._fallback

    def check(self, stored: Optional[str], password: str) -> bool:
        """Whether ``password`` matches ``stored`` (None: no such user)."""
        hashed = stored_password(stored, plaintext=self.plaintext)
        if hashed is None:
            verify_password(self._dummy(), password)  # the time, not the answer
            return False
        with self._mutex:
            scheme, data = self._remember(hashed)
        # ``hashed`` is normalised already: verify_password's work less the reading.
        return SCHEMES[scheme][1](data, password)


def preload() -> None:
    """Import the optional hash libraries that are installed.

    A daemon calls this before dropping privileges: afterwards the
    interpreter's own files may no longer be readable.
    """
    for module in ("argon2", "bcrypt", "passlib.hash"):
        try:
            __import__(module)
        except ImportError:
            pass


def table_check(table: Mapping[str, Optional[str]]) -> Callable[[str, str], bool]:
    """``(user, password) -> bool`` over ``{user: stored value}``, looked up at
    each login (users may come and go), through one :class:`PasswordCheck`."""
    # islice and list in one C call: a dict another thread adds to is read whole or not at all.
    check = PasswordCheck(sample=lambda: list(itertools.islice(table.values(), SAMPLE_SIZE)))
    return lambda user, password: check.check(table.get(user), password)


def default_scheme() -> str:
    """ARGON2ID when argon2-cffi is installed, else the stdlib SCRYPT."""
    try:
        import argon2  # noqa: F401
    except ImportError:
        return "SCRYPT"
    return "ARGON2ID"


def hash_password(password: str, scheme: str = "") -> str:
    """Hash ``password``; returns ``{SCHEME}data`` ready for a passwd-file or a table."""
    scheme = (scheme or default_scheme()).upper()
    if scheme not in SCHEMES:
        raise UnsupportedScheme("unknown password scheme %r" % scheme)
    return "{%s}%s" % (scheme, SCHEMES[scheme][0](password))


def verify_password(hashed: str, password: str) -> bool:
    """Check ``password`` against a stored value, read by :func:`stored_password`.

    Values that match nothing (locked markers, unknown or malformed hashes)
    verify as False (and never raise), except that a known scheme whose
    library is missing raises UnsupportedScheme, so a misconfigured server
    fails loudly instead of locking everyone out silently.  This answers
    at once for such values: a store checks with :class:`PasswordCheck`,
    whose answers all take one real verification.
    """
    normalised = stored_password(hashed)
    if normalised is None:
        return False
    scheme, data = split_scheme(normalised)
    return SCHEMES[scheme][1](data, password)
