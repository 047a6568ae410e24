"""Socket-free tests of the wire format (pop3frame.protocol)."""
from __future__ import annotations

import io
import os

import pytest
from hypothesis import given, strategies as st

from pop3frame import protocol
from pop3frame.protocol import SizeMismatch, Stuffer, iter_message, iter_top, parse_command, stream_wire_size, stuff, wire_size


def unstuff(wire: bytes) -> bytes:
    assert wire.endswith(b".\r\n")
    lines = wire[:-3].split(b"\r\n")
    return b"\r\n".join(l[1:] if l.startswith(b".") else l for l in lines)


# -- command parsing (RFC 1939 section 3, RFC 2449 section 3) -----------------


def test_keywords_are_case_insensitive():
    """RFC 1939 section 3: keywords are case-insensitive."""
    assert parse_command(b"uidl 3\r\n") == ("UIDL", ["3"], "3")
    assert parse_command(b"StAt\r\n").name == "STAT"


def test_pass_keeps_spaces_verbatim():
    """RFC 1939 section 7 (PASS): the server may treat spaces as part of the password."""
    cmd = parse_command(b"PASS  two  spaces \r\n")
    assert cmd.rest == " two  spaces "


@pytest.mark.parametrize(
    "line",
    [b"\r\n", b"", b"ST\x00AT\r\n", b"STAT\rX\r\n", b"TOOLONG\r\n", b"12\r\n", b"US\xffR\r\n", b"USER \xe9\r\n", b"USER\ta\r\n"],
)
def test_bad_lines_raise(line):
    """RFC 1939 section 3: keywords are 3-4 printable ASCII characters."""
    with pytest.raises(protocol.ProtocolError):
        parse_command(line)


def test_utf8_arguments_only_when_asked_for():
    """RFC 6856 section 2.1: ASCII-only until UTF-8 mode.  The parser takes UTF-8 only
    when asked: the session asks in UTF-8 mode and, for USER/PASS/APOP (section 2.2),
    before it too (tests/test_auth_security.py checks that over the wire)."""
    with pytest.raises(protocol.ProtocolError):
        parse_command("USER jürgen\r\n".encode())
    assert parse_command("USER jürgen\r\n".encode(), utf8=True).args == ["jürgen"]


def test_keyword_grammar_is_3_to_4_vchar():
    """RFC 2449 section 3: keyword = 3*4VCHAR; UTF8 (RFC 6856) contains a digit."""
    assert parse_command(b"utf8\r\n").name == "UTF8"
    for bad in (b"AB\r\n", b"ABCDE\r\n", b"\xc3\xa9t\xc3\xa9\r\n"):
        with pytest.raises(protocol.ProtocolError):
            parse_command(bad, utf8=True)


def test_bare_lf_terminator_accepted():
    assert parse_command(b"NOOP\n").name == "NOOP"


# -- status lines (RFC 2449 sections 4 and 8) -------------------------------


def test_status_line_with_code():
    """RFC 2449 section 8: the response code is in brackets right after the status."""
    assert protocol.err("in use", protocol.IN_USE) == b"-ERR [IN-USE] in use\r\n"
    assert protocol.ok() == b"+OK\r\n"


def test_status_line_cannot_be_split_by_injected_crlf():
    assert protocol.err("a\r\n+OK fake\r\n") == b"-ERR a +OK fake\r\n"


def test_status_line_clipped_to_512_octets():
    """RFC 2449 section 4: responses are at most 512 octets including CRLF."""
    line = protocol.ok("é" * 600)
    assert len(line) <= 512 and line.endswith(b"\r\n")
    line.decode("utf-8")  # clipping never splits a UTF-8 sequence


def test_multiline_stuffs_its_lines():
    assert protocol.multiline(b"+OK\r\n", ["a", ".b"]) == b"+OK\r\na\r\n..b\r\n.\r\n"


# -- byte-stuffing and line endings (RFC 1939 section 3) -----------------------


def test_dot_at_message_start_is_stuffed():
    assert stuff(b".hidden\r\n") == b"..hidden\r\n.\r\n"


