"""Operator mistakes are caught before serving: one line each on stderr,
exit code 2, never a traceback, from ``serve`` and from ``check-config``,
which reports every problem of a file in one run.  Paths are checked as
the user the server runs as (``--user nobody``; the tests run as root)."""
from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys

import pytest

from tests.helpers import RawClient, moved_into, reachable_dir
from tests.processes import Daemon, pop3frame, write_config

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "example.toml")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to nobody needs root")


def errors(out) -> list:
    """The stderr lines of a command that must have failed as an operator mistake."""
    err = out.stderr.decode()
    assert out.returncode == 2, err
    assert "Traceback" not in err and out.stdout == b"", err
    lines = err.splitlines()
    assert lines and all(line.startswith("pop3frame: ") for line in lines), err
    return lines


def who() -> str:
    """How the checks name the user they run as."""
    return "user %s" % pwd.getpwuid(os.geteuid()).pw_name


def one_error(out) -> str:
    (line,) = errors(out)
    return line


@pytest.fixture
def passwd(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("alice:{PLAIN}pw\n")
    return str(path)


@pytest.mark.parametrize("store,path,what", [
    ("maildir", "nope/mail", "nope/mail (the maildir root)"),
    ("directory", "nope/mail", "nope/mail (the directory root)"),
    ("mbox", "nope/mail", "nope/mail (the mbox directory)"),
    ("mbox", "nope/{user}/mbox", "nope (the directory of the mbox files)"),
])
def test_missing_mail_root_is_refused(tmp_path, passwd, store, path, what):
    """A mail root that does not exist used to serve empty maildrops to everyone."""
    out = pop3frame("serve", "--" + store, path, "--passwd", passwd, "--listen", "127.0.0.1:0", cwd=str(tmp_path))
    assert one_error(out) == "pop3frame: --%s: no such directory: %s" % (store, what)
    config = write_config(tmp_path, """
        [adapter]
        type = "%s"
        path = "%s"
        passwd = "%s"
    """ % (store, path, passwd))
    for args in (("serve", "--config", config, "--listen", "127.0.0.1:0"), ("check-config", config)):
        out = pop3frame(*args, cwd=str(tmp_path))
        assert one_error(out) == "pop3frame: %s:4: adapter.path: no such directory: %s" % (config, what)
    assert sorted(os.listdir(tmp_path)) == ["passwd", "pop3frame.toml"]  # nothing created


def test_a_file_as_mail_root_is_refused(tmp_path, passwd):
    out = pop3frame("serve", "--maildir", passwd, "--passwd", passwd, "--listen", "127.0.0.1:0")
    assert one_error(out) == "pop3frame: --maildir: not a directory: %s (the maildir root)" % passwd


@pytest.fixture
def nobody():
    return pwd.getpwnam("nobody")


@pytest.fixture
def shared(nobody):
    """A root-owned directory nobody can enter but not write, with a Maildir
    root in it whose user Maildir belongs to nobody."""
    with reachable_dir("pop3frame-shared-", 0o755) as path:
        os.makedirs(os.path.join(path, "mail", "alice", "new"))
        os.chmod(os.path.join(path, "mail"), 0o755)
        for name in ("alice", "alice/new"):
            os.chown(os.path.join(path, "mail", name), nobody.pw_uid, nobody.pw_gid)
        yield path


@needs_root
def test_passwd_file_the_dropped_user_cannot_read(shared, tmp_path):
    """Root can read the passwd-file, nobody cannot: refused at start-up (not at
    the first login with -ERR [SYS/TEMP]), by serve and by check-config, which
    checks as the configured user in a child process."""
    passwd = os.path.join(shared, "passwd")
    with open(passwd, "w") as f:
        f.write("alice:{PLAIN}pw\n")
    os.chmod(passwd, 0o600)
    mail = os.path.join(shared, "mail")
    out = pop3frame("serve", "--maildir", mail, "--passwd", passwd, "--user", "nobody", "--listen", "127.0.0.1:0")
    assert one_error(out) == "pop3frame: --passwd: cannot read %s as user nobody: Permission denied" % passwd
    config = write_config(tmp_path, """
        user = "nobody"
        [adapter]
        type = "maildir"
        path = "%s"
        passwd = "%s"
    """ % (mail, passwd))
    out = pop3frame("check-config", config)
    assert one_error(out) == ("pop3frame: %s:6: adapter.passwd: cannot read %s as user nobody: Permission denied"
                              % (config, passwd))
    os.chmod(passwd, 0o644)
    assert pop3frame("check-config", config).returncode == 0
    with Daemon("--maildir", mail, "--passwd", passwd, "--user", "nobody", "--listen", "127.0.0.1:0") as d:
        assert d.saw(r"loaded 1 user from %s" % re.escape(passwd))  # read at start-up, as nobody
        with RawClient(("127.0.0.1", d.port)) as c:
            assert c.login("alice", "pw") == b"+OK alice's maildrop has 0 messages (0 octets)\r\n"
        assert d.stop() == 0


def test_malformed_passwd_lines_are_refused(tmp_path):
    """Each malformed line is one line of the report, named by file and line,
    from serve and from check-config (which used to say nothing of them)."""
    passwd = tmp_path / "passwd"
    passwd.write_text("# users\nalice:{PLAIN}pw\nthis line has no colon\n\n:{PLAIN}no-user\nbob:{PLAIN}pw\n")
    (tmp_path / "mail").mkdir()
    out = pop3frame("serve", "--maildir", str(tmp_path / "mail"), "--passwd", str(passwd),
                    "--listen", "127.0.0.1:0")
    malformed = ["%s:%d: malformed line (expected user:{SCHEME}hash)" % (passwd, n) for n in (3, 5)]
    assert errors(out) == ["pop3frame: --passwd: " + line for line in malformed]
    config = write_config(tmp_path, """
        [adapter]
        type = "maildir"
        path = "%s"
        passwd = "%s"
    """ % (tmp_path / "mail", passwd))
    out = pop3frame("check-config", config)
    assert errors(out) == ["pop3frame: %s:5: adapter.passwd: %s" % (config, line) for line in malformed]


@pytest.mark.parametrize("special, kind", [("fifo", "a FIFO"), ("/dev/zero", "a character device"),
                                           ("/dev/null", "a character device")])
def test_passwd_file_certificate_and_key_must_be_regular_files(tmp_path, special, kind):
    """A FIFO nobody writes to held serve and check-config in open() for ever, /dev/zero
    in read() until memory ran out: each is one line now, and nothing waits."""
    if special == "fifo":
        special = str(tmp_path / "fifo")
        os.mkfifo(special)
    (tmp_path / "mail").mkdir()
    mail = str(tmp_path / "mail")
    out = pop3frame("serve", "--maildir", mail, "--passwd", special, "--listen", "127.0.0.1:0")
    assert one_error(out) == "pop3frame: --passwd: cannot read %s as %s: %s, not a regular file" % (
        special, who(), kind)
    config = write_config(tmp_path, """
        [adapter]
        type = "maildir"
        path = "%s"
        passwd = "%s"
        [tls]
        cert = "%s"
        key = "%s"
    """ % (mail, special, special, special))
    assert errors(pop3frame("check-config", config)) == [
        "pop3frame: %s:%d: %s: cannot read %s as %s: %s, not a regular file" % (config, line, key, special, who(), kind)
        for line, key in ((5, "adapter.passwd"), (7, "tls.cert"), (8, "tls.key"))]


def test_a_config_file_without_end_is_refused_bounded(tmp_path):
    """check-config /dev/zero read until memory ran out; a pipe (bash's <(...)) still works."""
    for args in (("check-config", "/dev/zero"), ("serve", "--config", "/dev/zero", "--listen", "127.0.0.1:0")):
        assert one_error(pop3frame(*args)) == "pop3frame: /dev/zero: larger than 1024 KiB: not a config file"
    out = subprocess.run(["bash", "-c", "%s -m pop3frame check-config <(printf 'workers = 2\\n')" % sys.executable],
                         capture_output=True, timeout=60, cwd=str(tmp_path))
    assert out.returncode == 0 and b"workers = 2" in out.stdout, out


@needs_root
def test_paths_the_dropped_user_cannot_create(shared):
    """The SQLite store and the lock directory are created after the switch:
    a directory only root may write in is refused up front."""
    db = os.path.join(shared, "store", "pop3frame.db")
    out = pop3frame("serve", "--sqlite", db, "--user", "nobody", "--listen", "127.0.0.1:0")
    assert one_error(out) == ("pop3frame: --sqlite: cannot create %s (the directory of the SQLite store): "
                              "%s: permission denied for user nobody" % (os.path.dirname(db), shared))
    locks = os.path.join(shared, "locks")
    out = pop3frame("serve", "--demo", "--lock-dir", locks, "--user", "nobody", "--listen", "127.0.0.1:0")
    assert one_error(out) == ("pop3frame: --lock-dir: cannot create %s (the lock directory): "
                              "%s: permission denied for user nobody" % (locks, shared))
    assert sorted(os.listdir(shared)) == ["mail"]


def test_lock_directory_others_may_write_is_refused_at_start(tmp_path):
    """A shared lock directory (--lock-dir /tmp/locks, mode 1777) would let any
    local user take any mailbox's lock: one line, exit 2."""
    locks = tmp_path / "locks"
    locks.mkdir()
    locks.chmod(0o1777)
    out = pop3frame("serve", "--demo", "--lock-dir", str(locks), "--listen", "127.0.0.1:0")
    assert out.returncode == 2
    assert one_error(out) == ("pop3frame: lock directory %s: others may write in it "
                              "(chmod go-w, or a directory of its own)" % locks)


@pytest.mark.parametrize("address,why", [
    ("[::1", "no ']' closes the IPv6 address"),
    (":1100", "the host is empty; for all interfaces write 0.0.0.0:1100 or [::]:1100"),
    ("::1:1100", "write an IPv6 address in brackets, as [::1]:1100"),
    ("[::1]1100", "a ':PORT' must follow the ']'"),
    ("[localhost]:1100", "'localhost' in brackets is not an IPv6 address"),
    ("127.0.0.1", "no ':PORT'"),
    ("127.0.0.1:", "the port is empty"),
    ("127.0.0.1:65536", "the port must be a number from 0 to 65535"),
    ("127.0.0.1:pop3", "the port must be a number from 0 to 65535"),
    ("300.1.1.1:110", "'300.1.1.1' is not an IPv4 address or a host name"),
    ("mail server:110", "'mail server' is not an IPv4 address or a host name"),
    ("host]:110", "a ']' without '['"),
    # int() takes any Unicode digits: fullwidth zero was port 0, '²' an error about base 10.
    ("127.0.0.1:\uff10", "the port must be a number from 0 to 65535"),
    ("127.0.0.1:\u00b2", "the port must be a number from 0 to 65535"),
])
def test_malformed_listen_addresses(tmp_path, address, why):
    """Every malformed address gets one clear line, on the command line and in
    a config file; an empty host no longer means "every interface"."""
    out = pop3frame("serve", "--demo", "--listen", address)
    expected = "expected HOST:PORT, got %r (%s)" % (address, why)
    assert one_error(out) == "pop3frame: serve: argument --listen: " + expected
    config = write_config(tmp_path, '[[listener]]\naddress = "%s"\n[stats]\nlisten = "%s"\n' % (address, address))
    assert errors(pop3frame("check-config", config)) == [
        "pop3frame: %s:2: listener[0].address: %s" % (config, expected),
        "pop3frame: %s:4: stats.listen: %s" % (config, expected),
    ]


def test_numbers_in_settings_are_ascii_digits():
    """'２' workers, EXPIRE '１０' (which CAPA would have sent, RFC 2449 section 6.7 wants
    digits), --user '０' (uid 0 by int()): each is refused as not a number."""
    from pop3frame.config import ServerConfig
    from pop3frame.configfile import parse_workers
    from pop3frame.lifecycle import resolve_ids

    with pytest.raises(ValueError, match="expected a number of processes"):
        parse_workers("\uff12")
    with pytest.raises(ValueError, match="expire must be NEVER or a number of days"):
        ServerConfig(expire="\uff11\uff10")
    with pytest.raises(ValueError, match="no such user"):
        resolve_ids("\uff10", None)
    assert parse_workers("2") == 2 and resolve_ids("0", None)[:2] == (0, 0)


@pytest.mark.parametrize("address,bound", [("0.0.0.0:0", "0.0.0.0"), ("[::]:0", "::"), ("[::1]:0", "::1")])
def test_all_interfaces_written_out(tmp_path, address, bound):
    with Daemon("--sqlite", str(tmp_path / "store.db"), "--listen", address) as d:
        assert d.saw(r"listening on %s port %d" % (re.escape(bound), d.port))
        with RawClient(("::1" if ":" in bound else "127.0.0.1", d.port)) as c:
            assert c.greeting.startswith(b"+OK")
        assert d.stop() == 0


def test_check_config_reports_every_problem_in_one_run(tmp_path):
    """One run lists them all, in the order of the file, each FILE:LINE: key: message."""
    (tmp_path / "file").write_text("")
    config = write_config(tmp_path, """\
        [[listener]]
        address = ":110"
        [adapter]
        type = "maildir"
        path = "{d}/nope/mail"
        passwd = "{d}/nope/passwd"
        [locks]
        backend = "file"
        directory = "{d}/file/locks"
        [server]
        timeout = 60
        max_conections = 3
        greeting = "fine"
        [logging]
        level = "LOUD"
    """.replace("{d}", str(tmp_path)))
    out = pop3frame("check-config", config, cwd=str(tmp_path))
    assert errors(out) == ["pop3frame: %s:%s" % (config, line) for line in (
        "2: listener[0].address: expected HOST:PORT, got ':110' (the host is empty; for all interfaces "
        "write 0.0.0.0:110 or [::]:110)",
        "5: adapter.path: no such directory: %s/nope/mail (the maildir root)" % tmp_path,
        "6: adapter.passwd: no such file: %s/nope/passwd" % tmp_path,
        "9: locks.directory: cannot create %s/file/locks (the lock directory): %s/file is not a directory"
        % (tmp_path, tmp_path),
        "11: server.timeout: must be at least 600 seconds (RFC 1939 section 3)",
        "12: server.max_conections: unknown key (did you mean 'max_connections'?)",
        "15: logging.level: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'LOUD'",
    )]
    # serve names the same problems (the first of a file's mistakes and all the rest)
    assert errors(pop3frame("serve", "--config", config, cwd=str(tmp_path)))[0] == errors(out)[0]
    assert sorted(os.listdir(tmp_path)) == ["file", "pop3frame.toml"]


def example_in(tree) -> str:
    """docs/example.toml with its /etc, /var/mail and /run paths moved into ``tree``."""
    with open(EXAMPLE) as f:
        return write_config(tree, moved_into(f.read(), tree), "example.toml")


def test_shipped_example_validates_in_a_temporary_tree(tmp_path):
    """docs/example.toml is checked as shipped, paths aside: with its files in
    place it passes; without them, check-config names each one."""
    import trustme

    config = example_in(tmp_path)
    missing = errors(pop3frame("check-config", config, cwd=str(tmp_path)))
    assert [re.sub(r"^pop3frame: [^:]+:\d+: ", "", line).split(":")[0] for line in missing] == [
        "tls.cert", "tls.key", "adapter.path", "adapter.passwd"]
    (tmp_path / "etc").mkdir()
    (tmp_path / "mail").mkdir()
    (tmp_path / "etc" / "passwd").write_text("alice:{PLAIN}pw\n")
    issued = trustme.CA().issue_cert("mail.example.org")
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "etc" / "fullchain.pem"))
    issued.private_key_pem.write_to_path(str(tmp_path / "etc" / "privkey.pem"))
    out = pop3frame("check-config", config, cwd=str(tmp_path))
    assert out.returncode == 0 and out.stderr == b"", out.stderr
    text = out.stdout.decode()
    assert 'directory = "%s"' % (tmp_path / "run" / "locks") in text and 'address = "[::]:110"' in text
    assert not (tmp_path / "run").exists()  # checked, not created
    shutil.rmtree(tmp_path / "etc")


