"""HAProxy PROXY protocol, versions 1 and 2 (haproxy.org/download/2.9/doc/proxy-protocol.txt).

A load balancer in front of pop3frame connects on behalf of the client and
first sends one header naming the real client address.  The parsing here is
pure (bytes in, :class:`ProxyHeader` out, :class:`ProxyError` for anything
malformed); :func:`read_header` reads exactly one header from a socket,
never a byte more, so the POP3 bytes behind it stay in the socket.

- v1: ``PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n`` or
  ``PROXY UNKNOWN ...\\r\\n``, at most 107 octets.
- v2: a 12-octet signature, version/command, family/transport, a 2-octet
  length and the addresses; TLVs after the addresses are skipped.

``LOCAL`` (v2: health checks from the proxy itself) and ``UNKNOWN`` (v1)
carry no client address: the connection's own peer address stands.
"""
from __future__ import annotations

import ipaddress
import socket
import struct
import time
from typing import NamedTuple, Optional, Tuple

from .clientlog import quoted

__all__ = [
    "ProxyError",
    "ProxyHeader",
    "V2_SIGNATURE",
    "parse_v1",
    "parse_v2",
    "parse",
    "read_header",
    "build_v1",
    "build_v2",
]

V1_MAX = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Upper bound on the v2 address+TLV block we accept (the format allows 65535).
V2_MAX_BODY = 4096


class ProxyError(ValueError):
    """Not a valid PROXY protocol header."""


class Incomplete(ProxyError):
    """More bytes are needed to decide (internal to :func:`parse`)."""


class ProxyHeader(NamedTuple):
    """What a header says.  ``source``/``destination`` are None for LOCAL/UNKNOWN."""

    version: int
    command: str  # "PROXY" or "LOCAL"
    family: str  # "TCP4", "TCP6", "UDP4", "UDP6", "UNIX", "UNKNOWN"
    source: Optional[Tuple[str, int]] = None
    destination: Optional[Tuple[str, int]] = None

    @property
    def has_address(self) -> bool:
        return self.source is not None


def _port(text: str) -> int:
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or len(text) > 5 or int(text) > 65535:
        raise ProxyError("bad port %s" % quoted(text))
    return int(text)


def _ip(text: str, version: int) -> str:
    if "%" in text:
        # An IPv6 zone ("fe80::1%eth0", Python 3.9+ parses it) names an
        # interface of the proxy's host, not a client: the sender chose it,
        # and it would reach the logs and every per-address key verbatim.
        raise ProxyError("an address with a zone is not a client address")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError("bad address %s" % quoted(text)) from None
    if ip.version != version:
        raise ProxyError("address %s is not IPv%d" % (quoted(text), version))
    if version == 4 and text != str(ip):
        # The spec wants dotted decimal without leading zeros.
        raise ProxyError("bad address %s" % quoted(text))
    return str(ip)


