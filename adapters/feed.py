"""An RSS or Atom feed as a mailbox: one message per item.

::

    from pop3frame.adapters.feed import FeedAdapter
    adapter = FeedAdapter("https://example.org/news.atom", users={"me": "{SCRYPT}..."})

Needs ``feedparser``: ``pip install 'pop3frame[feeds]'``.  It is imported
when the first adapter is made, so the rest of pop3frame works without it.

Each login fetches the feed once (HTTP(S) with ``timeout``, or a local
file) and builds every item's message for the session; RETR serves those
bytes (the same cache trade-off as the SQL query adapter: feeds are small).

Messages: Subject = item title; Date = published (else updated) time, else
the feed's; From = the item's author (else the feed's title) with
``sender_address``; To = the user; the body is the item's text (HTML
converted to plain text) followed by its link, plus the HTML itself as a
multipart/alternative part when the item has HTML.  Message-ID and the
unique-id are derived from the item's id (RSS ``guid``, Atom ``id``), else
its link, else its title and date: SHA-256, so any id makes a valid POP3
unique-id and the same item always gets the same one.

Deleting: with no ``state_file`` the adapter is read-only (DELE answers
``-ERR [SYS/PERM]``), the right choice for "leave messages on server"
clients.  With ``state_file`` a DELE is remembered: the item's unique-id
is written to that small JSON file and the item is not listed again for
that user.  The file only keeps ids still present in the feed, so it
stays as small as the feed; it is replaced atomically (write + rename), so
a crash leaves the old or the new state, never half of one.

Thread-safety: feed fetching and parsing happen per call, in the session's
thread; the per-session cache and the state file are guarded by one mutex.

Errors: an unreachable feed, an HTTP error or a document that is not a
feed gives ``-ERR [SYS/TEMP]`` at login.  An item that cannot be turned
into a message (a ``build`` override failing on it) is logged and left
out of that session; the others are served.  Passwords and item contents are
never logged.
"""
from __future__ import annotations

import hashlib
import html.parser
import json
import logging
import os
import tempfile
import threading
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

from pop3frame import AdapterBase, MessageInfo, PermanentFailure, POP3Error, TemporaryFailure
from pop3frame.clientlog import quoted
from pop3frame.extras import install_hint
from pop3frame.failures import log_failure
from pop3frame.passwords import table_check
from pop3frame.protocol import wire_size

from ._build import build_message, message_id, one_line

__all__ = ["FeedAdapter", "html_to_text"]

logger = logging.getLogger("pop3frame.adapters.feed")

#: Largest feed document read, so a hostile URL cannot fill memory.
MAX_FEED_BYTES = 20 * 1024 * 1024


def _feedparser():
    try:
        import feedparser
    except ImportError:
        raise ImportError("the feed adapter needs feedparser: %s" % install_hint("feeds")) from None
    return feedparser


class _TextExtractor(html.parser.HTMLParser):
    _BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "hr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: List[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in self._BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style") and self._skip:
            self._skip -= 1
        elif tag in self._BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        if not self._skip:
            self.out.append(data)


