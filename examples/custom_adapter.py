"""A custom adapter from scratch: each line of a text file is a message; DELE removes the line.
Run: .venv/bin/python examples/custom_adapter.py todo.txt [PORT]   # any user name, password "secret"; PORT 1100"""
import email.header, email.utils, hashlib, hmac, os, sys  # noqa: E401
from pop3frame import AdapterBase, MessageInfo, POP3Server, protocol
class LinesAdapter(AdapterBase):
    def __init__(self, path, password):
        self.path, self.password = path, password

    def authenticate(self, username, password):  # any user name, one password
        return hmac.compare_digest(password.encode(), self.password.encode())

    def mailbox_id(self, username):  # every user reads the same file: one lock for all
        return "lines"

    def _lines(self):  # unique non-blank lines, in file order
        with open(self.path, encoding="utf-8") as f:
            return list(dict.fromkeys(line.strip() for line in f if line.strip()))

    def _message(self, line, date):  # a minimal RFC 5322 message; Subject RFC 2047-encoded, Message-ID from the line
        subject, digest = email.header.Header(line[:70], "utf-8").encode(), hashlib.sha1(line.encode()).hexdigest()
        return ("From: lines@localhost\r\nTo: you@localhost\r\nSubject: %s\r\nDate: %s\r\nMessage-ID: <%s@lines.invalid>\r\nMIME-Version: 1.0"
                "\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n%s\r\n" % (subject, email.utils.formatdate(date), digest, line)).encode()

    def list_messages(self, username):  # unique-id: a hash of the line; Date: when the file last changed, fixed for the session
        date = os.path.getmtime(self.path)
        return [MessageInfo(hashlib.sha1(l.encode()).hexdigest(), protocol.wire_size(self._message(l, date)), (l, date)) for l in self._lines()]

    def open_message(self, username, message):
        return self._message(*message.key)

    def delete_messages(self, username, messages):  # all or none: write a new file, rename it over the old
        doomed = {m.key[0] for m in messages}
        with open(self.path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in self._lines() if line not in doomed)
        os.replace(self.path + ".tmp", self.path)

build_adapter = LinesAdapter  # build_adapter(path, password): what the tests and __main__ call
if __name__ == "__main__":
    if len(sys.argv) < 2 or not os.path.isfile(sys.argv[1]): sys.exit("usage: custom_adapter.py FILE [PORT]: FILE, one message per line, must exist")  # noqa: E701
    POP3Server(("127.0.0.1", int(sys.argv[2]) if len(sys.argv) > 2 else 1100), build_adapter(sys.argv[1], "secret")).serve_forever()