def parse_v1(line: bytes) -> ProxyHeader:
    """Parse one v1 line, CRLF included."""
    if len(line) > V1_MAX:
        raise ProxyError("v1 header longer than %d octets" % V1_MAX)
    if not line.startswith(b"PROXY ") or not line.endswith(b"\r\n"):
        raise ProxyError("not a v1 header")
    try:
        text = line[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("v1 header is not ASCII") from None
    if "\r" in text or "\n" in text:
        raise ProxyError("v1 header has a stray CR or LF")
    parts = text.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        # "the receiver must ignore anything presented before the CRLF"
        return ProxyHeader(1, "PROXY", "UNKNOWN")
    if len(parts) != 6:
        raise ProxyError("v1 header needs 6 fields, got %d" % len(parts))
    _, family, src, dst, sport, dport = parts
    if family not in ("TCP4", "TCP6"):
        raise ProxyError("unknown v1 family %s" % quoted(family))
    version = 4 if family == "TCP4" else 6
    return ProxyHeader(1, "PROXY", family, (_ip(src, version), _port(sport)), (_ip(dst, version), _port(dport)))


_V2_FAMILIES = {
    0x00: ("UNKNOWN", 0),
    0x11: ("TCP4", 12),
    0x12: ("UDP4", 12),
    0x21: ("TCP6", 36),
    0x22: ("UDP6", 36),
    0x31: ("UNIX", 216),
    0x32: ("UNIX", 216),
}


def parse_v2(head: bytes, body: bytes) -> ProxyHeader:
    """Parse a v2 header: ``head`` is the fixed 16 octets, ``body`` the ``len`` octets after."""
    if len(head) != 16 or not head.startswith(V2_SIGNATURE):
        raise ProxyError("not a v2 header")
    ver_cmd, fam, length = struct.unpack("!BBH", head[12:16])
    if ver_cmd >> 4 != 2:
        raise ProxyError("unsupported v2 version %d" % (ver_cmd >> 4))
    if len(body) != length:
        raise ProxyError("v2 length says %d octets, got %d" % (length, len(body)))
    command = ver_cmd & 0x0F
    if command == 0:
        # LOCAL: the proxy speaks for itself; addresses, if any, are ignored.
        return ProxyHeader(2, "LOCAL", "UNKNOWN")
    if command != 1:
        raise ProxyError("unknown v2 command %d" % command)
    if fam not in _V2_FAMILIES:
        raise ProxyError("unknown v2 family/protocol 0x%02x" % fam)
    family, needed = _V2_FAMILIES[fam]
    if length < needed:
        raise ProxyError("v2 %s addresses need %d octets, got %d" % (family, needed, length))
    if family in ("TCP4", "UDP4"):
        src, dst, sport, dport = struct.unpack("!4s4sHH", body[:12])
        return ProxyHeader(2, "PROXY", family, (socket.inet_ntop(socket.AF_INET, src), sport),
                           (socket.inet_ntop(socket.AF_INET, dst), dport))
    if family in ("TCP6", "UDP6"):
        src, dst, sport, dport = struct.unpack("!16s16sHH", body[:36])
        return ProxyHeader(2, "PROXY", family, (str(ipaddress.IPv6Address(src)), sport),
                           (str(ipaddress.IPv6Address(dst)), dport))
    # UNIX sockets and UNSPEC carry no usable client address.
    return ProxyHeader(2, "PROXY", family)


def parse(data: bytes) -> Tuple[ProxyHeader, int]:
    """Parse the header at the start of ``data``: (header, octets it used).

    Raises :class:`Incomplete` when ``data`` is a valid beginning but too
    short, :class:`ProxyError` when it can never become a valid header.
    """
    if not data:
        raise Incomplete("no data")
    if data[:1] == b"\r":
        if data[:12] != V2_SIGNATURE[: len(data[:12])]:
            raise ProxyError("no PROXY protocol header")
        if len(data) < 16:
            raise Incomplete("need 16 octets")
        (length,) = struct.unpack("!H", data[14:16])
        if length > V2_MAX_BODY:
            raise ProxyError("v2 header of %d octets is too long" % length)
        if len(data) < 16 + length:
            raise Incomplete("need %d octets" % (16 + length))
        return parse_v2(data[:16], data[16 : 16 + length]), 16 + length
    if data[:6] != b"PROXY "[: len(data[:6])]:
        raise ProxyError("no PROXY protocol header")
    end = data.find(b"\n")
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyError("v1 header longer than %d octets" % V1_MAX)
        raise Incomplete("need a line end")
    return parse_v1(data[: end + 1]), end + 1


def read_header(sock: socket.socket, timeout: float = 5.0, clock=time.monotonic) -> ProxyHeader:
    """Read exactly one header from ``sock`` within ``timeout`` seconds.

    Bytes are peeked first and consumed only once they are known to belong
    to the header, so the client's first POP3 bytes are never swallowed.
    Raises :class:`ProxyError` (malformed, timed out, or closed early).
    """
    deadline = clock() + timeout
    consumed = b""
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            raise ProxyError("timed out waiting for the PROXY header")
        sock.settimeout(remaining)
        try:
            peeked = sock.recv(V1_MAX + 16 + V2_MAX_BODY, socket.MSG_PEEK)
        except socket.timeout:
            raise ProxyError("timed out waiting for the PROXY header") from None
        except OSError as exc:
            raise ProxyError("connection failed before the PROXY header: %s" % exc) from None
        if not peeked:
            raise ProxyError("connection closed before the PROXY header")
        data = consumed + peeked
        try:
            header, used = parse(data)
        except Incomplete:
            # Everything peeked belongs to the header: take it, so the next
            # peek blocks until more arrives instead of spinning.
            header, take = None, len(peeked)
        else:
            take = used - len(consumed)
        got = b""
        while len(got) < take:
            chunk = sock.recv(take - len(got))
            if not chunk:
                raise ProxyError("connection closed inside the PROXY header")
            got += chunk
        consumed += got
        if header is not None:
            return header


def build_v1(source: Optional[Tuple[str, int]], destination: Optional[Tuple[str, int]]) -> bytes:
    """A v1 header (for tests and for clients of a PROXY listener); None gives UNKNOWN."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP6" if ":" in source[0] else "TCP4"
    return ("PROXY %s %s %s %d %d\r\n" % (family, source[0], destination[0], source[1], destination[1])).encode()


def build_v2(source: Optional[Tuple[str, int]], destination: Optional[Tuple[str, int]], *,
             local: bool = False, tlvs: bytes = b"") -> bytes:
    """A v2 header; ``local=True`` gives a LOCAL command (health check)."""
    if local or source is None or destination is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20 if local else 0x21, 0x00, len(tlvs)) + tlvs
    if ":" in source[0]:
        body = socket.inet_pton(socket.AF_INET6, source[0]) + socket.inet_pton(socket.AF_INET6, destination[0])
        fam = 0x21
    else:
        body = socket.inet_pton(socket.AF_INET, source[0]) + socket.inet_pton(socket.AF_INET, destination[0])
        fam = 0x11
    body += struct.pack("!HH", source[1], destination[1]) + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, fam, len(body)) + body
