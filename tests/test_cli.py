"""The pop3frame command, run as a real subprocess."""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request

import pytest

from pop3frame.proxy import build_v1, build_v2
from tests.helpers import ROOT, RawClient, demo_store, reachable_dir, tls_files
from tests.processes import Daemon, on_port_0, pop3frame, write_config


def test_serve_demo_subprocess():
    with Daemon("--demo", "--listen", "127.0.0.1:0") as d:
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.greeting.startswith(b"+OK POP3 server ready <")
            assert c.login("demo", "demo") == b"+OK demo's maildrop has 3 messages (683 octets)\r\n"
            c.send(b"RETR 2\r\n")
            body = c.multiline()
            assert b"\r\n..A line that starts with a dot" in body
            c.cmd("DELE 1")
            assert c.cmd("QUIT") == b"+OK " + c.greeting.split(b"@")[1].split(b">")[0] + b" POP3 server signing off (2 messages left)\r\n"
        assert d.stop() == 0


def test_sigterm_with_live_session_exits_zero_and_session_is_closed():
    with Daemon("--demo", "--listen", "127.0.0.1:0") as d:
        with RawClient(("127.0.0.1", d.port)) as c:
            c.login("demo", "demo")
            c.cmd("DELE 1")
            assert d.stop() == 0
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


def test_default_store_is_sqlite_seeded_with_demo(tmp_path):
    """The quick start: a new ./pop3frame.db on loopback gets demo/demo, and
    the log says where to reach it: the port really bound, not 1100."""
    with Daemon("--listen", "127.0.0.1:0", cwd=str(tmp_path)) as d:
        assert d.saw(r"new store pop3frame\.db: added user 'demo' .*; try: pop3frame client localhost:%d "
                     r"\(or telnet localhost %d\)$" % (d.port, d.port))
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("demo", "demo") == b"+OK demo's maildrop has 3 messages (683 octets)\r\n"
            c.cmd("QUIT")
        assert d.stop() == 0
    assert (tmp_path / "pop3frame.db").exists()


def test_named_store_without_users_gets_no_demo(tmp_path):
    db = str(tmp_path / "named.db")
    with Daemon("--sqlite", db, "--listen", "127.0.0.1:0") as d:
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("demo", "demo") == b"-ERR [AUTH] invalid user name or password\r\n"
        assert d.stop() == 0
    assert not any("added user" in line for line in d.seen)
    assert pop3frame("user", "--sqlite", db, "list").stdout == b""


def test_default_store_whose_users_were_all_deleted_gets_no_demo_again(tmp_path):
    with Daemon("--listen", "127.0.0.1:0", cwd=str(tmp_path)) as d:
        assert d.saw(r"added user 'demo'")
        assert d.stop() == 0
    assert pop3frame("user", "del", "demo", cwd=str(tmp_path)).returncode == 0
    with Daemon("--listen", "127.0.0.1:0", cwd=str(tmp_path)) as d:
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("demo", "demo") == b"-ERR [AUTH] invalid user name or password\r\n"
        assert d.stop() == 0
    assert not any("added user" in line for line in d.seen)
    assert pop3frame("user", "list", cwd=str(tmp_path)).stdout == b""


