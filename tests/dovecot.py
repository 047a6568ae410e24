"""A private Dovecot for tests: the IMAP upstream of the IMAP adapter, or a POP3 peer.

:class:`Dovecot` starts Debian's ``dovecot`` in the foreground
(``dovecot -F -c CONF``) with a configuration generated in a temporary
directory: one protocol (``imap`` or ``pop3``) on 127.0.0.1 and a free
port, passwd-file users, Maildirs, plaintext logins allowed, no auth
failure delay; TLS (STARTTLS/STLS on the same port) when given a
certificate and key.  It is stopped by its PID.

When ``dovecot`` is not installed, tests skip, or fail under ``CI=true``
(``.ci/run`` installs ``dovecot-imapd`` and ``dovecot-pop3d``).
"""
from __future__ import annotations

import imaplib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from typing import Optional

from tests import reaper
from tests.helpers import free_port, wait_ready

DOVECOT = shutil.which("dovecot") or ("/usr/sbin/dovecot" if os.path.exists("/usr/sbin/dovecot") else None)
#: Where each protocol's server lives (Debian packages them apart).
SERVERS = {"imap": "/usr/lib/dovecot/imap", "pop3": "/usr/lib/dovecot/pop3"}
#: A login greeting: IMAP's untagged OK, POP3's +OK.
GREETINGS = {"imap": b"* OK", "pop3": b"+OK"}

CONFIG = """\
protocols = {protocol}
login_greeting = {greeting}
listen = 127.0.0.1
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
info_log_path = {base}/dovecot.log
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
login_trusted_networks = 127.0.0.0/8
default_login_user = {login_user}
default_internal_user = {internal_user}
first_valid_uid = {uid}
last_valid_uid = 0
mail_location = maildir:{mail}/%u
namespace inbox {{
  inbox = yes
  mailbox Trash {{
    special_use = \\Trash
    auto = create
  }}
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {base}/users/%u
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {base}/users/%u
}}
service {protocol}-login {{
  inet_listener {protocol} {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener {protocol}s {{
    port = 0
  }}
}}
# Dovecot slows down repeated failed logins per client IP (the auth
# penalty, kept by anvil) and every test client is 127.0.0.1.  The auth
# process disables the penalty when it cannot reach anvil's penalty socket.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
"""


def missing_reason(protocol: str = "imap") -> Optional[str]:
    """Why Dovecot cannot serve ``protocol`` here (None if it can)."""
    if DOVECOT is None or not os.path.exists(SERVERS[protocol]):
        return "dovecot not installed (apt-get install dovecot-%sd)" % protocol
    return None


def require(protocol: str = "imap") -> None:
    """Skip the calling test where Dovecot cannot serve ``protocol``, or fail it under ``CI=true``."""
    import pytest

    reason = missing_reason(protocol)
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but " + reason)
        pytest.skip(reason)


