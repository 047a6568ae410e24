"""Mail from a plain Python function: a live status report of this machine.

Each login calls ``status_report()``; whatever it returns is the mailbox.
Here that is one message, rebuilt at every login, with a unique-id that
changes once a day, so a client that keeps mail on the server gets one new
report per day.

Run::

    .venv/bin/python examples/function_mail.py [PORT]      # user "me", password "secret"
"""
import datetime
import os
import shutil
import sys
from email.message import EmailMessage

from pop3frame import serve_function
from pop3frame.adapters.function import FunctionAdapter


def status_report():
    today = datetime.date.today().isoformat()
    usage = shutil.disk_usage("/")
    msg = EmailMessage()
    msg["From"] = "status <status@localhost>"
    msg["To"] = "me@localhost"
    msg["Subject"] = "Status of %s on %s" % (os.uname().nodename, today)
    msg["Date"] = datetime.datetime.now(datetime.timezone.utc)
    msg["Message-ID"] = "<status-%s@localhost>" % today
    msg.set_content(
        "Disk /: %d%% used (%.1f GB free)\nLoad average: %.2f %.2f %.2f\n"
        % ((100 * usage.used // usage.total), usage.free / 1e9, *os.getloadavg())
    )
    return [("status-" + today, msg)]  # (unique-id, message) pairs


def build_adapter():
    return FunctionAdapter(status_report, user="me", password="secret")


if __name__ == "__main__":
    serve_function(status_report, user="me", password="secret", port=int(sys.argv[1]) if len(sys.argv) > 1 else 1100)
