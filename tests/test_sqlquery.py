"""SQL query adapter: rows of a real sqlite3 table become RFC 5322 messages.

The conformance suite (tests/harness_sqlquery.py) covers the POP3 side
with a raw-message column; these tests cover building messages from
ordinary columns, per-user queries, read-only mode, the one-transaction
delete and the placeholder styles of other drivers.
"""
from __future__ import annotations

import hashlib
import logging
import poplib
import sqlite3

import pytest

from pop3frame.adapters.sqlquery import SQLQueryAdapter, _params, _placeholders
from pop3frame.passwords import hash_password
from pop3frame.testing import Controller
from tests.helpers import assert_clean, expected_failure_logged_once, parse, retr_lines_to_bytes
from tests.pg import pg_db, pg_dsn  # noqa: F401  (fixtures)



@pytest.fixture
def db(tmp_path):
    path = str(tmp_path / "logs.db")
    conn = sqlite3.connect(path)
    with conn:
        conn.executescript(
            """
            CREATE TABLE logs (
                id INTEGER PRIMARY KEY, owner TEXT, ts TEXT, level TEXT, line TEXT,
                seen INTEGER NOT NULL DEFAULT 0, dump BLOB
            );
            INSERT INTO logs (owner, ts, level, line) VALUES
                ('ops', '2026-11-25 09:00:00', 'INFO', 'backup finished'),
                ('ops', '2026-11-25 09:05:00', 'WARN', 'disk /var at 91%'),
                ('dev', '2026-11-25 09:06:00', 'INFO', 'deploy ok');
            """
        )
    conn.close()
    return path


def connector(path):
    return lambda: sqlite3.connect(path, timeout=30)


#: The fixture's rows: id -> timestamp.
TS = {1: "2026-11-25 09:00:00", 2: "2026-11-25 09:05:00", 3: "2026-11-25 09:06:00"}


def uid_of(row_id, ts):
    """The unique-id of a row of a query with a timestamp column: id, '.', 10 hex digits of its SHA-256."""
    return "%s.%s" % (row_id, hashlib.sha256(ts.encode()).hexdigest()[:10])


QUERY = "SELECT id, ts AS date, level || ': ' || line AS subject, line AS body FROM logs WHERE seen = 0 ORDER BY id"


def login(server, user="ops", password="ops-pw"):
    client = server.pop3()
    client.user(user)
    client.pass_(password)
    return client


def fetch(server, user="ops", password="ops-pw"):
    client = login(server, user, password)
    try:
        return [retr_lines_to_bytes(client.retr(i)[1]) for i in range(1, client.stat()[0] + 1)]
    finally:
        client.quit()


def text(part) -> str:
    """A text part's content with the wire's CRLF turned back into LF."""
    return part.get_content().replace("\r\n", "\n")


def test_rows_become_clean_messages(db):
    """Every message parses without defects and has the RFC 5322 / MIME
    headers clients need; Date comes from the timestamp column."""
    adapter = SQLQueryAdapter(connector(db), QUERY, users={"ops": "ops-pw"}, name="logs")
    with Controller(adapter) as server:
        raws = fetch(server)
    assert len(raws) == 3
    msgs = [assert_clean(r) for r in raws]
    for raw in raws:
        assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    assert msgs[1]["Subject"] == "WARN: disk /var at 91%"
    assert msgs[1]["Date"] == "Wed, 25 Nov 2026 09:05:00 +0000"
    assert msgs[1]["Message-ID"] == "<%s.logs@pop3frame.invalid>" % uid_of(2, TS[2])
    assert msgs[1]["To"] == "ops@localhost"
    assert text(msgs[1]) == "disk /var at 91%\n"


