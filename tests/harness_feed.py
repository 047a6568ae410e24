"""Conformance harness for the feed adapter: an RSS feed on a local http.server.

Each delivered message becomes one ``<item>`` (Subject -> title, body ->
description, a fresh guid), and the adapter builds its own message from
it, so ``verbatim = False``: the suite checks sizes, TOP against RETR,
unique-ids, DELE/RSET/QUIT and snapshots, not delivered bytes.  One feed
serves every user (``per_user_mailboxes = False``); DELE is remembered per
user in a state file.  Without feedparser the harness skips, or fails
under ``CI=true``.
"""
import email.policy
import itertools
import os
import threading
from email.parser import BytesHeaderParser
from xml.sax.saxutils import escape

from pop3frame.adapters.feed import FeedAdapter

_HEADER = '<?xml version="1.0" encoding="UTF-8"?>\n<rss version="2.0"><channel>' \
          "<title>conformance</title><link>http://127.0.0.1/</link><description>items</description>\n"


def rss_item(data, guid):
    """An RSS ``<item>`` carrying the Subject and body of ``data`` (raw message bytes)."""
    text = data.replace(b"\r\n", b"\n")
    head, _, body = text.partition(b"\n\n")
    subject = BytesHeaderParser(policy=email.policy.default).parsebytes(head + b"\n\n").get("Subject", "")
    return "<item><title>%s</title><guid isPermaLink=\"false\">%s</guid><description>%s</description></item>\n" % (
        escape(str(subject)), guid, escape(body.decode("utf-8", "replace")))


class Harness:
    name = "feed"
    verbatim = False
    per_user_mailboxes = False

    def __init__(self, tmp_path):
        self.server = None
        try:
            import feedparser  # noqa: F401  (the adapter's optional dependency)
        except ImportError:
            if os.environ.get("CI") == "true":
                raise RuntimeError("CI=true but feedparser is missing (pip install 'pop3frame[feeds]')") from None
            self.skip_reason = "feedparser not installed"
            return
        from tests.feeds import FeedServer

        self.state = str(tmp_path / "feed-state.json")
        self._lock = threading.Lock()
        self._passwords = {}
        self._items = []  # (guid, <item> text)
        self._guids = itertools.count(1)
        self.server = FeedServer()
        self._publish()

    def _publish(self):
        self.server.publish("/feed", _HEADER + "".join(item for _, item in self._items) + "</channel></rss>\n")

    def make_adapter(self):
        return FeedAdapter(self.server.url("/feed"), users=self._check, state_file=self.state, timeout=30)

    def _check(self, user, password):
        with self._lock:
            return self._passwords.get(user) == password

    def add_user(self, user, password):
        with self._lock:
            self._passwords[user] = password

    def deliver(self, user, data):
        guid = "item-%d" % next(self._guids)
        with self._lock:
            self._items.append((guid, rss_item(data, guid)))
            self._publish()
        return guid

    def remove(self, user, guid):
        with self._lock:
            self._items = [(g, item) for g, item in self._items if g != guid]
            self._publish()

    def replace(self, user, guid, data):
        """The publisher edits the item: same guid, new text."""
        with self._lock:
            self._items = [(g, rss_item(data, g) if g == guid else item) for g, item in self._items]
            self._publish()

    def close(self):
        if self.server is not None:
            self.server.close()
