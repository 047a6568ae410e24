"""PROXY protocol v1/v2: pure parsing with hand-built headers, the socket reader, and listeners."""
from __future__ import annotations

import logging
import socket
import struct
import threading

import pytest

from pop3frame.proxy import (
    V2_SIGNATURE,
    Incomplete,
    ProxyError,
    ProxyHeader,
    build_v1,
    build_v2,
    parse,
    parse_v1,
    parse_v2,
    read_header,
)
from pop3frame.server import ServerGroup
from pop3frame.stats import Stats
from pop3frame import ServerConfig
from tests.helpers import RawClient

# -- v1 ---------------------------------------------------------------------------


def test_v1_tcp4():
    h = parse_v1(b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 110\r\n")
    assert h == ProxyHeader(1, "PROXY", "TCP4", ("192.0.2.10", 56324), ("198.51.100.1", 110))


def test_v1_tcp6():
    h = parse_v1(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 995\r\n")
    assert h.source == ("2001:db8::1", 4000) and h.destination == ("2001:db8::2", 995)


def test_v1_unknown_ignores_the_rest():
    assert parse_v1(b"PROXY UNKNOWN\r\n") == ProxyHeader(1, "PROXY", "UNKNOWN")
    h = parse_v1(b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n")
    assert not h.has_address


def test_v1_longest_header_is_accepted():
    line = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
    assert len(line) == 107
    assert parse(line + b"USER x\r\n") == (ProxyHeader(1, "PROXY", "UNKNOWN"), len(line))


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.10 198.51.100.1 56324\r\n",          # a field short
    b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 110 x\r\n",    # a field too many
    b"PROXY TCP5 192.0.2.10 198.51.100.1 56324 110\r\n",      # no such family
    b"PROXY TCP4 2001:db8::1 198.51.100.1 56324 110\r\n",     # family mismatch
    b"PROXY TCP6 192.0.2.10 2001:db8::2 56324 110\r\n",
    b"PROXY TCP4 192.0.2.300 198.51.100.1 56324 110\r\n",     # bad address
    b"PROXY TCP4 192.0.2.010 198.51.100.1 56324 110\r\n",     # leading zero
    b"PROXY TCP4 192.0.2.10 198.51.100.1 65536 110\r\n",      # port out of range
    b"PROXY TCP4 192.0.2.10 198.51.100.1 0110 110\r\n",       # leading zero port
    b"PROXY TCP4 192.0.2.10 198.51.100.1 -1 110\r\n",
    b"PROXY  TCP4 192.0.2.10 198.51.100.1 1 110\r\n",         # double space
    b"PROXY TCP4 192.0.2.10 198.51.100.1 1 110\n",            # LF without CR
    b"proxy TCP4 192.0.2.10 198.51.100.1 1 110\r\n",          # case matters
    b"PROXY TCP4 \xff.0.2.10 198.51.100.1 1 110\r\n",         # not ASCII
    b"PROXY TCP6 fe80::1%x ::1 1 110\r\n",                    # an IPv6 zone
    b"PROXY TCP6 ::1 fe80::1%eth0 1 110\r\n",
])
def test_v1_malformed(line):
    with pytest.raises(ProxyError):
        parse(line)


def test_v1_too_long_without_line_end():
    with pytest.raises(ProxyError, match="longer"):
        parse(b"PROXY UNKNOWN " + b"x" * 200)


def test_v1_incomplete_needs_more():
    for cut in (1, 5, 6, 20):
        with pytest.raises(Incomplete):
            parse(b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 110\r\n"[:cut])


def test_not_a_proxy_header():
    for data in (b"USER alice\r\n", b"GET / HTTP/1.0\r\n", b"\r\n\r\nX", b"\x16\x03\x01"):
        with pytest.raises(ProxyError):
            parse(data)
        assert not isinstance(_error(data), Incomplete)


def _error(data):
    try:
        parse(data)
    except ProxyError as exc:
        return exc


# -- v2 ---------------------------------------------------------------------------


def v2(ver_cmd: int, fam: int, body: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam, len(body)) + body


def test_v2_tcp4_by_hand():
    body = bytes([192, 0, 2, 10, 198, 51, 100, 1]) + struct.pack("!HH", 56324, 110)
    header, used = parse(v2(0x21, 0x11, body) + b"CAPA\r\n")
    assert header == ProxyHeader(2, "PROXY", "TCP4", ("192.0.2.10", 56324), ("198.51.100.1", 110))
    assert used == 16 + 12


def test_v2_tcp6_by_hand_with_tlvs_skipped():
    src = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    dst = socket.inet_pton(socket.AF_INET6, "2001:db8::2")
    tlv = b"\x04\x00\x05hello"  # PP2_TYPE_NOOP with 5 octets
    header, used = parse(v2(0x21, 0x21, src + dst + struct.pack("!HH", 4000, 995) + tlv))
    assert header.source == ("2001:db8::1", 4000) and header.destination == ("2001:db8::2", 995)
    assert used == 16 + 36 + len(tlv)


def test_v2_local_ignores_addresses():
    body = bytes(12)
    assert parse(v2(0x20, 0x11, body))[0] == ProxyHeader(2, "LOCAL", "UNKNOWN")
    assert parse(v2(0x20, 0x00, b""))[0].command == "LOCAL"


def test_v2_unspec_and_unix_have_no_address():
    assert not parse(v2(0x21, 0x00, b""))[0].has_address
    assert parse(v2(0x21, 0x31, bytes(216)))[0].family == "UNIX"


@pytest.mark.parametrize("data", [
    v2(0x11, 0x11, bytes(12)),          # version 1 in a v2 header
    v2(0x22, 0x11, bytes(12)),          # command 2
    v2(0x21, 0x11, bytes(11)),          # TCP4 needs 12 octets
    v2(0x21, 0x21, bytes(35)),          # TCP6 needs 36
    v2(0x21, 0x41, bytes(12)),          # unknown family
    V2_SIGNATURE[:11] + b"X" + bytes(4),  # signature broken
    V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 60000),  # absurd length
])
def test_v2_malformed(data):
    with pytest.raises(ProxyError) as info:
        parse(data + bytes(64))
    assert not isinstance(info.value, Incomplete)


def test_v2_incomplete():
    full = v2(0x21, 0x11, bytes(12))
    for cut in (1, 12, 15, 16, 27):
        with pytest.raises(Incomplete):
            parse(full[:cut])


def test_parse_v2_length_mismatch():
    with pytest.raises(ProxyError):
        parse_v2(v2(0x21, 0x11, bytes(12))[:16], bytes(11))


def test_builders_round_trip():
    for src, dst in ((("10.1.2.3", 1), ("10.0.0.1", 110)), (("2001:db8::5", 65535), ("::1", 995))):
        assert parse(build_v1(src, dst))[0].source == src
        assert parse(build_v2(src, dst))[0].source == src
    assert parse(build_v2(None, None, local=True))[0].command == "LOCAL"


# -- the socket reader -----------------------------------------------------------


def pair():
    a, b = socket.socketpair()
    return a, b


@pytest.mark.parametrize("header", [
    build_v1(("192.0.2.7", 4242), ("192.0.2.1", 110)),
    build_v2(("192.0.2.7", 4242), ("192.0.2.1", 110)),
])
def test_reader_reads_exactly_the_header(header):
    server, client = pair()
    with server, client:
        client.sendall(header + b"USER alice\r\n")
        assert read_header(server, 5).source == ("192.0.2.7", 4242)
        server.settimeout(5)
        assert server.recv(100) == b"USER alice\r\n"


def test_reader_header_in_pieces():
    header = build_v2(("192.0.2.7", 4242), ("192.0.2.1", 110))
    server, client = pair()
    result = {}
    with server, client:
        t = threading.Thread(target=lambda: result.update(h=read_header(server, 10)))
        t.start()
        for i in range(0, len(header), 5):
            client.sendall(header[i:i + 5])
        t.join(10)
        assert result["h"].source == ("192.0.2.7", 4242)


def test_reader_refuses_garbage_and_early_close():
    server, client = pair()
    with server, client:
        client.sendall(b"USER alice\r\n")
        with pytest.raises(ProxyError):
            read_header(server, 5)
    server, client = pair()
    with server:
        client.sendall(b"PROXY TCP4 ")
        client.close()
        with pytest.raises(ProxyError, match="closed"):
            read_header(server, 5)


def test_reader_times_out_on_a_silent_peer():
    ticks = iter([0.0, 0.0, 100.0, 100.0])
    server, client = pair()
    with server, client:
        client.sendall(b"PROXY TCP4 1.2.3.4")  # never finished
        with pytest.raises(ProxyError, match="timed out"):
            read_header(server, 5.0, clock=lambda: next(ticks))


# -- listeners ------------------------------------------------------------------


@pytest.fixture
def proxied(adapter):
    stats = Stats()
    group = ServerGroup(adapter, ServerConfig(hostname="localhost", max_connections_per_ip=1), stats=stats)
    server = group.add_listener(("127.0.0.1", 0), proxy_protocol=True, proxy_timeout=5)
    group.start(poll_interval=0.05)
    yield group, server.server_address[:2], stats
    group.shutdown()


def connect(address, header: bytes) -> RawClient:
    sock = socket.create_connection(address, timeout=10)
    sock.sendall(header)
    client = RawClient.__new__(RawClient)
    client.sock, client.buf = sock, b""
    client.greeting = client.line()
    return client


@pytest.mark.parametrize("build", [build_v1, build_v2])
def test_real_address_is_used_for_per_ip_limits(proxied, build):
    group, address, stats = proxied
    first = connect(address, build(("203.0.113.5", 5000), ("127.0.0.1", 110)))
    assert first.greeting.startswith(b"+OK")
    assert group.tracker.count_ip("203.0.113.5") == 1
    assert group.tracker.count_ip("127.0.0.1") == 0
    # Same real client again: over the per-IP limit of 1, though the proxy's address is the same.
    second = connect(address, build(("203.0.113.5", 5001), ("127.0.0.1", 110)))
    assert second.greeting == b"-ERR [SYS/TEMP] too many connections from your address\r\n"
    # Another real client through the same proxy is admitted.
    third = connect(address, build(("203.0.113.6", 5002), ("127.0.0.1", 110)))
    assert third.greeting.startswith(b"+OK")
    # The plaintext policy sees the real (untrusted) address, not the proxy's loopback one.
    assert third.cmd("USER alice").startswith(b"-ERR [AUTH] Plaintext authentication disallowed")
    for c in (first, second, third):
        c.close()
    assert group.tracker.wait_until_at_most(0, 10)
    assert stats.get("refused") == 1


def test_listener_closes_connections_without_a_valid_header(proxied):
    group, address, stats = proxied
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"USER alice\r\n")
        assert sock.recv(100) == b""  # closed, no greeting
    assert group.tracker.wait_until_at_most(0, 10)
    assert stats.get("refused") == 1