def test_uidl_and_message_id_stable_and_derived_from_row_id_and_timestamp(db):
    adapter = SQLQueryAdapter(connector(db), QUERY, users={"ops": "ops-pw"})
    with Controller(adapter) as server:
        client = login(server)
        uids = [l.split()[1] for l in client.uidl()[1]]
        first = retr_lines_to_bytes(client.retr(1)[1])
        client.quit()
        # A changed row keeps its unique-id: clients never fetch it twice.
        conn = sqlite3.connect(db)
        with conn:
            conn.execute("UPDATE logs SET line = 'edited' WHERE id = 1")
        conn.close()
        client = login(server)
        assert [l.split()[1].decode() for l in client.uidl()[1]] == [u.decode() for u in uids] == [
            uid_of(i, TS[i]) for i in (1, 2, 3)]
        again = retr_lines_to_bytes(client.retr(1)[1])
        client.quit()
    assert parse(first)["Message-ID"] == parse(again)["Message-ID"]


def test_same_row_builds_same_bytes_and_size(db):
    adapter = SQLQueryAdapter(connector(db), QUERY, users={"ops": "ops-pw"})
    with Controller(adapter) as server:
        for _ in range(2):
            client = login(server)
            listed = client.list()[1]
            got = fetch_and_quit(client)
            assert [int(l.split()[1]) for l in listed] == [len(r) for r in got]
            if _ == 0:
                before = got
    assert got == before


def fetch_and_quit(client):
    out = [retr_lines_to_bytes(client.retr(i)[1]) for i in range(1, client.stat()[0] + 1)]
    client.quit()
    return out


def test_utf8_subject_body_and_header_injection(db):
    """Non-ASCII text is encoded (RFC 2047 headers, quoted-printable body)
    and a newline in the data cannot add a header."""
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("DELETE FROM logs")
        conn.execute(
            "INSERT INTO logs (owner, ts, level, line) VALUES ('ops', 1795651200, 'ERR', ?)",
            ("Prüfung fehlgeschlagen: naïve café ☕\nBcc: victim@example.org",),
        )
    conn.close()
    adapter = SQLQueryAdapter(
        connector(db), QUERY, users={"ops": "ops-pw"}, sender="Überwachung <monitor@example.org>"
    )
    with Controller(adapter) as server:
        (raw,) = fetch(server)
    assert raw.isascii()
    msg = parse(raw)
    assert msg["Subject"] == "ERR: Prüfung fehlgeschlagen: naïve café ☕ Bcc: victim@example.org"
    assert msg["Bcc"] is None
    assert msg["From"].addresses[0].display_name == "Überwachung"
    assert text(msg) == "Prüfung fehlgeschlagen: naïve café ☕\nBcc: victim@example.org\n"
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert msg["Date"] == "Thu, 26 Nov 2026 00:00:00 +0000"  # from a Unix timestamp


def test_blob_columns_become_attachments_and_subject_from_body(db):
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE logs SET dump = ? WHERE id = 2", (b"\x00core\xffdump",))
    conn.close()
    adapter = SQLQueryAdapter(
        connector(db),
        "SELECT id, ts, line || char(10) || 'details follow' AS body, dump FROM logs WHERE owner = ? ORDER BY id",
        users={"ops": "ops-pw"},
    )
    with Controller(adapter) as server:
        raws = fetch(server)
    plain, with_blob = parse(raws[0]), parse(raws[1])
    assert plain["Subject"] == "backup finished"  # first body line
    assert not plain.is_multipart()
    assert with_blob.is_multipart()
    (attachment,) = list(with_blob.iter_attachments())
    assert attachment.get_filename() == "dump.bin"
    assert attachment.get_content() == b"\x00core\xffdump"
    assert text(with_blob.get_body(("plain",))) == "disk /var at 91%\ndetails follow\n"


