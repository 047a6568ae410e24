"""A real POP3 client from Debian (mpop) fetching a Maildir served by pop3frame."""
from __future__ import annotations

import base64
import os
import shlex
import subprocess

from pop3frame.adapters.maildir import MaildirAdapter
from pop3frame.adapters.passwdfile import PasswdFile, set_password
from pop3frame.testing import Controller
from tests.harness_maildir import deliver_like_an_mda
from tests.helpers import RawClient, literal_block, require_program
from tests.processes import Daemon


MESSAGES = [
    b"From: a@example.org\nSubject: dots\n\n.starts with a dot\n.\n..two\nlast\n",
    "From: Jürgen <j@example.org>\nSubject: Grüße aus Köln\n\nUTF-8 header bytes, raw.\n".encode(),
    b"Subject: attachment\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n--b\n"
    b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n"
    + base64.encodebytes(os.urandom(5 * 1024 * 1024)) + b"--b--\n",
]


def test_mpop_fetches_maildir_byte_exact(tmp_path):
    """Lines starting with '.', raw UTF-8 headers and a 5 MB attachment arrive byte-exact
    (RFC 1939 section 3 byte-stuffing undone by mpop); with --keep=off mpop's DELE and
    QUIT (section 6) empty the Maildir."""
    passwd = str(tmp_path / "passwd")
    set_password(passwd, "alice", "pw", scheme="PLAIN")
    mail = str(tmp_path / "mail")
    for m in MESSAGES:
        deliver_like_an_mda(mail, "alice", m)
    out = tmp_path / "out"
    for sub in ("new", "cur", "tmp"):
        (out / sub).mkdir(parents=True)
    with Controller(MaildirAdapter(mail, PasswdFile(passwd))) as server:
        result = subprocess.run(
            [require_program("mpop"), "-C", "/dev/null", "--host=127.0.0.1", "--port=%d" % server.port, "--auth=user",
             "--user=alice", "--passwordeval=echo pw", "--tls=off", "--delivery=maildir,%s" % out,
             "--uidls-file=%s" % (tmp_path / "uidls"), "--keep=off", "--received-header=off", "-q"],
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert server.wait_for_connections(0)
    delivered = sorted((out / "new" / name).read_bytes() for name in os.listdir(out / "new"))
    assert delivered == sorted(MESSAGES)
    # --keep=off: mpop deleted what it fetched, through DELE + QUIT.
    assert os.listdir(os.path.join(mail, "alice", "new")) == []
    assert os.listdir(os.path.join(mail, "alice", "cur")) == []


def test_readme_mpop_needs_tls_off_and_auth_user_against_the_quick_start(tmp_path):
    """README's mpop line against the quick start's store (SQLite, which
    offers no challenge-response mechanism): mpop's defaults refuse to send
    a password without TLS; with --tls=off --auth=user (USER/PASS, RFC 1939
    section 7) it fetches the three demo messages and, keeping them, deletes
    nothing."""
    mpop = require_program("mpop")
    line = literal_block("mpop --host=127.0.0.1").strip()
    assert "\n" not in line
    with Daemon("--listen", "127.0.0.1:0", cwd=str(tmp_path)) as d:
        words = shlex.split(line.replace("--port=1100", "--port=%d" % d.port))
        assert words[0] == "mpop" and "--port=%d" % d.port in words
        env = dict(os.environ, HOME=str(tmp_path), LC_ALL="C")

        def run(argv):
            return subprocess.run([mpop, *argv[1:], "--passwordeval=echo demo"], cwd=str(tmp_path),
                                  capture_output=True, text=True, env=env, timeout=120)

        refused = run([w for w in words if w not in ("--tls=off", "--auth=user")])
        assert refused.returncode != 0 and "cannot use a secure authentication method" in refused.stderr, refused
        result = run(words)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "demo.mbox").read_bytes().count(b"\nSubject: ") == 3
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("demo", "demo") == b"+OK demo's maildrop has 3 messages (683 octets)\r\n"
        assert d.stop() == 0
