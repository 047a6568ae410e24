"""The TOML config file: every key, generic ServerConfig mapping, errors naming key and line."""
from __future__ import annotations

import dataclasses
import os
import textwrap

import pytest

from pop3frame import ServerConfig
from pop3frame.configfile import (
    NOT_CONFIGURABLE,
    AdapterSpec,
    ConfigError,
    Listener,
    dump,
    load,
    make_adapter,
    parse,
    server_config,
)

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "docs", "example.toml")


@pytest.fixture
def example_text(tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text("alice:{PLAIN}pw\n")
    with open(EXAMPLE) as f:
        return f.read().replace("/etc/pop3frame/passwd", str(passwd))


def test_example_file_parses(example_text):
    s = parse(example_text, "example.toml")
    assert s.listeners == [
        Listener(("0.0.0.0", 110)),
        Listener(("::", 110)),
        Listener(("0.0.0.0", 995), tls=True),
        Listener(("127.0.0.1", 1110), proxy_protocol=True),
    ]
    assert s.cert == "/etc/pop3frame/fullchain.pem"
    assert s.adapter.type == "maildir" and s.adapter.path == "/var/mail" and s.adapter.options == {"mark_seen": True}
    assert (s.lock_backend, s.lock_dir) == ("file", "/run/pop3frame/locks")
    assert s.shutdown_grace == 10.0 and s.proxy_timeout == 5.0
    config = server_config(s)
    assert config.trusted_networks == ("127.0.0.0/8", "::1/128")
    assert config.max_auth_failure_delay == 60.0 and isinstance(config.timeout, float)


def test_example_documents_every_server_config_field():
    """A field the TLS/session side adds to ServerConfig must be documented in example.toml."""
    with open(EXAMPLE) as f:
        text = f.read()
    for field in dataclasses.fields(ServerConfig):
        if field.name not in NOT_CONFIGURABLE:
            assert "\n%s = " % field.name in text or "# %s = " % field.name in text, field.name


def test_every_server_config_field_is_settable():
    """The [server] table is generic: each field maps by name, typed by its annotation."""
    sample = {bool: "true", int: "65536", float: "700.5", str: '"x"'}
    import typing

    hints = typing.get_type_hints(ServerConfig)
    for field in dataclasses.fields(ServerConfig):
        if field.name in NOT_CONFIGURABLE:
            continue
        hint = hints[field.name]
        if hint in sample:
            value = '"%s"' % field.default if hint is str and isinstance(field.default, str) else sample[hint]
            text = "[server]\n%s = %s\n" % (field.name, value)
            value = parse(text).server[field.name]
            assert type(value) is hint, field.name


def test_defaults_without_a_file():
    s = parse("")
    assert s.effective_listeners() == [Listener(("127.0.0.1", 1100))]
    assert s.adapter == AdapterSpec() and s.lock_backend == "memory" and s.shutdown_grace == 10.0
    assert server_config(s) == ServerConfig(hostname=server_config(s).hostname, clock=server_config(s).clock)


def test_dump_round_trips(example_text):
    s = parse(example_text)
    again = parse(dump(s))
    assert dataclasses.replace(again, server={}) == dataclasses.replace(s, server={}, source=None)
    assert server_config(again) == server_config(s)


def test_dump_hides_secrets():
    s = parse('[adapter]\ntype = "postgres"\ndsn = "postgresql://u:hunter2@db/mail"\n'
              '[adapter.options]\npassword = "hunter2"\n')
    assert "hunter2" not in dump(s)


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(textwrap.dedent(text), "f.toml")
    return str(info.value)


@pytest.mark.parametrize("text,message", [
    ("shutdown_grace = 10\n[server]\nmax_conections = 5\n",
     "f.toml:3: server.max_conections: unknown key (did you mean 'max_connections'?)"),
    ("[server]\n\ntimeout = 300\n", "f.toml:3: server.timeout: must be at least 600 seconds (RFC 1939 section 3)"),
    ("[server]\nmax_connections = 0\n", "f.toml:2: server.max_connections: must be at least 1"),
    ("[server]\nstack_size = 1000\n", "f.toml:2: server.stack_size: must be 0 or at least 32768 bytes"),
    ("[server]\nallow_plaintext_auth = \"yes\"\n", "f.toml:2: server.allow_plaintext_auth: expected true or false"),
    ("[server]\nmax_connections = 1.5\n", "f.toml:2: server.max_connections: expected an integer"),
    ("[server]\ntrusted_networks = \"10.0.0.0/8\"\n", "f.toml:2: server.trusted_networks: expected a list of strings"),
    ("[server]\ntrusted_networks = [\"10.0.0.0/33\"]\n", "f.toml:2: server.trusted_networks: '10.0.0.0/33'"),
    ("[server]\nclock = 1\n", "f.toml:2: server.clock: unknown key"),
    ("[server]\nmax_connections_per_user = 3\n", "f.toml:2: server.max_connections_per_user: must be 1"),
    ("[[listener]]\naddress = \"a:1\"\n[[listener]]\naddress = \"nonsense\"\n",
     "f.toml:4: listener[1].address: expected HOST:PORT, got 'nonsense'"),
    ("[[listener]]\ntls = true\n", "f.toml:1: listener[0].address: missing"),
    ("[[listener]]\naddress = \"127.0.0.1:995\"\ntls = true\n", "f.toml:3: listener[0].tls: a TLS listener needs [tls] cert and key"),
    ("[tls]\ncert = \"c.pem\"\n", "f.toml:1: tls.key: missing"),
    ("[adapter]\ntype = \"maildir\"\npath = \"/var/mail\"\n", "f.toml:1: adapter.passwd: missing"),
    ("[adapter]\ntype = \"oracle\"\n", "f.toml:2: adapter.type: expected one of sqlite"),
    ("[adapter]\ntype = \"postgres\"\n", "f.toml:1: adapter.dsn: missing"),
    ("[locks]\nbackend = \"redis\"\n", "f.toml:2: locks.backend: expected memory, file or postgres"),
    ("[locks]\nbackend = \"file\"\n", "f.toml:1: locks.directory: missing"),
    ("[logging]\nlevel = \"LOUD\"\n", "f.toml:2: logging.level: expected one of DEBUG"),
    ("shutdown_grace = -1\n", "f.toml:1: shutdown_grace: must not be negative"),
    ("shutdown_grace = \"10s\"\n", "f.toml:1: shutdown_grace: expected a number"),
    ("[proxy]\ntimeout = 0\n", "f.toml:2: proxy.timeout: must be positive"),
    ("[stats]\nlisten = 9110\n", "f.toml:2: stats.listen: expected HOST:PORT"),
    ("listen = [\"127.0.0.1:1100\"]\n", "f.toml:1: listen: unknown key (did you mean 'listener'?)"),
    ("[server\ntimeout = 600\n", "f.toml:1: invalid TOML"),
    ("[server]\ntimeout = 600\ntimeout = 700\n", "f.toml:3: invalid TOML"),
])
def test_errors_name_key_and_line(text, message):
    text_error = error(text)
    assert text_error.startswith(message), text_error
    assert "\n" not in text_error


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(ConfigError, match="No such file"):
        load(str(tmp_path / "nope.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"greeting = \"\xff\"\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(str(bad))


def test_custom_adapter_from_a_file_with_options(tmp_path):
    script = tmp_path / "myadapter.py"
    script.write_text(textwrap.dedent('''
        from pop3frame import AdapterBase

        class Mine(AdapterBase):
            def __init__(self, greeting_user, limit=1):
                self.greeting_user, self.limit = greeting_user, limit
            def authenticate(self, u, p):
                return u == self.greeting_user
            def list_messages(self, u):
                return []
            def open_message(self, u, m):
                return b""

        def not_an_adapter():
            return object()
    '''))
    s = parse('[adapter]\ntype = "%s:Mine"\n[adapter.options]\ngreeting_user = "ann"\nlimit = 3\n' % script)
    adapter = make_adapter(s.adapter)
    assert (adapter.greeting_user, adapter.limit) == ("ann", 3)
    with pytest.raises(ValueError, match=r"^options.nope: not an option of Mine \(it takes: greeting_user, limit\)$"):
        make_adapter(AdapterSpec("%s:Mine" % script, options={"nope": 1}))
    with pytest.raises(ValueError, match="rejected the options"):  # path given, greeting_user missing: the call says so
        make_adapter(AdapterSpec("%s:Mine" % script, path="/x"))
    with pytest.raises(ValueError, match="did not give a pop3frame.AdapterBase"):
        make_adapter(AdapterSpec("%s:not_an_adapter" % script))
    with pytest.raises(ValueError, match="has no attribute 'Other'"):
        make_adapter(AdapterSpec("%s:Other" % script))
    with pytest.raises(ValueError, match="cannot import no_such_module_xyz"):
        make_adapter(AdapterSpec("no_such_module_xyz:X"))


def test_bundled_adapter_by_name(tmp_path):
    s = parse('[adapter]\ntype = "sqlite"\npath = "%s"\n' % (tmp_path / "m.db"))
    store = make_adapter(s.adapter)
    assert store.list_users() == []  # a store the operator named is never seeded
