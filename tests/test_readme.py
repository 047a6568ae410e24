"""The code in README.rst runs as shown: a stale README is a failing test."""
from __future__ import annotations

import os
import re
import shlex
import textwrap

from pop3frame import client
from pop3frame.adapters.memory import MemoryAdapter
from pop3frame.cli import build_parser
from pop3frame.testing import Controller

from .helpers import RawClient
from .processes import Daemon, pop3frame

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.rst")


def literal_block(starts_with: str) -> str:
    """The reStructuredText literal block whose first line starts with ``starts_with``."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    for block in re.findall(r"::\n\n((?:(?: {4}.*)?\n)+)", text):
        code = textwrap.dedent(block)
        if code.startswith(starts_with):
            return code
    raise AssertionError("no literal block starting with %r in README.rst" % starts_with)


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


def test_testing_section_runs_against_the_readme_adapter(tmp_path):
    """The "Testing your adapter" snippet passes against the adapter it tests."""
    namespace: dict = {"__name__": "myserver"}
    exec(compile(literal_block("# myserver.py"), "myserver.py", "exec"), namespace)
    test_code = literal_block("from pop3frame.testing import Controller")
    namespace.update(Controller=Controller)
    exec(compile(test_code, "README-test", "exec"), namespace)
    namespace["test_reports"]()  # raises AssertionError if stat() is not (1, 39)


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
