"""What a certificate says -- subject, issuer, names, expiry -- read from its DER bytes.

``ssl`` decodes a peer's certificate only when it verified it
(``getpeercert()`` is empty under ``CERT_NONE``), yet a self-signed
certificate met with ``pop3frame client --insecure`` is exactly the one a
person testing by hand wants to read.  This is a minimal, bounds-checked
DER walk over the few fields of RFC 5280 section 4.1 that are shown; a
certificate it cannot read raises ``ValueError``, never anything else.
"""
from __future__ import annotations

import datetime
import ipaddress
from typing import Iterator, List, NamedTuple, Tuple

__all__ = ["Certificate", "decode"]

# DER tags (X.690): universal types, and the context-specific ones used here.
_SEQUENCE, _SET, _OID, _OCTETS = 0x30, 0x31, 0x06, 0x04
_UTCTIME, _GENERALIZEDTIME = 0x17, 0x18
_VERSION, _EXTENSIONS = 0xA0, 0xA3  # [0] and [3] EXPLICIT in TBSCertificate
_DNS_NAME, _IP_ADDRESS = 0x82, 0x87  # GeneralName [2] and [7] IMPLICIT
#: Directory string types and their encodings (RFC 5280 section 4.1.2.4).
_STRINGS = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x14: "latin-1", 0x1E: "utf-16-be", 0x1C: "utf-32-be"}
#: Attribute names as OpenSSL prints them (RFC 4514 section 3, RFC 5280 appendix A).
_ATTRIBUTES = {
    "2.5.4.3": "CN", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.10": "O", "2.5.4.11": "OU",
    "1.2.840.113549.1.9.1": "emailAddress",
}
_SUBJECT_ALT_NAME = "2.5.29.17"
#: Longer OIDs are refused: decoding one costs time quadratic in its length
#: (1 MB took 100 s), and real ones (a UUID arc too) fit in 30 octets.
_MAX_OID = 64


class Certificate(NamedTuple):
    """The fields shown of an X.509 certificate."""

    #: ``CN=mail.example.com, O=Example`` (attributes in certificate order).
    subject: str
    issuer: str
    #: End of validity, in UTC (timezone-aware).
    not_after: datetime.datetime
    #: subjectAltName entries: ``DNS:mail.example.com``, ``IP:192.0.2.1``.
    names: Tuple[str, ...]


def _items(data: bytes) -> Iterator[Tuple[int, bytes]]:
    """(tag, contents) of each DER element in ``data``, in order."""
    i = 0
    while i < len(data):
        if i + 2 > len(data):
            raise ValueError("truncated DER element")
        tag, length = data[i], data[i + 1]
        i += 2
        if length & 0x80:
            size = length & 0x7F
            if not 1 <= size <= 4 or i + size > len(data):
                raise ValueError("bad DER length")
            length = int.from_bytes(data[i:i + size], "big")
            i += size
        if i + length > len(data):
            raise ValueError("DER element runs past its container")
        yield tag, data[i:i + length]
        i += length


def _expect(data: bytes, *tags: int) -> List[bytes]:
    """The contents of the leading elements of ``data``, which must carry ``tags``."""
    items = list(_items(data))
    if len(items) < len(tags) or any(t != tag for (t, _), tag in zip(items, tags)):
        raise ValueError("unexpected DER structure")
    return [value for _, value in items[:len(tags)]]


def _oid(data: bytes) -> str:
    if len(data) > _MAX_OID:
        raise ValueError("OID longer than %d octets" % _MAX_OID)
    numbers = []
    value = 0
    for byte in data:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            numbers.append(value)
            value = 0
    if not numbers:
        raise ValueError("empty OID")
    # X.690 section 8.19.4: the first number packs two arcs, X * 40 + Y.
    first = min(numbers[0] // 40, 2)
    return ".".join(map(str, [first, numbers[0] - 40 * first] + numbers[1:]))


def _name(data: bytes) -> str:
    """An RFC 5280 Name as ``CN=..., O=...``."""
    out = []
    for tag, rdn in _items(data):
        if tag != _SET:
            raise ValueError("bad RDN")
        for tag, pair in _items(rdn):
            items = list(_items(pair))
            if tag != _SEQUENCE or len(items) != 2 or items[0][0] != _OID:
                raise ValueError("bad attribute")
            oid = _oid(items[0][1])
            vtag, value = items[1]
            text = value.decode(_STRINGS.get(vtag, "latin-1"), "replace")
            out.append("%s=%s" % (_ATTRIBUTES.get(oid, oid), text))
    return ", ".join(out)


def _time(tag: int, data: bytes) -> datetime.datetime:
    """UTCTime or GeneralizedTime, both in RFC 5280 section 4.1.2.5's Zulu form."""
    text = data.decode("ascii")
    if tag == _UTCTIME:
        # RFC 5280 section 4.1.2.5.1: YY below 50 is 20YY.
        year = int(text[:2])
        text = str(year + (2000 if year < 50 else 1900)) + text[2:]
    elif tag != _GENERALIZEDTIME:
        raise ValueError("bad time")
    when = datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ")
    return when.replace(tzinfo=datetime.timezone.utc)


def _alt_names(extensions: bytes) -> Tuple[str, ...]:
    (sequence,) = _expect(extensions, _SEQUENCE)
    for _, extension in _items(sequence):
        items = list(_items(extension))
        if not items or items[0][0] != _OID or _oid(items[0][1]) != _SUBJECT_ALT_NAME:
            continue
        if items[-1][0] != _OCTETS:
            raise ValueError("bad extension")
        (names,) = _expect(items[-1][1], _SEQUENCE)
        out = []
        for tag, value in _items(names):
            if tag == _DNS_NAME:
                out.append("DNS:" + value.decode("ascii", "replace"))
            elif tag == _IP_ADDRESS:
                out.append("IP:%s" % ipaddress.ip_address(value))
        return tuple(out)
    return ()


def decode(der: bytes) -> Certificate:
    """The :class:`Certificate` in ``der``; ``ValueError`` if it cannot be read."""
    try:
        (certificate,) = _expect(der, _SEQUENCE)
        (tbs,) = _expect(certificate, _SEQUENCE)
        fields = list(_items(tbs))
        if fields and fields[0][0] == _VERSION:
            fields = fields[1:]
        # serialNumber, signature, issuer, validity, subject, subjectPublicKeyInfo
        if len(fields) < 6 or [t for t, _ in fields[2:6]] != [_SEQUENCE] * 4:
            raise ValueError("not a TBSCertificate")
        validity = list(_items(fields[3][1]))
        if len(validity) != 2:
            raise ValueError("bad validity")
        extensions = [value for tag, value in fields[6:] if tag == _EXTENSIONS]
        return Certificate(
            subject=_name(fields[4][1]),
            issuer=_name(fields[2][1]),
            not_after=_time(*validity[1]),
            names=_alt_names(extensions[0]) if extensions else (),
        )
    except (IndexError, UnicodeDecodeError) as exc:
        raise ValueError("unreadable certificate: %s" % exc) from None
