"""The pop3frame command, run as a real subprocess."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from tests.helpers import RawClient


def start_server(*args: str, cwd=None, listeners: int = 1):
    """Start ``pop3frame serve``; returns (process, port) or (process, [ports])."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pop3frame", "serve", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd,
    )
    ports = []
    for line in proc.stderr:
        m = re.search(r"listening on \S+ port (\d+)", line)
        if m:
            ports.append(int(m.group(1)))
            if len(ports) == listeners:
                return proc, (ports[0] if listeners == 1 else ports)
    proc.wait(10)
    pytest.fail("server did not start (exit %s)" % proc.returncode)


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_demo_subprocess():
    proc, port = start_server("--demo", "--listen", "127.0.0.1:0")
    try:
        with RawClient(("127.0.0.1", port)) as c:
            assert c.greeting.startswith(b"+OK POP3 server ready <")
            assert c.login("demo", "demo") == b"+OK demo's maildrop has 3 messages (683 octets)\r\n"
            c.send(b"RETR 2\r\n")
            body = c.multiline()
            assert b"\r\n..A line that starts with a dot" in body
            c.cmd("DELE 1")
            assert c.cmd("QUIT") == b"+OK " + c.greeting.split(b"@")[1].split(b">")[0] + b" POP3 server signing off (2 messages left)\r\n"
    finally:
        assert stop_server(proc) == 0


def test_sigterm_with_live_session_exits_zero_and_session_is_closed():
    proc, port = start_server("--demo", "--listen", "127.0.0.1:0")
    with RawClient(("127.0.0.1", port)) as c:
        c.login("demo", "demo")
        c.cmd("DELE 1")
        assert stop_server(proc) == 0
        assert c.read_all() == b""


def test_version_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "pop3frame", "--version"], capture_output=True, text=True, check=True)
    assert re.match(r"pop3frame \d+\.\d+\.\d+", out.stdout)
    script = os.path.join(os.path.dirname(sys.executable), "pop3frame")
    out2 = subprocess.run([script, "--version"], capture_output=True, text=True, check=True)
    assert out2.stdout == out.stdout


