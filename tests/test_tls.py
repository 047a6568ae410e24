"""TLS: implicit (RFC 8314), STLS (RFC 2595), plaintext policy, with real handshakes."""
from __future__ import annotations

import logging
import os
import poplib
import socket
import ssl
import subprocess
import warnings

import pytest
import trustme

from pop3frame.adapters.memory import MemoryAdapter
from pop3frame.testing import Controller
from pop3frame.tls import TLSCertificates
from tests.helpers import (FileSpanServer, RawClient, require_program, retr_interrupted, retr_lines_to_bytes,
                           tick_until_closed)


class SourcePOP3(poplib.POP3):
    """``poplib.POP3`` connecting from a chosen local address (e.g. 127.0.0.2).

    Without it Linux picks 127.0.0.1 as the source for any 127/8
    destination, and an "untrusted" client would in fact be trusted.
    """

    def __init__(self, address, source: str, timeout: float = 10.0) -> None:
        self.source = source
        super().__init__(*address, timeout=timeout)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture
def certs(ca, tmp_path):
    issued = ca.issue_cert("localhost", "127.0.0.1", "127.0.0.2")
    cert, key, cafile = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(cafile))
    return TLSCertificates(str(cert), str(key)), str(cafile)


@pytest.fixture
def client_context(ca):
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def store():
    s = MemoryAdapter({"alice": "pw"}, apop=False)
    s.deliver("alice", b"Subject: secret\r\n\r\nover TLS\r\n")
    return s


def test_implicit_tls_listener(store, certs, client_context, caplog):
    """RFC 8314 section 3.3: TLS from the first byte on the POP3S port."""
    tls, _ = certs
    caplog.set_level(logging.INFO, logger="pop3frame")
    with Controller(store, tls=tls, secure=True) as server:
        client = poplib.POP3_SSL("127.0.0.1", server.port, context=client_context, timeout=10)
        assert "STLS" not in client.capa()
        client.user("alice")
        client.pass_("pw")
        assert client.retr(1)[1] == [b"Subject: secret", b"", b"over TLS"]
        version = client.sock.version()
        assert version in ("TLSv1.2", "TLSv1.3")
        client.quit()
        assert server.wait_for_connections(0)
    # The session's one INFO line names the TLS version (DEBUG has the cipher too).
    end, = [r for r in caplog.records if "session end" in r.getMessage()]
    assert end.tls == version and end.getMessage().endswith(", quit, " + version)


def test_message_stored_as_sent_goes_out_from_its_file_through_tls(certs, client_context, tmp_path):
    """A message in wire form (CRLF, no line starting with ".") is read from its
    file and written through TLS, which sendfile() cannot cross: exact bytes."""
    from pop3frame.adapters.maildir import MaildirAdapter

    data = b"Subject: over TLS\r\n\r\n" + b"Line. Another, with dots.\r\n" * 8000
    for sub in ("new", "cur", "tmp"):
        (tmp_path / "u" / sub).mkdir(parents=True)
    (tmp_path / "u" / "new" / "1700000000.M1P1.host").write_bytes(data)
    tls, _ = certs
    with Controller(MaildirAdapter(str(tmp_path), lambda user, password: password == "pw"), tls=tls, secure=True,
                    server_class=FileSpanServer) as server:
        client = poplib.POP3_SSL("127.0.0.1", server.port, context=client_context, timeout=10)
        client.user("u")
        client.pass_("pw")
        assert retr_lines_to_bytes(client.retr(1)[1]) == data
        client.quit()
        assert server.wait_for_connections(0)
        assert server.server.file_spans == [len(data)]


