"""The pop3frame command, run as a real subprocess."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from tests.helpers import RawClient


def start_server(*args: str) -> "tuple[subprocess.Popen, int]":
    proc = subprocess.Popen(
        [sys.executable, "-m", "pop3frame", "serve", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    for line in proc.stderr:
        m = re.search(r"listening on \S+ port (\d+)", line)
        if m:
            return proc, int(m.group(1))
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