def test_a_port_in_use_or_an_address_not_here_says_what_to_do(tmp_path):
    """The quick start's port may be taken by another program: the line says
    so and what to do, for the POP3 and the stats listeners alike."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = pop3frame("serve", "--demo", "--listen", "127.0.0.1:%d" % port)
        assert one_error(out) == ("pop3frame: cannot listen on 127.0.0.1:%d: Address already in use (another "
                                  "program listens there: stop it, or choose another port)" % port)
        out = pop3frame("serve", "--demo", "--listen", "127.0.0.1:0", "--stats-listen", "127.0.0.1:%d" % port)
        assert one_error(out).startswith("pop3frame: cannot listen on 127.0.0.1:%d for stats: Address already in use ("
                                         % port)
    out = pop3frame("serve", "--demo", "--listen", "192.0.2.1:1100")  # TEST-NET-1: on no interface here
    assert one_error(out) == ("pop3frame: cannot listen on 192.0.2.1:1100: Cannot assign requested address "
                              "(no network interface of this machine has that address)")


@needs_root
def test_a_uid_without_passwd_entry_needs_a_group(tmp_path):
    """--user 99999 (no passwd entry) used to switch the uid alone and serve
    with root's group and supplementary groups; now it must name a group."""
    assert 99999 not in [entry.pw_uid for entry in pwd.getpwall()]
    out = pop3frame("serve", "--demo", "--user", "99999", "--listen", "127.0.0.1:0")
    assert one_error(out) == ("pop3frame: --user: uid 99999 has no passwd entry to take a group from; "
                              "name the group too")
    config = write_config(tmp_path, 'user = "99999"\n')
    assert one_error(pop3frame("check-config", config)).startswith("pop3frame: %s:1: user: uid 99999 " % config)
    with Daemon("--demo", "--user", "99999", "--group", "65534", "--listen", "127.0.0.1:0") as d:
        with open("/proc/%d/status" % d.proc.pid) as f:
            status = dict(line.split(":", 1) for line in f)
        assert status["Uid"].split() == ["99999"] * 4 and status["Gid"].split() == ["65534"] * 4
        assert status["Groups"].split() == ["65534"]
        assert d.stop() == 0