def test_message_written_in_place_while_sent_through_tls_never_goes_out_unstuffed(certs, client_context,
                                                                                   tmp_path):
    """RFC 1939 section 3: a message in wire form is read from its file for TLS (no
    sendfile()), so a write to it while it is sent is seen before the next piece goes
    out: a Maildir file rewritten in place (same size, now with lines that are "."
    alone, where the size cache said none starts with ".") never sends those lines
    unstuffed, where the first would end the reply early in a terminator; the
    connection closes after old bytes only."""
    from pop3frame.adapters.maildir import MaildirAdapter

    data = b"Subject: huge\r\n\r\n" + (b"x" * 998 + b"\r\n") * 16_000
    dotted = b"Subject: huge\r\n\r\n" + (b".\r\n" + b"y" * 995 + b"\r\n") * 16_000
    for sub in ("new", "cur", "tmp"):
        (tmp_path / "u" / sub).mkdir(parents=True)
    path = tmp_path / "u" / "new" / "1700000000.M1P1.host"
    path.write_bytes(data)

    def rewrite():
        old = path.stat().st_mtime_ns
        with open(path, "r+b") as f:
            f.write(dotted)
        os.utime(path, ns=(old + 10**9, old + 10**9))  # a later clock tick, as any real write

    tls, _ = certs
    with Controller(MaildirAdapter(str(tmp_path), lambda user, password: password == "pw"), tls=tls, secure=True,
                    server_class=FileSpanServer) as server:
        status, body, complete = retr_interrupted(server.address, "u", "pw", 1, rewrite, context=client_context)
        assert status == b"+OK %d octets\r\n" % len(data)
        assert not complete and data.startswith(body)
        assert server.wait_for_connections(0)
        assert len(server.server.file_spans) == 1 and server.server.file_spans[0] < len(data)


def test_stls_upgrades_and_capa_reflects_it(store, certs, client_context):
    """RFC 2595 section 4: STLS in AUTHORIZATION; afterwards CAPA no longer offers STLS."""
    tls, _ = certs
    with Controller(store, tls=tls) as server:
        client = server.pop3()
        assert "STLS" in client.capa()
        assert client.stls(client_context).startswith(b"+OK")
        assert "STLS" not in client.capa()
        client.user("alice")
        client.pass_("pw")
        client.quit()


def test_stls_command_injection_is_discarded(store, certs, client_context):
    """RFC 2595 section 4 / CVE-2011-0411: commands pipelined after STLS are never executed."""
    tls, _ = certs
    with Controller(store, tls=tls) as server:
        sock = socket.create_connection(server.address, timeout=10)
        f = sock.makefile("rb")
        assert f.readline().startswith(b"+OK")
        sock.sendall(b"STLS\r\nCAPA\r\n")
        assert f.readline() == b"+OK Begin TLS negotiation\r\n"
        f.close()
        with client_context.wrap_socket(sock, server_hostname="localhost") as secure:
            secure.sendall(b"QUIT\r\n")
            rest = b""
            while True:
                chunk = secure.recv(4096)
                if not chunk:
                    break
                rest += chunk
        # Only QUIT's reply: no CAPA listing arrived inside the TLS session.
        assert rest == b"+OK localhost POP3 server signing off\r\n"


def test_stls_refused_after_login_and_on_tls(store, certs, client_context):
    """RFC 2595 section 4: STLS only in AUTHORIZATION, and not twice."""
    tls, _ = certs
    with Controller(store, tls=tls) as server:
        with RawClient(server.address) as c:
            c.login("alice", "pw")
            assert c.cmd("STLS") == b"-ERR STLS not valid in the TRANSACTION state\r\n"
        client = server.pop3()
        client.stls(client_context)
        with pytest.raises(poplib.error_proto, match="already using TLS"):
            client._shortcmd("STLS")
        client.quit()


def test_stls_without_certificates():
    """RFC 2595 section 4: STLS is an optional extension; without certificates it is refused."""
    with Controller(MemoryAdapter()) as server, RawClient(server.address) as c:
        assert c.cmd("STLS") == b"-ERR TLS is not configured\r\n"


def silent_then_served(server, client_context) -> socket.socket:
    """Connect a client that says nothing, then serve a full POP3S session to another.

    Connections are accepted in order, so once the second one is served the
    silent one is known to the server (and was no obstacle to the other).
    """
    silent = socket.create_connection(server.address, timeout=10)
    client = poplib.POP3_SSL("127.0.0.1", server.port, context=client_context, timeout=10)
    client.user("alice")
    assert client.pass_("pw").startswith(b"+OK")
    client.quit()
    return silent


def test_silent_tls_client_blocks_nobody(store, certs, client_context):
    """RFC 8314 section 3.3 (TLS from the first byte) without PITFALLS' POP3SF defect:
    the handshake runs in the connection's thread, not in accept()."""
    tls, _ = certs
    with Controller(store, tls=tls, secure=True) as server:
        with silent_then_served(server, client_context):
            assert server.wait_for_connections(1)