def test_bad_listen_address_is_a_one_line_error():
    out = subprocess.run([sys.executable, "-m", "pop3frame", "serve", "--demo", "--listen", "nonsense"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "expected HOST:PORT" in out.stderr
    assert "Traceback" not in out.stderr


def pop3frame(*args, input=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "pop3frame", *args], input=input, capture_output=True,
                          cwd=cwd, timeout=60)


def test_default_store_is_sqlite_seeded_with_demo(tmp_path):
    proc, port = start_server("--listen", "127.0.0.1:0", cwd=str(tmp_path))
    try:
        with RawClient(("127.0.0.1", port)) as c:
            assert c.login("demo", "demo") == b"+OK demo's maildrop has 3 messages (683 octets)\r\n"
            c.cmd("QUIT")
    finally:
        assert stop_server(proc) == 0
    assert (tmp_path / "pop3frame.db").exists()


def test_log_lines_become_email(tmp_path):
    """The README example: a script adds a user and delivers; a POP3 client reads it."""
    db = str(tmp_path / "logs.db")
    assert pop3frame("user", "--sqlite", db, "add", "ops", "--password-stdin", input=b"s3cret\n").returncode == 0
    message = b"Subject: backup finished\n\n2026-11-25 03:00 backup ok\n"
    assert pop3frame("deliver", "--sqlite", db, "ops", input=message).returncode == 0
    listing = pop3frame("user", "--sqlite", db, "list")
    assert listing.stdout == b"ops\t1 messages\t56 octets\n"
    proc, port = start_server("--sqlite", db, "--listen", "127.0.0.1:0")
    try:
        with RawClient(("127.0.0.1", port)) as c:
            assert c.login("ops", "s3cret").startswith(b"+OK ops's maildrop has 1 message")
            c.send(b"RETR 1\r\n")
            assert c.multiline() == b"+OK 56 octets\r\n" + message.replace(b"\n", b"\r\n") + b".\r\n"
    finally:
        assert stop_server(proc) == 0


def test_maildir_with_passwd_file(tmp_path):
    passwd = str(tmp_path / "passwd")
    assert pop3frame("passwd", passwd, "alice", "--password-stdin", input=b"pw\n").returncode == 0
    os.makedirs(tmp_path / "mail" / "alice" / "new")
    (tmp_path / "mail" / "alice" / "new" / "1700000000.M1.host").write_bytes(b"Subject: md\n\nx\n")
    proc, port = start_server("--listen", "127.0.0.1:0", "--maildir", str(tmp_path / "mail"), "--passwd", passwd,
                              "--read-only")
    try:
        with RawClient(("127.0.0.1", port)) as c:
            assert c.login("alice", "pw").startswith(b"+OK alice's maildrop has 1 message")
            assert c.cmd("UIDL 1") == b"+OK 1 1700000000.M1.host\r\n"
            assert c.cmd("DELE 1") == b"-ERR [SYS/PERM] mailbox is read-only\r\n"
    finally:
        assert stop_server(proc) == 0


@pytest.mark.parametrize("args,message", [
    (("serve", "--maildir", "/nonexistent"), "--maildir needs --passwd FILE"),
    (("serve", "--maildir", "/tmp", "--passwd", "/nonexistent/passwd"), "--passwd: no such file"),
    (("deliver", "nobody"), "no such user: nobody"),
    (("user", "del", "nobody"), "no such user: nobody"),
    (("serve", "--demo", "--max-connections", "0"), "max_connections must be at least 1"),
    (("serve", "--demo", "--trusted-network", "10.0.0.0/33"), "trusted_networks: '10.0.0.0/33'"),
])
def test_operator_mistakes_are_one_line(tmp_path, args, message):
    out = pop3frame(*args, input=b"Subject: x\n\nx\n", cwd=str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.decode().startswith("pop3frame: ") and message in out.stderr.decode()
    assert b"Traceback" not in out.stderr
    assert len(out.stderr.decode().strip().splitlines()) == 1


@pytest.mark.parametrize("store", ["mbox", "directory"])
def test_mbox_and_directory_stores(tmp_path, store):
    passwd = str(tmp_path / "passwd")
    assert pop3frame("passwd", passwd, "alice", "--password-stdin", "--scheme", "PLAIN", input=b"pw\n").returncode == 0
    if store == "mbox":
        (tmp_path / "alice").write_bytes(b"From a@b Mon Jan  1 00:00:00 2026\nSubject: m\n\n>From x\n\n")
    else:
        (tmp_path / "alice").mkdir()
        (tmp_path / "alice" / "report.txt").write_bytes(b"Subject: m\n\nFrom x\n")
    proc, port = start_server("--listen", "127.0.0.1:0", "--" + store, str(tmp_path), "--passwd", passwd)
    try:
        with RawClient(("127.0.0.1", port)) as c:
            assert c.login("alice", "pw").startswith(b"+OK alice's maildrop has 1 message")
            c.send(b"RETR 1\r\n")
            assert c.multiline() == b"+OK 22 octets\r\nSubject: m\r\n\r\nFrom x\r\n.\r\n"
    finally:
        assert stop_server(proc) == 0


def test_tls_listeners_stls_and_sighup_reload(tmp_path):
    import poplib
    import ssl

    import trustme

    ca = trustme.CA()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued = ca.issue_cert("localhost", "127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    proc, (plain, secure) = start_server("--demo", "--listen", "127.0.0.1:0", "--tls-listen", "127.0.0.1:0",
                                         "--cert", str(cert), "--key", str(key), listeners=2)
    try:
        client = poplib.POP3("127.0.0.1", plain, timeout=10)
        assert "STLS" in client.capa()
        client.stls(context)
        client.user("demo")
        client.pass_("demo")
        pops = poplib.POP3_SSL("127.0.0.1", secure, context=context, timeout=10)
        first = pops.sock.getpeercert(binary_form=True)
        pops.quit()
        reissued = ca.issue_cert("localhost", "127.0.0.1")
        reissued.cert_chain_pems[0].write_to_path(str(cert))
        reissued.private_key_pem.write_to_path(str(key))
        proc.send_signal(signal.SIGHUP)
        for line in proc.stderr:
            if "TLS certificate reloaded" in line:
                break
        pops = poplib.POP3_SSL("127.0.0.1", secure, context=context, timeout=10)
        assert pops.sock.getpeercert(binary_form=True) != first
        pops.quit()
        assert client.stat()[0] == 3  # the STLS session survived the reload
        client.quit()
    finally:
        assert stop_server(proc) == 0
