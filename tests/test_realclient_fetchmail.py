"""A real POP3 client from Debian (fetchmail) fetching a Maildir served by pop3frame.

fetchmail hands every message to an MDA on stdin; the MDA here writes it to
a file, so the delivered bytes can be compared with what was put in the
Maildir.  A first run keeps the mail and tracks UIDL (peeking with TOP, so
nothing is marked seen), a second fetches it with RETR (so the messages move
new/ -> cur/ on the server), a third must find nothing new (the unique-ids
survived the move); a last run deletes everything.
"""
from __future__ import annotations

import base64
import os
import pathlib
import subprocess

from pop3frame.adapters.maildir import MaildirAdapter
from pop3frame.adapters.passwdfile import PasswdFile, set_password
from pop3frame.testing import Controller
from tests.harness_maildir import deliver_like_an_mda
from tests.helpers import README, RawClient, literal_block, require_program
from tests.processes import Daemon

MESSAGES = [
    b"From: a@example.org\nTo: alice@example.org\nSubject: dots\n\n"
    b".starts with a dot\n.\n..two\n. a dot and a space\nlast\n",
    "From: Jürgen Groß <j@example.org>\nTo: alice@example.org\nSubject: Grüße aus Köln\n\n"
    "Raw UTF-8 in the headers, Latin-1 in the body: ".encode() + b"caf\xe9\n",
    # fetchmail splits lines longer than its 8 KiB buffer, so this stays at
    # RFC 5322's 998-octet limit; 200 such lines still span several reads.
    b"From: b@example.org\nTo: alice@example.org\nSubject: long\n\n" + (b"." + b"x" * 997 + b"\n") * 200 + b".\n",
    b"From: c@example.org\nTo: alice@example.org\nSubject: attachment\nMIME-Version: 1.0\n"
    b"Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: application/octet-stream\n"
    b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(os.urandom(5 * 1024 * 1024)) + b"--b--\n",
]


def run_fetchmail(tmp_path, port, *options, uidl=False):
    rc = tmp_path / "fetchmailrc"
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    # fetchmail refuses a run-control file that others can read, since it
    # holds the password.
    rc.write_text(
        "set no syslog\n"
        "set idfile \"%s\"\n"
        "poll 127.0.0.1 with proto POP3 port %d auth password %s\n"
        "  user \"alice\" there with password \"pw\" is \"root\" here\n"
        "  options no rewrite sslproto '' %s\n"
        "  mda \"/bin/sh -c 'cat > %s/msg.$$'\"\n" % (tmp_path / "fetchids", port, "uidl" if uidl else "", " ".join(options), out)
    )
    os.chmod(rc, 0o600)
    env = dict(os.environ, HOME=str(tmp_path), FETCHMAILHOME=str(tmp_path), LC_ALL="C")
    result = subprocess.run(
        [require_program("fetchmail"), "--nodetach", "--invisible", "--pidfile", str(tmp_path / "fetchmail.pid"),
         "-f", str(rc)],
        capture_output=True, env=env, timeout=120,
    )
    delivered = sorted(p.read_bytes() for p in out.iterdir())
    for p in out.iterdir():
        p.unlink()
    return result, delivered


def test_fetchmail_fetches_maildir_byte_exact_keeps_then_deletes(tmp_path):
    """Lines starting with '.', raw UTF-8 headers and a 5 MB attachment arrive byte-exact
    (RFC 1939 section 3 byte-stuffing undone by the client); UIDL (RFC 1939 section 7)
    stays stable across runs; DELE then QUIT (section 6) removes the mail."""
    passwd = str(tmp_path / "passwd")
    set_password(passwd, "alice", "pw", scheme="PLAIN")
    mail = str(tmp_path / "mail")
    names = [deliver_like_an_mda(mail, "alice", m) for m in MESSAGES]
    with Controller(MaildirAdapter(mail, PasswdFile(passwd))) as server:
        # 1: keep the mail on the server, remember its UIDs.  In keep mode
        # fetchmail peeks ("TOP n 99999999"), and a peek marks nothing seen.
        result, delivered = run_fetchmail(tmp_path, server.port, "keep", uidl=True)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert delivered == sorted(MESSAGES)
        assert server.wait_for_connections(0)
        assert sorted(os.listdir(os.path.join(mail, "alice", "new"))) == sorted(names)

        # 2: fetchall makes it RETR: the server marks them seen, new/ -> cur/
        # with the S flag.
        result, delivered = run_fetchmail(tmp_path, server.port, "keep", "fetchall", uidl=True)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert delivered == sorted(MESSAGES)
        assert server.wait_for_connections(0)
        assert os.listdir(os.path.join(mail, "alice", "new")) == []
        assert sorted(os.listdir(os.path.join(mail, "alice", "cur"))) == sorted(n + ":2,S" for n in names)

        # 3: same UIDs after the move, so fetchmail sees nothing new
        # (exit code 1 means "no mail").
        result, delivered = run_fetchmail(tmp_path, server.port, "keep", uidl=True)
        assert result.returncode == 1, result.stderr.decode(errors="replace")
        assert delivered == []

        # 4: fetch everything and delete it on the server (DELE + QUIT).
        result, delivered = run_fetchmail(tmp_path, server.port, "fetchall", "nokeep")
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert delivered == sorted(MESSAGES)
        assert server.wait_for_connections(0)
    assert os.listdir(os.path.join(mail, "alice", "new")) == []
    assert os.listdir(os.path.join(mail, "alice", "cur")) == []


