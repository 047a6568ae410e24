"""Small client-side helpers shared by the tests: raw-socket POP3 talk."""
from __future__ import annotations

import contextlib
import email.policy
import logging
import os
import poplib
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import textwrap
import threading
import time
from email.parser import BytesParser
from typing import List, Optional, Set, Tuple

import pytest

from pop3frame.server import POP3Server, SessionHandler

CRLF = b"\r\n"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.rst")


def literal_block(starts_with: str, document: str = "README.rst") -> str:
    """The reStructuredText literal block whose first line starts with
    ``starts_with``, in README.rst or another ``document`` of the repository."""
    with open(os.path.join(ROOT, document), encoding="utf-8") as f:
        text = f.read()
    for block in re.findall(r"::\n\n((?:(?: {4}.*)?\n)+)", text):
        code = textwrap.dedent(block)
        if code.startswith(starts_with):
            return code
    raise AssertionError("no literal block starting with %r in %s" % (starts_with, document))


def moved_into(text: str, tree) -> str:
    """A config text (docs/example.toml, a docs snippet) with its /etc, /var/mail and /run paths inside ``tree``."""
    for old, new in (("/etc/pop3frame", "etc"), ("/var/mail", "mail"), ("/run/pop3frame", "run")):
        text = text.replace(old, os.path.join(str(tree), new))
    return text


class RawClient:
    """A POP3 client on a raw socket, for asserting exact bytes."""

    def __init__(self, address: Tuple[str, int], timeout: float = 10.0, source: str = "", rcvbuf: int = 0,
                 context: Optional[ssl.SSLContext] = None) -> None:
        if rcvbuf:
            # Set before connecting, which also turns off the kernel's
            # autotuning: the server can run only this far ahead of us.
            self.sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
            self.sock.settimeout(timeout)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.connect(address)
        else:
            self.sock = socket.create_connection(address, timeout=timeout,
                                                 source_address=(source, 0) if source else None)
        if context is not None:  # implicit TLS (RFC 8314)
            self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        self.buf = b""
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 16)
        if not data:
            return False
        self.buf += data
        return True

    def line(self) -> bytes:
        """One response line including CRLF (b'' at end of stream)."""
        while CRLF not in self.buf:
            if not self._fill():
                rest, self.buf = self.buf, b""
                return rest
        i = self.buf.index(CRLF) + 2
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def multiline(self) -> bytes:
        """Everything up to and including the terminating '.CRLF', verbatim."""
        while True:
            if self.buf.startswith(b".\r\n"):
                end = 3
                break
            i = self.buf.find(b"\r\n.\r\n")
            if i >= 0:
                end = i + 5
                break
            if not self._fill():
                raise EOFError("connection closed inside a multi-line response")
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def cmd(self, line: str) -> bytes:
        self.send(line.encode() + CRLF)
        return self.line()

    def login(self, user: str, password: str) -> bytes:
        assert self.cmd("USER " + user).startswith(b"+OK")
        return self.cmd("PASS " + password)

    def read_all(self) -> bytes:
        """Read until the server closes the connection."""
        while self._fill():
            pass
        out, self.buf = self.buf, b""
        return out

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def retr_interrupted(address: Tuple[str, int], user: str, password: str, number: int, interrupt,
                     read_first: int = 1 << 20, context: Optional[ssl.SSLContext] = None) -> Tuple[bytes, bytes, bool]:
    """RETR read by a slow client, with ``interrupt()`` called part-way.

    The client's small receive window keeps the server at most a few MB (its
    send buffer) ahead, so ``interrupt()`` runs while the server is still
    reading a message of tens of MB.  Returns (status line, the wire bytes
    after it, whether they ended in the terminator rather than a close).

    As a real client does, the reply ends at the first line that is "."
    alone, wherever it comes: a "." line the server failed to byte-stuff
    ends the message there, and what follows it is not part of it.
    """
    with RawClient(address, timeout=60, rcvbuf=64 * 1024, context=context) as raw:
        assert raw.login(user, password).startswith(b"+OK")
        raw.send(b"RETR %d\r\n" % number)
        status = raw.line()
        while len(raw.buf) < read_first and raw._fill():
            pass
        interrupt()
        # The body so far, and the position from which it is still to be
        # searched for CRLF.CRLF (a terminator can span two reads).
        body = bytearray(b"\r\n" + raw.buf)
        searched = 0
        while True:
            end = body.find(b"\r\n.\r\n", searched)
            if end >= 0:
                return status, bytes(body[2:end + 5]), True
            searched = max(len(body) - 4, 0)
            data = raw.sock.recv(1 << 16)
            if not data:
                return status, bytes(body[2:]), False
            body += data