def test_header_naming_an_ipv6_zone_closes_the_connection(proxied, caplog):
    """A v1 header's address must be a plain address: Python 3.9+ parses "fe80::1%x"
    as an address with zone "x", which a client of a trusted proxy could otherwise
    choose freely, and which reached the logs and the per-address keys verbatim."""
    group, address, stats = proxied
    caplog.set_level(logging.INFO, logger="pop3frame")
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(b"PROXY TCP6 fe80::1%forged-zone ::1 5000 110\r\nCAPA\r\n")
        assert sock.recv(100) == b""  # closed, no greeting
    assert group.tracker.wait_until_at_most(0, 10)
    assert stats.get("refused") == 1
    assert "bad PROXY header" in caplog.text and "forged-zone" not in caplog.text


def test_local_command_keeps_the_peer_address(proxied):
    group, address, _ = proxied
    c = connect(address, build_v2(None, None, local=True))
    assert c.greeting.startswith(b"+OK")
    assert group.tracker.count_ip("127.0.0.1") == 1
    c.close()


@pytest.mark.parametrize("header", [
    build_v1(("127.0.0.1", 5000), ("127.0.0.1", 110)),
    build_v1(None, None),  # UNKNOWN
    build_v2(None, None, local=True),
    V2_SIGNATURE + bytes((0x21, 0x31, 0, 216)) + bytes(216),  # AF_UNIX
], ids=["names-loopback", "v1-unknown", "v2-local", "v2-unix"])
def test_what_a_trusted_proxys_header_without_an_outside_address_gets(proxied, header):
    """docs/security.rst: a header naming a trusted address, or no client at all
    (the proxy's own loopback address stands), gets what a trusted network gets:
    passwords without TLS and no per-address limit (max_connections_per_ip is 1 here)."""
    group, address, _ = proxied
    clients = [connect(address, header) for _ in range(2)]
    try:
        assert [c.greeting[:3] for c in clients] == [b"+OK", b"+OK"]
        assert clients[1].cmd("USER alice") == b"+OK send PASS\r\n"
    finally:
        for c in clients:
            c.close()
    assert group.tracker.wait_until_at_most(0, 10)