class Dovecot:
    """One private Dovecot server; ``add_user``, ``drop``, ``imap``/``append``, ``stop``, ``cleanup``.

    ``cert`` and ``key`` (PEM files) turn TLS on: STARTTLS for IMAP, STLS
    for POP3, offered and not required.
    """

    def __init__(self, protocol: str = "imap", cert: Optional[str] = None, key: Optional[str] = None) -> None:
        self.protocol = protocol
        # Everything lives under a fresh /tmp directory rather than pytest's
        # root-only tmp_path: Dovecot's auth and mail processes run as
        # unprivileged users and must reach the passwd-file and the Maildirs.
        self.base = base = tempfile.mkdtemp(prefix="pop3frame-dovecot-")
        reaper.remove(base)
        #: Says the server on our port is this one, not another test run's
        #: that took the port after free_port().
        self.greeting = "pop3frame test " + os.path.basename(base)
        os.chmod(base, 0o755)
        os.makedirs(os.path.join(base, "run"), exist_ok=True)
        os.makedirs(os.path.join(base, "state"), exist_ok=True)
        self.ssl = "ssl = no"
        if cert and key:
            # Copied in: the config process reads them from a path it can reach.
            for name, path in (("cert.pem", cert), ("key.pem", key)):
                shutil.copyfile(path, os.path.join(base, name))
            self.ssl = "ssl = yes\nssl_cert = <{0}/cert.pem\nssl_key = <{0}/key.pem".format(base)
        # One passwd-file per user: Dovecot notices a changed passwd-file
        # at most once a second, a file it has never read at once.
        self.users = os.path.join(base, "users")
        os.mkdir(self.users)
        os.chmod(self.users, 0o755)
        if os.geteuid() == 0:
            # Dovecot refuses root for its login processes and for mail
            # access: use its own service users and nobody's uid for mail.
            self.login_user, self.internal_user = "dovenull", "dovecot"
            nobody = pwd.getpwnam("nobody")
            self.uid, self.gid = nobody.pw_uid, nobody.pw_gid
        else:
            me = pwd.getpwuid(os.geteuid()).pw_name
            self.login_user = self.internal_user = me
            self.uid, self.gid = os.geteuid(), os.getegid()
        self.mail = os.path.join(base, "mail")
        os.mkdir(self.mail)
        os.chown(self.mail, self.uid, self.gid)
        self.proc = None
        self.port = 0
        self._passwords = {}
        self._drops = 0

    @property
    def log(self) -> str:
        out = []
        for name in ("stderr", "dovecot.log"):
            try:
                with open(os.path.join(self.base, name), errors="replace") as f:
                    out.append(f.read())
            except OSError:
                pass
        return "".join(out)

    def start(self, attempts: int = 3) -> "Dovecot":
        for _ in range(attempts):
            self.port = free_port()  # a start that loses the race is retried
            conf = os.path.join(self.base, "dovecot.conf")
            with open(conf, "w") as f:
                f.write(CONFIG.format(
                    protocol=self.protocol, base=self.base, mail=self.mail, port=self.port,
                    uid=min(self.uid, 500), login_user=self.login_user, internal_user=self.internal_user,
                    ssl=self.ssl, greeting=self.greeting,
                ))
            # Configuration errors go to stderr before the log file is open.
            with open(os.path.join(self.base, "stderr"), "ab") as err:
                self.proc = subprocess.Popen([DOVECOT, "-F", "-c", conf], stdout=subprocess.DEVNULL, stderr=err)
            reaper.reap(self.proc.pid)
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError("dovecot did not start; its log:\n" + self.log)

    def _wait_ready(self, timeout: float = 20.0) -> bool:
        """Wait for the login greeting; False if Dovecot exited."""
        def ready() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn, \
                        conn.makefile("rb") as greeting:
                    line = greeting.readline()
                return line.startswith(GREETINGS[self.protocol]) and self.greeting.encode() in line
            except OSError:
                return False

        return wait_ready(self.proc, ready, timeout)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # our own child, by PID: the master stops its children
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def add_user(self, user: str, password: str) -> None:
        path = os.path.join(self.users, user)
        with open(path, "w") as f:
            f.write("%s:{PLAIN}%s:%d:%d::%s/%s::\n" % (user, password, self.uid, self.gid, self.mail, user))
        os.chmod(path, 0o644)
        self._passwords[user] = password

    def drop(self, user: str, data: bytes) -> None:
        """Put ``data`` as it is into the user's INBOX Maildir (``new/``),
        creating the Maildir if the user never logged in: for bytes an
        IMAP APPEND would change (imaplib turns a lone CR into CRLF), and
        for POP3, which cannot deliver."""
        home = os.path.join(self.mail, user)
        for sub in ("", "tmp", "new", "cur"):
            path = os.path.join(home, sub)
            if not os.path.isdir(path):
                os.mkdir(path, 0o700)
                os.chown(path, self.uid, self.gid)
        self._drops += 1
        name = "1700000000.M%dP%d.pop3frame-test" % (self._drops, os.getpid())
        tmp = os.path.join(home, "tmp", name)
        with open(tmp, "wb") as f:
            f.write(data)
        os.chown(tmp, self.uid, self.gid)
        # Written in tmp/, renamed into new/: Dovecot never sees half a file.
        os.rename(tmp, os.path.join(home, "new", name))

    def imap(self, user: str) -> imaplib.IMAP4:
        """A logged-in IMAP connection (``protocol="imap"``)."""
        conn = imaplib.IMAP4("127.0.0.1", self.port, timeout=30)
        # AUTHENTICATE PLAIN: imaplib's LOGIN cannot send non-ASCII passwords.
        token = ("\0%s\0%s" % (user, self._passwords[user])).encode("utf-8")
        conn.authenticate("PLAIN", lambda _: token)
        return conn

    def append(self, user: str, data: bytes, folder: str = "INBOX") -> int:
        """APPEND a message over IMAP (imaplib sends it with CRLF); returns its UID."""
        conn = self.imap(user)
        try:
            typ, resp = conn.append(folder, None, None, data)
            assert typ == "OK", resp
            return int(resp[0].split(b"]")[0].split()[-1])  # [APPENDUID validity uid]
        finally:
            conn.logout()