#: Headers every message a client gets should carry (RFC 5322 section 3.6,
#: RFC 2045 section 4).
REQUIRED = ("From", "To", "Subject", "Date", "Message-ID", "MIME-Version")


def parse(raw: bytes):
    return BytesParser(policy=email.policy.default).parsebytes(raw)


def assert_clean(raw: bytes, seven_bit: bool = True):
    """The message parses without a defect in any part or any header, is
    7-bit (unless told otherwise), and has every header clients need
    (RFC 5322 section 3.6: From, Date; To, Subject, Message-ID; RFC 2045
    section 4: MIME-Version)."""
    msg = parse(raw)
    assert all(msg[h] for h in REQUIRED), raw
    for part in msg.walk():
        assert not part.defects, (part.defects, raw)
        assert not [(name, value.defects) for name, value in part.items() if value.defects], raw
    assert raw.isascii() or not seven_bit
    return msg


def unstuff(wire: bytes) -> bytes:
    """Undo byte-stuffing of a multi-line body (status line already removed)."""
    assert wire.endswith(b".\r\n")
    body = wire[:-3]
    lines = body.split(CRLF)
    return CRLF.join(l[1:] if l.startswith(b".") else l for l in lines)


def retr_lines_to_bytes(lines: List[bytes]) -> bytes:
    """poplib's RETR line list back to the CRLF message it transmitted."""
    return b"".join(l + CRLF for l in lines)


def refused_login(server, user: str, password: str) -> bytes:
    """The -ERR a poplib login to a Controller ``server`` gets (its clients time out in 10 s)."""
    client = server.pop3()
    client.user(user)
    with pytest.raises(poplib.error_proto) as info:
        client.pass_(password)
    client.quit()
    return info.value.args[0]


def drop(client) -> None:
    """Drop a poplib client's connection without QUIT (its makefile keeps the fd alive)."""
    client.sock.shutdown(socket.SHUT_RDWR)
    client.file.close()
    client.sock.close()


def demo_store(path: str) -> str:
    """A SQLite store at ``path`` holding user ``demo`` (password ``demo``) and
    the three sample messages, as ``pop3frame serve`` seeds its own new default."""
    from pop3frame.adapters.sqlite import SQLiteStore

    assert SQLiteStore(path).ensure_demo()
    return path


@contextlib.contextmanager
def reachable_dir(prefix: str, mode: int = 0o755, owner=None):
    """A fresh directory other users can reach, removed afterwards.

    pytest's ``tmp_path`` lies under root's 0700 directory, so a server that
    drops to another user, or a delivery agent running as one, cannot use
    it.  ``owner``: a ``pwd`` entry to give the directory to.
    """
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        os.chmod(path, mode)
        if owner is not None:
            os.chown(path, owner.pw_uid, owner.pw_gid)
        yield path
    finally:
        shutil.rmtree(path)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just handed out and took back: free now, with nothing
    listening.  A server that binds it next may lose a race (so retry)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def open_fds() -> Set[Tuple[str, str]]:
    """This process's open descriptors, each with what it points to (a
    socket's inode, a file's path).  ``open_fds() - before`` is what was
    opened since ``before`` and is still open, whatever other code (a
    subprocess object of an earlier test collected meanwhile) closed."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add((fd, os.readlink("/proc/self/fd/" + fd)))
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return found


#: ``thread_keepalive`` for a server whose threads a test counts: no idle
#: connection thread ends by itself while counted, so counts are exact.
KEEP_THREADS = 3600.0


def settled_workers(server, before) -> set:
    """The connection threads a :class:`~pop3frame.testing.Controller`
    (started with ``thread_keepalive=KEEP_THREADS``) keeps once its sessions
    ended.  Waits (bounded) until no connection is live and every thread
    started since ``before`` (a set of threads), listeners aside, waits idle
    in the pool; a thread still serving, or one that is no connection
    thread, fails the test.  How many there are is up to the scheduler: a
    client that reconnects at once may be accepted before the previous
    session's thread is back in the pool, and then gets a new one."""
    assert server.wait_for_connections(0)
    workers = {t for t in set(threading.enumerate()) - before if not t.name.startswith("pop3-listen-")}
    pool = server.group.workers
    assert pool.wait_idle(len(workers)), "%d of %d connection threads idle" % (pool.idle, len(workers))
    assert pool.idle == len(workers)
    return workers


