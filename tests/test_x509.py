"""pop3frame.x509: the DER reading behind ``pop3frame client``'s certificate notes."""
from __future__ import annotations

import datetime
import functools
import glob
import poplib
import ssl

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3frame import x509
from pop3frame.adapters.memory import MemoryAdapter
from pop3frame.testing import Controller
from pop3frame.tls import TLSCertificates

#: ssl's attribute names, OpenSSL's short ones.
LONG_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU"}
NOT_AFTER = datetime.datetime(2031, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)


def der(leaf) -> bytes:
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode("ascii"))


def test_fields_of_a_leaf_certificate():
    """RFC 5280 section 4.1: subject, issuer, notAfter, subjectAltName (DNS and IP, v4 and v6)."""
    ca = trustme.CA(organization_name="Example CA")
    leaf = ca.issue_cert("mail.example.com", "192.0.2.1", "2001:db8::1", common_name="mail.example.com",
                         organization_name="Example", not_after=NOT_AFTER.replace(tzinfo=None))
    cert = x509.decode(der(leaf))
    assert cert.subject.startswith("O=Example, ") and cert.subject.endswith(", CN=mail.example.com")
    assert cert.issuer.startswith("O=Example CA, OU=")
    assert cert.not_after == NOT_AFTER
    assert cert.names == ("DNS:mail.example.com", "IP:192.0.2.1", "IP:2001:db8::1")


def test_agrees_with_what_ssl_decodes_after_verification(tmp_path):
    """The same subject, names and expiry as ``getpeercert()`` of a verified handshake."""
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    tls = TLSCertificates(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    with Controller(MemoryAdapter({}), tls=tls, secure=True) as server:
        client = poplib.POP3_SSL("127.0.0.1", server.port, context=context, timeout=10)
        seen = client.sock.getpeercert()
        mine = x509.decode(client.sock.getpeercert(binary_form=True))
        client.quit()
    assert mine.subject.split(", ") == ["%s=%s" % (LONG_NAMES[k], v) for rdn in seen["subject"] for k, v in rdn]
    assert mine.names == tuple("%s:%s" % ("IP" if kind == "IP Address" else kind, value)
                               for kind, value in seen["subjectAltName"])
    assert mine.not_after.timestamp() == ssl.cert_time_to_seconds(seen["notAfter"])


def test_every_system_ca_certificate_decodes():
    """Real-world certificates (UTCTime and GeneralizedTime, many string types) all read."""
    paths = glob.glob("/etc/ssl/certs/*.pem")
    assert paths, "no CA certificates installed (ca-certificates)"
    for path in paths:
        with open(path, encoding="ascii") as f:
            cert = x509.decode(ssl.PEM_cert_to_DER_cert(f.read()))
        assert cert.subject and cert.not_after.year >= 2000, path


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_is_a_value_error(data):
    """A hostile server's "certificate" raises ValueError and nothing else."""
    try:
        x509.decode(data)
    except ValueError:
        pass


@functools.lru_cache(maxsize=None)
def leaf_der() -> bytes:
    return der(trustme.CA().issue_cert("localhost", "127.0.0.1"))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), min_size=1, max_size=4))
def test_corrupted_certificate_reads_or_is_a_value_error(changes):
    """Bytes of a real certificate changed anywhere: a Certificate or ValueError, nothing else."""
    data = bytearray(leaf_der())
    for where, value in changes:
        data[where % len(data)] = value
    try:
        x509.decode(bytes(data))
    except ValueError:
        pass


@pytest.mark.parametrize("cut", [1, 10, 100, -1])
def test_truncated_certificate_is_a_value_error(cut):
    data = leaf_der()
    with pytest.raises(ValueError):
        x509.decode(data[:cut])


def _der(tag: int, content: bytes) -> bytes:
    """One DER element (X.690 section 8.1: the long length form when needed)."""
    if len(content) < 0x80:
        return bytes([tag, len(content)]) + content
    size = (len(content).bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + len(content).to_bytes(size, "big") + content


def test_a_huge_oid_is_refused_at_once():
    """An attribute type of 200 KB of OID arcs (decoding was quadratic: 1 MB took 100 s, and
    Python 3.11 then refused the arc's 4,300+ digits): ValueError, from the length alone."""
    name = _der(0x30, _der(0x31, _der(0x30, _der(0x06, b"\xff" * 200_000 + b"\x01") + _der(0x0C, b"x"))))
    validity = _der(0x30, _der(0x17, b"200101000000Z") + _der(0x17, b"350101000000Z"))
    tbs = _der(0x30, _der(0x02, b"\x01") + _der(0x30, b"") + name + validity + name + _der(0x30, b""))
    with pytest.raises(ValueError, match="OID longer than 64 octets"):
        x509.decode(_der(0x30, tbs))
