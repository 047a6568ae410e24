"""The pop3frame command as a subprocess, for tests that drive the real CLI."""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from tests import reaper


def pop3frame(*args, input=None, cwd=None, env=None) -> subprocess.CompletedProcess:
    """Run one ``pop3frame`` command to completion (bounded); ``env`` is added to the environment."""
    return subprocess.run([sys.executable, "-m", "pop3frame", *args], input=input, capture_output=True,
                          cwd=cwd, timeout=60, env=dict(os.environ, **env) if env else None)


def on_port_0(args: tuple) -> tuple:
    """``serve`` args with a listener on port 0 unless they name one: a
    mistake checked after binding (as the serving user) must neither need
    nor take the default 127.0.0.1:1100, which another process may hold."""
    if args[:1] == ("serve",) and "--listen" not in args:
        return args + ("--listen", "127.0.0.1:0")
    return args


class Piped:
    """A program in a subprocess whose stderr is pumped into a queue, so every wait is bounded."""

    def __init__(self, argv, cwd=None) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, cwd=cwd)
        reaper.reap(self.proc.pid)
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.seen: list = []
        self.terminated = False
        self._pumping = threading.Thread(target=self._pump, daemon=True)
        self._pumping.start()

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put("")

    def wait_for(self, pattern: str, timeout: float = 20.0):
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                pytest.fail("no log line matching %r in %s s; saw:\n%s" % (pattern, timeout, "".join(self.seen)))
            if not line:
                pytest.fail("process exited (%s) before logging %r:\n%s" % (self.proc.wait(10), pattern, "".join(self.seen)))
            self.seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m

    def rest(self, timeout: float = 20.0) -> str:
        """Every line still to come, once the process has ended (bounded)."""
        out = []
        for _ in range(100000):
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                pytest.fail("the process did not close stderr in %s s" % timeout)
            if not line:
                return "".join(out)
            out.append(line)
        pytest.fail("endless output")

    def saw(self, pattern: str):
        """A line already read (e.g. before the listening lines) that matches."""
        return next((m for m in (re.search(pattern, l) for l in self.seen) if m), None)

    def signal(self, signum) -> None:
        self.terminated = self.terminated or signum == signal.SIGTERM
        self.proc.send_signal(signum)

    def stop(self) -> int:
        if self.proc.poll() is None and not self.terminated:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        # The pump ends at the end of stderr; then the pipe can be closed.
        self._pumping.join(10)
        self.proc.stderr.close()


class Daemon(Piped):
    """``pop3frame serve`` in a subprocess, started when its listeners log their ports."""

    def __init__(self, *args: str, cwd=None, listeners: int = 1, ulimit: str = "") -> None:
        argv = [sys.executable, "-m", "pop3frame", "serve", *args]
        if ulimit:  # the shell's ulimit options (e.g. "-Sn 64"), then exec: the pid stays the server's
            argv = ["sh", "-c", 'ulimit %s && exec "$@"' % ulimit, "sh"] + argv
        super().__init__(argv, cwd=cwd)
        try:
            self.ports = [int(self.wait_for(r"listening on \S+ port (\d+)").group(1)) for _ in range(listeners)]
        except BaseException:
            self.__exit__()
            raise
        self.port = self.ports[0]


def write_config(tmp_path, text: str, name: str = "pop3frame.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)
