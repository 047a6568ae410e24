"""Feed adapter: RSS 2.0 and Atom (RFC 4287) feeds served by a real local
http.server become clean RFC 5322 messages over POP3."""
from __future__ import annotations

import email.policy
import json
import logging
import poplib
import socket
from email.parser import BytesParser

import pytest

pytest.importorskip("feedparser", reason="pip install 'pop3frame[feeds]'")

from pop3frame import TemporaryFailure  # noqa: E402
from pop3frame.adapters.feed import FeedAdapter, html_to_text  # noqa: E402
from pop3frame.testing import Controller  # noqa: E402
from tests.helpers import retr_lines_to_bytes  # noqa: E402
from tests.feeds import ATOM, RSS, FeedServer  # noqa: E402
from tests.helpers import assert_clean, expected_failure_logged_once  # noqa: E402



@pytest.fixture
def feeds():
    server = FeedServer()
    server.publish("/rss", RSS)
    server.publish("/atom", ATOM, "application/atom+xml")
    yield server
    server.close()


def fetch(server, user="me", password="pw"):
    client = server.pop3()
    client.user(user)
    client.pass_(password)
    try:
        return [retr_lines_to_bytes(client.retr(i)[1]) for i in range(1, client.stat()[0] + 1)]
    finally:
        client.quit()


def parse(raw):
    return BytesParser(policy=email.policy.default).parsebytes(raw)


def body_text(msg):
    part = msg.get_body(("plain",))
    return part.get_content().replace("\r\n", "\n")


def test_rss_items_become_messages(feeds):
    with Controller(FeedAdapter(feeds.url("/rss"), users={"me": "pw"})) as server:
        raws = fetch(server)
    msgs = [assert_clean(r) for r in raws]
    assert [m["Subject"] for m in msgs] == [
        "Build #41 passed",
        "Build #42 fehlgeschlagen – Größe überschritten",
        "No guid, only a link",
    ]
    first, second, third = msgs
    assert first["Date"] == "Wed, 25 Nov 2026 09:00:00 +0000"
    assert second["Date"] == "Wed, 25 Nov 2026 09:30:00 +0000"  # feedparser normalises to UTC
    assert first["From"].addresses[0].display_name == "Build Server"
    assert "Jörg CI" in str(second["From"])
    assert first["To"] == "me@localhost"
    assert body_text(first) == "All 312 tests green.\n\nhttp://ci.example.org/41\n"
    # HTML items: readable text part, sanitised HTML alternative (no script).
    assert body_text(second) == "Step test failed.\n\nSee log.\n\nhttp://ci.example.org/42\n"
    html = second.get_body(("html",)).get_content()
    assert "<b>test</b>" in html and "script" not in html
    assert third["X-Feed-URL"] == "http://ci.example.org/43"
    assert third["Date"] == "Thu, 01 Jan 1970 00:00:00 +0000"  # no date anywhere: fixed, not "now"


def test_atom_entry(feeds):
    with Controller(FeedAdapter(feeds.url("/atom"), users={"me": "pw"})) as server:
        (raw,) = fetch(server)
    msg = assert_clean(raw)
    assert msg["Subject"] == "pop3frame 1.0"
    assert msg["Date"] == "Fri, 20 Nov 2026 18:30:02 +0000"
    assert msg["From"].addresses[0].display_name == "Release Bot"
    assert body_text(msg) == "Now stable\n\nAdapters for everything.\n\nhttp://example.org/1.0\n"


ODD = """<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0"><channel><title>Odd "feed", &lt;really&gt;</title>
  <item><title>odd author</title><guid>odd-1</guid><author>a@b, &lt;</author><pubDate>not a date</pubDate></item>
  <item><title>long author</title><guid>odd-2</guid><author>%s</author></item>
  <item><title>   </title><guid>odd-3</guid><description>text only</description></item>
  <item><title>breaks build</title><guid>odd-4</guid></item>
</channel></rss>
""" % ("a b. " * 60)


class FussyFeedAdapter(FeedAdapter):
    def build(self, username, feed, entry):
        if entry.get("id") == "odd-4":
            raise ValueError("cannot shape this item")
        return super().build(username, feed, entry)


def test_odd_items_give_clean_messages_and_a_failing_item_is_left_out(feeds, caplog):
    """Authors that are not addresses (or that the email package would fold
    into several), a date that is not one, a blank title: each item is a
    clean RFC 5322 message; an item build() fails on is logged and skipped,
    the rest of the feed is served."""
    feeds.publish("/odd", ODD)
    with Controller(FussyFeedAdapter(feeds.url("/odd"), users={"me": "pw"})) as server:
        msgs = [assert_clean(r) for r in fetch(server)]
    assert [m["Subject"] for m in msgs] == ["odd author", "long author", "text only"]
    assert [len(m["From"].addresses) for m in msgs] == [1, 1, 1]
    assert msgs[0]["From"].addresses[0].display_name == "a@b, <"
    assert msgs[0]["Date"] == "Thu, 01 Jan 1970 00:00:00 +0000"
    assert "could not be turned into a message (ValueError); left out" in caplog.text


