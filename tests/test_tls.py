"""TLS: implicit (RFC 8314), STLS (RFC 2595), plaintext policy, with real handshakes."""
from __future__ import annotations

import poplib
import socket
import ssl
import subprocess

import pytest
import trustme

from pop3frame.adapters.memory import MemoryAdapter
from pop3frame.testing import Controller
from pop3frame.tls import TLSCertificates
from tests.helpers import RawClient, require_program


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


def test_implicit_tls_listener(store, certs, client_context):
    """RFC 8314 section 3.3: TLS from the first byte on the POP3S port."""
    tls, _ = certs
    with Controller(store, tls=tls, secure=True) as server:
        client = poplib.POP3_SSL("127.0.0.1", server.port, context=client_context, timeout=10)
        assert "STLS" not in client.capa()
        client.user("alice")
        client.pass_("pw")
        assert client.retr(1)[1] == [b"Subject: secret", b"", b"over TLS"]
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.quit()


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
        secure = client_context.wrap_socket(sock, server_hostname="localhost")
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
    with Controller(MemoryAdapter()) as server, RawClient(server.address) as c:
        assert c.cmd("STLS") == b"-ERR TLS is not configured\r\n"


def test_silent_tls_client_blocks_nobody(store, certs, client_context):
    """PITFALLS (POP3SF): the handshake runs in the connection's thread, not in accept()."""
    tls, _ = certs
    with Controller(store, tls=tls, secure=True) as server:
        silent = socket.create_connection(server.address)
        try:
            client = poplib.POP3_SSL("127.0.0.1", server.port, context=client_context, timeout=10)
            client.user("alice")
            assert client.pass_("pw").startswith(b"+OK")
            client.quit()
        finally:
            silent.close()


def test_handshake_timeout_frees_the_connection(store, certs):
    tls, _ = certs
    with Controller(store, tls=tls, secure=True, tls_handshake_timeout=0.3) as server:
        silent = socket.create_connection(server.address)
        try:
            assert server.wait_for_connections(0, timeout=10)
            assert silent.recv(100) == b""  # the server closed it
        finally:
            silent.close()


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


def test_plaintext_refused_from_untrusted_address(store, certs, client_context):
    """USER/PASS and PLAIN are refused without TLS outside trusted networks (CAPA hides them)."""
    tls, _ = certs
    with Controller(store, tls=tls, host="0.0.0.0", trusted_networks=["127.0.0.1/32"]) as server:
        with RawClient(("127.0.0.2", server.port), source="127.0.0.2") as c:
            c.send(b"CAPA\r\n")
            capa = c.multiline()
            assert b"\r\nUSER\r\n" not in capa and b"PLAIN" not in capa and b"\r\nSTLS\r\n" in capa
            assert c.cmd("USER alice") == (
                b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n")
            assert c.cmd("AUTH PLAIN AGFsaWNlAHB3").startswith(b"-ERR [AUTH] Plaintext")
        with RawClient(("127.0.0.1", server.port), source="127.0.0.1") as c:
            assert c.login("alice", "pw").startswith(b"+OK")  # trusted network
        client = poplib.POP3("127.0.0.2", server.port, timeout=10)
        client.stls(client_context)
        client.user("alice")
        assert client.pass_("pw").startswith(b"+OK")  # fine once encrypted
        client.quit()


# -- real clients ----------------------------------------------------------------------


def curl(*args):
    return subprocess.run([require_program("curl"), "-sS", "--max-time", "30", *args], capture_output=True, timeout=60)


def test_curl_pop3s_and_stls(store, certs):
    tls, cafile = certs
    with Controller(store, tls=tls, secure=True) as server:
        out = curl("--cacert", cafile, "-u", "alice:pw", "pop3s://localhost:%d/1" % server.port)
        assert out.returncode == 0, out.stderr
        assert out.stdout == b"Subject: secret\r\n\r\nover TLS\r\n"
    with Controller(store, tls=tls) as server:
        out = curl("--ssl-reqd", "--cacert", cafile, "-u", "alice:pw", "pop3://localhost:%d/" % server.port)
        assert out.returncode == 0, out.stderr
        assert out.stdout == b"1 29\r\n"
