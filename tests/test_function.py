"""Function adapter: a callable's (uid, message) list over POP3."""
from __future__ import annotations

import email.policy
import poplib
import queue
import subprocess
import sys
import threading
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

import pop3frame
from pop3frame.adapters.function import FunctionAdapter, make_function_server
from pop3frame.testing import Controller
from tests.helpers import retr_lines_to_bytes


def login(server, user="me", password="pw"):
    client = server.pop3()
    client.user(user)
    client.pass_(password)
    return client


def test_bytes_str_and_emailmessage():
    msg = EmailMessage()
    msg["From"] = "script <s@localhost>"
    msg["To"] = "me@localhost"
    msg["Subject"] = "Grüße aus der Funktion"
    msg.set_content("hallo\n")

    def mail():
        return [
            ("raw-1", b"Subject: bytes\n\nlf only\n"),
            ("text-2", "Subject: str\r\n\r\nnaïve\r\n"),
            (3, msg),
        ]

    with Controller(FunctionAdapter(mail, user="me", password="pw")) as server:
        client = login(server)
        assert [l.split()[1] for l in client.uidl()[1]] == [b"raw-1", b"text-2", b"3"]
        got = [retr_lines_to_bytes(client.retr(i)[1]) for i in (1, 2, 3)]
        sizes = [int(l.split()[1]) for l in client.list()[1]]
        client.quit()
    assert got[0] == b"Subject: bytes\r\n\r\nlf only\r\n"
    assert got[1] == "Subject: str\r\n\r\nnaïve\r\n".encode("utf-8")
    assert sizes == [len(g) for g in got]
    parsed = BytesParser(policy=email.policy.default).parsebytes(got[2])
    assert parsed["Subject"] == "Grüße aus der Funktion"


def test_function_gets_user_and_is_called_once_per_login():
    calls = []

    def mail(user):
        calls.append(user)
        return [("only", ("Subject: for %s\r\n\r\nx\r\n" % user).encode())]

    with Controller(FunctionAdapter(mail, users={"a": "pa", "b": "pb"})) as server:
        client = login(server, "a", "pa")
        client.retr(1)
        client.retr(1)
        client.quit()
        client = login(server, "b", "pb")
        assert client.retr(1)[1][0] == b"Subject: for b"
        client.quit()
    assert calls == ["a", "b"]


def test_read_only_and_invalid_uids_hashed_duplicates_dropped():
    def mail():
        return [("has spaces", b"Subject: a\r\n\r\na\r\n"), ("ü" * 80, b"Subject: b\r\n\r\nb\r\n"),
                ("has spaces", b"Subject: dup\r\n\r\nx\r\n")]

    with Controller(FunctionAdapter(mail, user="me", password="pw")) as server:
        client = login(server)
        assert "X-READ-ONLY" in client.capa()
        uids = [l.split()[1].decode() for l in client.uidl()[1]]
        assert len(uids) == 2 and all(1 <= len(u) <= 70 and u.isascii() and " " not in u for u in uids)
        with pytest.raises(poplib.error_proto, match=r"\[SYS/PERM\]"):
            client.dele(1)
        client.quit()
        client = login(server)
        assert [l.split()[1].decode() for l in client.uidl()[1]] == uids  # stable
        client.quit()


def test_on_delete_gets_original_uids_after_quit_only():
    deleted = []
    box = {"k1": b"Subject: 1\r\n\r\n1\r\n", "key two": b"Subject: 2\r\n\r\n2\r\n"}

    def on_delete(user, uids):
        deleted.append((user, uids))
        for uid in uids:
            del box[uid]

    adapter = FunctionAdapter(lambda: list(box.items()), user="me", password="pw", on_delete=on_delete)
    with Controller(adapter) as server:
        client = login(server)
        client.dele(2)
        assert deleted == []
        client.quit()
        assert deleted == [("me", ["key two"])]
        client = login(server)
        assert client.stat()[0] == 1
        client.quit()


def test_failures_are_sys_temp_and_auth():
    def broken():
        raise RuntimeError("database down, password=hunter2")

    def failing_delete(user, uids):
        raise OSError("nope")

    with Controller(FunctionAdapter(broken, user="me", password="pw")) as server:
        client = server.pop3()
        client.user("me")
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            client.pass_("wrong")
        client.user("me")
        with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\] mail source failed"):
            client.pass_("pw")
        client.quit()
    ok = lambda: [("a", b"Subject: a\r\n\r\na\r\n")]  # noqa: E731
    with Controller(FunctionAdapter(ok, user="me", password="pw", on_delete=failing_delete)) as server:
        client = login(server)
        client.dele(1)
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.quit()
    with Controller(FunctionAdapter(lambda: [("x", 42)], user="me", password="pw")) as server:
        client = server.pop3()
        client.user("me")
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.pass_("pw")
        client.quit()


def test_constructor_needs_credentials():
    with pytest.raises(ValueError):
        FunctionAdapter(lambda: [])
    with pytest.raises(ValueError):
        FunctionAdapter(lambda: [], user="me")
    adapter = FunctionAdapter(lambda: [], authenticate=lambda u, p: p == "k")
    assert adapter.authenticate("anyone", "k") and not adapter.authenticate("anyone", "x")


def test_make_function_server_non_blocking_form():
    """What serve_function runs, on a port the OS picks, stopped by shutdown()."""
    server = make_function_server(
        lambda: [("1", b"Subject: served\r\n\r\nhi\r\n")], user="me", password="pw", port=0
    )
    thread = threading.Thread(target=server.serve, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        client = poplib.POP3("127.0.0.1", server.port, timeout=10)
        client.user("me")
        client.pass_("pw")
        assert client.retr(1)[1] == [b"Subject: served", b"", b"hi"]
        client.quit()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_serve_function_blocks_until_shut_down_and_closes_its_socket():
    """pop3frame.serve_function, the one-file-script entry point of issue 8:
    ``ready`` hands over the bound server (port 0: the OS picks), a real
    POP3 session reads the function's mail, shutdown() makes the blocking
    call return, and the listening socket is closed afterwards."""
    started = queue.Queue()
    thread = threading.Thread(
        target=pop3frame.serve_function,
        args=(lambda: [("1", b"Subject: blocking\r\n\r\nhi\r\n")],),
        kwargs={"user": "me", "password": "pw", "port": 0, "ready": started.put},
        daemon=True,
    )
    thread.start()
    server = started.get(timeout=10)
    try:
        client = poplib.POP3("127.0.0.1", server.port, timeout=10)
        client.user("me")
        client.pass_("pw")
        assert client.retr(1)[1] == [b"Subject: blocking", b"", b"hi"]
        client.quit()
    finally:
        server.shutdown()
        thread.join(10)
    assert not thread.is_alive()
    assert server.socket.fileno() == -1  # the listening socket is closed


def test_serve_function_export_is_lazy():
    """Importing pop3frame does not import the adapters package; the
    attribute does, and is the adapters' own function."""
    code = (
        "import sys, pop3frame\n"
        "assert 'pop3frame.adapters' not in sys.modules\n"
        "from pop3frame import serve_function\n"
        "from pop3frame.adapters.function import serve_function as original\n"
        "assert serve_function is original and 'serve_function' in pop3frame.__all__\n"
        "try:\n"
        "    pop3frame.no_such_name\n"
        "except AttributeError:\n"
        "    print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout == "ok\n", done.stderr
