"""Every script in examples/ works: its build function serves a real poplib
session, and sql_logs.py also runs end to end as a program."""
from __future__ import annotations

import email.policy
import importlib.util
import os
import pathlib
import poplib
import shlex
import signal
import sqlite3
import subprocess
import sys
from email.parser import BytesParser

import pytest

from pop3frame.testing import Controller
from tests.helpers import ROOT, assert_clean, require_program, retr_lines_to_bytes
from tests.processes import Piped

EXAMPLES = pathlib.Path(ROOT) / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location("example_" + name, EXAMPLES / (name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def session(server, user, password):
    client = server.pop3()
    client.user(user)
    client.pass_(password)
    return client


def parse(raw):
    return BytesParser(policy=email.policy.default).parsebytes(raw)


def test_every_example_has_a_builder_and_a_main_guard():
    names = sorted(p.stem for p in EXAMPLES.glob("*.py"))
    assert names == ["custom_adapter", "feed_reader", "function_mail", "imap_proxy", "sql_logs"]
    for name in names:
        text = (EXAMPLES / (name + ".py")).read_text()
        assert "build_adapter" in text and 'if __name__ == "__main__":' in text
    assert len((EXAMPLES / "custom_adapter.py").read_text().splitlines()) <= 40
    for name in names:  # the docstring at the top says how to run it (custom_adapter's hid it in its last lines)
        header = (EXAMPLES / (name + ".py")).read_text().split('"""')[1]
        assert ".venv/bin/python examples/%s.py" % name in header, name


def test_sql_logs_builder(tmp_path):
    example = load("sql_logs")
    db = str(tmp_path / "logs.db")
    example.create_log_table(db)
    example.log(db, "ERROR", "disk full")
    example.log(db, "INFO", "all good")
    with Controller(example.build_adapter(db)) as server:
        client = session(server, "ops", "ops")
        msg = assert_clean(retr_lines_to_bytes(client.retr(1)[1]))
        assert msg["Subject"] == "ERROR: disk full"
        client.dele(1)
        client.quit()
        client = session(server, "ops", "ops")
        assert client.stat()[0] == 1
        client.quit()


def test_sql_logs_serves_rows_that_are_not_utf8(tmp_path):
    """A script that logs raw bytes must not lock everyone out: the
    example's connections decode leniently, so the row arrives with U+FFFD
    where the bad bytes were and every other row is still served."""
    example = load("sql_logs")
    db = str(tmp_path / "logs.db")
    example.create_log_table(db)
    example.log(db, "INFO", "fine")
    conn = sqlite3.connect(db)
    with conn:  # what a script writing bytes to a TEXT column leaves behind
        conn.execute("INSERT INTO logs (level, line) VALUES ('ERROR', CAST(X'6469736b2066756c6c20ff' AS TEXT))")
    conn.close()
    with Controller(example.build_adapter(db)) as server:
        client = session(server, "ops", "ops")
        msgs = [assert_clean(retr_lines_to_bytes(client.retr(i)[1])) for i in (1, 2)]
        client.quit()
    assert [m["Subject"] for m in msgs] == ["INFO: fine", "ERROR: disk full \ufffd"]


def test_sql_logs_runs_end_to_end(tmp_path):
    """The script as a user runs it: creates and fills the table, serves it
    on a port the OS picks, a POP3 client reads and deletes, the process is
    stopped by its PID."""
    db = tmp_path / "logs.db"
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "sql_logs.py"), "0", str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(tmp_path),
    )
    try:
        banner = proc.stdout.readline()
        assert banner.startswith("serving"), banner + proc.stderr.read()
        port = int(banner.split("127.0.0.1:")[1].split()[0])
        client = poplib.POP3("127.0.0.1", port, timeout=10)
        client.user("ops")
        client.pass_("ops")
        subjects = [parse(retr_lines_to_bytes(client.retr(i)[1]))["Subject"] for i in (1, 2, 3)]
        assert subjects == [
            "INFO: nightly backup finished in 312 s",
            "WARNING: disk /var is 91% full",
            "ERROR: certificate for mail.example.org expires in 3 days",
        ]
        # Row id, then a digest of its timestamp (adapters/sqlquery.py).
        assert [l.split()[1].split(b".")[0] for l in client.uidl()[1]] == [b"1", b"2", b"3"]
        client.dele(2)
        assert client.quit().startswith(b"+OK")
        # A script logs while the server runs; the next session sees it.
        load("sql_logs").log(str(db), "INFO", "logged while serving")
        client = poplib.POP3("127.0.0.1", port, timeout=10)
        client.user("ops")
        client.pass_("ops")
        assert [l.split()[1].split(b".")[0] for l in client.uidl()[1]] == [b"1", b"3", b"4"]
        client.quit()
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def test_sql_logs_new_row_after_deleting_the_newest_reaches_mpop_keeping_mail(tmp_path):
    """Issue 11 defect 2, RFC 1939 section 7 (UIDL): mpop with ``keep on`` fetches all
    rows; the newest row is deleted and a new one logged.  The table hands out ids with
    AUTOINCREMENT, so the new row gets a new id, unique-id and Message-ID, and mpop
    downloads it (with id reuse it took the row for one it had: "no new messages")."""
    example = load("sql_logs")
    db = str(tmp_path / "logs.db")
    example.create_log_table(db)
    for level, line in (("INFO", "backup done"), ("WARNING", "disk 91% full"), ("ERROR", "cert expires")):
        example.log(db, level, line)
    out = tmp_path / "out"
    for sub in ("new", "cur", "tmp"):
        (out / sub).mkdir(parents=True)

    def mpop(port):
        result = subprocess.run(
            [require_program("mpop"), "-C", "/dev/null", "--host=127.0.0.1", "--port=%d" % port, "--auth=user",
             "--user=ops", "--passwordeval=echo ops", "--tls=off", "--delivery=maildir,%s" % out,
             "--uidls-file=%s" % (tmp_path / "uidls"), "--keep=on", "--received-header=off"],
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return sorted(parse((out / "new" / name).read_bytes())["Subject"] for name in os.listdir(out / "new"))

    with Controller(example.build_adapter(db)) as server:
        assert mpop(server.port) == ["ERROR: cert expires", "INFO: backup done", "WARNING: disk 91% full"]
        conn = sqlite3.connect(db)
        with conn:
            conn.execute("DELETE FROM logs WHERE id = (SELECT MAX(id) FROM logs)")
        conn.close()
        example.log(db, "NEW", "database is down")
        assert mpop(server.port) == ["ERROR: cert expires", "INFO: backup done", "NEW: database is down",
                                     "WARNING: disk 91% full"]


def test_function_mail_builder():
    example = load("function_mail")
    with Controller(example.build_adapter()) as server:
        client = session(server, "me", "secret")
        (uid,) = [l.split()[1].decode() for l in client.uidl()[1]]
        assert uid.startswith("status-")
        msg = assert_clean(retr_lines_to_bytes(client.retr(1)[1]))
        assert msg["Subject"].startswith("Status of ") and "Disk /:" in msg.get_content()
        with pytest.raises(poplib.error_proto, match=r"\[SYS/PERM\]"):
            client.dele(1)
        client.quit()


def test_custom_adapter(tmp_path):
    example = load("custom_adapter")
    todo = tmp_path / "todo.txt"
    todo.write_text("buy milk\n\nrenew the certificate für mail\nbuy milk\ncall Bob\n", encoding="utf-8")
    changed = 1795000000  # 2026-11-18: the messages are dated when the file last changed, not 1970
    os.utime(todo, (changed, changed))
    with Controller(example.build_adapter(str(todo), "secret")) as server:
        client = session(server, "anyone", "secret")
        assert client.stat()[0] == 3
        msg = assert_clean(retr_lines_to_bytes(client.retr(2)[1]), seven_bit=False)
        assert msg["Subject"] == "renew the certificate für mail"
        assert msg["Date"].datetime.timestamp() == changed
        sizes = [int(l.split()[1]) for l in client.list()[1]]
        assert sizes[1] == len(retr_lines_to_bytes(client.retr(2)[1]))
        client.dele(1)
        client.dele(3)
        client.quit()
    assert todo.read_text(encoding="utf-8") == "renew the certificate für mail\n"


def test_feed_reader_builder(tmp_path):
    pytest.importorskip("feedparser", reason="pip install 'pop3frame[feeds]'")
    from tests.feeds import RSS, FeedServer

    feeds = FeedServer()
    feeds.publish("/rss", RSS)
    try:
        example = load("feed_reader")
        adapter = example.build_adapter(feeds.url("/rss"), state_file=str(tmp_path / "state.json"))
        with Controller(adapter) as server:
            client = session(server, "reader", "reader")
            assert client.stat()[0] == 3
            assert assert_clean(retr_lines_to_bytes(client.retr(1)[1]))["Subject"] == "Build #41 passed"
            client.dele(1)
            client.quit()
            client = session(server, "reader", "reader")
            assert client.stat()[0] == 2
            client.quit()
    finally:
        feeds.close()


def test_imap_proxy_builder():
    from tests.dovecot import Dovecot, require as require_dovecot

    require_dovecot()
    dovecot = Dovecot().start()
    try:
        dovecot.add_user("alice", "alice-pw")
        dovecot.append("alice", b"Subject: via IMAP\r\n\r\nhello\r\n")
        example = load("imap_proxy")
        with Controller(example.build_adapter("127.0.0.1", dovecot.port, security="plain")) as server:
            client = session(server, "alice", "alice-pw")
            assert client.retr(1)[1][0] == b"Subject: via IMAP"
            client.quit()
    finally:
        dovecot.cleanup()


def test_feed_reader_without_feedparser_says_what_to_install():
    """Run as its header says, from the checkout, in a Python where
    feedparser cannot be imported: one line with the command that installs
    it there, not a traceback (``pip install 'pop3frame[feeds]'`` named a
    ``pip`` that is not on the PATH and a package that is not on an index)."""
    run = ("import runpy, sys; sys.modules['feedparser'] = None; "
           "sys.argv = ['examples/feed_reader.py', 'https://example.org/news.atom', '0']; "
           "runpy.run_path('examples/feed_reader.py', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert out.returncode == 1 and out.stdout == ""
    python = os.path.relpath(sys.executable, ROOT)  # .venv/bin/python, as the header has it
    assert out.stderr == "the feed adapter needs feedparser: %s -m pip install -e '.[feeds]'\n" % python


def header_command(name: str, *replace) -> list:
    """The command an example's header gives (``.venv/bin/python examples/NAME.py ...``), as
    words, run with this Python and the example's absolute path; ``replace``: (old, new) word pairs."""
    text = (EXAMPLES / (name + ".py")).read_text()
    line = next(l for l in text.splitlines() if ".venv/bin/python examples/%s.py" % name in l)
    words = shlex.split(line[line.index(".venv/bin/python"):].split(";")[0], comments=True)
    assert words[:2] == [".venv/bin/python", "examples/%s.py" % name], line
    words[:2] = [sys.executable, str(EXAMPLES / (name + ".py"))]
    for old, new in replace:
        assert old in words, (old, line)
        words[words.index(old)] = new
    return words


def run_as_its_header_says(words, cwd, user, password, messages):
    """Start the example, log in, count the messages; then Ctrl-C: exit status 0, no traceback."""
    with Piped(words, cwd=cwd) as p:
        port = int(p.wait_for(r"INFO pop3frame\.server listening on 127\.0\.0\.1 port (\d+)$").group(1))
        client = poplib.POP3("127.0.0.1", port, timeout=30)
        client.user(user)
        client.pass_(password)
        assert client.stat()[0] == messages
        client.quit()
        p.signal(signal.SIGINT)
        assert p.proc.wait(30) == 0
        rest = p.rest()
    assert "Traceback" not in rest and "interrupted: stopped listening" in rest, rest


def test_custom_adapter_run_as_its_header_says(tmp_path):
    """``custom_adapter.py todo.txt [PORT]`` where there is no todo.txt used to
    listen anyway and answer every login with a traceback (FileNotFoundError);
    without arguments, an IndexError.  Now one usage line, exit status 1."""
    words = header_command("custom_adapter", ("[PORT]", "0"))
    assert words[2] == "todo.txt"
    usage = "usage: custom_adapter.py FILE [PORT]: FILE, one message per line, must exist\n"
    for argv in (words, words[:2]):
        out = subprocess.run(argv, cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
        assert (out.returncode, out.stdout, out.stderr) == (1, "", usage)
    (tmp_path / "todo.txt").write_text("buy milk\ncall Bob\n")
    run_as_its_header_says(words, str(tmp_path), "anyone", "secret", 2)


def test_function_mail_run_as_its_header_says(tmp_path):
    run_as_its_header_says(header_command("function_mail", ("[PORT]", "0")), str(tmp_path), "me", "secret", 1)


def test_feed_reader_run_as_its_header_says(tmp_path):
    """The header's feed URL replaced by a local feed (the tests have no network)."""
    from tests.feeds import RSS, FeedServer

    feeds = FeedServer()
    feeds.publish("/rss", RSS)
    try:
        words = header_command("feed_reader", ("https://example.org/news.atom", feeds.url("/rss")), ("[PORT]", "0"))
        run_as_its_header_says(words, str(tmp_path), "reader", "reader", 3)
    finally:
        feeds.close()


def test_imap_proxy_run_as_its_header_says(tmp_path):
    """The header's IMAP server replaced by a local Dovecot (without implicit TLS)."""
    from tests.dovecot import Dovecot, require as require_dovecot

    require_dovecot()
    dovecot = Dovecot().start()
    try:
        dovecot.add_user("alice", "alice-pw")
        dovecot.append("alice", b"Subject: via IMAP\r\n\r\nhello\r\n")
        words = header_command("imap_proxy", ("imap.example.org", "127.0.0.1"), ("ssl", "plain"), ("1100", "0"))
        run_as_its_header_says(words + ["--imap-port", str(dovecot.port)], str(tmp_path), "alice", "alice-pw", 1)
    finally:
        dovecot.cleanup()
