"""What docs/ tells an operator to build or run holds for this tree."""
from __future__ import annotations

import configparser
import io
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers import RawClient, literal_block, moved_into, require_program, tls_files
from tests.processes import Daemon, pop3frame

ROOT = pathlib.Path(__file__).resolve().parent.parent


def build_inputs():
    """Every file and directory ``pip install .`` reads, from setup.cfg itself."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    needed = {"pyproject.toml", "setup.cfg", "setup.py"}
    needed.add(cfg["metadata"]["long_description"].replace("file:", "").strip())
    needed.update(cfg["metadata"]["license_files"].split())
    needed.update(line.split("=")[1].strip() for line in cfg["options"]["package_dir"].strip().splitlines())
    return needed


@pytest.mark.parametrize("dockerfile", ["docs/Dockerfile", "docs/compose/Dockerfile"])
def test_dockerfile_copies_what_the_install_needs(dockerfile):
    """The image's ``pip install '.[...]'`` builds from what COPY put in /src:
    docs/Dockerfile lacked pyproject.toml, so its build did not go through
    the PEP 517 backend the repository declares."""
    copied = set()
    for line in (ROOT / dockerfile).read_text().splitlines():
        if line.startswith("COPY "):
            copied.update(p.rstrip("/") for p in line.split()[1:-1])
    assert build_inputs() <= copied, build_inputs() - copied
    assert re.search(r"^RUN pip install --no-cache-dir '\.\[", (ROOT / dockerfile).read_text(), re.M)


def dockerfile_commands(dockerfile: str) -> list:
    """The shell commands in a Dockerfile's comments (``#   command``, continued by a trailing backslash)."""
    commands, current = [], ""
    for line in (ROOT / dockerfile).read_text().splitlines():
        if not line.startswith("#   "):
            current = ""
            continue
        current += line[1:].strip()
        if current.endswith("\\"):
            current = current[:-1] + " "
        else:
            commands.append(current)
            current = ""
    return commands


def test_dockerfile_local_try_as_written(tmp_path):
    """docs/Dockerfile's local try, the container's /data a temporary directory
    and each ``docker exec`` run in it as WORKDIR: the store it names and the
    0.0.0.0 listener get no demo user (its comment promised demo/demo), the
    documented ``user add`` and ``deliver`` fill it, and ops logs in."""
    commands = dockerfile_commands("docs/Dockerfile")
    run = next(c for c in commands if c.startswith("docker run -d "))
    serve = shlex.split(run)
    serve = serve[serve.index("serve") + 1:]
    assert serve[:2] == ["--sqlite", "/data/pop3frame.db"] and "0.0.0.0:1100" in serve
    # Loopback stands in for Docker's bridge, where the container sees its clients come from.
    assert serve[serve.index("--trusted-network") + 1] == "172.16.0.0/12"
    moved = {"/data": str(tmp_path), "0.0.0.0:1100": "127.0.0.1:0", "172.16.0.0/12": "127.0.0.0/8"}
    serve = [moved.get(w, w).replace("/data/", str(tmp_path) + "/") for w in serve]
    with Daemon(*serve, cwd=str(tmp_path)) as d:
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("demo", "demo").startswith(b"-ERR [AUTH]")
        execs = [c for c in commands if "docker exec -i pop3frame pop3frame " in c]
        assert len(execs) == 2
        for command in execs:
            piped, _, inside = command.rpartition("docker exec -i pop3frame pop3frame ")
            words, _, here = inside.partition("<<<")
            if here:
                data = shlex.split(here)[0] + "\n"
            else:
                printf = shlex.split(piped.rstrip(" |"))
                assert printf[0] == "printf" and len(printf) == 2
                data = printf[1].replace("\\n", "\n")
            out = pop3frame(*shlex.split(words), input=data.encode(), cwd=str(tmp_path))
            assert out.returncode == 0, out.stderr
        telnet = next(c for c in commands if c.startswith("telnet "))
        assert telnet == "telnet localhost 1100"
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("ops", "s3cret") == b"+OK ops's maildrop has 1 message (38 octets)\r\n"
            c.send(b"TOP 1 0\r\n")
            assert c.multiline().endswith(b"\r\nSubject: hello\r\n\r\n.\r\n")
        assert d.stop() == 0


@pytest.mark.parametrize("document", ["README.rst", "docs/configuration.rst", "docs/deployment-postgres.rst",
                                      "docs/security.rst", "bench/README.rst"])
def test_documents_are_plain_restructuredtext(document):
    """Each document renders where a newcomer reads it (GitHub, PyPI: plain
    docutils, no Sphinx): deployment-postgres.rst's :class: and :func: roles
    showed as errors there."""
    import docutils.core

    problems = io.StringIO()
    docutils.core.publish_doctree((ROOT / document).read_text(encoding="utf-8"), source_path=document,
                                  settings_overrides={"warning_stream": problems, "report_level": 2})
    assert problems.getvalue() == ""


def test_every_document_is_checked():
    documents = set()
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and not d.endswith(".egg-info")]  # venvs, git
        documents.update(os.path.relpath(os.path.join(top, f), ROOT) for f in files if f.endswith(".rst"))
    checked = set(test_documents_are_plain_restructuredtext.pytestmark[0].args[1])
    assert documents == checked


