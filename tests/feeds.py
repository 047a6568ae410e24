"""Sample RSS and Atom feeds, and a local HTTP server that publishes them."""
from __future__ import annotations

import http.server
import threading

RSS = """<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0"><channel>
  <title>Build Server</title><link>http://ci.example.org/</link><description>builds</description>
  <item>
    <title>Build #41 passed</title>
    <link>http://ci.example.org/41</link>
    <guid isPermaLink="false">build-41</guid>
    <pubDate>Wed, 25 Nov 2026 09:00:00 +0000</pubDate>
    <description>All 312 tests green.</description>
  </item>
  <item>
    <title>Build #42 fehlgeschlagen – Größe überschritten</title>
    <link>http://ci.example.org/42</link>
    <guid isPermaLink="false">build-42</guid>
    <pubDate>Wed, 25 Nov 2026 10:30:00 +0100</pubDate>
    <author>ci@example.org (Jörg CI)</author>
    <description>&lt;p&gt;Step &lt;b&gt;test&lt;/b&gt; failed.&lt;/p&gt;&lt;script&gt;alert(1)&lt;/script&gt;&lt;p&gt;See log.&lt;/p&gt;</description>
  </item>
  <item>
    <title>No guid, only a link</title>
    <link>http://ci.example.org/43</link>
  </item>
</channel></rss>
"""

ATOM = """<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom">
  <title>Release notes</title>
  <id>urn:uuid:60a76c80-d399-11d9-b93C-0003939e0af6</id>
  <updated>2026-11-20T18:30:02Z</updated>
  <entry>
    <title>pop3frame 1.0</title>
    <link href="http://example.org/1.0"/>
    <id>urn:uuid:1225c695-cfb8-4ebb-aaaa-80da344efa6a</id>
    <updated>2026-11-20T18:30:02Z</updated>
    <author><name>Release Bot</name></author>
    <content type="html">&lt;h1&gt;Now stable&lt;/h1&gt;&lt;p&gt;Adapters for everything.&lt;/p&gt;</content>
  </entry>
</feed>
"""


class FeedServer:
    """A real HTTP server on 127.0.0.1, port picked by the OS, in a thread."""

    def __init__(self):
        self.documents = {}
        self.hits = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.hits += 1
                doc = owner.documents.get(self.path)
                if doc is None:
                    self.send_error(404)
                    return
                ctype, body = doc
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.httpd.server_address[1], path)

    def publish(self, path, text, ctype="application/rss+xml"):
        self.documents[path] = (ctype, text.encode("utf-8"))

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)