def test_lone_dot_line_is_stuffed():
    assert stuff(b"a\r\n.\r\nb\r\n") == b"a\r\n..\r\nb\r\n.\r\n"


def test_lf_and_mixed_endings_become_crlf_without_doubling_cr():
    assert stuff(b"a\nb\r\nc\n") == b"a\r\nb\r\nc\r\n.\r\n"
    assert b"\r\r" not in stuff(b"x\r\ny\r\n")


def test_missing_final_newline_is_added():
    assert stuff(b"no newline") == b"no newline\r\n.\r\n"
    assert stuff(b"") == b".\r\n"


def test_dot_exactly_at_chunk_boundary():
    s = Stuffer()
    out = s.feed(b"line one\n") + s.feed(b".dot after boundary\n") + s.finish()
    assert out == b"line one\r\n..dot after boundary\r\n.\r\n"


def test_crlf_split_across_chunks():
    s = Stuffer()
    out = s.feed(b"a\r") + s.feed(b"\n.b\r") + s.feed(b"\n") + s.finish()
    assert out == b"a\r\n..b\r\n.\r\n"


def test_bare_cr_passes_through():
    assert stuff(b"a\rb\n") == b"a\rb\r\n.\r\n"


messages = st.lists(
    st.sampled_from([b"a", b".", b"\r\n", b"\n", b"\r", b"..", b"x\x00\xff", b"From "]), max_size=60
).map(b"".join)


@given(messages, st.integers(min_value=1, max_value=7))
def test_chunked_equals_whole_and_round_trips(data, chunk):
    """Any chunking gives the same wire bytes; unstuffing restores the CRLF message."""
    whole = stuff(data)
    assert b"".join(iter_message(io.BytesIO(data), chunk_size=chunk)) == whole
    body = unstuff(whole)
    assert len(body) == wire_size(data)
    assert stream_wire_size(io.BytesIO(data), chunk_size=chunk) == wire_size(data)
    # has_dot_lines says exactly whether stuffing added octets, also when a
    # line's "." is the first octet of a chunk (measure_stream).
    dots = protocol.has_dot_lines(data)
    assert dots == (len(whole) - 3 > len(body))
    assert protocol.measure_stream(io.BytesIO(data), chunk_size=chunk) == (wire_size(data), dots)
    # The first end-of-response marker a client can see is the real one.
    assert (b"\r\n" + whole).find(b"\r\n.\r\n") == len(whole) - 3
    # Every LF on the wire is part of CRLF.
    assert whole.count(b"\n") == whole.count(b"\r\n")


@given(messages, st.integers(min_value=1, max_value=7))
def test_stuffer_counts_the_octets_list_announces(data, chunk):
    """RFC 1939 section 11: what the Stuffer counts as sent is exactly wire_size, the
    size LIST gives, for any chunking (bare CR, mixed line ends, no final line end)."""
    assert b"".join(iter_message(io.BytesIO(data), wire_size(data), chunk_size=chunk)) == stuff(data)
    s = Stuffer()
    for i in range(0, len(data), chunk):
        s.feed(data[i:i + chunk])
    s.finish()
    assert s.octets == wire_size(data)


def test_iter_message_never_ends_a_message_of_the_wrong_size():
    """A stream shorter or longer than the announced size gets no '.CRLF': the short one
    raises where the terminator would come, the long one before the chunk that runs past."""
    data = b"Subject: x\n\n" + b"line\n" * 100
    size = wire_size(data)
    out = []
    with pytest.raises(SizeMismatch) as short:
        for chunk in iter_message(io.BytesIO(data), size + 1, chunk_size=64):
            out.append(chunk)
    assert short.value.sent == size and short.value.announced == size + 1
    assert b"".join(out) == stuff(data)[:-3]
    out = []
    with pytest.raises(SizeMismatch) as long:
        for chunk in iter_message(io.BytesIO(data), size - 10, chunk_size=64):
            out.append(chunk)
    assert long.value.sent > size - 10
    assert len(b"".join(out)) <= size - 10 and not b"".join(out).endswith(b".\r\n")
    assert b"".join(iter_message(io.BytesIO(data), size)) == stuff(data)


