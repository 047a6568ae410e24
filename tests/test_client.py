"""``pop3frame client``: the line client and ``--check``, against pop3frame, Dovecot and hostile peers."""
from __future__ import annotations

import contextlib
import datetime
import io
import os
import pty
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import tracemalloc

import pytest
import trustme

from pop3frame import client, x509
from pop3frame.adapters.memory import MemoryAdapter
from pop3frame.client import CheckFailed, ClientConnection, ClientError, Lines, Output
from pop3frame.protocol import wire_size
from pop3frame.session import Session, SessionContext
from pop3frame.testing import Controller
from pop3frame.tls import TLSCertificates
from tests.dovecot import Dovecot, require as require_dovecot
from tests.helpers import RawClient, free_port
from tests.processes import Daemon, Piped, pop3frame

NOT_AFTER = datetime.datetime(2031, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
#: The client's wall clock in the tests: 31 days before the certificate expires.
NOW = (NOT_AFTER - datetime.timedelta(days=31)).timestamp()
MESSAGES = [
    b"Subject: one\r\n\r\nfirst\r\n",
    b"Subject: two\r\n\r\n.dotted\r\nsecond\r\n",  # byte-stuffed on the wire
    b"Subject: three\n\nthird\n",  # LF only: CRLF on the wire
]
OCTETS = sum(wire_size(m) for m in MESSAGES)
GREETING = b"+OK POP3 server ready\r\n"


def store() -> MemoryAdapter:
    adapter = MemoryAdapter({"alice": "alice-pw"}, apop=False)
    for n, message in enumerate(MESSAGES, 1):
        adapter.deliver("alice", message, uid="uid-%d" % n)
    return adapter


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def pki(ca, tmp_path_factory):
    """A server certificate for localhost and 127.0.0.1 expiring at NOT_AFTER, and its CA file."""
    d = tmp_path_factory.mktemp("pki")
    leaf = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost", not_after=NOT_AFTER.replace(tzinfo=None))
    leaf.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(d / "key.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return {"cert": str(d / "cert.pem"), "key": str(d / "key.pem"), "ca": str(d / "ca.pem")}


@pytest.fixture
def tls(pki):
    return TLSCertificates(pki["cert"], pki["key"])


def converse(address, commands: bytes, **options):
    """Run the line client in-process on ``commands``: (exit status, stdout, stderr)."""
    stdout, stderr = io.BytesIO(), io.BytesIO()
    context = options.pop("context", None) or client.tls_context(insecure=True)
    starttls = options.pop("starttls", False)
    with ClientConnection(address, **options) as conn:
        status = client.converse(conn, Lines(io.BytesIO(commands)), Output(stdout, stderr, terminal=False),
                                 context=context, starttls=starttls, clock=lambda: NOW)
    return status, stdout.getvalue(), stderr.getvalue().decode()


def wire_transcript(address, commands) -> bytes:
    """What a raw socket receives for ``commands``: (line, multi-line?) pairs."""
    with RawClient(address) as raw:
        out = raw.greeting
        for line, is_multiline in commands:
            status = raw.cmd(line)
            out += status
            if is_multiline and status.startswith(b"+OK"):
                out += raw.multiline()
    return out


# -- which replies are multi-line -------------------------------------------------


@pytest.mark.parametrize("command, expected", [
    (b"CAPA", True), (b"RETR 1", True), (b"TOP 1 0", True),  # RFC 2449 section 5; RFC 1939 sections 5, 7
    (b"LIST", True), (b"LIST 1", False), (b"UIDL", True), (b"UIDL 1", False),  # RFC 1939 sections 5, 7
    (b"LANG", True), (b"LANG en", False),  # RFC 6856 section 3
    (b"AUTH", True), (b"AUTH PLAIN", False), (b"list ", True), (b"stat", False), (b"QUIT", False), (b"", False),
])
def test_which_replies_are_multiline_rfc1939_2449_6856(command, expected):
    assert client.multiline(command) is expected


# -- the line client: exact output ------------------------------------------------

SESSION = [("CAPA", True), ("USER alice", False), ("PASS alice-pw", False), ("LIST", True), ("LIST 2", False),
           ("UIDL", True), ("TOP 3 0", True), ("RETR 2", True), ("RETR 9", True), ("LANG", True), ("QUIT", False)]


def test_pipeline_prints_exactly_the_wire_bytes_rfc1939_section_3():
    """Commands on stdin, no tty: stdout is byte for byte what the server sent, multi-line
    replies byte-stuffed with their terminating dot; exit 1 because RETR 9 got -ERR."""
    commands = b"".join(line.encode() + b"\n" for line, _ in SESSION)
    with Controller(store()) as server:
        result = pop3frame("client", "127.0.0.1:%d" % server.port, input=commands)
        expected = wire_transcript(server.address, SESSION)
    assert result.stdout == expected
    assert result.stdout.startswith(GREETING)
    assert b"\r\n\r\n..dotted\r\nsecond\r\n.\r\n" in result.stdout  # shown stuffed, as sent
    assert b"pop3>" not in result.stdout and result.stderr == b""
    assert result.returncode == client.EXIT_REFUSED


def test_pipeline_exit_0_when_every_reply_is_ok_and_input_may_end_without_quit():
    """End of input without QUIT closes the connection: RFC 1939 section 6, nothing deleted."""
    adapter = store()
    with Controller(adapter) as server:
        result = pop3frame("client", "127.0.0.1:%d" % server.port, input=b"USER alice\r\nPASS alice-pw\r\n\nDELE 1\n")
        assert server.wait_for_connections(0)
    assert result.returncode == 0, result
    assert result.stdout.count(b"+OK") == 4
    assert len(adapter.messages("alice")) == 3


def test_sasl_exchange_is_passed_through_rfc5034_section_4():
    """AUTH PLAIN: the "+ " continuation is shown, the next line answers it (not a command)."""
    import base64

    token = base64.b64encode(b"\0alice\0alice-pw")
    with Controller(store()) as server:
        status, out, _ = converse(server.address, b"AUTH PLAIN\n" + token + b"\nSTAT\nQUIT\n")
    lines = out.split(b"\r\n")
    assert lines[1].startswith(b"+ ") or lines[1] == b"+"
    assert lines[2].startswith(b"+OK") and lines[3] == b"+OK 3 %d" % OCTETS
    assert status == 0


# -- TLS ----------------------------------------------------------------------------


def test_implicit_tls_with_cafile_rfc8314_shows_the_certificate(tls, pki):
    with Controller(store(), tls=tls, secure=True) as server:
        status, out, notes = converse(server.address, b"CAPA\nQUIT\n", context=client.tls_context(pki["ca"]),
                                      tls=client.tls_context(pki["ca"]))
    assert status == 0 and out.startswith(GREETING) and b"\r\nSTLS\r\n" not in out
    assert re.search(r"^\* TLS 1\.[23] \(\S+\), certificate verified for 127\.0\.0\.1$", notes, re.M), notes
    assert "* subject: O=trustme" in notes and notes.count("CN=localhost") == 1
    assert "* names: DNS:localhost, IP:127.0.0.1\n" in notes
    assert "* expires: 2031-05-06 (in 31 days)\n" in notes


def test_implicit_tls_insecure_accepts_and_still_shows_a_self_signed_certificate(tls):
    with Controller(store(), tls=tls, secure=True) as server:
        status, out, notes = converse(server.address, b"QUIT\n", tls=client.tls_context(insecure=True))
    assert status == 0 and out.startswith(GREETING)
    assert "certificate NOT verified (--insecure)" in notes and "* names: DNS:localhost" in notes


def test_unknown_ca_is_refused_with_a_hint(tls):
    """RFC 8314 section 5.3: a certificate that cannot be validated is not accepted (exit 2)."""
    with Controller(store(), tls=tls, secure=True) as server:
        with pytest.raises(ClientError) as info:
            ClientConnection(server.address, tls=client.tls_context())  # the system's CAs only
    assert info.value.exit_status == client.EXIT_FAILED
    assert "not accepted" in str(info.value) and "--cafile" in str(info.value) and "--insecure" in str(info.value)


def test_host_name_mismatch_is_refused_rfc7817(ca, tmp_path):
    leaf = ca.issue_cert("mail.example.com")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    tls = TLSCertificates(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    with Controller(store(), tls=tls, secure=True) as server:
        with pytest.raises(ClientError, match="not accepted: .*(mismatch|match)"):
            ClientConnection(server.address, tls=client.tls_context(str(tmp_path / "ca.pem")))


def test_certificate_notes_are_shortened(ca):
    """A certificate with 3,000 names and a 60 KB organisation: each note is one short line."""
    leaf = ca.issue_cert(*("h%d.example" % n for n in range(3000)), organization_name="O" * 60000)
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode("ascii"))
    notes = client.TLSInfo("TLS 1.3", "X", True, x509.decode(der)).notes("h0.example", NOW)
    assert notes[2] == "names: " + ", ".join("DNS:h%d.example" % n for n in range(15))[:200] + "... (3,000 names)"
    assert notes[1].startswith("subject: O=OOO") and notes[1].endswith("...")
    assert max(len(note) for note in notes) < 250, notes


def test_starttls_continues_inside_tls_rfc2595_section_4(tls, pki):
    context = client.tls_context(pki["ca"])
    with Controller(store(), tls=tls) as server:
        status, out, notes = converse(server.address, b"CAPA\nUSER alice\nPASS alice-pw\nSTAT\nQUIT\n",
                                      context=context, starttls=True)
    assert out.startswith(GREETING + b"+OK Begin TLS negotiation\r\n")
    # The CAPA after STLS no longer offers it.
    assert b"+OK Capability list follows\r\n" in out and b"\r\nSTLS\r\n" not in out
    assert b"+OK 3 %d\r\n" % OCTETS in out and status == 0
    assert "certificate verified for 127.0.0.1" in notes


def test_typed_stls_also_continues_inside_tls(tls, pki):
    with Controller(store(), tls=tls) as server:
        status, out, notes = converse(server.address, b"STLS\nCAPA\nQUIT\n", context=client.tls_context(pki["ca"]))
    assert status == 0 and "verified" in notes and b"\r\nSTLS\r\n" not in out.split(b"Capability list")[1]


def test_starttls_refused_is_exit_1():
    with Controller(store()) as server:  # no certificate: STLS is answered -ERR
        with pytest.raises(CheckFailed, match="refused STLS: -ERR") as info:
            converse(server.address, b"QUIT\n", starttls=True)
    assert info.value.exit_status == client.EXIT_REFUSED


def test_plain_port_with_tls_is_a_clear_error(tls):
    with Controller(store()) as server:
        with pytest.raises(ClientError, match="TLS handshake with 127.0.0.1:%d failed: .*--starttls" % server.port):
            ClientConnection(server.address, tls=client.tls_context(insecure=True))


# -- --check --------------------------------------------------------------------


def run_check(address, password="alice-pw", user="alice", warnings=None, **options):
    starttls = options.pop("starttls", None)
    with ClientConnection(address, **options) as conn:
        return client.check(conn, user, password, starttls=starttls, clock=lambda: NOW,
                            warn=(warnings if warnings is not None else []).append)


def test_check_plain():
    with Controller(store()) as server:
        verdict = run_check(server.address)
        assert server.wait_for_connections(0)
    assert verdict == "OK: logged in as alice, 3 messages, %d octets, no TLS" % OCTETS


def test_check_implicit_tls_with_cafile(tls, pki):
    with Controller(store(), tls=tls, secure=True) as server:
        verdict = run_check(server.address, tls=client.tls_context(pki["ca"]))
    assert re.fullmatch(r"OK: logged in as alice, 3 messages, %d octets, TLS 1\.[23], "
                        r"certificate expires 2031-05-06 \(in 31 days\)" % OCTETS, verdict), verdict


def test_check_starttls_insecure(tls):
    with Controller(store(), tls=tls) as server:
        verdict = run_check(server.address, starttls=client.tls_context(insecure=True))
    assert verdict.endswith("certificate expires 2031-05-06 (in 31 days), certificate NOT verified (--insecure)")


def test_check_warns_before_a_password_goes_unencrypted_to_a_server_offering_stls_rfc2595(tls):
    """Without --starttls the check logs in as told, but says so first when STLS was there to use;
    with it, or where no STLS is offered, it says nothing."""
    for options, expected in (({}, ["warning: 127.0.0.1:%d offers STLS, yet the password goes unencrypted "
                                    "(--starttls sends it inside TLS)"]),
                              ({"starttls": client.tls_context(insecure=True)}, [])):
        warnings = []
        with Controller(store(), tls=tls, allow_plaintext_auth=True) as server:
            assert run_check(server.address, warnings=warnings, **options).startswith("OK: logged in as alice")
        assert warnings == [text % server.port for text in expected]
    warnings = []
    with Controller(store()) as server:
        run_check(server.address, warnings=warnings)
    assert warnings == []


def test_check_starttls_not_offered_fails_before_any_password_rfc2595_section_4():
    adapter = store()
    with Controller(adapter) as server:
        with pytest.raises(CheckFailed, match="does not offer STLS"):
            run_check(server.address, starttls=client.tls_context(insecure=True))


def test_check_wrong_password_is_exit_1_with_the_servers_reason():
    with Controller(store()) as server:
        with pytest.raises(CheckFailed) as info:
            run_check(server.address, password="wrong")
    assert str(info.value) == "login as alice refused: -ERR [AUTH] invalid user name or password"
    assert info.value.exit_status == client.EXIT_REFUSED


class NoUserSession(Session):
    """A server that offers SASL only, as some do once USER/PASS is switched off."""

    def capabilities(self):
        return [c for c in super().capabilities() if c != "USER"]


def test_check_logs_in_with_auth_plain_when_user_is_not_offered_rfc5034_rfc4616():
    context = SessionContext(store(), session_class=NoUserSession)
    with Controller(context) as server:
        verdict = run_check(server.address)
    assert verdict.startswith("OK: logged in as alice, 3 messages")


def test_check_with_utf8_credentials_rfc6856_section_2():
    adapter = MemoryAdapter({"jörg": "pässwort"}, apop=False)
    with Controller(adapter) as server:
        verdict = run_check(server.address, user="jörg", password="pässwort")
    assert verdict == "OK: logged in as jörg, 0 messages, 0 octets, no TLS"


def test_check_subprocess_password_from_environment_exit_0():
    with Controller(store()) as server:
        result = pop3frame("client", "--check", "alice", "127.0.0.1:%d" % server.port,
                           env={"POP3_PASSWORD": "alice-pw"}, input=b"")
    assert result.returncode == 0, result
    assert result.stdout.decode() == "OK: logged in as alice, 3 messages, %d octets, no TLS\n" % OCTETS
    assert result.stderr == b""


def test_check_subprocess_password_from_stdin_when_no_variable():
    env = {k: v for k, v in os.environ.items() if k != "POP3_PASSWORD"}
    with Controller(store()) as server:
        result = subprocess.run([sys.executable, "-m", "pop3frame", "client", "--check", "alice",
                                 "127.0.0.1:%d" % server.port], input=b"alice-pw\n", capture_output=True,
                                env=env, timeout=60, start_new_session=True)
    assert result.returncode == 0 and result.stdout.startswith(b"OK: logged in as alice"), result


@pytest.mark.parametrize("password, status, reason", [
    ("wrong", 1, "FAIL: login as alice refused: -ERR [AUTH] invalid user name or password"),
    ("", 2, "FAIL: no password: set POP3_PASSWORD, or type it when asked"),
])
def test_check_subprocess_failures_are_one_line(password, status, reason):
    with Controller(store()) as server:
        result = pop3frame("client", "--check", "alice", "127.0.0.1:%d" % server.port,
                           env={"POP3_PASSWORD": password}, input=b"")
    assert (result.returncode, result.stdout, result.stderr.decode()) == (status, b"", reason + "\n")


@pytest.mark.parametrize("mode", [(), ("--check", "alice")])
def test_standard_output_that_fails_is_exit_2_in_one_line(mode):
    """Output to a full disk (/dev/full): exit 2 and one line, not a traceback that exits 1,
    the status of a server that refused."""
    with Controller(store()) as server, open("/dev/full", "wb") as full:
        result = subprocess.run([sys.executable, "-m", "pop3frame", "client", *mode, "127.0.0.1:%d" % server.port],
                                input=b"CAPA\nQUIT\n", stdout=full, stderr=subprocess.PIPE, timeout=60,
                                env=dict(os.environ, POP3_PASSWORD="alice-pw"))
    assert (result.returncode, result.stderr) == (2, b"pop3frame: client: cannot go on: No space left on device\n")


def test_check_connection_refused_is_exit_2_without_traceback():
    result = pop3frame("client", "--check", "alice", "127.0.0.1:%d" % free_port(),
                       env={"POP3_PASSWORD": "x"}, input=b"")
    assert result.returncode == 2
    assert result.stderr.decode() == "FAIL: cannot connect to 127.0.0.1:%s: Connection refused\n" % (
        result.args[-1].rsplit(":", 1)[1])


def test_line_client_connection_refused_is_one_line_exit_2():
    result = pop3frame("client", "[::1]:%d" % free_port("::1"), input=b"")
    assert result.returncode == 2
    assert re.fullmatch(r"pop3frame: client: cannot connect to \[::1\]:\d+: .+\n", result.stderr.decode())


def test_usage_errors_are_exit_2():
    assert pop3frame("client", "localhost").returncode == 2  # no port
    result = pop3frame("client", "--tls", "--starttls", "127.0.0.1:1")
    assert result.returncode == 2 and b"not allowed with" in result.stderr
    result = pop3frame("client", "--timeout", "0", "127.0.0.1:1")
    assert result.returncode == 2 and b"expected seconds > 0" in result.stderr
    result = pop3frame("client", "--cafile", "/nonexistent/ca.pem", "127.0.0.1:1", input=b"")
    assert result.returncode == 2 and result.stderr.startswith(b"pop3frame: client: cannot load --cafile")


class BlockingLogin(MemoryAdapter):
    """Holds each login until the test let it go (bounded), to look at the client meanwhile."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.arrived, self.release = threading.Event(), threading.Event()

    def authenticate(self, username, password):
        self.arrived.set()
        self.release.wait(20)
        return super().authenticate(username, password)


def test_password_never_appears_in_the_command_line():
    """While the server checks the password, /proc/<pid>/cmdline of the client holds no trace of
    it; there is no option that takes one."""
    adapter = BlockingLogin({"alice": "s3cret-pw"}, apop=False)
    with Controller(adapter) as server:
        proc = subprocess.Popen([sys.executable, "-m", "pop3frame", "client", "--check", "alice",
                                 "127.0.0.1:%d" % server.port], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=dict(os.environ, POP3_PASSWORD="s3cret-pw"))
        try:
            assert adapter.arrived.wait(30), "the client never sent PASS"
            with open("/proc/%d/cmdline" % proc.pid, "rb") as f:
                cmdline = f.read()
            adapter.release.set()
            out, err = proc.communicate(timeout=30)
        finally:
            adapter.release.set()
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert b"--check\0alice\0" in cmdline and b"s3cret" not in cmdline
    assert proc.returncode == 0 and out.startswith(b"OK: logged in as alice") and b"s3cret" not in out + err
    assert b"--password" not in pop3frame("client", "--help").stdout
    assert pop3frame("client", "--password", "x", "127.0.0.1:1").returncode == 2


# -- at a terminal --------------------------------------------------------------


class Pty:
    """``pop3frame client`` on a pseudo-terminal: ``expect`` what it shows, ``type`` at it."""

    def __init__(self, args, env, python_code=None):
        self.master, slave = pty.openpty()
        program = ["-c", python_code] if python_code else ["-m", "pop3frame"]
        # A new session has no controlling terminal: getpass falls back to
        # the pty on stdin instead of opening the /dev/tty of whoever runs pytest.
        self.proc = subprocess.Popen([sys.executable, *program, "client", *args], stdin=slave, stdout=slave,
                                     stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self.seen = b""

    def expect(self, text: bytes, count: int = 1, timeout: float = 60.0) -> None:
        """Wait until ``text`` was shown ``count`` times in all."""
        deadline = time.monotonic() + timeout
        while self.seen.count(text) < count:
            left = deadline - time.monotonic()
            assert left > 0, "no %r within %s s; the terminal shows:\n%r" % (text, timeout, self.seen)
            if select.select([self.master], [], [], left)[0]:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # EIO: the client exited
                    data = b""
                assert data, "the client exited before showing %r:\n%r" % (text, self.seen)
                self.seen += data

    def type(self, text: str) -> None:
        os.write(self.master, text.encode() + b"\r")

    def wait_blocked(self, timeout: float = 60.0) -> None:
        """Wait until the client sleeps in the kernel: once its prompt is shown
        that is the wait for input.  A SIGINT that comes between the prompt
        and that select() stays pending until the next keystroke: CPython's
        readline (and plain input()) look at signals only when the wait is
        interrupted."""
        deadline = time.monotonic() + timeout
        while True:
            with open("/proc/%d/stat" % self.proc.pid) as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state == "S":
                return
            assert time.monotonic() < deadline, "the client did not wait for input in %s s (state %s)" % (
                timeout, state)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(0.01)  # a pause that ends at once if the client exited
            assert self.proc.poll() is None, "the client exited at the prompt:\n%r" % self.seen

    def wait(self) -> int:
        try:
            while select.select([self.master], [], [], 60)[0]:  # drain, or the child blocks writing
                try:
                    data = os.read(self.master, 4096)
                except OSError:
                    break
                if not data:
                    break
                self.seen += data
            return self.proc.wait(60)
        finally:
            self.close()

    def close(self) -> None:
        """Kill the client if it still runs and close the terminal (again: nothing)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    def __enter__(self) -> "Pty":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # also when a test failed half-way, with the client still at its prompt


def terminal_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "POP3_PASSWORD"}
    env.update(HOME=str(tmp_path), XDG_STATE_HOME=str(tmp_path / "state"), TERM="dumb")
    return env


@pytest.mark.parametrize("readline", [True, False], ids=["readline", "no-readline"])
def test_interactive_session_at_a_terminal(tmp_path, readline):
    """Prompt, replies, PASS alone asks without echo; the history keeps commands but no
    password line; without readline it still works (and keeps no history)."""
    code = None if readline else (
        "import sys; sys.modules['readline'] = None; from pop3frame.cli import main; sys.exit(main())")
    with Controller(store()) as server:
        with Pty(["127.0.0.1:%d" % server.port], terminal_env(tmp_path), python_code=code) as term:
            term.expect(b"+OK POP3 server ready")
            term.expect(b"pop3> ")
            term.type("CAPA")
            term.expect(b"IMPLEMENTATION")
            term.type("USER alice")
            term.expect(b"send PASS")
            term.type("PASS wrong-pw")
            term.expect(b"-ERR [AUTH]")
            term.type("USER alice")
            term.expect(b"send PASS", count=2)
            term.type("PASS")
            term.expect(b"Password: ")
            term.type("alice-pw")
            term.expect(b"maildrop has 3 messages")
            term.type("QUIT")
            status = term.wait()
    assert status == client.EXIT_REFUSED  # the wrong password's -ERR
    assert b"alice-pw" not in term.seen and b"Traceback" not in term.seen
    history = tmp_path / "state" / "pop3frame" / "client_history"
    if readline:
        saved = history.read_text()
        assert "CAPA" in saved and "USER alice" in saved and "PASS" not in saved and "pw" not in saved
        assert history.stat().st_mode & 0o077 == 0
    else:
        assert not history.exists()


def test_ctrl_c_at_the_prompt_ends_cleanly(tmp_path):
    with Controller(store()) as server, Pty(["127.0.0.1:%d" % server.port], terminal_env(tmp_path)) as term:
        term.expect(b"pop3> ")
        term.type("NOOP")
        term.expect(b"-ERR")  # NOOP before login
        term.expect(b"pop3> ", count=2)
        term.wait_blocked()
        term.proc.send_signal(signal.SIGINT)
        status = term.wait()
        assert server.wait_for_connections(0)
    assert status == 130 and b"Traceback" not in term.seen
    assert "NOOP" in (tmp_path / "state" / "pop3frame" / "client_history").read_text()


def test_check_asks_for_the_password_at_a_terminal(tmp_path):
    """No POP3_PASSWORD: --check asks (getpass, no echo); Ctrl-D at the prompt is "no password"."""
    with Controller(store()) as server:
        with Pty(["--check", "alice", "127.0.0.1:%d" % server.port], terminal_env(tmp_path)) as term:
            term.expect(b"Password for alice: ")
            term.type("alice-pw")
            term.expect(b"OK: logged in as alice, 3 messages")
            assert term.wait() == 0
            assert b"alice-pw" not in term.seen  # not echoed
        with Pty(["--check", "alice", "127.0.0.1:%d" % server.port], terminal_env(tmp_path)) as term:
            term.expect(b"Password for alice: ")
            os.write(term.master, b"\x04")
            term.expect(b"FAIL: no password")
            assert term.wait() == client.EXIT_FAILED
    assert b"Traceback" not in term.seen


def test_terminal_output_cannot_drive_the_terminal():
    """On a terminal, escape sequences and stray CRs from the server are shown, not obeyed."""
    assert client.visible(b"+OK \x1b]0;pwned\x07 a\rb\tc\xc2\x9b2J\r\n") == (
        b"+OK \\x1b]0;pwned\\x07 a\\x0db\tc\\xc2\\x9b2J\r\n")
    assert client.visible("+OK grüße\r\n".encode()) == "+OK grüße\r\n".encode()


@pytest.mark.parametrize("sent, shown", [
    ("+OK \u202egnp.exe\r\n".encode(), b"+OK \\xe2\\x80\\xaegnp.exe\r\n"),  # a right-to-left override
    ("+OK a\u2066b\u2069c\u200fd\u061c\r\n".encode(),
     b"+OK a\\xe2\\x81\\xa6b\\xe2\\x81\\xa9c\\xe2\\x80\\x8fd\\xd8\\x9c\r\n"),  # isolates and marks
    (b"+OK \x9b2J \x9d0;x\x9c\r\n", b"+OK \\x9b2J \\x9d0;x\\x9c\r\n"),  # 8-bit C1: CSI, OSC, ST
    (b"+OK caf\xe9 \xff\xfe\r\n", b"+OK caf\\xe9 \\xff\\xfe\r\n"),  # not UTF-8
    (b"+OK \xc2", b"+OK \\xc2"),  # a C1 control's first byte at the end of a piece of a long line
    (b"\x08\x08\x00\x7f.\r\n", b"\\x08\\x08\\x00\\x7f.\r\n"),
])
def test_terminal_output_shows_bidi_controls_8bit_controls_and_non_utf8_bytes(sent, shown):
    """Nothing a server sends reorders the text on a terminal or reaches an 8-bit terminal as a control."""
    assert client.visible(sent) == shown
    stdout = io.BytesIO()
    Output(stdout, io.BytesIO(), terminal=True).server(sent)
    assert stdout.getvalue() == shown


def test_failure_lines_show_what_the_server_sent_escaped():
    """A -ERR text quoted in a FAIL line reaches the terminal (standard error) escaped."""
    capa = b"+OK\r\nUSER\r\n.\r\n"
    with Peer(canned(capa, b"-ERR \x1b[31mred \xe2\x80\xae evil \x9b2J\r\n")) as peer:
        with pytest.raises(CheckFailed) as info:
            run_check(peer.address)
    assert str(info.value) == "login as alice refused: -ERR \\x1b[31mred \\xe2\\x80\\xae evil \\x9b2J"


# -- hostile servers ------------------------------------------------------------------


class Peer:
    """A scripted server for the first connection on a loopback port: ``script(sock)``."""

    def __init__(self, script, tls=None):
        self.script, self.tls = script, tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.listener.settimeout(20)
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        with sock:
            sock.settimeout(20)
            try:
                self.script(sock)
            except OSError:
                pass  # the client gave up and hung up: how most scripts end

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.listener.close()
        self.thread.join(30)
        assert not self.thread.is_alive()


class SteppingClock:
    """A clock that moves ``step`` seconds each time it is read: deadlines pass
    after a known number of reads, whatever the machine's speed."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 1000.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def endless(sock, chunk):
    """Send ``chunk`` until the client hangs up (bounded: 1 GiB)."""
    for _ in range((1 << 30) // len(chunk)):
        sock.sendall(chunk)


def hold(sock):
    """Read and ignore everything until the client hangs up."""
    while sock.recv(65536):
        pass


def test_silent_server_times_out_with_a_hint():
    with Peer(hold) as peer:
        with ClientConnection(peer.address, timeout=30, clock=SteppingClock(5), poll_interval=0.01) as conn:
            with pytest.raises(ClientError, match=r"no complete reply from 127\.0\.0\.1:\d+ within 30 s "
                                                  r"\(a POP3S port\? then use --tls\)"):
                conn.reply_line()


def test_endless_multiline_reply_is_bounded_in_time_and_memory():
    def script(sock):
        sock.sendall(b"+OK\r\n")
        sock.recv(100)
        sock.sendall(b"+OK here it comes\r\n")
        endless(sock, b"1 uid\r\n" * 10000)

    with Peer(script) as peer:
        with ClientConnection(peer.address, timeout=30, clock=SteppingClock(0.01)) as conn:
            conn.reply_line()
            conn.send(b"UIDL")
            conn.reply_line()
            largest = 0
            with pytest.raises(ClientError, match="no complete reply .* within 30 s$"):
                for block in conn.body():
                    largest = max(largest, len(block), len(conn._in))
    assert 0 < largest <= client.MAX_LINE + client.RECV_SIZE


def test_huge_line_passes_in_pieces_in_bounded_memory():
    body = b"x" * (20 << 20)

    def script(sock):
        sock.sendall(b"+OK\r\n")
        sock.recv(100)
        sock.sendall(b"+OK\r\n" + body + b"\r\n.\r\n")
        sock.recv(100)

    with Peer(script) as peer:
        with ClientConnection(peer.address) as conn:
            conn.reply_line()
            conn.send(b"RETR 1")
            conn.reply_line()
            tracemalloc.start()
            try:
                received = sum(len(block) for block in conn.body())
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
    assert received == len(body) + 5
    assert peak < 8 * (client.MAX_LINE + client.RECV_SIZE), peak


def test_huge_status_line_is_refused():
    with Peer(lambda sock: endless(sock, b"+" * 65536)) as peer:
        with ClientConnection(peer.address) as conn:
            with pytest.raises(ClientError, match="a reply line longer than 65536 octets"):
                conn.reply_line()


def test_reply_without_crlf_then_close():
    def script(sock):
        sock.sendall(b"+OK hello")

    with Peer(script) as peer:
        with ClientConnection(peer.address) as conn:
            with pytest.raises(ClientError, match="closed the connection in the middle of a reply"):
                conn.reply_line()


def test_multiline_reply_is_shown_as_it_arrives_in_a_pipeline():
    """The first lines of a reply reach standard output (a pipe) while the
    server still holds back the rest: a slow RETR or UIDL shows progress.
    Python buffers a pipe's output unless told otherwise."""
    shown = threading.Event()

    def script(sock):
        sock.sendall(b"+OK ready\r\n")
        sock.recv(100)  # RETR 1
        sock.sendall(b"+OK 2 lines\r\nfirst line\r\n")
        shown.wait(30)  # the rest only once the client showed the first part
        sock.sendall(b"second line\r\n.\r\n")
        hold(sock)

    with Peer(script) as peer:
        # Unbuffered as a user's shell runs it: without PYTHONUNBUFFERED, which this environment may set.
        command = "printf 'RETR 1\\n' | env -u PYTHONUNBUFFERED %s -m pop3frame client 127.0.0.1:%d 1>&2" % (
            sys.executable, peer.address[1])
        with Piped(["/bin/sh", "-c", command]) as p:
            p.wait_for(r"^\+OK ready$")
            p.wait_for(r"^\+OK 2 lines$")
            p.wait_for(r"^first line$")
            shown.set()
            assert p.wait_for(r"^(\S+)").group(1) == "second"
            assert p.wait_for(r"^(\S+)").group(1) == "."
            assert p.proc.wait(30) == 0
            assert p.rest() == ""


def test_a_dot_after_a_bare_lf_ends_no_reply_however_it_arrives_rfc1939_section_3():
    """"abc\\n" then ".\\r\\n" in a later read ended the reply there; in one read it did not."""
    go = threading.Event()

    def script(sock):
        sock.sendall(b"+OK\r\n")
        sock.recv(100)
        sock.sendall(b"+OK\r\nabc\n")
        go.wait(20)
        sock.sendall(b".\r\nreal\r\n.\r\n")
        sock.recv(100)

    with Peer(script) as peer:
        with ClientConnection(peer.address) as conn:
            conn.reply_line()
            conn.send(b"LIST")
            conn.reply_line()
            blocks = conn.body()
            first = next(blocks)
            go.set()
            assert first + b"".join(blocks) == b"abc\n.\r\nreal\r\n.\r\n"


def test_not_a_pop3_server():
    with Peer(lambda sock: sock.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")) as peer:
        with pytest.raises(ClientError, match=r"not a POP3 reply \(neither \+OK nor -ERR\): SSH-2\.0"):
            converse(peer.address, b"QUIT\n")


def test_garbage_instead_of_a_tls_handshake():
    with Peer(lambda sock: endless(sock, bytes(range(256)) * 64)) as peer:
        with pytest.raises(ClientError, match="TLS handshake with 127.0.0.1:\\d+ failed"):
            ClientConnection(peer.address, tls=client.tls_context(insecure=True))


def test_stalled_tls_handshake_is_bounded():
    with Peer(hold) as peer:
        with pytest.raises(ClientError, match="TLS handshake with .* did not finish within 30 s"):
            ClientConnection(peer.address, tls=client.tls_context(insecure=True), clock=SteppingClock(5),
                             poll_interval=0.01)


def test_data_injected_after_the_stls_reply_is_refused():
    """A man in the middle appends a forged reply to the cleartext "+OK" of STLS: the client
    must not read it as if it came through TLS (the "STARTTLS injection" of CVE-2011-0411's family)."""
    def script(sock):
        sock.sendall(b"+OK ready\r\n")
        sock.recv(100)
        sock.sendall(b"+OK Begin TLS\r\n+OK Capability list follows\r\nUSER\r\n.\r\n")
        sock.recv(100)

    with Peer(script) as peer:
        with pytest.raises(ClientError, match="sent data after its STLS reply"):
            converse(peer.address, b"CAPA\n", starttls=True)


def test_plaintext_after_the_stls_reply_fails_the_handshake_without_a_wrong_hint():
    """+OK to STLS, then clear text instead of a handshake (RFC 2595 section 4): the handshake
    fails, nothing is read as a reply, and no '--starttls' hint is given to one who used it."""
    def script(sock):
        sock.sendall(b"+OK ready\r\n")
        sock.recv(100)
        sock.sendall(b"+OK Begin TLS\r\n")
        sock.recv(1000)  # the ClientHello
        sock.sendall(b"+OK Capability list follows\r\nUSER\r\n.\r\n")
        sock.recv(100)

    with Peer(script) as peer:
        with pytest.raises(ClientError) as info:
            converse(peer.address, b"CAPA\n", starttls=True)
    assert re.fullmatch(r"TLS handshake with 127\.0\.0\.1:\d+ failed: WRONG_VERSION_NUMBER", str(info.value))


def canned(*replies, heard=None):
    """A server that answers each line it receives with the next reply; the
    lines, without CRLF, are appended to ``heard`` when given."""
    def script(sock):
        sock.sendall(b"+OK ready\r\n")
        buffered = b""
        for reply in replies:
            while b"\n" not in buffered:
                data = sock.recv(1024)
                if not data:
                    return
                buffered += data
            line, buffered = buffered.split(b"\n", 1)
            if heard is not None:
                heard.append(line.rstrip(b"\r"))
            sock.sendall(reply)
    return script


def test_check_runs_capa_login_stat_uidl_quit_in_this_order():
    """The issue's smoke test, command by command: CAPA (RFC 2449 section 5),
    USER/PASS (RFC 1939 section 7), STAT, UIDL, QUIT; nothing else is sent."""
    heard = []
    replies = (b"+OK\r\nUSER\r\nUIDL\r\n.\r\n", b"+OK\r\n", b"+OK\r\n", b"+OK 2 20\r\n",
               b"+OK\r\n1 a\r\n2 b\r\n.\r\n", b"+OK bye\r\n")
    with Peer(canned(*replies, heard=heard)) as peer:
        assert run_check(peer.address) == "OK: logged in as alice, 2 messages, 20 octets, no TLS"
    assert heard == [b"CAPA", b"USER alice", b"PASS alice-pw", b"STAT", b"UIDL", b"QUIT"]


@pytest.mark.parametrize("uidl, reason", [
    (b"+OK\r\n1 a\r\n.\r\n", "UIDL lists 1 message, STAT said 2"),
    (b"+OK\r\n1 a\r\n2 b\r\n3 c\r\n.\r\n", "UIDL line 3 is wrong (STAT said 2 messages): 3 c"),
    (b"+OK\r\n1 a\r\n2 b c\r\n.\r\n", "UIDL line 2 is wrong (STAT said 2 messages): 2 b c"),
])
def test_check_catches_a_wrong_uidl_listing_rfc1939_section_7(uidl, reason):
    capa = b"+OK\r\nUSER\r\n.\r\n"
    with Peer(canned(capa, b"+OK\r\n", b"+OK\r\n", b"+OK 2 20\r\n", uidl, b"+OK\r\n")) as peer:
        with pytest.raises(CheckFailed) as info:
            run_check(peer.address)
    assert str(info.value) == reason


@pytest.mark.parametrize("stat", [b"+OK " + b"1" * 5000 + b" 5\r\n", b"+OK 0 " + b"9" * 5000 + b"\r\n",
                                  b"+OK -1 5\r\n", b"+OK 1\r\n"])
def test_check_refuses_a_stat_reply_that_is_not_two_numbers_rfc1939_section_5(stat):
    """Numbers of thousands of digits, beyond what int() takes, are a wrong reply (exit 1), not a traceback."""
    capa = b"+OK\r\nUSER\r\n.\r\n"
    with Peer(canned(capa, b"+OK\r\n", b"+OK\r\n", stat)) as peer:
        with pytest.raises(CheckFailed, match=r"^STAT reply is not '\+OK count size' \(RFC 1939 section 5\)"):
            run_check(peer.address)


def test_check_a_server_without_capa_uses_user_and_pass_rfc2449_section_5():
    """CAPA answered -ERR (an RFC 1939-only server): USER/PASS, which RFC 1939 servers have."""
    with Peer(canned(b"-ERR unknown command\r\n", b"+OK\r\n", b"+OK\r\n", b"+OK 0 0\r\n", b"+OK\r\n.\r\n",
                     b"+OK bye\r\n")) as peer:
        assert run_check(peer.address) == "OK: logged in as alice, 0 messages, 0 octets, no TLS"


# -- against pop3frame serve -------------------------------------------------------


def test_check_after_a_deploy_against_pop3frame_serve(pki):
    """The operator's smoke test against a running ``pop3frame serve`` with
    a certificate: --check over POP3S (RFC 8314) and over STLS on the plain
    listener (RFC 2595), both verified against the CA; a wrong password is
    exit 1 with the server's reason."""
    with Daemon("--demo", "--listen", "127.0.0.1:0", "--tls-listen", "127.0.0.1:0", "--cert", pki["cert"],
                "--key", pki["key"], listeners=2) as d:
        plain, secure = d.ports
        verdicts = [pop3frame("client", "--check", "demo", *options, "--cafile", pki["ca"], "127.0.0.1:%d" % port,
                              env={"POP3_PASSWORD": "demo"}, input=b"")
                    for options, port in ((["--tls"], secure), (["--starttls"], plain))]
        for result in verdicts:
            assert result.returncode == 0 and result.stderr == b"", result
            assert re.fullmatch(r"OK: logged in as demo, 3 messages, 683 octets, TLS 1\.[23], "
                                r"certificate expires 2031-05-06 \(in [\d,]+ days\)\n", result.stdout.decode())
        wrong = pop3frame("client", "--check", "demo", "--tls", "--cafile", pki["ca"], "127.0.0.1:%d" % secure,
                          env={"POP3_PASSWORD": "wrong"}, input=b"")
        assert (wrong.returncode, wrong.stdout) == (1, b"")
        assert wrong.stderr == b"FAIL: login as demo refused: -ERR [AUTH] invalid user name or password\n"
        assert d.stop() == 0


# -- against Dovecot ------------------------------------------------------------------


@pytest.fixture(scope="module")
def dovecot(pki):
    """Dovecot's POP3 server with STLS (offered, not required) and a user with two messages."""
    require_dovecot("pop3")
    server = Dovecot("pop3", cert=pki["cert"], key=pki["key"])
    try:
        server.add_user("carol", "carol-pw")
        server.drop("carol", MESSAGES[0])
        server.drop("carol", MESSAGES[2])
        server.start()
        yield server
    finally:
        server.cleanup()


def dovecot_check(dovecot, *options, password="carol-pw"):
    return pop3frame("client", "--check", "carol", *options, "127.0.0.1:%d" % dovecot.port,
                     env={"POP3_PASSWORD": password}, input=b"")


def test_check_against_dovecot_plain(dovecot):
    """Dovecot offers STLS: the password sent without it is said on standard error."""
    result = dovecot_check(dovecot)
    expected = "OK: logged in as carol, 2 messages, %d octets, no TLS\n" % (wire_size(MESSAGES[0]) + wire_size(MESSAGES[2]))
    warning = "* warning: 127.0.0.1:%d offers STLS, yet the password goes unencrypted (--starttls sends it inside TLS)\n"
    assert (result.returncode, result.stdout.decode(), result.stderr.decode()) == (0, expected, warning % dovecot.port), (
        dovecot.log)


def test_check_against_dovecot_with_stls_rfc2595(dovecot, pki):
    result = dovecot_check(dovecot, "--starttls", "--cafile", pki["ca"])
    assert result.returncode == 0, (result, dovecot.log)
    assert re.fullmatch(r"OK: logged in as carol, 2 messages, \d+ octets, TLS 1\.[23], "
                        r"certificate expires 2031-05-06 \(in [\d,]+ days\)\n", result.stdout.decode())


def test_check_against_dovecot_wrong_password(dovecot):
    result = dovecot_check(dovecot, password="wrong")
    assert result.returncode == 1
    assert re.fullmatch(r"\* warning: .* offers STLS, .*\nFAIL: login as carol refused: -ERR \[AUTH\] .+\n",
                        result.stderr.decode())


def test_line_client_against_dovecot_shows_multiline_replies(dovecot):
    commands = [("CAPA", True), ("USER carol", False), ("PASS carol-pw", False), ("LIST", True),
                ("RETR 2", True), ("QUIT", False)]
    result = pop3frame("client", "127.0.0.1:%d" % dovecot.port,
                       input=b"".join(c.encode() + b"\r\n" for c, _ in commands))
    assert result.returncode == 0, result
    assert result.stdout == wire_transcript(("127.0.0.1", dovecot.port), commands)
    assert b"\r\nSTLS\r\n" in result.stdout and b"Subject: three\r\n\r\nthird\r\n.\r\n" in result.stdout
