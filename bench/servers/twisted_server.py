"""A Maildir-backed ``twisted.mail.pop3`` server, for side-by-side benchmarks.

Usage (in a virtualenv with Twisted, not the project's)::

    python bench/servers/twisted_server.py --root MAILDIR_ROOT --passwd FILE [--port 0] [--lifetime 3600]

Users and ``{PLAIN}`` passwords come from the same Dovecot-style
passwd-file as the other servers; ROOT/<user>/ is served with
``twisted.mail.maildir.MaildirMailbox``.  Listens on 127.0.0.1 only, stops
on SIGTERM or after ``--lifetime`` seconds.
"""
import argparse
import os

from twisted.cred import checkers, portal
from twisted.internet import protocol, reactor
from twisted.mail import maildir, pop3
from zope.interface import implementer


class BinaryMaildirMailbox(maildir.MaildirMailbox):
    """MaildirMailbox.getMessage opens files in text mode, and RETR then fails
    on Python 3 (str written to a bytes transport): open them in binary."""

    def getMessage(self, i):
        return open(self.list[i], "rb")


@implementer(portal.IRealm)
class MaildirRealm:
    def __init__(self, root):
        self.root = root

    def requestAvatar(self, avatar_id, mind, *interfaces):
        if pop3.IMailbox not in interfaces:
            raise NotImplementedError("only POP3 mailboxes")
        name = avatar_id.decode() if isinstance(avatar_id, bytes) else avatar_id
        # MaildirMailbox joins its path with bytes file names.
        box = BinaryMaildirMailbox(os.path.join(self.root, name).encode())
        return pop3.IMailbox, box, lambda: None


class NoDelayPOP3(pop3.POP3):
    """TCP_NODELAY, as pop3frame sets it (Dovecot corks and uncorks): without it a short RETR
    waits ~40 ms for Nagle's algorithm and the client's delayed ACK, which
    would measure the configuration rather than the implementation."""

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        super().connectionMade()


class POP3Factory(protocol.ServerFactory):
    def __init__(self, cred_portal):
        self.portal = cred_portal

    def buildProtocol(self, addr):
        proto = NoDelayPOP3()
        proto.portal = self.portal
        proto.factory = self
        return proto


def read_passwd(path):
    checker = checkers.InMemoryUsernamePasswordDatabaseDontUse()
    with open(path) as f:
        for line in f:
            user, _, value = line.strip().partition(":")
            if user and value.startswith("{PLAIN}"):
                checker.addUser(user.encode(), value[len("{PLAIN}"):].split(":")[0].encode())
    return checker


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--passwd", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lifetime", type=float, default=3600.0)
    args = parser.parse_args()
    cred_portal = portal.Portal(MaildirRealm(os.path.abspath(args.root)), [read_passwd(args.passwd)])
    listening = reactor.listenTCP(args.port, POP3Factory(cred_portal), interface="127.0.0.1", backlog=1024)
    print(listening.getHost().port, flush=True)
    reactor.callLater(args.lifetime, reactor.stop)
    reactor.run()  # installs its own SIGTERM/SIGINT handlers that stop the reactor


if __name__ == "__main__":
    main()
