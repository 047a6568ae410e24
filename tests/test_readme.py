"""The code in README.rst runs as shown: a stale README is a failing test."""
from __future__ import annotations

import os
import pathlib
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys

from pop3frame import client
from pop3frame.adapters.memory import MemoryAdapter
from pop3frame.cli import build_parser
from pop3frame.testing import Controller

from .helpers import README, RawClient, literal_block
from .processes import Daemon, Piped, pop3frame

def test_quick_start_session_as_shown(tmp_path):
    """The quick start's telnet session, line by line, against ``pop3frame
    serve`` on a new ./pop3frame.db: the same replies, but for the parts the
    README says differ.  The unique-id (RFC 1939 section 7, UIDL) is the
    store's id, the message's number and a part drawn at delivery: the README
    showed ``6f2a91c3.2`` long after the random part was added."""
    shown = literal_block("$ telnet localhost 1100").splitlines()[1:]
    uid = re.search(r"^\+OK 2 (\w+)\.2\.(\w+)$", "\n".join(shown), re.M)
    assert uid, shown
    text = pathlib.Path(README).read_text(encoding="utf-8")
    assert "is the store's id (``%s``" % uid.group(1) in text
    with Daemon("--listen", "127.0.0.1:0", cwd=str(tmp_path)) as d:
        with sqlite3.connect(str(tmp_path / "pop3frame.db")) as db:
            (store_id,) = db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        db.close()

        def expected(line: str) -> str:
            pattern = re.escape(line).replace(uid.group(1), store_id).replace(uid.group(2), "[0-9a-f]{8}")
            return pattern.replace("myhost", re.escape(socket.gethostname()))

        with RawClient(("127.0.0.1", d.port)) as c:
            assert re.fullmatch(expected(shown[0]), c.greeting.decode().rstrip("\r\n"))
            commands = 0
            for line in shown[1:]:
                if not line.startswith(("+OK", "-ERR")) and re.match(r"[A-Z]{3,4}( |$)", line):
                    c.send(line.encode() + b"\r\n")
                    commands += 1
                else:
                    got = c.line().decode().rstrip("\r\n")
                    assert re.fullmatch(expected(line), got), (line, got)
            assert commands == 6 and c.read_all() == b""
        assert d.stop() == 0


def test_quick_start_log_names_a_client_that_is_there(tmp_path):
    """``.venv/bin/pop3frame serve`` on a fresh machine: the log's "try:"
    line said ``telnet localhost 1100``, which a machine with only python3
    lacks.  It now gives the client as it was started, and that command,
    run as printed, logs in as demo."""
    script = os.path.relpath(os.path.join(os.path.dirname(sys.executable), "pop3frame"), str(tmp_path))
    with Piped([script, "serve", "--listen", "127.0.0.1:0"], cwd=str(tmp_path)) as p:
        hint = p.wait_for(r"added user 'demo' .*; try: (\S+ client localhost:(\d+)) \(or telnet localhost \2\)$")
        assert hint.group(1).startswith(script + " client ")
        p.wait_for(r"listening on 127\.0\.0\.1 port %s$" % hint.group(2))
        out = subprocess.run(shlex.split(hint.group(1)), input=b"USER demo\nPASS demo\nQUIT\n", cwd=str(tmp_path),
                             capture_output=True, timeout=60)
        assert out.returncode == 0, out
        assert b"+OK demo's maildrop has 3 messages (683 octets)\r\n" in out.stdout
        p.signal(signal.SIGTERM)
        assert p.proc.wait(30) == 0


def test_myserver_script_through_the_cli(tmp_path):
    """``pop3frame serve --adapter myserver.py:ReportAdapter`` serves the README's adapter."""
    script = tmp_path / "myserver.py"
    script.write_text(literal_block("# myserver.py"))
    with Daemon("--adapter", "%s:ReportAdapter" % script, "--listen", "127.0.0.1:0") as d:
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("ops", "secret") == b"+OK ops's maildrop has 1 message (39 octets)\r\n"
            c.send(b"RETR 1\r\n")
            assert c.multiline() == b"+OK 39 octets\r\nSubject: nightly report\r\n\r\nAll green.\r\n.\r\n"
            assert c.cmd("DELE 1").startswith(b"-ERR [SYS/PERM]")
        assert d.stop() == 0