def test_uids_and_message_ids_stable_across_feed_changes(feeds):
    """UIDL comes from guid/id (else link): reordering or new items leave
    existing unique-ids alone, so clients never fetch an item twice."""
    adapter = FeedAdapter(feeds.url("/rss"), users={"me": "pw"})
    with Controller(adapter) as server:
        client = server.pop3()
        client.user("me")
        client.pass_("pw")
        before = dict(zip([l.split()[1] for l in client.uidl()[1]], ["41", "42", "43"]))
        ids = [parse(retr_lines_to_bytes(client.retr(i)[1]))["Message-ID"] for i in (1, 2, 3)]
        client.quit()
        assert all(len(u) <= 70 for u in before)
        changed = RSS.replace("<title>Build #41 passed</title>", "<title>Build #41 passed (edited)</title>")
        changed = changed.replace("<item>", "<item><title>Build #44</title><guid>build-44</guid></item><item>", 1)
        feeds.publish("/rss", changed)
        client = server.pop3()
        client.user("me")
        client.pass_("pw")
        after = [l.split()[1] for l in client.uidl()[1]]
        ids_after = [parse(retr_lines_to_bytes(client.retr(i)[1]))["Message-ID"] for i in (2, 3, 4)]
        client.quit()
    assert after[1:] == list(before)
    assert ids_after == ids


def test_read_only_without_state_file(feeds):
    with Controller(FeedAdapter(feeds.url("/rss"), users={"me": "pw"})) as server:
        client = server.pop3()
        client.user("me")
        client.pass_("pw")
        assert "X-READ-ONLY" in client.capa()
        with pytest.raises(poplib.error_proto, match=r"\[SYS/PERM\]"):
            client.dele(1)
        client.quit()


def test_state_file_remembers_deleted_items_per_user(feeds, tmp_path):
    state = tmp_path / "seen.json"
    adapter = FeedAdapter(feeds.url("/rss"), users={"me": "pw", "you": "pw2"}, state_file=str(state))
    with Controller(adapter) as server:
        client = server.pop3()
        client.user("me")
        client.pass_("pw")
        uid2 = client.uidl(2).split()[2].decode()
        client.dele(2)
        client.quit()
        assert server.wait_for_connections(0)
        assert [parse(r)["Subject"] for r in fetch(server)] == ["Build #41 passed", "No guid, only a link"]
        assert len(fetch(server, "you", "pw2")) == 3
        # Items that left the feed leave the state file too.
        feeds.publish("/rss", RSS.replace("<guid isPermaLink=\"false\">build-42</guid>", "<guid>gone</guid>"))
        client = server.pop3()
        client.user("me")
        client.pass_("pw")
        client.dele(1)
        client.quit()
    saved = json.loads(state.read_text())
    assert uid2 not in saved["me"] and len(saved["me"]) == 1
    assert not list(tmp_path.glob(".feedstate-*"))


def test_local_path_and_fetch_failures(feeds, tmp_path):
    path = tmp_path / "feed.xml"
    path.write_text(ATOM, encoding="utf-8")
    with Controller(FeedAdapter(str(path), users={"me": "pw"})) as server:
        assert len(fetch(server)) == 1
    feeds.publish("/notafeed", "this is not XML at all {", "text/plain")
    for source in (feeds.url("/missing"), feeds.url("/notafeed"), str(tmp_path / "nope.xml")):
        with Controller(FeedAdapter(source, users={"me": "pw"})) as server:
            client = server.pop3()
            client.user("me")
            with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
                client.pass_("pw")
            client.quit()


def test_feed_unreachable_is_one_log_line(caplog):
    """No network (connection refused): -ERR [SYS/TEMP], and one WARNING
    line with the cause instead of urllib's chained traceback."""
    caplog.set_level(logging.INFO)
    with socket.socket() as s:  # a port the OS picked and nobody listens on
        s.bind(("127.0.0.1", 0))
        url = "http://127.0.0.1:%d/feed" % s.getsockname()[1]
    with Controller(FeedAdapter(url, users={"me": "pw"})) as server:
        client = server.pop3()
        client.user("me")
        with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[SYS/TEMP\] feed unavailable'$"):
            client.pass_("pw")
        client.quit()
        client.close()
        assert server.wait_for_connections(0)
    line = expected_failure_logged_once(caplog.records, "Connection refused")
    assert line.getMessage() == "cannot fetch feed %s: Connection refused" % url
    assert "Traceback" not in caplog.text


def test_feed_unreachable_at_debug_logs_the_traceback(caplog):
    """At DEBUG the same one line carries the traceback, for whoever digs."""
    caplog.set_level(logging.DEBUG)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = "http://127.0.0.1:%d/feed" % s.getsockname()[1]
    with pytest.raises(TemporaryFailure):
        FeedAdapter(url, users={"me": "pw"}).fetch()
    (line,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert line.getMessage().endswith(": Connection refused") and line.exc_info is not None


def test_wrong_password_and_hits_once_per_login(feeds):
    adapter = FeedAdapter(feeds.url("/rss"), users={"me": "pw"})
    with Controller(adapter) as server:
        client = server.pop3()
        client.user("me")
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            client.pass_("nope")
        assert feeds.hits == 0  # no fetch before the password is right
        client.user("me")
        client.pass_("pw")
        for i in (1, 2, 3, 1):
            client.retr(i)
        client.quit()
    assert feeds.hits == 1


def test_html_to_text():
    assert html_to_text("<p>a &amp; b</p><p>c<br>d</p><style>x{}</style>") == "a & b\n\nc\nd"