def wait_ready(proc, ready, timeout: float) -> bool:
    """Call ``ready()`` until it returns True (the server ``proc`` started):
    False after ``timeout`` seconds, or at once when ``proc`` exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        try:
            # Waiting on the process, not sleeping: returns at once if it died.
            proc.wait(timeout=0.05)
            return False
        except subprocess.TimeoutExpired:
            continue
    return False


def tick_until_closed(server, frozen, seconds: float, tries: int = 100) -> bool:
    """Move the injected clock by ``seconds`` until ``server`` has no connection left.

    A tick that lands before the server thread has set its deadline moves
    nothing, so one tick is not enough whatever the scheduling; bounded by
    ``tries`` waits of 50 ms.
    """
    for _ in range(tries):
        frozen.tick(seconds)
        if server.wait_for_connections(0, timeout=0.05):
            return True
    return False


def require_program(name: str) -> str:
    """Path of a Debian client the test drives; a missing one fails under CI (which installs it)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("%s is missing under CI; .ci/run installs it" % name)
        pytest.skip("%s not installed" % name)
    return path


def expected_failure_logged_once(records, cause: str):
    """The log of an expected failure (network down, upstream refused, store
    unavailable): exactly one line at WARNING or above, naming ``cause``,
    and no traceback anywhere (tracebacks are for bugs, or DEBUG)."""
    loud = [r for r in records if r.levelno >= logging.WARNING]
    assert len(loud) == 1, [r.getMessage() for r in loud]
    assert cause in loud[0].getMessage() and "\n" not in loud[0].getMessage(), loud[0].getMessage()
    assert [r.getMessage() for r in records if r.exc_info] == []
    return loud[0]


class FileSpanServer(POP3Server):
    """A POP3Server whose connections record, in ``file_spans``, the octets each
    FileSpan sent: proof that a message went out from its file (sendfile())."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.file_spans: List[int] = []

    class handler_class(SessionHandler):
        def setup(self) -> None:
            super().setup()
            send_file, spans = self.conn.send_file, self.server.file_spans

            def recorded(span) -> None:
                try:
                    send_file(span)
                finally:
                    spans.append(span.sent)

            self.conn.send_file = recorded


def assert_new_mail_records_dot_lines(store) -> None:
    """``store`` holds, for alice (password "pw"), one message from before it kept
    MessageInfo.dot_lines, whose line ".dotted" starts with ".": that one reports
    None (not known), two new deliveries False and True, and RETR gives all three
    exactly, stuffed where needed (RFC 1939 section 3)."""
    from pop3frame.testing import Controller

    store.deliver("alice", b"Subject: plain\n\nEnds in a dot.\n")
    store.deliver("alice", b"Subject: dotted\n\n.profile changed\n")
    assert [m.dot_lines for m in store.list_messages("alice")] == [None, False, True]
    store.close_mailbox("alice")
    with Controller(store) as server:
        client = server.pop3()
        client.user("alice")
        client.pass_("pw")
        assert [client.retr(i)[1][2] for i in (1, 2, 3)] == [b".dotted", b"Ends in a dot.", b".profile changed"]
        client.quit()


def tls_files(directory) -> Tuple[str, str, "ssl.SSLContext"]:
    """A trustme certificate for localhost and 127.0.0.1 written to ``directory``:
    (cert.pem path, key.pem path, a client context that trusts it)."""
    import ssl

    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = os.path.join(str(directory), "cert.pem"), os.path.join(str(directory), "key.pem")
    issued.cert_chain_pems[0].write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return cert, key, context