def readme_fetchmail(tmp_path, port: int, *drop: str) -> subprocess.CompletedProcess:
    """README's fetchmail commands, verbatim but for the port and the words in ``drop``."""
    block = literal_block("printf 'poll localhost port 1100")
    for word in drop:
        assert word in block
        block = block.replace(word, "")
    env = dict(os.environ, HOME=str(tmp_path), LC_ALL="C")
    return subprocess.run(["/bin/sh", "-c", block.replace("port 1100", "port %d" % port)], cwd=str(tmp_path),
                          capture_output=True, text=True, env=env, timeout=120)


def test_readme_fetchmail_needs_sslproto_off_against_a_plain_server(tmp_path):
    """fetchmail 6.4 requires TLS by default: against a server with no
    certificate it gives up; README's --sslproto '' gets the demo mailbox."""
    require_program("fetchmail")
    with Daemon("--demo", "--listen", "127.0.0.1:0") as d:
        refused = readme_fetchmail(tmp_path, d.port, "--sslproto ''")
        assert refused.returncode != 0 and "upgrade to TLS failed" in refused.stderr, refused.stderr
        result = readme_fetchmail(tmp_path, d.port)
        assert result.returncode == 0, result.stderr
        assert "3 messages for demo at localhost (683 octets)." in result.stdout
        # Read in order, the README's session has deleted message 1 by now.
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("demo", "demo").startswith(b"+OK")
            assert c.cmd("DELE 1") == b"+OK message 1 deleted\r\n"
            assert c.cmd("QUIT").startswith(b"+OK")
        result = readme_fetchmail(tmp_path, d.port)
        assert result.returncode == 0, result.stderr
        assert "2 messages for demo at localhost (440 octets)." in result.stdout
        assert d.stop() == 0
    text = " ".join(pathlib.Path(README).read_text(encoding="utf-8").split())
    assert ("which prints ``2 messages for demo at localhost (440 octets).`` after the session above deleted "
            "message 1 (``3 ... (683 octets)`` on a new store)") in text


def test_fetchmail_defaults_with_a_certificate_stls_and_pop3s(tmp_path):
    """The README's TLS set-up for real use: with --cert/--key the plain
    listener offers STLS (RFC 2595) and fetchmail's defaults upgrade and verify
    the certificate (here against a test CA); --ssl polls the POP3S listener
    (RFC 8314)."""
    import trustme

    require_program("fetchmail")
    ca = trustme.CA()
    # fetchmail wants the name in the subject's CN too, as a CA-issued
    # certificate has it; trustme puts it only in subjectAltName by default.
    issued = ca.issue_cert("localhost", common_name="localhost")
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    issued.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    with Daemon("--demo", "--listen", "127.0.0.1:0", "--tls-listen", "127.0.0.1:0", "--cert", str(tmp_path / "cert.pem"),
                "--key", str(tmp_path / "key.pem"), listeners=2) as d:
        plain, secure = d.ports
        for port, options in ((plain, ""), (secure, " ssl")):
            rc = tmp_path / "fetchmailrc"
            rc.write_text("poll localhost port %d protocol pop3 user demo password demo sslcertfile %s%s\n"
                          % (port, tmp_path / "ca.pem", options))
            rc.chmod(0o600)
            result = subprocess.run(["fetchmail", "-f", str(rc), "--check"], capture_output=True, text=True,
                                    env=dict(os.environ, HOME=str(tmp_path), LC_ALL="C"), timeout=120)
            assert result.returncode == 0, result.stderr
            assert "3 messages for demo at localhost (683 octets)." in result.stdout
        d.wait_for(r"session end: .*user 'demo'")
        assert d.stop() == 0
