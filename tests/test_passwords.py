"""Stored passwords in every store: one rule for what a stored value means
(locked markers never match, bare crypt hashes are hashes), and a wrong
password for a real user costing what any password for an unknown or locked
user costs, so that reply times do not list the users."""
from __future__ import annotations

import sqlite3
import statistics
import time

import argon2
import bcrypt
import passlib.hash
import pytest

from pop3frame.adapters.directory import DirectoryAdapter
from pop3frame.adapters.feed import FeedAdapter
from pop3frame.adapters.function import FunctionAdapter
from pop3frame.adapters.maildir import MaildirAdapter
from pop3frame.adapters.mbox import MboxAdapter
from pop3frame.adapters.memory import MemoryAdapter
from pop3frame.adapters.passwdfile import PasswdFile
from pop3frame.adapters.sqlite import SQLiteStore
from pop3frame.adapters.sqlquery import SQLQueryAdapter
from pop3frame.passwords import PasswordCheck, hash_password, plaintext_secret, stored_password
from tests import pg
from tests.dovecot import Dovecot, require as require_dovecot
from tests.pg import pg_db, pg_dsn  # noqa: F401  (fixtures)


def bcrypt_hash(password: str, rounds: int = 8) -> str:
    """A bare ``$2b$`` hash, cheap (a few ms) but a real scheme."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()


#: Bare crypt hashes of "pw", one of each kind the stores verify, all cheap.
CRYPT_HASHES = {
    "md5-crypt": passlib.hash.md5_crypt.hash("pw"),
    "sha256-crypt": passlib.hash.sha256_crypt.using(rounds=1000).hash("pw"),
    "sha512-crypt": passlib.hash.sha512_crypt.using(rounds=1000).hash("pw"),
    "bcrypt": bcrypt_hash("pw", 4),
    "argon2id": argon2.PasswordHasher(time_cost=1, memory_cost=64, parallelism=1).hash("pw"),
    "scrypt": hash_password("pw", "SCRYPT")[len("{SCRYPT}"):],
}
#: Values no password matches, each tried as the password too.
NEVER = {
    "empty": "",
    "shadow-x": "x",
    "star": "*",
    "bang": "!",
    "never-set": "!!",
    "solaris-locked": "*LK*",
    "locked-hash": "!" + CRYPT_HASHES["sha512-crypt"],
    "yescrypt": "$y$j9T$F5Jx5fExrKuPp53xLKQ..$X3DX6M94c7o.9agCG9G317fhZg9SqC.5i5rd.RhAtQ7",
    "unknown-scheme": "{NOPE}pw",
    "scheme-only": "{PLAIN}",
}


# -- the stores -------------------------------------------------------------------


def _passwd_file(tmp_path, users) -> str:
    path = str(tmp_path / "passwd")
    with open(path, "w") as f:
        f.writelines("%s:%s\n" % item for item in users.items())
    return path


def _sqlite(request, tmp_path, users):
    store = SQLiteStore(str(tmp_path / "s.db"))
    for name in users:
        store.add_user(name, "replaced", scheme="PLAIN")
    conn = sqlite3.connect(store.path)
    with conn:
        conn.executemany("UPDATE users SET password = ? WHERE name = ?", [(v, n) for n, v in users.items()])
    conn.close()
    return store.authenticate


def _postgres(request, tmp_path, users):
    from pop3frame.adapters.postgres import PostgresStore

    dsn = request.getfixturevalue("pg_db")
    store = PostgresStore(dsn, pool_size=2)
    request.addfinalizer(store.close)
    for name, value in users.items():
        store.add_user(name, "replaced", scheme="PLAIN")
        pg.sql(dsn, "UPDATE pop3frame_users SET password = %s WHERE name = %s", (value, name))
    return store.authenticate


#: store name -> (build(request, tmp_path, {user: stored value}) -> authenticate,
#: whether a bare value is a plaintext password there).
STORES = {
    "sqlite": (_sqlite, True),
    "postgres": (_postgres, True),
    "sqlquery": (lambda r, t, users: SQLQueryAdapter(
        lambda: sqlite3.connect(":memory:"), "SELECT 1 AS id", users=dict(users)).authenticate, True),
    "feed": (lambda r, t, users: FeedAdapter(str(t / "feed.xml"), users=dict(users)).authenticate, True),
    "function": (lambda r, t, users: FunctionAdapter(lambda: [], users=dict(users)).authenticate, True),
    "memory": (lambda r, t, users: MemoryAdapter(dict(users), apop=False).authenticate, True),
    "passwdfile": (lambda r, t, users: PasswdFile(_passwd_file(t, users)).authenticate, False),
    "maildir": (lambda r, t, users: MaildirAdapter(str(t), _passwd_file(t, users)).authenticate, False),
    "mbox": (lambda r, t, users: MboxAdapter(str(t), PasswdFile(_passwd_file(t, users))).authenticate, False),
    "directory": (lambda r, t, users: DirectoryAdapter(str(t), PasswdFile(_passwd_file(t, users))).authenticate,
                  False),
}


@pytest.fixture(params=sorted(STORES))
def store(request, tmp_path):
    """``build({user: stored value}) -> authenticate`` for one store, and whether it takes plaintext."""
    build, plaintext = STORES[request.param]
    return (lambda users: build(request, tmp_path, users)), plaintext


# -- what a stored value means ------------------------------------------------------


@pytest.mark.parametrize("value", sorted(NEVER.values()), ids=sorted(NEVER, key=NEVER.get))
def test_locked_empty_and_unknown_values_never_authenticate(store, value):
    """``*``, ``!``, ``x``, empty, and hashes of an unknown kind: not even the value itself is the password."""
    build, _ = store
    authenticate = build({"alice": value, "bob": bcrypt_hash("bob-pw", 4)})
    for guess in {value, value[1:], "pw", "*", "!", "x"} - {""}:
        assert not authenticate("alice", guess), guess
    assert not authenticate("alice", "")
    assert authenticate("bob", "bob-pw")


@pytest.mark.parametrize("kind", sorted(CRYPT_HASHES))
def test_bare_crypt_hash_is_verified_as_a_hash(store, kind):
    """As Dovecot: a value without {SCHEME} that looks like crypt(3) output is that
    hash, never a plaintext password equal to itself."""
    build, _ = store
    value = CRYPT_HASHES[kind]
    authenticate = build({"alice": value})
    assert authenticate("alice", "pw")
    assert not authenticate("alice", value)
    assert not authenticate("alice", "wrong")


def test_bare_plaintext_is_a_password_only_where_the_store_takes_plaintext(store):
    build, plaintext = store
    authenticate = build({"alice": "s3cret", "bob": "{PLAIN}!bang"})
    assert authenticate("alice", "s3cret") is plaintext
    assert authenticate("bob", "!bang")  # an explicit {PLAIN} says what it is, everywhere


def test_stored_password_rule():
    assert stored_password("$6$salt$hash") == "{SHA512-CRYPT}$6$salt$hash"
    assert stored_password("{CRYPT}$2y$05$abc") == "{BLF-CRYPT}$2y$05$abc"
    assert stored_password("{scrypt}$scrypt$x") == "{SCRYPT}$scrypt$x"
    assert stored_password("pw") == "{PLAIN}pw" and stored_password("pw", plaintext=False) is None
    assert stored_password(None) is None and stored_password("{CRYPT}pw") is None
    assert [stored_password(v) for v in NEVER.values()] == [None] * len(NEVER)
    # APOP, CRAM-MD5 and SCRAM get a secret only from a value in clear.
    assert plaintext_secret("pw") == "pw" and plaintext_secret("{PLAIN}*") == "*"
    assert plaintext_secret("*") is None and plaintext_secret(CRYPT_HASHES["bcrypt"]) is None


def test_apop_secret_of_a_locked_memory_user_is_none():
    store = MemoryAdapter({"alice": "!", "bob": "bob-pw", "carol": CRYPT_HASHES["bcrypt"]}, apop=True)
    assert store.apop_secret("alice") is None and store.apop_secret("carol") is None
    assert store.apop_secret("bob") == "bob-pw"


# -- what a check costs ----------------------------------------------------------------


def medians(authenticate, users, tries: int, clock=time.process_time):
    """Median seconds of a wrong password for each user, measured in turns, after a warm-up.

    By default the seconds are this process's CPU time: what a check costs
    is the hashing done here (argon2 in threads of its own included), and
    unlike the wall clock it does not grow when other processes take the
    CPU (bcrypt's 45 ms were read as 100 ms on a loaded machine)."""
    times = {user: [] for user in users}
    for attempt in range(tries + 1):
        for user in users:
            start = clock()
            assert not authenticate(user, "wrong-%d" % attempt)
            if attempt:
                times[user].append(clock() - start)
    return {user: statistics.median(spent) for user, spent in times.items()}


def assert_same_cost(costs, real: str):
    for user, spent in costs.items():
        assert 0.5 < spent / costs[real] < 2, ("%s took %.2f ms, %s %.2f ms"
                                                % (user, spent * 1000, real, costs[real] * 1000))


def test_unknown_and_locked_users_cost_what_a_wrong_password_costs(store):
    """With a cheap but real scheme (bcrypt cost 8, about 16 ms), chosen by the
    store's users rather than the default, the dummy check must be of that
    scheme and cost: no user name is told by the time of the answer."""
    build, _ = store
    authenticate = build({"alice": bcrypt_hash("right"), "bob": bcrypt_hash("other"), "carol": "!locked"})
    costs = medians(authenticate, ["alice", "nobody", "carol"], tries=7)
    assert costs["alice"] > 0.002  # really hashed
    assert_same_cost(costs, "alice")


def test_default_scheme_unknown_user_costs_what_a_wrong_password_costs(tmp_path):
    """The embedded default store with users added the usual way (the default scheme)."""
    store = SQLiteStore(str(tmp_path / "d.db"))
    store.add_user("alice", "right")
    costs = medians(store.authenticate, ["alice", "nobody"], tries=3)
    assert costs["alice"] > 0.02  # argon2id or scrypt: tens of milliseconds at least
    assert_same_cost(costs, "alice")


def test_imap_unknown_user_costs_what_a_wrong_password_costs():
    """The IMAP store asks the upstream server for every login, known name or not."""
    from pop3frame.adapters.imap import IMAPUpstreamAdapter

    require_dovecot()
    dovecot = Dovecot().start()
    try:
        dovecot.add_user("alice", "alice-pw")
        adapter = IMAPUpstreamAdapter("127.0.0.1", dovecot.port, timeout=30)
        # The check is the upstream's work: its answer time is what shows.
        assert_same_cost(medians(adapter.authenticate, ["alice", "nobody"], tries=3, clock=time.perf_counter), "alice")
        adapter.close()
    finally:
        dovecot.cleanup()


def test_dummy_follows_the_scheme_the_store_uses():
    """Before any real check the dummy is one of the store's own values (sampled
    once), afterwards the latest real value of the scheme seen most."""
    sampled = []
    values = [bcrypt_hash("a", 4), bcrypt_hash("b", 4), "plain"]
    check = PasswordCheck(sample=lambda: sampled.append(1) or values)
    assert not check.check(None, "x") and not check.check(None, "y")
    assert sampled == [1]
    assert check._dummy() == "{BLF-CRYPT}" + values[1]
    scrypt = hash_password("c", "SCRYPT")
    for _ in range(3):
        assert check.check(scrypt, "c")
    assert check._dummy() == scrypt