# -- who may send a header ------------------------------------------------------


@pytest.fixture
def one_proxy(adapter, caplog):
    """A PROXY listener that believes headers from 127.0.0.1 only, with plaintext
    passwords allowed from 127.0.0.1 only, one connection per address, and a
    failed-login delay from the first failure; the header timeout is long, so
    a close that comes at once was not a wait for one."""
    stats = Stats()
    config = ServerConfig(hostname="localhost", max_connections_per_ip=1, trusted_networks=["127.0.0.1/32"],
                          free_auth_failures=0)
    group = ServerGroup(adapter, config, stats=stats)
    server = group.add_listener(("127.0.0.1", 0), proxy_protocol=True, proxy_timeout=60,
                                proxy_trusted_networks=["127.0.0.1/32"])
    group.start(poll_interval=0.05)
    yield group, server.server_address[:2], stats
    group.shutdown()


def closed_unread(address, source: str, data: bytes) -> bool:
    """Connect from ``source``, send ``data``: whether the server closes with
    nothing sent, without waiting for more (a reset counts as a close)."""
    with socket.create_connection(address, timeout=10, source_address=(source, 0)) as sock:
        if data:
            sock.sendall(data)
        try:
            return sock.recv(100) == b""
        except ConnectionResetError:
            return True


def test_header_from_outside_the_trusted_proxies_closes_the_connection_unread(one_proxy, caplog):
    """A direct client that is not a listed proxy cannot choose its address:
    posing as the trusted 127.0.0.1 it would escape the plaintext policy, with
    a fresh address per connection the per-address limit and the failed-login
    delay.  It is closed before anything is read, even silent (so no wait for
    a header); a trusted proxy's connections are served as before."""
    group, address, stats = one_proxy
    spoofs = [build_v1(("127.0.0.1", 5000), ("127.0.0.1", 110)) + b"USER alice\r\nPASS alice-pw\r\n"]
    spoofs += [build_v2(("203.0.113.%d" % i, 5000), ("127.0.0.1", 110)) + b"USER alice\r\nPASS x\r\n"
               for i in range(1, 4)]
    for data in spoofs + [b""]:
        assert closed_unread(address, "127.0.0.2", data)
    assert stats.get("refused") == len(spoofs) + 1
    assert caplog.text.count("refusing 127.0.0.2 port") == len(spoofs) + 1
    assert "not a trusted proxy; closed unread" in caplog.text
    assert "login" not in caplog.text and "USER" not in caplog.text
    assert group.tracker.wait_until_at_most(0, 10)
    # From the trusted proxy the header's address counts, as before.
    trusted = connect(address, build_v1(("127.0.0.1", 5000), ("127.0.0.1", 110)))
    assert trusted.login("alice", "alice-pw").startswith(b"+OK")
    untrusted_client = connect(address, build_v1(("203.0.113.9", 5000), ("127.0.0.1", 110)))
    assert untrusted_client.cmd("USER alice").startswith(b"-ERR [AUTH] Plaintext authentication disallowed")
    for c in (trusted, untrusted_client):
        c.close()


def test_proxy_trusted_networks_default_to_loopback(adapter):
    group = ServerGroup(adapter, ServerConfig(hostname="localhost"))
    try:
        server = group.add_listener(("127.0.0.1", 0), proxy_protocol=True)
        assert [str(n) for n in server.proxy_networks] == ["127.0.0.0/8", "::1/128"]
        with pytest.raises(ValueError, match="^proxy_trusted_networks: "):
            group.add_listener(("127.0.0.1", 0), proxy_protocol=True, proxy_trusted_networks=["10.0.0.0/33"])
    finally:
        group.shutdown()