def _without_dot_lines(data: bytes) -> bytes:
    """``data`` with an "x" before every "." that starts a line (dots elsewhere stay)."""
    data = data.replace(b"\n.", b"\nx.")
    return b"x" + data if data.startswith(b".") else data


@given(messages, st.integers(min_value=1, max_value=7))
def test_a_message_said_to_have_no_dot_lines_gives_the_same_wire_bytes(data, chunk):
    """RFC 1939 section 3: with dot_lines=False (MessageInfo.dot_lines) RETR skips
    the search for lines to byte-stuff and still sends exactly what the full
    stuffer does, for any chunking, bare CR and missing final line end included."""
    data = _without_dot_lines(data)
    assert not protocol.has_dot_lines(data)
    sent = b"".join(iter_message(io.BytesIO(data), wire_size(data), chunk_size=chunk, dot_lines=False))
    assert sent == stuff(data)


def _stored(tmp_path, data: bytes):
    path = tmp_path / "message"
    path.write_bytes(data)
    return open(path, "rb")


PROSE_CRLF = b"Subject: stored as sent\r\n\r\n" + b"A line. Another one, with a dot. And\r\n" * 3000


def test_a_message_stored_as_sent_goes_out_as_one_file_span(tmp_path):
    """CRLF line ends, a final CRLF and no line starting with ".": the stored bytes
    are the wire bytes (RFC 1939 section 3), so RETR hands the file over whole
    (a FileSpan, for sendfile()), then the terminator, only if all of it went."""
    size = len(PROSE_CRLF)
    assert size >= protocol.SENDFILE_MIN and wire_size(PROSE_CRLF) == size
    with _stored(tmp_path, PROSE_CRLF) as f:
        chunks = iter_message(f, size, dot_lines=False)
        span = next(chunks)
        assert isinstance(span, protocol.FileSpan) and (span.file.file, span.offset, span.count) == (f, 0, size)
        span.sent = size
        assert list(chunks) == [b".\r\n"]
        assert stuff(PROSE_CRLF) == PROSE_CRLF + b".\r\n"  # what the stuffer would have sent
    with _stored(tmp_path, PROSE_CRLF) as f:
        chunks = iter_message(f, size, dot_lines=False)
        next(chunks).sent = size - 100  # the file ended early while it was sent
        with pytest.raises(SizeMismatch):
            next(chunks)
    with _stored(tmp_path, PROSE_CRLF) as f:
        chunks = iter_message(f, size, dot_lines=False)
        next(chunks).sent = size
        with open(tmp_path / "message", "ab") as grow:  # written to while it was sent
            grow.write(b"more\r\n")
        with pytest.raises((SizeMismatch, protocol.MessageChanged)):
            next(chunks)
    with _stored(tmp_path, PROSE_CRLF) as f:
        chunks = iter_message(f, size, dot_lines=False)
        next(chunks).sent = size
        _rewrite_in_place(tmp_path / "message", PROSE_CRLF.replace(b"A line", b"B line"))
        with pytest.raises(protocol.MessageChanged):
            next(chunks)


def _rewrite_in_place(path, data):
    """Write ``data`` over the file at ``path`` (same inode), with a later mtime
    than it had: a program writes in the same clock tick only by chance."""
    old = os.stat(path).st_mtime_ns
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(old + 10**9, old + 10**9))