def test_check_config_with_a_certificate_but_no_key_and_an_unknown_table(tmp_path):
    """Found together with other mistakes: no traceback from loading half a
    TLS pair, and an unknown table is named by its header's line."""
    config = write_config(tmp_path, '[[listener]]\naddress = "[::1"\n[tls]\ncert = "c.pem"\n[extra]\nx = 1\n')
    assert errors(pop3frame("check-config", config)) == ["pop3frame: %s:%s" % (config, line) for line in (
        "2: listener[0].address: expected HOST:PORT, got '[::1' (no ']' closes the IPv6 address)",
        "3: tls.key: missing: TLS needs both cert and key",
        "5: extra: unknown key",
    )]


def test_certificate_and_key_are_checked_each_by_its_own_name(tmp_path):
    """A missing certificate and a missing key are two problems, each named
    (one "cannot load certificate/key: No such file or directory" line used
    to hide which, and the key only showed once the certificate was there);
    an unreadable pair is one line naming both files."""
    out = pop3frame("serve", "--demo", "--listen", "127.0.0.1:0", "--cert", "cert.pem", "--key", "key.pem",
                    cwd=str(tmp_path))
    assert errors(out) == ["pop3frame: --cert: no such file: cert.pem", "pop3frame: --key: no such file: key.pem"]
    config = write_config(tmp_path, '[tls]\ncert = "cert.pem"\nkey = "key.pem"\n')
    assert errors(pop3frame("check-config", config, cwd=str(tmp_path))) == [
        "pop3frame: %s:2: tls.cert: no such file: cert.pem" % config,
        "pop3frame: %s:3: tls.key: no such file: key.pem" % config]
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    assert errors(pop3frame("check-config", config, cwd=str(tmp_path))) == [
        "pop3frame: %s:3: tls.key: no such file: key.pem" % config]
    (tmp_path / "key.pem").mkdir()
    assert errors(pop3frame("serve", "--config", config, "--listen", "127.0.0.1:0", cwd=str(tmp_path))) == [
        "pop3frame: %s:3: tls.key: cannot read key.pem as user %s: Is a directory"
        % (config, pwd.getpwuid(os.geteuid()).pw_name)]
    (tmp_path / "key.pem").rmdir()
    (tmp_path / "key.pem").write_text("not a key\n")
    (line,) = errors(pop3frame("check-config", config, cwd=str(tmp_path)))
    assert line.startswith("pop3frame: %s:2: tls.cert: cannot load cert.pem with the key key.pem: not a PEM "
                           "certificate chain and its private key (OpenSSL: " % config), line