def test_handshake_timeout_is_a_deadline_on_the_clock(store, certs, client_context, frozen):
    """RFC 8314 section 3.3: a POP3S client must start TLS at once; one that does not
    is cut off after tls_handshake_timeout seconds by ServerConfig.clock, and a
    handshake that waited less than that (while the server polled the socket many
    times) still completes."""
    tls, _ = certs
    clock = lambda: frozen().timestamp()  # noqa: E731
    with Controller(store, tls=tls, secure=True, clock=clock, poll_interval=0.01,
                    tls_handshake_timeout=30) as server:
        with silent_then_served(server, client_context) as late:
            assert server.wait_for_connections(1)
            frozen.tick(29)
            # Many 10 ms polls go by here: the server retries do_handshake.
            assert not server.wait_for_connections(0, timeout=0.2)
            with client_context.wrap_socket(late, server_hostname="localhost") as secure:
                assert secure.recv(100).startswith(b"+OK")
                secure.sendall(b"QUIT\r\n")
                assert secure.recv(100).startswith(b"+OK")
        assert server.wait_for_connections(0)

        with silent_then_served(server, client_context) as silent:
            assert tick_until_closed(server, frozen, 31)
            assert silent.recv(100) == b""  # the server closed it


def test_tls_below_1_2_is_refused_and_the_server_goes_on(store, certs, client_context, ca):
    """RFC 8314 section 4.1 as updated by RFC 8997 (TLS 1.2 or newer): a client capped at TLS 1.1 fails the
    handshake; the same client succeeds against a caller's context that allows
    TLS 1.1, so the refusal is the server's floor, not the client's inability."""
    tls, _ = certs
    assert tls.context.minimum_version >= ssl.TLSVersion.TLSv1_2
    old_client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old_client.check_hostname = False
    old_client.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.10+ warns, as it should
        old_client.minimum_version = ssl.TLSVersion.TLSv1
        old_client.maximum_version = ssl.TLSVersion.TLSv1_1
    # OpenSSL's default security level forbids TLS 1.1 even on the client side.
    old_client.set_ciphers("DEFAULT:@SECLEVEL=0")

    legacy = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.10+ warns, as it should
        legacy.minimum_version = ssl.TLSVersion.TLSv1
    legacy.set_ciphers("DEFAULT:@SECLEVEL=0")
    ca.issue_cert("localhost").configure_cert(legacy)
    with Controller(store, tls=TLSCertificates(context=legacy), secure=True) as server:
        client = poplib.POP3_SSL("127.0.0.1", server.port, context=old_client, timeout=10)
        assert client.sock.version() == "TLSv1.1"
        client.quit()

    with Controller(store, tls=tls, secure=True) as server:
        with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION|UNSUPPORTED_PROTOCOL"):
            poplib.POP3_SSL("127.0.0.1", server.port, context=old_client, timeout=10)
        assert server.wait_for_connections(0)
        client = poplib.POP3_SSL("127.0.0.1", server.port, context=client_context, timeout=10)
        client.user("alice")
        assert client.pass_("pw").startswith(b"+OK")
        client.quit()