def test_explicit_column_mapping_and_sender_recipient_columns(db):
    adapter = SQLQueryAdapter(
        connector(db),
        "SELECT id AS log_id, ts AS at, line AS what, owner || '@example.org' AS rcpt FROM logs ORDER BY id",
        users={"ops": "ops-pw"},
        columns={"id": "log_id", "date": "at", "body": "what", "recipient": "rcpt"},
        attachments=(),
    )
    with Controller(adapter) as server:
        raws = fetch(server)
    assert [parse(r)["To"] for r in raws] == ["ops@example.org", "ops@example.org", "dev@example.org"]
    assert parse(raws[2])["Date"] == "Wed, 25 Nov 2026 09:06:00 +0000"
    with pytest.raises(ValueError):
        SQLQueryAdapter(connector(db), QUERY, users={}, columns={"colour": "x"})


def test_per_user_query_positional_and_named(db):
    users = {"ops": "ops-pw", "dev": "dev-pw"}
    for query in (
        "SELECT id, ts, line AS body FROM logs WHERE owner = ? ORDER BY id",
        "SELECT id, ts, line AS body FROM logs WHERE owner = :user AND line <> '?' ORDER BY id",
    ):
        with Controller(SQLQueryAdapter(connector(db), query, users=users)) as server:
            assert len(fetch(server)) == 2
            assert [parse(r)["Subject"] for r in fetch(server, "dev", "dev-pw")] == ["deploy ok"]


def test_no_delete_statement_is_read_only(db):
    with Controller(SQLQueryAdapter(connector(db), QUERY, users={"ops": "ops-pw"})) as server:
        client = login(server)
        assert "X-READ-ONLY" in client.capa()
        with pytest.raises(poplib.error_proto, match=r"\[SYS/PERM\]"):
            client.dele(1)
        client.quit()
        assert len(fetch(server)) == 3


def test_update_statement_marks_rows_seen(db):
    """DELE can be an UPDATE: the rows stay in the table but leave the mailbox."""
    adapter = SQLQueryAdapter(
        connector(db), QUERY, users={"ops": "ops-pw"}, delete="UPDATE logs SET seen = 1 WHERE id = ?"
    )
    with Controller(adapter) as server:
        client = login(server)
        client.dele(1)
        client.dele(3)
        assert client.quit().startswith(b"+OK")
        assert [parse(r)["Subject"] for r in fetch(server)] == ["WARN: disk /var at 91%"]
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT id, seen FROM logs ORDER BY id").fetchall() == [(1, 1), (2, 0), (3, 1)]
    conn.close()


def test_named_delete_with_id_and_user(db):
    adapter = SQLQueryAdapter(
        connector(db),
        "SELECT id, ts, line AS body FROM logs WHERE owner = :user ORDER BY id",
        users={"ops": "ops-pw", "dev": "dev-pw"},
        delete="DELETE FROM logs WHERE id = :id AND owner = :user",
    )
    with Controller(adapter) as server:
        client = login(server)
        client.dele(2)
        client.quit()
        assert len(fetch(server)) == 1
    conn = sqlite3.connect(db)
    assert [r[0] for r in conn.execute("SELECT id FROM logs ORDER BY id")] == [1, 3]
    conn.close()


def test_delete_is_one_transaction(db, caplog):
    """RFC 1939 UPDATE: all or none.  A trigger makes deleting row 2 fail
    after row 1 was deleted in the same transaction: both stay."""
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "CREATE TRIGGER keep2 BEFORE DELETE ON logs WHEN old.id = 2 "
            "BEGIN SELECT RAISE(ABORT, 'row 2 is protected'); END"
        )
    conn.close()
    adapter = SQLQueryAdapter(connector(db), QUERY, users={"ops": "ops-pw"}, delete="DELETE FROM logs WHERE id = ?")
    with Controller(adapter) as server:
        client = login(server)
        client.dele(1)
        client.dele(2)
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.quit()
        assert server.wait_for_connections(0)
        assert len(fetch(server)) == 3
    # The cause in one line (the session adds its own WARNING that QUIT deleted nothing), no traceback.
    assert "sql: delete failed for 'ops'; rolled back: row 2 is protected" in [r.getMessage() for r in caplog.records]
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


