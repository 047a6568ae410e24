"""A POP3 front for an IMAP mailbox, for old devices that only speak POP3.

The device logs in with its IMAP user name and password; they are passed
through to the IMAP server.  Messages the device deletes are expunged
upstream (or moved to Trash with ``--trash``).

Run::

    .venv/bin/python examples/imap_proxy.py imap.example.org --security ssl --folder INBOX --port 1100
"""
import argparse

from pop3frame import POP3Server
from pop3frame.adapters.imap import IMAPUpstreamAdapter


def build_adapter(host, port=None, folder="INBOX", security="plain", trash=False):
    return IMAPUpstreamAdapter(
        host,
        port,
        security=security,  # "plain", "starttls" or "ssl" (certificates verified)
        folder=folder,
        on_delete="trash" if trash else "expunge",
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("imap_host")
    parser.add_argument("--imap-port", type=int)
    parser.add_argument("--security", choices=("plain", "starttls", "ssl"), default="ssl")
    parser.add_argument("--folder", default="INBOX")
    parser.add_argument("--trash", action="store_true", help="move deleted mail to Trash")
    parser.add_argument("--port", type=int, default=1100, help="POP3 port on 127.0.0.1")
    args = parser.parse_args(argv)
    adapter = build_adapter(args.imap_host, args.imap_port, args.folder, args.security, args.trash)
    server = POP3Server(("127.0.0.1", args.port), adapter)
    print("POP3 on 127.0.0.1:%d -> IMAP %s folder %s" % (server.port, args.imap_host, args.folder), flush=True)
    try:
        server.serve_forever()  # logs where it listens; Ctrl-C stops it
    finally:
        adapter.close()  # log out of the IMAP server


if __name__ == "__main__":
    main()
