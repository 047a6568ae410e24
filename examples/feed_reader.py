"""Read an RSS or Atom feed in your mail client: one mail per item.

Needs feedparser.  Deleting a mail hides that item from then on
(remembered in a small JSON state file).

Run::

    .venv/bin/pip install -e '.[feeds]'        # once: feedparser
    .venv/bin/python examples/feed_reader.py https://example.org/news.atom [PORT]

then log in as ``reader`` / ``reader`` on 127.0.0.1:PORT (default 1100).
"""
import sys

from pop3frame import POP3Server
from pop3frame.adapters.feed import FeedAdapter


def build_adapter(url, state_file="feed-state.json"):
    return FeedAdapter(
        url,  # http(s) URL or a local file
        users={"reader": "reader"},
        state_file=state_file,  # None: read-only, DELE refused
    )


def main(argv):
    if len(argv) < 2:
        sys.exit("usage: feed_reader.py FEED-URL [PORT]")
    port = int(argv[2]) if len(argv) > 2 else 1100
    try:
        adapter = build_adapter(argv[1])
    except ImportError as exc:
        sys.exit(str(exc))  # one line: what to install
    server = POP3Server(("127.0.0.1", port), adapter)
    print("serving %s on 127.0.0.1:%d (user reader, password reader)" % (argv[1], server.port), flush=True)
    server.serve_forever()  # logs where it listens; Ctrl-C stops it


if __name__ == "__main__":
    main(sys.argv)