def test_bad_addresses_and_dates_in_a_row_do_not_break_the_mailbox(db, caplog):
    """A sender the email package cannot parse (it raised IndexError on
    "a@b, <"), a recipient that is not an address and a timestamp beyond
    year 9999: every row is still served, as a clean RFC 5322 message, the
    text kept as the display name of a placeholder address, and logged."""
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE logs SET level = 'a@b, <', ts = '99999999999999999999' WHERE id = 1")
        conn.execute("UPDATE logs SET level = '<', owner = 'not an address' WHERE id = 2")
        conn.execute("UPDATE logs SET level = 'Build Bot <ci@example.org>', owner = 'dev@example.org' WHERE id = 3")
    conn.close()
    adapter = SQLQueryAdapter(
        connector(db),
        "SELECT id, ts AS date, line AS body, level AS sender, owner AS recipient FROM logs ORDER BY id",
        users={"ops": "ops-pw"},
    )
    with Controller(adapter) as server:
        msgs = [assert_clean(raw) for raw in fetch(server)]
    assert [m["Subject"] for m in msgs] == ["backup finished", "disk /var at 91%", "deploy ok"]
    first, second, third = (m["From"].addresses[0] for m in msgs)
    assert (first.display_name, first.addr_spec) == ("a@b, <", "pop3frame@localhost")
    assert (second.display_name, second.addr_spec) == ("<", "pop3frame@localhost")
    assert (third.display_name, third.addr_spec) == ("Build Bot", "ci@example.org")  # valid: unchanged
    assert msgs[1]["To"].addresses[0].display_name == "not an address"
    assert msgs[2]["To"] == "dev@example.org"
    assert msgs[0]["Date"] == "Thu, 01 Jan 1970 00:00:00 +0000"
    assert "'a@b, <' is not a valid address list" in caplog.text


class FussyAdapter(SQLQueryAdapter):
    """Shapes messages itself and cannot handle row 2 until ``fixed``."""

    fixed = False

    def build(self, username, names, row):
        if row[0] == 2 and not self.fixed:
            raise ValueError("cannot shape row 2: 'disk /var at 91%'")
        return super().build(username, names, row)


def test_row_that_cannot_be_rendered_becomes_a_placeholder(db, caplog):
    """The other rows stay readable; the bad row shows up as a short notice
    with its own unique-id (RFC 1939 section 7: unique-ids name content), so
    deleting the notice never deletes the unread row, and once the row can
    be rendered it arrives as new mail under its own unique-id."""
    adapter = FussyAdapter(connector(db), QUERY, users={"ops": "ops-pw"}, delete="DELETE FROM logs WHERE id = ?")
    with Controller(adapter) as server:
        client = login(server)
        uids = [l.split()[1].decode() for l in client.uidl()[1]]
        raws = fetch_and_quit_after(client, lambda: (client.dele(1), client.dele(2)))
        row_uids = [uid_of(i, TS[i]) for i in (1, 2, 3)]
        assert uids[0] == row_uids[0] and uids[2] == row_uids[2] and uids[1] not in row_uids
        notice = assert_clean(raws[1])
        assert notice["Subject"] == "Row 2 could not be shown"
        assert notice["Message-ID"] != "<%s.sql@pop3frame.invalid>" % row_uids[1]
        assert notice["Date"] == "Wed, 25 Nov 2026 09:05:00 +0000"  # the row's own date
        assert "does not delete the row" in text(notice)
        # Row 1 is deleted; row 2 is not, and its dismissed notice stays away.
        client = login(server)
        assert [l.split()[1].decode() for l in client.uidl()[1]] == row_uids[2:]
        client.quit()
        adapter.fixed = True
        client = login(server)
        assert [l.split()[1].decode() for l in client.uidl()[1]] == row_uids[1:]
        assert parse(retr_lines_to_bytes(client.retr(1)[1]))["Subject"] == "WARN: disk /var at 91%"
        client.quit()
    conn = sqlite3.connect(db)
    assert [r[0] for r in conn.execute("SELECT id FROM logs ORDER BY id")] == [2, 3]
    conn.close()
    assert "row 2 could not be turned into a message (ValueError)" in caplog.text
    assert "disk /var" not in caplog.text  # row contents never logged


