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
``SCRYPT``                ``$scrypt$ln=14,r=8,p=1$salt$hash`` stdlib hashlib
``PLAIN``                 the password itself                 -
========================  ==================================  =================

``SCRYPT`` (OpenSSL's scrypt through :func:`hashlib.scrypt`) is pop3frame's
standard-library scheme, so the embedded default store works with no extra
installed.  The optional libraries come with ``pip install pop3frame[passwords]``.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from typing import Callable, Dict, Tuple

__all__ = [
    "hash_password",
    "verify_password",
    "split_scheme",
    "default_scheme",
    "preload",
    "UnsupportedScheme",
    "SCHEMES",
]


class UnsupportedScheme(ValueError):
    """Unknown scheme, or its library is not installed."""


def split_scheme(hashed: str) -> Tuple[str, str]:
    """``"{ARGON2ID}$argon2id$..."`` -> ``("ARGON2ID", "$argon2id$...")``.

    A value without a ``{SCHEME}`` prefix is treated as PLAIN, as Dovecot
    does with ``default_pass_scheme = PLAIN``.
    """
    m = re.match(r"\{([A-Za-z0-9.-]+)\}", hashed)
    if not m:
        return "PLAIN", hashed
    return m.group(1).upper(), hashed[m.end():]


def _need(module: str, extra: str = "passwords"):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise UnsupportedScheme(
            "this scheme needs the %r package: pip install 'pop3frame[%s]'" % (module, extra)
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


def _sha512_crypt_verify(data: str, password: str) -> bool:
    try:
        return _need("passlib.hash").sha512_crypt.verify(password, data)
    except ValueError:
        return False


SCHEMES: Dict[str, Tuple[Callable[[str], str], Callable[[str, str], bool]]] = {
    "ARGON2ID": (_argon2_hash, _argon2_verify),
    "BLF-CRYPT": (_bcrypt_hash, _bcrypt_verify),
    "BCRYPT": (_bcrypt_hash, _bcrypt_verify),
    "SHA512-CRYPT": (_sha512_crypt_hash, _sha512_crypt_verify),
    "SCRYPT": (_scrypt_hash, _scrypt_verify),
    "PLAIN": (_plain_hash, _plain_verify),
}


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
    """Check ``password`` against a stored ``{SCHEME}data`` value.

    Unknown or malformed hashes verify as False (and never raise), except
    that a known scheme whose library is missing raises UnsupportedScheme,
    so a misconfigured server fails loudly instead of locking everyone out
    silently.
    """
    scheme, data = split_scheme(hashed)
    entry = SCHEMES.get(scheme)
    if entry is None:
        return False
    return entry[1](data, password)
