"""Interoperability with curl's POP3 client (Debian's curl, installed by .ci/run)."""
from __future__ import annotations

import base64
import os
import subprocess

import pytest

from pop3frame.adapters.memory import MemoryAdapter
from pop3frame.testing import Controller
from tests.helpers import require_program

ATTACHMENT = os.urandom(5 * 1024 * 1024)
MESSAGES = [
    b"From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <j@example.org>\r\nSubject: =?utf-8?b?"
    + base64.b64encode("Grüße".encode()) + b"?=\r\n" + "X-Raw: Grüße aus Köln\r\n".encode()
    + b"\r\n.leading dot\r\n.\r\n..two\r\nend\r\n",
    b"Subject: attachment\r\nMIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\n"
    + base64.encodebytes(ATTACHMENT).replace(b"\n", b"\r\n"),
    b"Subject: lf stored\n\nbare LF\n",
]


def curl(server, path="", *args, user="alice:pw"):
    out = subprocess.run(
        [require_program("curl"), "-sS", "--max-time", "60", "-u", user, "pop3://127.0.0.1:%d/%s" % (server.port, path), *args],
        capture_output=True, timeout=90,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(params=[True, False], ids=["apop", "user-pass"])
def server(request):
    store = MemoryAdapter({"alice": "pw"}, apop=request.param)
    for m in MESSAGES:
        store.deliver("alice", m)
    with Controller(store) as controller:
        controller.store = store
        yield controller


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def test_curl_list_retr_uidl_dele(server):
    """curl pop3://: LIST sizes are the octets RETR sends (RFC 1939 section 5), RETR is
    byte-exact after curl undoes the byte-stuffing (section 3) for dotted lines, non-ASCII
    headers (RFC 2047 and raw UTF-8) and a 5 MB attachment, UIDL (section 7), and -X DELE is applied at
    curl's QUIT (section 6)."""
    listing = curl(server)
    sizes = [len(crlf(m)) for m in MESSAGES]
    assert listing == b"".join(b"%d %d\r\n" % (i, s) for i, s in enumerate(sizes, 1))
    for i, m in enumerate(MESSAGES, 1):
        assert curl(server, str(i)) == crlf(m)
    assert curl(server, "", "-X", "UIDL") == b"1 m000001\r\n2 m000002\r\n3 m000003\r\n"
    curl(server, "1", "-X", "DELE", "-I")
    assert server.wait_for_connections(0)
    assert server.store.messages("alice") == MESSAGES[1:]


def test_curl_wrong_password_fails(server):
    """RFC 1939 section 7 (PASS) / RFC 3206 section 5: -ERR [AUTH]; curl reports a login failure."""
    out = subprocess.run(
        [require_program("curl"), "-sS", "-u", "alice:nope", "pop3://127.0.0.1:%d/" % server.port], capture_output=True, timeout=60
    )
    assert out.returncode == 67  # CURLE_LOGIN_DENIED