def test_caller_made_context(store, ca, client_context):
    """RFC 8314 section 3.3 through poplib.POP3_SSL with an ssl.SSLContext built by the
    caller: it is used as it is, and reload() leaves it alone."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    tls = TLSCertificates(context=context)
    tls.reload()
    assert tls.context is context and tls.certfile is None
    with Controller(store, tls=tls, secure=True) as server:
        client = poplib.POP3_SSL("127.0.0.1", server.port, context=client_context, timeout=10)
        client.user("alice")
        client.pass_("pw")
        assert client.retr(1)[1] == [b"Subject: secret", b"", b"over TLS"]
        client.quit()
    # The bare context does the same: the server wraps it.
    with Controller(store, tls=context) as server:
        assert server.context.tls.context is context
        client = server.pop3()
        client.stls(client_context)
        assert client.user("alice").startswith(b"+OK")
        client.quit()


def test_certificates_need_files_or_a_server_context(certs):
    tls, _ = certs
    with pytest.raises(ValueError, match="certfile and keyfile, or context"):
        TLSCertificates(tls.certfile)
    with pytest.raises(ValueError, match="not both"):
        TLSCertificates(tls.certfile, tls.keyfile, context=tls.context)
    with pytest.raises(ValueError, match="client context"):
        TLSCertificates(context=ssl.create_default_context())
    with pytest.raises(TypeError):
        TLSCertificates(context="ctx.pem")


def test_certificate_reload(store, certs, ca, client_context):
    """SIGHUP path: new handshakes get the new certificate; running sessions go on."""
    tls, _ = certs
    with Controller(store, tls=tls, secure=True) as server:
        before = poplib.POP3_SSL("127.0.0.1", server.port, context=client_context, timeout=10)
        old_cert = before.sock.getpeercert(binary_form=True)
        reissued = ca.issue_cert("localhost", "127.0.0.1")
        reissued.cert_chain_pems[0].write_to_path(tls.certfile)
        reissued.private_key_pem.write_to_path(tls.keyfile)
        tls.reload()
        after = poplib.POP3_SSL("127.0.0.1", server.port, context=client_context, timeout=10)
        assert after.sock.getpeercert(binary_form=True) != old_cert
        assert "TOP" in before.capa()  # the session from before the reload still works
        before.quit()
        after.quit()


# -- plaintext policy -------------------------------------------------------------


@pytest.fixture
def untrusted(store, certs):
    """A STLS server on 127.0.0.2 that trusts only 127.0.0.1/32, so 127.0.0.2 is untrusted."""
    tls, _ = certs
    with Controller(store, tls=tls, host="127.0.0.2", trusted_networks=["127.0.0.1/32"]) as server:
        yield server


def test_plaintext_refused_from_untrusted_address_until_stls(untrusted, client_context):
    """RFC 2595 section 2.3: clear-text logins refused without TLS outside trusted
    networks, saying why (RFC 3206 section 5, AUTH); CAPA hides USER and SASL PLAIN
    (RFC 2449 sections 6.2, 6.3) and offers them after STLS (RFC 2595 section 4:
    the client must issue CAPA again, which reflects the new state)."""
    server = untrusted
    refusal = "-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
    with RawClient(server.address, source="127.0.0.2") as c:
        assert c.cmd("AUTH PLAIN AGFsaWNlAHB3") == refusal.encode() + b"\r\n"
        assert c.cmd("AUTH LOGIN").startswith(b"-ERR [AUTH] Plaintext")
    client = SourcePOP3(server.address, source="127.0.0.2")
    try:
        assert client.sock.getsockname()[0] == "127.0.0.2"
        before = client.capa()
        assert "USER" not in before and "PLAIN" not in before.get("SASL", []) and "STLS" in before
        with pytest.raises(poplib.error_proto) as refused:
            client.user("alice")
        assert refused.value.args[0].decode() == refusal
        with pytest.raises(poplib.error_proto, match="PASS must follow USER"):
            client.pass_("pw")
        client.stls(client_context)
        after = client.capa()
        assert "USER" in after and "PLAIN" in after["SASL"] and "STLS" not in after
        client.user("alice")
        assert client.pass_("pw").startswith(b"+OK")
        client.quit()
    finally:
        client.close()
    with RawClient(server.address, source="127.0.0.1") as c:
        assert c.login("alice", "pw").startswith(b"+OK")  # trusted network, no TLS


def test_allow_plaintext_auth_from_untrusted_address(store):
    """RFC 2595 section 2.3 makes refusing clear text configurable: with
    allow_plaintext_auth the operator accepts USER/PASS without TLS from anywhere."""
    with Controller(store, host="127.0.0.2", trusted_networks=["127.0.0.1/32"],
                    allow_plaintext_auth=True) as server:
        client = SourcePOP3(server.address, source="127.0.0.2")
        try:
            assert client.sock.getsockname()[0] == "127.0.0.2"
            capa = client.capa()
            assert "USER" in capa and "PLAIN" in capa["SASL"]
            client.user("alice")
            assert client.pass_("pw").startswith(b"+OK")
            client.quit()
        finally:
            client.close()


# -- real clients ----------------------------------------------------------------------


def curl(*args):
    return subprocess.run([require_program("curl"), "-sS", "--max-time", "30", *args], capture_output=True, timeout=60)


def test_curl_pop3s_and_stls(store, certs):
    """curl: pop3s:// is implicit TLS (RFC 8314 section 3.3); pop3:// with --ssl-reqd
    upgrades with STLS (RFC 2595 section 4) before it logs in."""
    tls, cafile = certs
    with Controller(store, tls=tls, secure=True) as server:
        out = curl("--cacert", cafile, "-u", "alice:pw", "pop3s://localhost:%d/1" % server.port)
        assert out.returncode == 0, out.stderr
        assert out.stdout == b"Subject: secret\r\n\r\nover TLS\r\n"
    with Controller(store, tls=tls) as server:
        out = curl("--ssl-reqd", "--cacert", cafile, "-u", "alice:pw", "pop3://localhost:%d/" % server.port)
        assert out.returncode == 0, out.stderr
        assert out.stdout == b"1 29\r\n"