def test_systemd_unit_runs_what_its_install_steps_install(tmp_path):
    """docs/pop3frame.service started /usr/local/bin/pop3frame, which none of
    its install steps made (Debian's Python refuses a system-wide pip
    install): its ExecStart is the venv its steps create, and
    ``systemd-analyze verify`` accepts the unit with that venv's pop3frame
    (this test's own stands in for it)."""
    analyze = require_program("systemd-analyze")
    unit = (ROOT / "docs" / "pop3frame.service").read_text()
    steps = [line[1:].strip() for line in unit.splitlines() if line.startswith("#   ")]
    venv = re.fullmatch(r"python3 -m venv (\S+) && \1/bin/pip install '\.\[passwords\]'", steps[0])
    assert venv, steps[0]
    (start,) = re.findall(r"^ExecStart=(\S+) serve --config (\S+)$", unit, re.M)
    assert start[0] == venv.group(1) + "/bin/pop3frame"
    assert any("cp docs/example.toml %s " % start[1] in step for step in steps)
    assert "%s check-config %s" % start in steps
    ours = os.path.join(os.path.dirname(sys.executable), "pop3frame")
    assert os.access(ours, os.X_OK)
    (tmp_path / "pop3frame.service").write_text(unit.replace("ExecStart=" + start[0], "ExecStart=" + ours))
    out = subprocess.run([analyze, "verify", str(tmp_path / "pop3frame.service")], capture_output=True, text=True,
                         timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


def test_configuration_guides_short_config_validates(tmp_path):
    """docs/configuration.rst's config file "in short", its paths in a
    temporary tree with the files it names: check-config accepts it."""
    text = moved_into(literal_block("shutdown_grace = 10", "docs/configuration.rst"), tmp_path)
    config = tmp_path / "pop3frame.toml"
    config.write_text(text)
    (tmp_path / "etc").mkdir()
    (tmp_path / "mail").mkdir()
    (tmp_path / "etc" / "passwd").write_text("alice:{PLAIN}pw\n")
    cert, key, _ = tls_files(tmp_path)
    os.replace(cert, tmp_path / "etc" / "fullchain.pem")
    os.replace(key, tmp_path / "etc" / "privkey.pem")
    out = pop3frame("check-config", str(config), cwd=str(tmp_path))
    assert (out.returncode, out.stderr) == (0, b"")


@pytest.mark.parametrize("document,starts_with", [
    ("docs/deployment-postgres.rst", "# HAProxy connects here"),
    ("docs/compose/pop3frame.toml", None),
])
def test_postgres_deployment_configs_validate(tmp_path, document, starts_with):
    """The instance config of the PostgreSQL guide and the compose set-up's
    file: check-config accepts each as written (it connects to no database)."""
    text = (ROOT / document).read_text() if starts_with is None else literal_block(starts_with, document)
    config = tmp_path / "pop3frame.toml"
    config.write_text(text)
    out = pop3frame("check-config", str(config), cwd=str(tmp_path))
    assert (out.returncode, out.stderr) == (0, b"")
    assert 'type = "postgres"' in out.stdout.decode() and 'backend = "postgres"' in out.stdout.decode()


def test_stats_from_python_as_shown():
    """docs/configuration.rst's Stats snippet runs (``...`` is a statement) and its keys are the counters'."""
    from pop3frame.adapters.memory import MemoryAdapter
    from pop3frame.config import ServerConfig

    code = literal_block("from pop3frame.server import ServerGroup", "docs/configuration.rst")
    names = {"adapter": MemoryAdapter({}), "config": ServerConfig()}
    exec(compile(code, "configuration.rst", "exec"), names)
    shown = re.search(r"stats\.snapshot\(\)\s+# (\{.*\})", code).group(1)
    keys = re.findall(r'"(\w+)": \d+', shown)
    assert keys and set(keys) <= set(names["stats"].snapshot())


def test_serve_options_table_names_real_options_and_their_defaults():
    """configuration.rst's ``serve`` options table: every option exists, and
    a default it states for a ServerConfig field is that field's default
    (``--max-connections-per-ip`` said "no limit" while it was 10)."""
    from pop3frame.cli import build_parser
    from pop3frame.config import ServerConfig

    text = (ROOT / "docs" / "configuration.rst").read_text(encoding="utf-8")
    table = text.split("``serve`` options", 1)[1].split("\n\n", 2)[1]
    rows, option = {}, None
    for line in table.splitlines():
        if line.startswith("``"):
            option = line.split("``")[1].split()[0]
            rows[option] = line.split("  ", 1)[1].strip() if "  " in line else ""
        elif option and line.strip() and not line.startswith("="):
            rows[option] += " " + line.strip()
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    assert set(rows) - {"--demo", "--directory"} <= set(serve._option_string_actions), rows.keys()
    defaults = {name: ServerConfig.__dataclass_fields__[name].default for name in ServerConfig.__dataclass_fields__}
    checked = 0
    for option, says in rows.items():
        stated = re.search(r"default (\d+)", says)
        field = option[2:].replace("-", "_")
        if stated and field in defaults:
            assert int(stated.group(1)) == defaults[field], (option, says)
            checked += 1
    assert checked >= 2 and re.search(r"default \d+", rows["--max-connections-per-ip"]), rows