@needs_root
def test_code_the_dropped_user_cannot_read_is_refused(tmp_path, shared):
    """pop3frame run from a checkout in a directory only root may enter (as
    root's home, or a fresh clone under mktemp -d): with --user nobody it
    started, then a late import failed ("sqlite: cannot open pop3frame.db:
    No module named 'pop3frame.adapters.memory'"), or a login did.  Now one
    line names the code's place, from serve and from check-config."""
    code = tmp_path / "code"  # tmp_path: under root's 0700 directory
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copytree(os.path.join(root, "pop3frame"), str(code / "pop3frame"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(root, "adapters"), str(code / "pop3frame" / "adapters"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    db = os.path.join(shared, "store", "pop3frame.db")
    os.makedirs(os.path.dirname(db))
    os.chown(os.path.dirname(db), *[getattr(pwd.getpwnam("nobody"), f) for f in ("pw_uid", "pw_gid")])
    config = write_config(tmp_path, 'user = "nobody"\n[adapter]\ntype = "sqlite"\npath = "%s"\n' % db)
    paths = [str(code)]
    if sys.version_info < (3, 11):  # no tomllib: the config file needs tomli, which -S leaves out
        import tomli
        paths.append(os.path.dirname(os.path.dirname(tomli.__file__)))
    run = "import sys; sys.path[:0] = %r; from pop3frame.cli import main; sys.exit(main())" % paths
    expected = ("user nobody cannot read pop3frame's code in %s, which it imports while serving: install "
                "pop3frame where that user can read it (a venv under /opt, as docs/pop3frame.service does)"
                % (code / "pop3frame"))
    for args, prefix in ((("serve", "--sqlite", db, "--user", "nobody", "--listen", "127.0.0.1:0"), "--user: "),
                         (("check-config", config), "%s:1: user: " % config)):
        # -S: no site-packages, so this copy is the pop3frame imported (the core needs the standard library only)
        out = subprocess.run([sys.executable, "-S", "-c", run, *args], capture_output=True, timeout=60,
                             cwd=str(tmp_path))
        assert one_error(out) == "pop3frame: " + prefix + expected
    assert not os.path.exists(db)