def test_testing_section_passes_with_every_warning_an_error(tmp_path):
    """The "Testing your adapter" file, next to myserver.py, run the way the
    README says and under ``-X dev -W error``: both tests pass, no socket is
    left for the garbage collector (a ResourceWarning would fail them)."""
    (tmp_path / "myserver.py").write_text(literal_block("# myserver.py"))
    (tmp_path / "test_myserver.py").write_text(literal_block("# test_myserver.py"))
    text = " ".join(pathlib.Path(README).read_text(encoding="utf-8").split())
    assert ".venv/bin/python -m pytest test_myserver.py" in text
    strict = re.search(r"``(\S+) -X dev -m pytest -W error test_myserver.py``", text)
    assert strict and strict.group(1) == ".venv/bin/python", "the -X dev command as the README writes it"
    out = subprocess.run([sys.executable, "-X", "dev", "-m", "pytest", "-W", "error", "-p", "no:cacheprovider",
                          "-q", "test_myserver.py"], cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 passed" in out.stdout and "warning" not in out.stdout.lower(), out.stdout


def test_myserver_script_run_directly_logs_and_stops_on_ctrl_c(tmp_path):
    """``.venv/bin/python myserver.py``: a "listening on" line, the adapter
    served, and SIGINT (Ctrl-C) ends it with exit status 0 and no traceback."""
    script = literal_block("# myserver.py").replace('("127.0.0.1", 1100)', '("127.0.0.1", 0)')
    assert script != literal_block("# myserver.py")
    (tmp_path / "myserver.py").write_text(script)
    with Piped([sys.executable, "myserver.py"], cwd=str(tmp_path)) as p:
        port = int(p.wait_for(r"^\S+ \S+ INFO pop3frame\.server listening on 127\.0\.0\.1 port (\d+)$").group(1))
        with RawClient(("127.0.0.1", port)) as c:
            assert c.login("ops", "secret") == b"+OK ops's maildrop has 1 message (39 octets)\r\n"
            p.signal(signal.SIGINT)
            assert p.proc.wait(30) == 0
            assert c.read_all() == b""  # the session was ended, not left hanging
        rest = p.rest()
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest
    assert re.fullmatch(r"(\S+ \S+ INFO pop3frame\.\S+ .*\n)+", rest), rest
    assert "interrupted: stopped listening on 127.0.0.1 port %d\n" % port in rest


def test_myserver_script_pressed_ctrl_c_twice(tmp_path):
    """Ctrl-C pressed again while the first one stops the server is ignored:
    exit status 0, no traceback, the session closed once.  The second press
    comes from the adapter itself, when the stopping ends the session."""
    script = literal_block("# myserver.py").replace('("127.0.0.1", 1100)', '("127.0.0.1", 0)')
    script = script.replace("ReportAdapter()", "PressedTwice()").replace('if __name__ == "__main__":', """
class PressedTwice(ReportAdapter):
    def close_mailbox(self, username):
        import os, signal
        os.kill(os.getpid(), signal.SIGINT)

if __name__ == "__main__":""")
    (tmp_path / "myserver.py").write_text(script)
    with Piped([sys.executable, "myserver.py"], cwd=str(tmp_path)) as p:
        port = int(p.wait_for(r"listening on 127\.0\.0\.1 port (\d+)$").group(1))
        with RawClient(("127.0.0.1", port)) as c:
            assert c.login("ops", "secret").startswith(b"+OK")
            p.signal(signal.SIGINT)
            assert p.proc.wait(30) == 0
            assert c.read_all() == b""
        rest = "".join(p.seen) + p.rest()
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest
    assert rest.count("interrupted: stopped listening") == 1, rest


def test_testing_by_hand_commands_run_as_written():
    """The "Testing by hand" commands parse as written, and the pipeline one talks to a server."""
    block = literal_block(".venv/bin/pop3frame client")
    lines = [line.split("  #")[0] for line in block.splitlines() if line.strip()]
    parser = build_parser()
    for line in lines:
        words = shlex.split(line.split("|")[-1])
        assert words[:2] == [".venv/bin/pop3frame", "client"], line
        assert parser.parse_args(words[1:]).func is client.run
    pipeline = lines[-1]
    printed, command = pipeline.split("|")
    with Controller(MemoryAdapter({}, apop=False)) as server:
        result = pop3frame(*shlex.split(command)[1:-1], "127.0.0.1:%d" % server.port,
                           input=shlex.split(printed)[1].replace("\\n", "\n").encode())
    assert result.returncode == 0 and result.stdout.startswith(b"+OK POP3 server ready\r\n+OK Capability")
    verdict = literal_block("$ .venv/bin/pop3frame client --check").strip().splitlines()[-1]
    assert re.fullmatch(r"OK: logged in as \w+, [\d,]+ messages?, [\d,]+ octets, TLS 1\.\d, "
                        r"certificate expires \d{4}-\d\d-\d\d \(in [\d,]+ days?\)", verdict)


def test_every_python_command_runs_the_venvs_python():
    """A machine with only python3 has no ``python`` command, and the
    system's Python has neither pytest nor pop3frame: the README said
    ``python -X dev -m pytest -W error``.  Every command in README.rst and
    docs/*.rst runs ``.venv/bin/python`` (or ``python3`` to make the venv)."""
    for document in [README, *sorted(pathlib.Path(README).parent.joinpath("docs").glob("*.rst"))]:
        text = pathlib.Path(document).read_text(encoding="utf-8")
        # (a Dockerfile's own pip, quoted as such, runs in the image)
        bare = re.findall(r"(?:(?<!Dockerfile's )``|^ {4,}|\| )(?:python|pip)\b(?!3)[^`\n]*", text, re.M)
        assert bare == [], (str(document), bare)


def test_trying_tls_on_loopback_as_written(tmp_path):
    """The TLS section's try: trustme's certificate, serve with both
    listeners, the client with --starttls verifying against trustme's CA.
    ``--tls-listen`` alone serves POP3S alone: the default plain listener
    is there only while no listener is named, which the README now says
    (it said "adds")."""
    block = literal_block(".venv/bin/python -m trustme")
    make, serve, client_line = [line.split("  #")[0] for line in block.splitlines() if line.strip()]
    assert subprocess.run([sys.executable, *shlex.split(make)[1:]], cwd=str(tmp_path), capture_output=True,
                          timeout=60).returncode == 0
    args = shlex.split(serve)[2:]
    assert args[:2] == ["--listen", "127.0.0.1:1100"] and args[2:4] == ["--tls-listen", "127.0.0.1:1995"]
    args[1], args[3] = "127.0.0.1:0", "127.0.0.1:0"
    with Daemon(*args, cwd=str(tmp_path), listeners=2) as d:
        plain = d.ports[0]
        words = shlex.split(client_line)[1:]
        assert words[-1] == "127.0.0.1:1100"
        out = pop3frame(*words[:-1], "127.0.0.1:%d" % plain, input=b"CAPA\nQUIT\n", cwd=str(tmp_path))
        assert out.returncode == 0, out
        assert b"+OK Begin TLS negotiation\r\n" in out.stdout
        assert b"certificate verified for 127.0.0.1" in out.stderr
        assert d.stop() == 0
    with Daemon(*args[2:], cwd=str(tmp_path)) as d:  # --tls-listen without --listen
        assert d.stop() == 0
        logged = "".join(d.seen) + d.rest()
    assert logged.count("listening on") == 1 and "(TLS)" in logged, logged