def html_to_text(markup: str) -> str:
    """Readable plain text from an HTML fragment (for the text/plain part)."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    lines = [" ".join(line.split()) for line in "".join(parser.out).splitlines()]
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip()


class FeedAdapter(AdapterBase):
    """Serve the items of one RSS/Atom feed to every configured user.

    ``url_or_path``: ``http://``/``https://``/``file://`` URL or a local
    path.  ``users``: ``{name: password}`` (``{SCHEME}hash``, a bare crypt
    hash or plain text, read by :func:`pop3frame.passwords.stored_password`)
    or a callable ``(user, password) -> bool``.  ``state_file``: enables
    "delete = remember", see the module docstring.  ``sender_address``: the
    address in From.  ``timeout``: seconds for fetching the feed.
    """

    def __init__(
        self,
        url_or_path: str,
        *,
        users: Union[Mapping[str, str], Callable[[str, str], bool]],
        state_file: Optional[str] = None,
        sender_address: str = "feed@localhost",
        domain: str = "pop3frame.invalid",
        timeout: float = 30.0,
        user_agent: str = "pop3frame-feed",
    ) -> None:
        self._fp = _feedparser()  # fail at construction, with the install hint
        self.source = url_or_path
        if callable(users):
            self._check: Callable[[str, str], bool] = users
        else:
            self._check = table_check(users)
        self.state_file = state_file
        self.read_only = state_file is None
        self.sender_address = sender_address
        self.domain = domain
        self.timeout = timeout
        self.user_agent = user_agent
        self._mutex = threading.Lock()
        self._sessions: Dict[str, Dict[str, bytes]] = {}
        #: uids of every item in the feed at the user's last login, for pruning.
        self._current: Dict[str, Set[str]] = {}

    def authenticate(self, username: str, password: str) -> bool:
        return bool(self._check(username, password))

    # -- fetching -------------------------------------------------------------------

    def fetch(self) -> bytes:
        """The feed document's bytes."""
        source = self.source
        try:
            if "://" not in source:
                with open(source, "rb") as f:
                    return f.read(MAX_FEED_BYTES)
            request = urllib.request.Request(source, headers={"User-Agent": self.user_agent})
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read(MAX_FEED_BYTES)
        except (OSError, ValueError, urllib.error.URLError) as exc:
            log_failure(logger, logging.WARNING, "cannot fetch feed %s", source, exc=exc)
            raise TemporaryFailure("feed unavailable") from None

    def items(self) -> Tuple[Any, List[Any]]:
        """(feed metadata, entries) of the parsed feed."""
        parsed = self._fp.parse(self.fetch())
        if parsed.get("bozo") and not parsed.entries and not parsed.feed.get("title"):
            logger.warning("%s is not a feed: %s", self.source, parsed.get("bozo_exception"))
            raise TemporaryFailure("feed could not be parsed")
        return parsed.feed, list(parsed.entries)

    # -- items to messages ------------------------------------------------------------

    @staticmethod
    def item_key(entry: Any) -> str:
        """What identifies an item: its id/guid, else link, else title and date."""
        for field in ("id", "link"):
            value = entry.get(field)
            if value:
                return "%s:%s" % (field, value)
        return "title:%s|%s" % (entry.get("title", ""), entry.get("published", _own(entry, "updated") or ""))

    @classmethod
    def item_uid(cls, entry: Any) -> str:
        return "f" + hashlib.sha256(cls.item_key(entry).encode("utf-8")).hexdigest()[:40]

    def build(self, username: str, feed: Any, entry: Any) -> bytes:
        """The message for one item; override to shape messages differently."""
        markup, is_html = self._content(entry)
        text = html_to_text(markup) if is_html else markup.strip()
        link = entry.get("link", "")
        if link:
            text = (text + "\n\n" if text else "") + link
            if is_html:
                markup += '\n<p><a href="%s">%s</a></p>' % (_attr(link), _escape(link))
        author = one_line(entry.get("author") or feed.get("title") or "feed")
        date = entry.get("published_parsed") or _own(entry, "updated_parsed") or _own(feed, "updated_parsed")
        return build_message(
            subject=entry.get("title") or text.split("\n", 1)[0] or "(untitled)",
            body=text,
            html=markup if is_html else None,
            date=date,
            msgid=message_id(self.item_key(entry), "feed", self.domain),
            sender=_mailbox(author, self.sender_address),
            recipient=username if "@" in username else username + "@localhost",
            headers=[("X-Feed-URL", link)] if link else [],
        )

    @staticmethod
    def _content(entry: Any) -> Tuple[str, bool]:
        """(the richest text the item has, whether it is HTML)."""
        candidates = list(entry.get("content") or [])
        detail = entry.get("summary_detail")
        if detail:
            candidates.append(detail)
        for c in candidates:
            value = c.get("value") or ""
            if value:
                return value, "html" in (c.get("type") or "")
        return entry.get("summary", "") or "", False

    # -- state file -------------------------------------------------------------------

    def _load_state(self) -> Dict[str, List[str]]:
        if not self.state_file:
            return {}
        try:
            with open(self.state_file, "r", encoding="utf-8") as f:
                data = json.load(f)
            return {str(k): [str(u) for u in v] for k, v in data.items()} if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log_failure(logger, logging.ERROR, "cannot read state file %s", self.state_file, exc=exc)
            raise TemporaryFailure("feed state unavailable") from None

    def _save_state(self, state: Dict[str, List[str]]) -> None:
        assert self.state_file
        directory = os.path.dirname(os.path.abspath(self.state_file))
        fd, tmp = tempfile.mkstemp(prefix=".feedstate-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(state, f, indent=0, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_file)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    # -- the adapter contract -------------------------------------------------------

    def list_messages(self, username: str) -> Sequence[MessageInfo]:
        feed, entries = self.items()
        with self._mutex:
            hidden = set(self._load_state().get(username, ()))
        messages: List[MessageInfo] = []
        cache: Dict[str, bytes] = {}
        current: Set[str] = set()
        for entry in entries:
            uid = self.item_uid(entry)
            current.add(uid)
            if uid in hidden or uid in cache:
                continue
            try:
                data = self.build(username, feed, entry)
            except POP3Error:
                raise
            except Exception as exc:
                # One odd item must not hide the rest of the feed.  The type
                # only: the exception's text may quote the item's content.
                logger.error(
                    "%s: item %s could not be turned into a message (%s); left out",
                    self.source, uid, type(exc).__name__,
                )
                continue
            cache[uid] = data
            messages.append(MessageInfo(uid, wire_size(data), key=uid))
        with self._mutex:
            self._sessions[username] = cache
            self._current[username] = current
        return messages

    def open_message(self, username: str, message: MessageInfo) -> bytes:
        with self._mutex:
            data = self._sessions.get(username, {}).get(message.key)
        if data is None:
            raise TemporaryFailure("item no longer available")
        return data

    def delete_messages(self, username: str, messages: Sequence[MessageInfo]) -> None:
        if self.read_only:
            raise PermanentFailure("this mailbox is read-only")
        with self._mutex:
            state = self._load_state()
            current = self._current.get(username, set())
            # Keep only ids still in the feed: the file never outgrows it.
            seen = {u for u in state.get(username, ()) if u in current}
            seen.update(m.key for m in messages)
            state[username] = sorted(seen)
            try:
                self._save_state(state)
            except OSError as exc:
                log_failure(logger, logging.ERROR, "cannot write state file %s", self.state_file, exc=exc)
                raise TemporaryFailure("could not remember deleted items") from None
        logger.info("hid %d feed item(s) for %s", len(messages), quoted(username))

    def close_mailbox(self, username: str) -> None:
        with self._mutex:
            self._sessions.pop(username, None)
            self._current.pop(username, None)


def _own(parsed: Any, key: str) -> Any:
    """``parsed[key]`` if the document has it, else None.  feedparser's
    ``get("updated...")`` falls back to the published time with a
    DeprecationWarning, and that fallback is going away."""
    return parsed[key] if key in parsed else None


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _attr(text: str) -> str:
    return _escape(text).replace('"', "&quot;")


def _mailbox(name: str, address: str) -> str:
    from email.headerregistry import Address

    try:
        return str(Address(display_name=name, addr_spec=address))
    except (ValueError, IndexError):
        return address
