"""Conformance harness for the IMAP upstream adapter, against a real Dovecot.

:class:`Dovecot` starts Debian's ``dovecot`` in the foreground
(``dovecot -F -c CONF``) with a configuration generated in a temporary
directory: IMAP only, on 127.0.0.1 and a free port, passwd-file users,
Maildirs, no SSL, plaintext logins allowed, no auth failure delay.  It is
stopped by its PID.  Messages are put in with IMAP APPEND.

When ``dovecot`` is not installed the harness skips, or fails under
``CI=true`` (``.ci/run`` installs ``dovecot-imapd``).
"""
from __future__ import annotations

import imaplib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

from pop3frame.adapters.imap import IMAPUpstreamAdapter

DOVECOT = shutil.which("dovecot") or ("/usr/sbin/dovecot" if os.path.exists("/usr/sbin/dovecot") else None)

CONFIG = """\
protocols = imap
listen = 127.0.0.1
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
info_log_path = {base}/dovecot.log
ssl = no
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
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
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


def missing_reason():
    """Why Dovecot cannot run here (None if it can); fails under CI instead."""
    if DOVECOT is None:
        return "dovecot not installed (apt-get install dovecot-imapd)"
    return None


def _free_port() -> int:
    # The OS picks the port; Dovecot binds it right after (a start that
    # loses the race is retried by Dovecot.start).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dovecot:
    """One private Dovecot IMAP server; ``add_user``, ``append``, ``stop``."""

    def __init__(self) -> None:
        # Everything lives under a fresh /tmp directory rather than pytest's
        # root-only tmp_path: Dovecot's auth and mail processes run as
        # unprivileged users and must reach the passwd-file and the Maildirs.
        self.base = base = tempfile.mkdtemp(prefix="pop3frame-dovecot-")
        os.chmod(base, 0o755)
        os.makedirs(os.path.join(base, "run"), exist_ok=True)
        os.makedirs(os.path.join(base, "state"), exist_ok=True)
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
            self.port = _free_port()
            conf = os.path.join(self.base, "dovecot.conf")
            with open(conf, "w") as f:
                f.write(CONFIG.format(
                    base=self.base, mail=self.mail, port=self.port, uid=min(self.uid, 500),
                    login_user=self.login_user, internal_user=self.internal_user,
                ))
            # Configuration errors go to stderr before the log file is open.
            with open(os.path.join(self.base, "stderr"), "ab") as err:
                self.proc = subprocess.Popen([DOVECOT, "-F", "-c", conf], stdout=subprocess.DEVNULL, stderr=err)
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError("dovecot did not start; its log:\n" + self.log)

    def _wait_ready(self, timeout: float = 20.0) -> bool:
        """Wait for the IMAP greeting; False if Dovecot exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                conn = imaplib.IMAP4("127.0.0.1", self.port, timeout=5)
            except (OSError, imaplib.IMAP4.abort):
                try:
                    # Waiting on the process, not sleeping: returns at once if it died.
                    self.proc.wait(timeout=0.05)
                    return False
                except subprocess.TimeoutExpired:
                    continue
            conn.shutdown()
            return True
        return False

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
        self._passwords = getattr(self, "_passwords", {})
        self._passwords[user] = password

    def imap(self, user: str) -> imaplib.IMAP4:
        conn = imaplib.IMAP4("127.0.0.1", self.port, timeout=30)
        # AUTHENTICATE PLAIN: imaplib's LOGIN cannot send non-ASCII passwords.
        token = ("\0%s\0%s" % (user, self._passwords[user])).encode("utf-8")
        conn.authenticate("PLAIN", lambda _: token)
        return conn

    def drop(self, user: str, data: bytes) -> None:
        """Put ``data`` as it is into the user's INBOX Maildir (``new/``):
        for bytes APPEND would change (imaplib turns a lone CR into CRLF).
        The user must have logged in once, so that the Maildir exists."""
        self._drops = getattr(self, "_drops", 0) + 1
        name = "1700000000.M%dP%d.pop3frame-test" % (self._drops, os.getpid())
        tmp = os.path.join(self.mail, user, "tmp", name)
        with open(tmp, "wb") as f:
            f.write(data)
        os.chown(tmp, self.uid, self.gid)
        # Written in tmp/, renamed into new/: Dovecot never sees half a file.
        os.rename(tmp, os.path.join(self.mail, user, "new", name))

    def append(self, user: str, data: bytes, folder: str = "INBOX") -> int:
        """APPEND a message (imaplib sends it with CRLF); returns its UID."""
        conn = self.imap(user)
        try:
            typ, resp = conn.append(folder, None, None, data)
            assert typ == "OK", resp
            return int(resp[0].split(b"]")[0].split()[-1])  # [APPENDUID validity uid]
        finally:
            conn.logout()


class Harness:
    name = "imap"

    def __init__(self, tmp_path):
        self.skip_reason = missing_reason()
        if self.skip_reason and os.environ.get("CI") == "true":
            raise RuntimeError("CI=true but " + self.skip_reason)
        self.dovecot = None
        if not self.skip_reason:
            self.dovecot = Dovecot().start()

    def make_adapter(self):
        return IMAPUpstreamAdapter("127.0.0.1", self.dovecot.port, timeout=30)

    def add_user(self, user, password):
        self.dovecot.add_user(user, password)

    def deliver(self, user, data):
        self.dovecot.append(user, data)

    def close(self):
        if self.dovecot is not None:
            self.dovecot.cleanup()
