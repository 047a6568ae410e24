"""The code in README.rst runs as shown: a stale README is a failing test."""
from __future__ import annotations

import pathlib
import re
import shlex
import signal
import subprocess
import sys

import pytest

from pop3frame import client
from pop3frame.adapters.memory import MemoryAdapter
from pop3frame.cli import build_parser
from pop3frame.testing import Controller

from .helpers import README, RawClient, literal_block
from .processes import Daemon, Piped, pop3frame

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
    assert ".venv/bin/python -m pytest test_myserver.py" in pathlib.Path(README).read_text(encoding="utf-8")
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


@pytest.mark.parametrize("second", ["at once", "while it stops"])
def test_myserver_script_pressed_ctrl_c_twice(tmp_path, second):
    """A second Ctrl-C while it stops is ignored (status 0), or, landing after
    it stopped, ends Python as Ctrl-C does (status 130, -SIGINT here): never
    a traceback, never a half-closed session."""
    script = literal_block("# myserver.py").replace('("127.0.0.1", 1100)', '("127.0.0.1", 0)')
    (tmp_path / "myserver.py").write_text(script)
    with Piped([sys.executable, "myserver.py"], cwd=str(tmp_path)) as p:
        p.wait_for(r"listening on 127\.0\.0\.1 port \d+$")
        p.signal(signal.SIGINT)
        if second == "while it stops":
            p.wait_for(r"interrupted: stopped listening")
        p.signal(signal.SIGINT)
        assert p.proc.wait(30) in (0, -signal.SIGINT)
        rest = "".join(p.seen) + p.rest()
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest
    assert rest.count("interrupted: stopped listening") == 1, rest