@pytest.mark.parametrize("listeners", [
    ("--listen", "0.0.0.0:0"),
    ("--listen", "127.0.0.1:0", "--listen", "0.0.0.0:0"),
    ("--proxy-listen", "127.0.0.1:0"),  # a proxy in front brings other hosts' clients
], ids=["any-address", "one-of-two", "proxy"])
def test_default_store_gets_no_demo_unless_every_listener_is_loopback(tmp_path, listeners):
    with Daemon(*listeners, cwd=str(tmp_path), listeners=len(listeners) // 2) as d:
        if listeners[0] == "--listen":
            with RawClient(("127.0.0.1", d.ports[-1])) as c:  # the 0.0.0.0 port, reached on loopback
                assert c.login("demo", "demo") == b"-ERR [AUTH] invalid user name or password\r\n"
        assert d.stop() == 0
    assert not any("added user" in line for line in d.seen)
    assert pop3frame("user", "list", cwd=str(tmp_path)).stdout == b""


@pytest.mark.parametrize("listeners", [
    ("--listen", "0.0.0.0:0"),
    ("--listen", "127.0.0.1:0", "--tls-listen", "0.0.0.0:0"),
    ("--proxy-listen", "127.0.0.1:0"),
], ids=["any-address", "one-of-two", "proxy"])
def test_demo_mailbox_is_refused_unless_every_listener_is_loopback(tmp_path, listeners):
    """--demo is an account whose password everyone knows: like the seeded default
    store, only where nobody from another host can reach it.  Before, ``serve --demo
    --listen 0.0.0.0:110`` let anyone on the network log in as demo/demo."""
    cert, key, _ = tls_files(tmp_path)
    out = pop3frame("serve", "--demo", "--cert", cert, "--key", key, *listeners)
    assert out.returncode == 2
    assert out.stderr.decode().splitlines()[-1] == (
        "pop3frame: demo: user demo's password is public: serve it on loopback listeners only,"
        " none taking PROXY headers")


def test_log_lines_become_email(tmp_path):
    """The README example: a script adds a user and delivers; a POP3 client reads it."""
    db = str(tmp_path / "logs.db")
    assert pop3frame("user", "--sqlite", db, "add", "ops", "--password-stdin", input=b"s3cret\n").returncode == 0
    message = b"Subject: backup finished\n\n2026-11-25 03:00 backup ok\n"
    assert pop3frame("deliver", "--sqlite", db, "ops", input=message).returncode == 0
    listing = pop3frame("user", "--sqlite", db, "list")
    assert listing.stdout == b"ops\t1 message\t56 octets\n"
    with Daemon("--sqlite", db, "--listen", "127.0.0.1:0") as d:
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("ops", "s3cret").startswith(b"+OK ops's maildrop has 1 message")
            c.send(b"RETR 1\r\n")
            assert c.multiline() == b"+OK 56 octets\r\n" + message.replace(b"\n", b"\r\n") + b".\r\n"
        assert d.stop() == 0


def test_deliver_logs_the_size_list_reports(tmp_path):
    """RFC 1939 section 11: a size is counted with CRLF line ends; deliver,
    user list and LIST give the same number for one message (65 bytes with
    LF line ends: 68 on the wire), and "1 message" is singular."""
    db = str(tmp_path / "s.db")
    assert pop3frame("user", "--sqlite", db, "add", "ops", "--password-stdin", input=b"pw\n").returncode == 0
    message = b"Subject: size check\n\n" + b"x" * 40 + b"\n"
    assert len(message) == 62
    delivered = pop3frame("deliver", "--sqlite", db, "ops", input=message)
    assert delivered.returncode == 0
    (line,) = delivered.stderr.decode().splitlines()
    assert re.search(r"INFO pop3frame\.cli delivered 65 octets to ops as \S+$", line), line
    assert pop3frame("user", "--sqlite", db, "list").stdout == b"ops\t1 message\t65 octets\n"
    with Daemon("--sqlite", db, "--listen", "127.0.0.1:0", "--log-level", "DEBUG") as d:  # login lines are DEBUG
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("ops", "pw") == b"+OK ops's maildrop has 1 message (65 octets)\r\n"
            d.wait_for(r"login 'ops' from 127\.0\.0\.1: 1 message, 65 octets$")
            assert c.cmd("LIST 1") == b"+OK 1 65\r\n"
            c.cmd("QUIT")
        assert d.stop() == 0


@pytest.mark.parametrize("args", [("user", "list"), ("user", "del", "bob"), ("user", "passwd", "bob"),
                                  ("deliver", "bob")])
def test_commands_that_need_a_store_never_create_one(tmp_path, args):
    """Only ``user add`` creates a store; the others name the missing file."""
    out = pop3frame(*args, input=b"pw\n", cwd=str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.decode().splitlines() == [
        "pop3frame: no store at ./pop3frame.db (pop3frame user add NAME creates one; --sqlite PATH names another)"]
    assert out.stdout == b"" and os.listdir(tmp_path) == []
    elsewhere = pop3frame(*args[:2], "--sqlite", str(tmp_path / "x" / "m.db"), *args[2:], input=b"pw\n")
    assert elsewhere.returncode == 2 and b"no store at %s " % str(tmp_path / "x" / "m.db").encode() in elsewhere.stderr
    assert os.listdir(tmp_path) == []
    assert pop3frame("user", "add", "bob", "--password-stdin", input=b"pw\n", cwd=str(tmp_path)).returncode == 0
    assert os.path.exists(tmp_path / "pop3frame.db")


def test_maildir_with_passwd_file(tmp_path):
    passwd = str(tmp_path / "passwd")
    assert pop3frame("passwd", passwd, "alice", "--password-stdin", input=b"pw\n").returncode == 0
    os.makedirs(tmp_path / "mail" / "alice" / "new")
    (tmp_path / "mail" / "alice" / "new" / "1700000000.M1.host").write_bytes(b"Subject: md\n\nx\n")
    with Daemon("--listen", "127.0.0.1:0", "--maildir", str(tmp_path / "mail"), "--passwd", passwd, "--read-only") as d:
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("alice", "pw").startswith(b"+OK alice's maildrop has 1 message")
            assert c.cmd("UIDL 1") == b"+OK 1 1700000000.M1.host\r\n"
            assert c.cmd("DELE 1") == b"-ERR [SYS/PERM] mailbox is read-only\r\n"
        assert d.stop() == 0


@pytest.mark.parametrize("args,message", [
    (("serve", "--maildir", "/nonexistent"), "--maildir needs --passwd FILE"),
    (("serve", "--maildir", "/tmp", "--passwd", "/nonexistent/passwd", "--listen", "127.0.0.1:0"),
     "--passwd: no such file"),
    (("deliver", "nobody"), "no store at ./pop3frame.db"),
    (("user", "del", "nobody"), "no store at ./pop3frame.db"),
    (("serve", "--demo", "--max-connections", "0"), "max_connections must be at least 1"),
    (("serve", "--demo", "--trusted-network", "10.0.0.0/33"), "trusted_networks: '10.0.0.0/33'"),
    (("serve", "--demo", "--proxy-trusted-network", "nonsense"), "--proxy-trusted-network: 'nonsense'"),
])
def test_operator_mistakes_are_one_line(tmp_path, args, message):
    out = pop3frame(*on_port_0(args), input=b"Subject: x\n\nx\n", cwd=str(tmp_path))
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
    with Daemon("--listen", "127.0.0.1:0", "--" + store, str(tmp_path), "--passwd", passwd) as d:
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("alice", "pw").startswith(b"+OK alice's maildrop has 1 message")
            c.send(b"RETR 1\r\n")
            assert c.multiline() == b"+OK 22 octets\r\nSubject: m\r\n\r\nFrom x\r\n.\r\n"
        assert d.stop() == 0


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
    with Daemon("--demo", "--listen", "127.0.0.1:0", "--tls-listen", "127.0.0.1:0", "--cert", str(cert), "--key", str(key), listeners=2) as d:
        client = poplib.POP3("127.0.0.1", d.ports[0], timeout=10)
        assert "STLS" in client.capa()
        client.stls(context)
        client.user("demo")
        client.pass_("demo")
        pops = poplib.POP3_SSL("127.0.0.1", d.ports[1], context=context, timeout=10)
        first = pops.sock.getpeercert(binary_form=True)
        pops.quit()
        reissued = ca.issue_cert("localhost", "127.0.0.1")
        reissued.cert_chain_pems[0].write_to_path(str(cert))
        reissued.private_key_pem.write_to_path(str(key))
        d.signal(signal.SIGHUP)
        d.wait_for("TLS certificate reloaded")
        pops = poplib.POP3_SSL("127.0.0.1", d.ports[1], context=context, timeout=10)
        assert pops.sock.getpeercert(binary_form=True) != first
        pops.quit()
        assert client.stat()[0] == 3  # the STLS session survived the reload
        client.quit()
        assert d.stop() == 0


# -- the daemon: config file, signals, limits, PROXY, logs -------------------------



def test_config_file_sighup_reload_and_per_ip_limits(tmp_path):
    config = write_config(tmp_path, """
        shutdown_grace = 5
        [[listener]]
        address = "127.0.0.1:0"
        [adapter]
        type = "sqlite"
        path = "%s"
        [server]
        greeting = "from the file"
        # Trusted networks (loopback by default) have no per-address limit.
        trusted_networks = []
        allow_plaintext_auth = true
        [logging]
        level = "INFO"
    """ % demo_store(str(tmp_path / "store.db")))
    with Daemon("--config", config) as d:
        with RawClient(("127.0.0.1", d.port)) as keep:
            assert keep.greeting.startswith(b"+OK from the file")
            assert keep.login("demo", "demo").startswith(b"+OK")
            # Tighten the per-IP limit and reload: live sessions stay.
            text = pathlib.Path(config).read_text().replace('greeting = "from the file"',
                                               'greeting = "from the file"\nmax_connections_per_ip = 1')
            pathlib.Path(config).write_text(text.replace('level = "INFO"', 'level = "DEBUG"'))
            d.signal(signal.SIGHUP)
            d.wait_for(r"configuration reloaded \(log level DEBUG, max_connections 1000, max_connections_per_ip 1\)")
            assert keep.cmd("STAT") == b"+OK 3 683\r\n"  # the session survived the reload
            with RawClient(("127.0.0.1", d.port)) as second:
                assert second.greeting == b"-ERR [SYS/TEMP] too many connections from your address\r\n"
            with RawClient(("127.0.0.1", d.port), source="127.0.0.2") as other_ip:
                assert other_ip.greeting.startswith(b"+OK")
            # A broken file on SIGHUP keeps the old settings.
            pathlib.Path(config).write_text("[server\n")
            d.signal(signal.SIGHUP)
            d.wait_for(r"keeping the old configuration: .*invalid TOML")
            keep.cmd("QUIT")
        assert d.stop() == 0


def test_sigterm_grace_applies_deletions_of_a_session_that_quits(tmp_path):
    db = demo_store(str(tmp_path / "g.db"))
    with Daemon("--sqlite", db, "--listen", "127.0.0.1:0", "--shutdown-grace", "60") as d:
        with RawClient(("127.0.0.1", d.port)) as c:
            c.login("demo", "demo")
            assert c.cmd("DELE 1") == b"+OK message 1 deleted\r\n"
            d.signal(signal.SIGTERM)
            d.wait_for(r"waiting up to 60 s for 1 session")
            with pytest.raises(OSError):
                RawClient(("127.0.0.1", d.port))  # no longer accepting
            assert c.cmd("QUIT").startswith(b"+OK")
        assert d.stop() == 0  # exits as soon as the session is done, well before 60 s
    assert pop3frame("user", "--sqlite", db, "list").stdout.startswith(b"demo\t2 messages")


def test_sigterm_grace_over_cuts_a_session_without_deleting(tmp_path):
    db = demo_store(str(tmp_path / "g.db"))
    with Daemon("--sqlite", db, "--listen", "127.0.0.1:0", "--shutdown-grace", "0.2") as d:
        with RawClient(("127.0.0.1", d.port)) as c:
            c.login("demo", "demo")
            c.cmd("DELE 1")
            d.signal(signal.SIGTERM)
            d.wait_for(r"closing 1 session\(s\) still open; their deletions are not applied")
            assert c.read_all() == b""
        assert d.stop() == 0
    assert pop3frame("user", "--sqlite", db, "list").stdout.startswith(b"demo\t3 messages")


@pytest.mark.parametrize("header", ["v1", "v2"])
def test_proxy_listener_end_to_end(tmp_path, header):
    build = build_v1 if header == "v1" else build_v2
    # Plaintext allowed everywhere: a trusted network would have no per-address limit.
    with Daemon("--sqlite", demo_store(str(tmp_path / "store.db")), "--proxy-listen", "127.0.0.1:0",
                "--max-connections-per-ip", "1", "--allow-plaintext-auth") as d:
        def connect(ip):
            s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
            s.sendall(build((ip, 40000), ("127.0.0.1", d.port)))
            c = RawClient.__new__(RawClient)
            c.sock, c.buf = s, b""
            c.greeting = c.line()
            return c

        first = connect("198.51.100.7")
        assert first.login("demo", "demo").startswith(b"+OK")
        second = connect("198.51.100.7")
        assert second.greeting == b"-ERR [SYS/TEMP] too many connections from your address\r\n"
        third = connect("198.51.100.8")
        assert third.greeting.startswith(b"+OK")
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as raw:
            raw.sendall(b"USER demo\r\n")
            assert raw.recv(100) == b""  # no header: closed
        first.cmd("QUIT")
        d.wait_for(r"session end: peer 198\.51\.100\.7 port 40000, user 'demo'")
        for c in (first, second, third):
            c.close()
        assert d.stop() == 0


def test_proxy_trusted_network_replaces_the_loopback_default(tmp_path):
    """--proxy-trusted-network 127.0.0.1/32: a client from 127.0.0.2 (loopback,
    trusted by default) may no longer send a header, and is closed unread."""
    with Daemon("--sqlite", demo_store(str(tmp_path / "store.db")), "--proxy-listen", "127.0.0.1:0",
                "--proxy-trusted-network", "127.0.0.1/32") as d:
        assert d.saw(r"listening on 127\.0\.0\.1 port \d+ \(PROXY protocol from 127\.0\.0\.1/32\)")
        with socket.create_connection(("127.0.0.1", d.port), timeout=10, source_address=("127.0.0.2", 0)) as raw:
            raw.sendall(build_v1(("127.0.0.1", 40000), ("127.0.0.1", d.port)) + b"USER demo\r\n")
            try:
                assert raw.recv(100) == b""
            except ConnectionResetError:
                pass  # closed with our bytes unread
        d.wait_for(r"refusing 127\.0\.0\.2 port \d+: not a trusted proxy; closed unread")
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as raw:
            raw.sendall(build_v1(("198.51.100.7", 40000), ("127.0.0.1", d.port)))
            assert raw.recv(100).startswith(b"+OK")
        assert d.stop() == 0


def test_one_info_line_per_session_and_every_line_written_at_sigterm():
    """By default a session logs one INFO line, its summary; a refused login
    adds a line of its own (guessing must show as it happens) and is counted in
    the summary.  The lines logged while stopping are written before the exit."""
    with Daemon("--demo", "--listen", "127.0.0.1:0") as d:
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("demo", "demo").startswith(b"+OK")
            c.cmd("STAT")
            c.cmd("QUIT")
        d.wait_for(r"session end")
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("demo", "wrong-password-xyz").startswith(b"-ERR [AUTH]")
            c.cmd("QUIT")
        assert d.stop() == 0
        rest = [line for line in iter(lambda: d.lines.get(timeout=10), "")]
    sessions = [line for line in d.seen[d.seen.index(d.saw("session end").string):] + rest if "] " in line]
    assert len(sessions) == 3, sessions
    assert re.search(r"INFO pop3frame.server \[\S+\] session end: peer 127.0.0.1 port \d+, user 'demo', "
                     r"0 retrieved, 0 deleted, \d+ octets sent, \d+\.\d{3} s, quit\n", sessions[0])
    assert "INFO pop3frame.session" in sessions[1] and "login failed for 'demo' from 127.0.0.1" in sessions[1]
    assert re.search(r"session end: .* user -, .* s, quit, 1 failed login\n", sessions[2])
    assert rest[-1].endswith("INFO pop3frame.cli stopped\n")
    assert not any("wrong-password-xyz" in line for line in d.seen + rest)


def test_custom_adapter_script_with_options(tmp_path):
    script = tmp_path / "reports.py"
    script.write_text(textwrap.dedent('''
        import hmac
        from pop3frame import AdapterBase, MessageInfo
        from pop3frame.protocol import wire_size

        class ReportAdapter(AdapterBase):
            read_only = True

            def __init__(self, password, subject="report"):
                self.password = password
                self.body = ("Subject: %s\\r\\n\\r\\nAll green.\\r\\n" % subject).encode()

            def authenticate(self, username, password):
                return username == "ops" and hmac.compare_digest(password, self.password)

            def list_messages(self, username):
                return [MessageInfo("r1", wire_size(self.body))]

            def open_message(self, username, message):
                return self.body
    '''))
    with Daemon("--listen", "127.0.0.1:0", "--adapter", "%s:ReportAdapter" % script,
                "--adapter-option", "password=s3cret", "--adapter-option", "subject=nightly") as d:
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("ops", "s3cret").startswith(b"+OK ops's maildrop has 1 message")
            c.send(b"RETR 1\r\n")
            assert b"Subject: nightly\r\n" in c.multiline()
            assert c.cmd("DELE 1").startswith(b"-ERR [SYS/PERM]")
        assert d.stop() == 0


def test_json_logs_pid_file_and_stats(tmp_path):
    pid_file = tmp_path / "run" / "p.pid"
    pid_file.parent.mkdir()
    with Daemon("--demo", "--listen", "127.0.0.1:0", "--log-json", "--pid-file", str(pid_file),
                "--stats-listen", "127.0.0.1:0") as d:
        assert pid_file.read_text() == "%d\n" % d.proc.pid
        with RawClient(("127.0.0.1", d.port)) as c:
            c.login("demo", "wrong-password-xyz")
            c.login("demo", "demo")
            c.send(b"RETR 1\r\n")
            c.multiline()
            c.cmd("QUIT")
        end = json.loads(d.wait_for(r'"session end').string)
        assert end["user"] == "demo" and end["retrieved"] == 1 and end["deleted"] == 0 and end["bytes_out"] > 200
        assert end["peer"] == "127.0.0.1" and "session" in end and end["duration"] >= 0
        assert end["ended"] == "quit" and end["failed_logins"] == 1 and end["pid"] == d.proc.pid
        stats_port = int(d.saw(r"stats on http://127.0.0.1:(\d+)/metrics").group(1))
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % stats_port, timeout=10) as r:
            metrics = r.read().decode()
        assert 'pop3frame_logins_total{result="ok"} 1' in metrics
        assert 'pop3frame_logins_total{result="failed"} 1' in metrics
        assert "pop3frame_messages_retrieved_total 1" in metrics
        assert d.stop() == 0
        for line in d.seen + [l for l in iter(lambda: d.lines.get(timeout=10), "")]:
            json.loads(line)  # every line is JSON
            assert "wrong-password-xyz" not in line and "Subject:" not in line
    assert not pid_file.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")
def test_user_drops_privileges_after_binding(tmp_path):
    import pwd

    with Daemon("--demo", "--listen", "127.0.0.1:0", "--user", "nobody") as d:
        assert d.saw(r"running as uid %d" % pwd.getpwnam("nobody").pw_uid)
        with open("/proc/%d/status" % d.proc.pid) as f:
            uids = next(l for l in f if l.startswith("Uid:")).split()[1:]
        assert set(uids) == {str(pwd.getpwnam("nobody").pw_uid)}
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("demo", "demo").startswith(b"+OK")
        assert d.stop() == 0


@pytest.fixture
def nobody_dir():
    """A private directory owned by nobody, where nobody can reach it."""
    import pwd

    entry = pwd.getpwnam("nobody")
    with reachable_dir("pop3frame-nobody-", 0o700, owner=entry) as path:
        yield path, entry


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")
def test_store_and_locks_are_created_by_the_dropped_user(nobody_dir):
    """The store and the lock files are opened after the switch, so a user-owned
    directory is all the server needs: the default store is created (and
    seeded) by nobody, and login, DELE and QUIT work as nobody."""
    path, nobody = nobody_dir
    db, lock_dir = os.path.join(path, "pop3frame.db"), os.path.join(path, "locks")
    with Daemon("--lock-dir", lock_dir, "--listen", "127.0.0.1:0", "--user", "nobody", cwd=path) as d:
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("demo", "demo").startswith(b"+OK")
            assert c.cmd("DELE 1") == b"+OK message 1 deleted\r\n"
            assert c.cmd("QUIT").startswith(b"+OK")
        assert d.stop() == 0
    for name in (db, lock_dir) + tuple(os.path.join(lock_dir, f) for f in os.listdir(lock_dir)):
        assert os.stat(name).st_uid == nobody.pw_uid, name
    with Daemon("--listen", "127.0.0.1:0", "--user", "nobody", cwd=path) as d:
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("demo", "demo").startswith(b"+OK demo's maildrop has 2 messages")
        assert d.stop() == 0


def test_check_config_prints_effective_settings(tmp_path):
    config = write_config(tmp_path, """
        [[listener]]
        address = "127.0.0.1:1100"
        [server]
        max_connections_per_ip = 4
    """)
    out = pop3frame("check-config", config)
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert 'address = "127.0.0.1:1100"' in text and "max_connections_per_ip = 4" in text
    assert "timeout = 600.0" in text and 'type = "sqlite"' in text
    assert 'trusted_networks = ["127.0.0.0/8", "::1/128"]' in text.split("[proxy]")[1]


@pytest.mark.parametrize("text,message", [
    ("[server]\ntimeout = 60\n", "pop3frame: {f}:2: server.timeout: must be at least 600 seconds"),
    ("[server]\nmax_conections = 1\n", "pop3frame: {f}:2: server.max_conections: unknown key (did you mean 'max_connections'?)"),
    ("[[listener]]\naddress = \"localhost\"\n", "pop3frame: {f}:2: listener[0].address: expected HOST:PORT"),
    ("[adapter]\ntype = \"nosuchmod_abc:X\"\n", "pop3frame: {f}:2: adapter.type: cannot import nosuchmod_abc"),
    ("[tls]\ncert = \"/etc/passwd\"\nkey = \"/etc/passwd\"\n",
     "pop3frame: {f}:2: tls.cert: cannot load /etc/passwd with the key /etc/passwd: not a PEM certificate chain"),
    ("x = = 1\n", "pop3frame: {f}:1: invalid TOML"),
    ("[proxy]\ntrusted_networks = [\"10.0.0.0/33\"]\n",
     "pop3frame: {f}:2: proxy.trusted_networks: '10.0.0.0/33' does not appear to be an IPv4 or IPv6 network"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, text, message):
    config = write_config(tmp_path, text)
    for args in (("check-config", config), ("serve", "--config", config)):
        out = pop3frame(*on_port_0(args), cwd=str(tmp_path))
        err = out.stderr.decode()
        if args[0] == "serve" and "adapter.type" in message:
            message = "pop3frame: cannot import nosuchmod_abc"
        assert out.returncode == 2, err
        assert err.startswith(message.format(f=config)), err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("text,message", [
    ('user = "no-such-user-xyz"\n', "{f}:1: user: no such user 'no-such-user-xyz'"),
    ('[adapter]\ntype = "sqlite"\npath = "x.db"\n[adapter.options]\nbogus = 1\n',
     "{f}:5: adapter.options.bogus: not an option of SQLiteStore (it takes: busy_timeout)"),
    ('[adapter]\ntype = "mbox"\npath = "{d}/{{user}}"\npasswd = "{d}/passwd"\n[adapter.options]\nmark_seen = true\n',
     "{f}:6: adapter.options.mark_seen: not an option of MboxAdapter"),
])
def test_check_config_catches_what_serve_would(tmp_path, text, message):
    """Mistakes that used to surface only when serve opened the store: same one-line form, nothing created."""
    config = write_config(tmp_path, "")
    (tmp_path / "passwd").write_text("alice:{PLAIN}pw\n")
    with open(config, "w") as f:
        f.write(text.format(f=config, d=tmp_path))
    out = pop3frame("check-config", config, cwd=str(tmp_path))
    assert out.returncode == 2
    (line,) = out.stderr.decode().splitlines()  # the only problem
    assert line.startswith("pop3frame: " + message.format(f=config)), out.stderr
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("args,message", [
    (("serve", "--config", "/nonexistent.toml"), "pop3frame: /nonexistent.toml: No such file or directory"),
    (("serve", "--listen", "1.2.3.4"), "pop3frame: serve: argument --listen: expected HOST:PORT"),
    (("serve", "--demo", "--sqlite", "x.db"), "pop3frame: serve: argument --sqlite: not allowed with argument --demo"),
    (("serve", "--adapter", "nocolon"), "pop3frame: --adapter: type: expected one of"),
    (("serve", "--adapter", "x.py:Cls"), "pop3frame: --adapter: no such file: x.py"),
    (("serve", "--demo", "--adapter-option", "novalue"), "pop3frame: serve: argument --adapter-option: expected key=value"),
    (("serve", "--demo", "--tls-listen", "127.0.0.1:0"), "pop3frame: TLS needs both --cert FILE and --key FILE"),
    (("serve", "--demo", "--user", "no-such-user-xyz"), "pop3frame: --user: no such user 'no-such-user-xyz'"),
    (("serve", "--demo", "--shutdown-grace", "-1"), "pop3frame: --shutdown-grace: expected seconds >= 0"),
    (("serve", "--demo", "--log-level", "LOUD"), "pop3frame: serve: argument --log-level: invalid choice"),
    (("serve", "--demo", "--listen", "127.0.0.1:0", "--pid-file", "/nonexistent/dir/p.pid"),
     "pop3frame: --pid-file: /nonexistent/dir/p.pid"),
    (("frobnicate",), "pop3frame: argument COMMAND: invalid choice"),
    (("user", "--postgres", "postgresql://nobody@127.0.0.1:1/none", "list"), "pop3frame: --postgres: "),
    (("passwd", "/nonexistent/dir/passwd", "bob", "--password-stdin"), "pop3frame: "),
])
def test_more_operator_mistakes_are_one_line(tmp_path, args, message):
    out = pop3frame(*on_port_0(args), input=b"pw\n", cwd=str(tmp_path))
    err = out.stderr.decode()
    assert out.returncode == 2, err
    assert err.startswith(message), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_user_subcommand_options_after_the_action(tmp_path):
    db = str(tmp_path / "u.db")
    assert pop3frame("user", "add", "--sqlite", db, "ann", "--password-stdin", input=b"pw\n").returncode == 0
    assert pop3frame("deliver", "ann", "--sqlite", db, input=b"Subject: hi\n\nhello\n").returncode == 0
    assert pop3frame("user", "list", "--sqlite", db).stdout == b"ann\t1 message\t22 octets\n"
    assert pop3frame("user", "del", "--sqlite", db, "ann").returncode == 0
    assert pop3frame("user", "list", "--sqlite", db).stdout == b""


def test_tls_listeners_from_a_config_file(tmp_path):
    import poplib

    cert, key, context = tls_files(tmp_path)
    config = write_config(tmp_path, """
        [[listener]]
        address = "127.0.0.1:0"
        [[listener]]
        address = "127.0.0.1:0"
        tls = true
        [tls]
        cert = "%s"
        key = "%s"
        [adapter]
        type = "demo"
    """ % (cert, key))
    with Daemon("--config", config, listeners=2) as d:
        plain, secure = d.ports
        assert d.saw(r"port %d \(STLS offered\)" % plain) and d.saw(r"port %d \(TLS\)" % secure)
        pops = poplib.POP3_SSL("127.0.0.1", secure, context=context, timeout=10)
        pops.user("demo")
        assert pops.pass_("demo").startswith(b"+OK")
        pops.quit()
        client = poplib.POP3("127.0.0.1", plain, timeout=10)
        assert "STLS" in client.capa()
        client.quit()
        assert d.stop() == 0


BLOCK_PSYCOPG = ("import sys; sys.modules['psycopg'] = sys.modules['psycopg_pool'] = None; "
                 "from pop3frame.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("args,prefix", [
    (("user", "list", "--postgres", "postgresql://u@127.0.0.1:1/mail"), "pop3frame: --postgres: "),
    (("deliver", "ops", "--postgres", "postgresql://u@127.0.0.1:1/mail"), "pop3frame: --postgres: "),
    (("serve", "--postgres", "postgresql://u@127.0.0.1:1/mail"), "pop3frame: postgres: adapter not available: "),
])
def test_postgres_without_psycopg_says_what_to_install(args, prefix):
    """In an interpreter where psycopg cannot be imported (None in
    sys.modules makes every import of it fail), the one line names the extra
    to install instead of claiming it cannot connect: for the README's
    checkout and venv, the command that installs it there (``pip`` is not on
    the PATH, and pop3frame comes from the checkout, not from an index)."""
    out = subprocess.run([sys.executable, "-c", BLOCK_PSYCOPG, *on_port_0(args)], input=b"Subject: x\n\nx\n",
                         capture_output=True, timeout=60, cwd=ROOT)
    err = out.stderr.decode()
    assert out.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(prefix + "the PostgreSQL store needs psycopg 3 and psycopg_pool"), err
    python = os.path.relpath(sys.executable, ROOT)  # .venv/bin/python in the README's set-up
    assert err.endswith(": %s -m pip install -e '.[postgres]'\n" % python) and "cannot connect" not in err


def test_install_hint_for_a_checkout_and_for_an_installed_package(tmp_path, monkeypatch):
    """Outside the checkout its path is absolute; a pop3frame installed from
    an index (no setup.cfg beside the package) is installed by name."""
    from pop3frame import extras

    monkeypatch.chdir(tmp_path)
    assert extras.install_hint("feeds") == "%s -m pip install -e '%s[feeds]'" % (sys.executable, ROOT)
    monkeypatch.setattr(extras, "_ROOT", str(tmp_path))
    assert extras.install_hint("feeds") == "%s -m pip install 'pop3frame[feeds]'" % sys.executable


def test_check_config_names_the_adapter_type_when_its_extra_is_missing(tmp_path):
    """The missing driver is the fault of ``type = "postgres"`` (its line), not of a key named postgres."""
    config = write_config(tmp_path, '[adapter]\ntype = "postgres"\ndsn = "postgresql://u@127.0.0.1:1/mail"\n')
    out = subprocess.run([sys.executable, "-c", BLOCK_PSYCOPG, "check-config", config], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith("pop3frame: %s:2: adapter.type: postgres: adapter not available: " % config)