def fetch_and_quit_after(client, before_quit):
    """Every message of the session, then ``before_quit()``, then QUIT (which must succeed)."""
    out = [retr_lines_to_bytes(client.retr(i)[1]) for i in range(1, client.stat()[0] + 1)]
    before_quit()
    assert client.quit().startswith(b"+OK")
    return out


def test_hashed_and_plain_passwords_and_callable(db, caplog):
    caplog.set_level(logging.DEBUG)
    users = {"ops": hash_password("ops-pw", "SCRYPT"), "dev": "dev-pw"}
    with Controller(SQLQueryAdapter(connector(db), QUERY, users=users)) as server:
        fetch(server)
        fetch(server, "dev", "dev-pw")
        for user, password in (("ops", "wrong"), ("nobody", "ops-pw")):
            client = server.pop3()
            client.user(user)
            with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
                client.pass_(password)
            client.quit()
    checker = lambda user, password: (user, password) == ("ops", "from-callable")  # noqa: E731
    with Controller(SQLQueryAdapter(connector(db), QUERY, users=checker)) as server:
        assert len(fetch(server, "ops", "from-callable")) == 3
    assert "ops-pw" not in caplog.text and "backup finished" not in caplog.text


def test_database_failures_are_sys_temp(tmp_path, caplog):
    """A database that cannot be opened: -ERR [SYS/TEMP] and one ERROR line with the cause."""
    caplog.set_level(logging.INFO)
    unavailable = connector(str(tmp_path / "no-such-dir" / "logs.db"))
    with Controller(SQLQueryAdapter(unavailable, QUERY, users={"ops": "ops-pw"}, name="logs")) as server:
        client = server.pop3()
        client.user("ops")
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.pass_("ops-pw")
        client.quit()
        client.close()
        assert server.wait_for_connections(0)
    line = expected_failure_logged_once(caplog.records, "unable to open database file")
    assert line.levelno == logging.ERROR
    assert line.getMessage() == "logs: cannot connect to the database: unable to open database file"
    caplog.clear()
    missing_table = connector(str(tmp_path / "empty.db"))
    with Controller(SQLQueryAdapter(missing_table, QUERY, users={"ops": "ops-pw"}, name="logs")) as server:
        client = server.pop3()
        client.user("ops")
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.pass_("ops-pw")
        client.quit()
    # The query fails in the database: one line with its reason too, not the driver's traceback.
    line = expected_failure_logged_once(caplog.records, "no such table: logs")
    assert line.levelno == logging.ERROR
    assert line.getMessage() == "logs: query failed for 'ops': no such table: logs"


def test_query_without_id_column_is_sys_perm(db):
    adapter = SQLQueryAdapter(connector(db), "SELECT line AS body FROM logs", users={"ops": "ops-pw"})
    with Controller(adapter) as server:
        client = server.pop3()
        client.user("ops")
        with pytest.raises(poplib.error_proto, match=r"\[SYS/PERM\]"):
            client.pass_("ops-pw")
        client.quit()


def test_odd_ids_get_valid_unique_ids_and_duplicates_are_dropped(tmp_path):
    path = str(tmp_path / "odd.db")
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE t (id TEXT, body TEXT)")
        conn.executemany(
            "INSERT INTO t VALUES (?, ?)",
            [("2026-11-25 job #7", "a"), ("x" * 200, "b"), ("ok-id_1.2", "c"), ("ok-id_1.2", "dup")],
        )
    conn.close()
    with Controller(SQLQueryAdapter(connector(path), "SELECT * FROM t", users={"u": "p"})) as server:
        client = login(server, "u", "p")
        uids = [l.split()[1].decode() for l in client.uidl()[1]]
        ids = [parse(retr_lines_to_bytes(client.retr(i)[1]))["Message-ID"] for i in (1, 2, 3)]
        client.quit()
    assert len(uids) == 3 and uids[2] == "ok-id_1.2"
    assert all(1 <= len(u) <= 70 and u.isascii() and " " not in u for u in uids)
    assert len(set(ids)) == 3 and all(i.startswith("<") and i.endswith("@pop3frame.invalid>") for i in ids)