@pytest.mark.parametrize("dot_lines", [None, False])
def test_a_file_written_while_it_is_read_never_ends(tmp_path, dot_lines):
    """RFC 1939 section 3: the terminator vouches for the whole message.  A message
    file rewritten in place (same size) after RETR read its first chunk: the next
    chunk is not sent, stuffed or not (LF storage, so no FileSpan), whatever the
    file holds now; a "." line in it never goes out unstuffed."""
    data = PROSE_CRLF.replace(b"\r\n", b"\n") * 8
    new = data.replace(b"A line.", b"\n.\nine.")
    assert len(new) == len(data) and len(data) > 2 * protocol.CHUNK_SIZE
    with _stored(tmp_path, data) as f:
        chunks = iter_message(f, wire_size(data), dot_lines=dot_lines)
        first = next(chunks)
        assert isinstance(first, bytes) and b"\r\n.\r\n" not in first
        _rewrite_in_place(tmp_path / "message", new)
        with pytest.raises(protocol.MessageChanged):
            next(chunks)


@pytest.mark.parametrize("data, dot_lines", [
    (PROSE_CRLF, None),                                     # not known: looked for
    (PROSE_CRLF.replace(b"\r\n", b"\n"), False),            # LF line ends (Maildir)
    (PROSE_CRLF[:-2], False),                               # no final CRLF: one is added
    (PROSE_CRLF[:-1], False),                               # ends in a lone CR
    (PROSE_CRLF[:-2] + b"\n", False),                       # one bare LF
    (b"Subject: small\r\n\r\nshort.\r\n", False),         # below SENDFILE_MIN
])
def test_other_messages_are_stuffed_as_ever(tmp_path, data, dot_lines):
    """Only the wire form goes out as a FileSpan; anything the stuffer would
    change (line ends, the final CRLF), or a message whose lines are not known
    to be free of dots, goes through it."""
    with _stored(tmp_path, data) as f:
        chunks = list(iter_message(f, wire_size(data), dot_lines=dot_lines))
    assert all(isinstance(c, bytes) for c in chunks)
    assert b"".join(chunks) == stuff(data)


def test_bare_cr_inside_a_stored_wire_form_is_sent_as_the_stuffer_would(tmp_path):
    data = PROSE_CRLF.replace(b"one, with", b"one,\rwith", 1)
    assert wire_size(data) == len(data) and stuff(data) == data + b".\r\n"
    with _stored(tmp_path, data) as f:
        assert isinstance(next(iter_message(f, len(data), dot_lines=False)), protocol.FileSpan)


def test_wire_size_counts_crlf():
    """RFC 1939 section 11: sizes count CRLF line endings."""
    assert wire_size(b"a\nb\n") == 6
    assert wire_size(b"a\r\nb\r\n") == 6
    assert wire_size(b"abc") == 5


# -- TOP (RFC 1939 section 7) ---------------------------------------------------

MSG = b"H1: a\nH2: b\n\nbody1\n.body2\nbody3\n"


def test_top_zero_lines_sends_headers_and_blank_line():
    """RFC 1939 section 7 (TOP): n 0 gives the headers and the blank line."""
    assert b"".join(iter_top(io.BytesIO(MSG), 0)) == b"H1: a\r\nH2: b\r\n\r\n.\r\n"


def test_top_counts_body_lines_and_stuffs():
    assert b"".join(iter_top(io.BytesIO(MSG), 2)) == b"H1: a\r\nH2: b\r\n\r\nbody1\r\n..body2\r\n.\r\n"


def test_top_more_lines_than_body():
    assert b"".join(iter_top(io.BytesIO(MSG), 99)) == stuff(MSG)


def test_top_stops_reading_early():
    """TOP of a huge message reads only what it sends."""
    stream = io.BytesIO(b"H: x\n\n" + b"line\n" * 1_000_000)
    b"".join(iter_top(stream, 3))
    assert stream.tell() < 100


def test_top_long_header_line_is_not_mistaken_for_blank():
    long_line = b"X: " + b"y" * (70 * 1024) + b"\n"
    msg = long_line + b"\nbody\n"
    out = b"".join(iter_top(io.BytesIO(msg), 0))
    assert out == stuff(long_line + b"\n")


def test_valid_uid():
    """RFC 1939 section 7 (UIDL): 1-70 characters in 0x21..0x7E."""
    assert protocol.valid_uid("a" * 70)
    assert not protocol.valid_uid("a" * 71)
    assert not protocol.valid_uid("has space")
    assert not protocol.valid_uid("")