@pytest.mark.parametrize(
    "sql, style, expected",
    [
        ("SELECT * FROM t WHERE u = ?", "qmark", ("alice",)),
        ("SELECT * FROM t WHERE u = :user", "named", {"user": "alice"}),
        ("SELECT * FROM t WHERE u = :1", "numeric", ("alice",)),
        ("SELECT * FROM t WHERE u = %s", "format", ("alice",)),
        ("SELECT * FROM t WHERE u = %s AND x LIKE 'a%%'", "pyformat", ("alice",)),
        ("SELECT * FROM t WHERE u = %(user)s", "pyformat", {"user": "alice"}),
        ("SELECT '?', '%s' FROM t", "qmark", ()),
        ("SELECT x::text FROM t WHERE y = '%s'", "pyformat", ()),
    ],
)
def test_placeholders_in_each_driver_style(sql, style, expected):
    """psycopg and PyMySQL use %s / %(name)s, sqlite3 ? and :name: the user
    name goes in with the driver's own style; quoted text is not a placeholder."""
    assert _params(sql, style, {"user": "alice"}, "user") == expected


def test_delete_placeholders():
    assert _params("DELETE FROM t WHERE id = %s", "pyformat", {"id": 7, "user": "u"}, "id") == (7,)
    assert _params("DELETE FROM t WHERE id = %(id)s AND o = %(user)s", "pyformat", {"id": 7, "user": "u"}, "id") == {
        "id": 7,
        "user": "u",
    }
    with pytest.raises(ValueError):
        _params("DELETE FROM t WHERE id = :rowid", "named", {"id": 7, "user": "u"}, "id")
    assert _placeholders("UPDATE t SET a = ? WHERE id = ?", "qmark") == (2, [])


# -- the same adapter on PostgreSQL through psycopg (paramstyle pyformat) -------------


@pytest.fixture
def postgres(pg_db):
    """Connections to a fresh database of the tests' PostgreSQL (tests.pg)."""
    import psycopg

    return lambda: psycopg.connect(pg_db)


@pytest.fixture
def pg_logs(postgres):
    conn = postgres()
    with conn:
        conn.execute("DROP TABLE IF EXISTS logs")
        conn.execute(
            "CREATE TABLE logs (id serial PRIMARY KEY, owner text, at timestamptz, line text, trace bytea)"
        )
        conn.execute(
            "INSERT INTO logs (owner, at, line, trace) VALUES "
            "('ops', '2026-11-25 10:00:00+01', 'Größe 100% erreicht', NULL), "
            "('ops', '2026-11-25 11:00:00+00', 'crash', '\\x00ff'::bytea), "
            "('dev', '2026-11-25 12:00:00+00', 'deploy', NULL)"
        )
    conn.close()
    return postgres


@pytest.mark.parametrize(
    "query",
    [
        "SELECT id, at AS date, line AS body, trace FROM logs WHERE owner = %s AND line NOT LIKE '%%x' ORDER BY id",
        "SELECT id, at AS date, line AS body, trace FROM logs WHERE owner = %(user)s ORDER BY id",
    ],
)
def test_postgres_psycopg_pyformat(pg_logs, query):
    """psycopg's own placeholders for the user and the delete; timestamptz
    becomes Date, bytea an attachment; the delete is one transaction."""
    adapter = SQLQueryAdapter(
        pg_logs, query, users={"ops": "ops-pw"}, delete="DELETE FROM logs WHERE id = %s", name="pg"
    )
    assert _params(query, "pyformat", {"user": "ops"}, "user") in (("ops",), {"user": "ops"})
    with Controller(adapter) as server:
        raws = fetch(server)
        assert len(raws) == 2
        first, second = parse(raws[0]), parse(raws[1])
        assert first["Subject"] == "Größe 100% erreicht"
        assert first["Date"] == "Wed, 25 Nov 2026 09:00:00 +0000"
        (attachment,) = list(second.iter_attachments())
        assert attachment.get_content() == b"\x00\xff"
        client = login(server)
        client.dele(1)
        client.quit()
        assert [parse(r)["Subject"] for r in fetch(server)] == ["crash"]


def test_postgres_failed_delete_rolls_back(pg_logs):
    conn = pg_logs()
    with conn:
        conn.execute(
            "CREATE OR REPLACE FUNCTION keep2() RETURNS trigger AS $$ BEGIN "
            "IF old.id = 2 THEN RAISE EXCEPTION 'protected'; END IF; RETURN old; END $$ LANGUAGE plpgsql"
        )
        conn.execute("CREATE TRIGGER keep2 BEFORE DELETE ON logs FOR EACH ROW EXECUTE FUNCTION keep2()")
    conn.close()
    adapter = SQLQueryAdapter(
        pg_logs, "SELECT id, at, line AS body FROM logs WHERE owner = %s ORDER BY id",
        users={"ops": "ops-pw"}, delete="DELETE FROM logs WHERE id = %(id)s AND owner = %(user)s",
    )
    with Controller(adapter) as server:
        client = login(server)
        client.dele(1)
        client.dele(2)
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            client.quit()
        assert server.wait_for_connections(0)
        assert len(fetch(server)) == 2


def test_a_table_that_reuses_ids_still_gives_a_new_row_a_new_unique_id(db):
    """Issue 11 defect 2, RFC 1939 section 7 (UIDL): the fixture's table reuses ids
    (INTEGER PRIMARY KEY, no AUTOINCREMENT).  After the newest row is deleted, the next
    row gets its id again, but not its unique-id or Message-ID: the timestamp tells them
    apart.  And a DELE naming ``:date`` never deletes a row that took over the id of the
    listed one during the session."""
    adapter = SQLQueryAdapter(connector(db), QUERY, users={"ops": "ops-pw"},
                              delete="DELETE FROM logs WHERE id = :id AND ts = :date")

    def insert(ts, line):
        conn = sqlite3.connect(db)
        with conn:
            row_id = conn.execute("INSERT INTO logs (owner, ts, level, line) VALUES ('ops', ?, 'NEW', ?)",
                                  (ts, line)).lastrowid
        conn.close()
        return row_id

    def listing(client):
        uids = [l.split()[1].decode() for l in client.uidl()[1]]
        ids = [parse(retr_lines_to_bytes(client.retr(n)[1]))["Message-ID"] for n in range(1, len(uids) + 1)]
        return uids, ids

    with Controller(adapter) as server:
        client = login(server)
        issued, msgids = listing(client)
        client.dele(3)
        client.quit()
        assert insert("2026-11-25 10:00:00", "database is down") == 3  # the id comes back
        client = login(server)
        uids, ids = listing(client)
        assert uids[:2] == issued[:2] and uids[2] not in issued
        assert ids[:2] == msgids[:2] and ids[2] not in msgids
        # Row 3 is replaced by another row 3 while a session that listed it runs.
        client.dele(3)
        conn = sqlite3.connect(db)
        with conn:
            conn.execute("DELETE FROM logs WHERE id = 3")
        conn.close()
        assert insert("2026-11-25 10:05:00", "database is up again") == 3
        assert client.quit().startswith(b"+OK")
        client = login(server)
        assert parse(retr_lines_to_bytes(client.retr(3)[1]))["Subject"] == "NEW: database is up again"
        client.quit()
