"""Mesh DNS's fast path (agent/dns.py `refused`): a plain query outside the mesh domain is answered
REFUSED from its raw bytes, without dnspython, with the very bytes dnspython's path (agent/dns_wire.py)
gives for it. Checked against each other on generated queries: names of random bytes and case, IDNA
and escaped-looking labels, the domain as a suffix that is not at a label boundary (`xmesh.`, a label
holding the bytes `\\x04mesh`), EDNS or not, other classes, compression pointers, authority records,
trailing bytes, names over 255 octets. The cost is asserted as work done (dnspython's parser called or
not, dnspython loaded or not), not as time: the measurements are in refused()'s docstring.
"""

from __future__ import annotations

import struct
import subprocess
import sys

import dns.message
import dns.rcode
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from hostmesh.agent import dns_wire
from hostmesh.agent.dns import (
    MAX_NAME,
    REFUSED,
    UDP_MAX_ANSWER,
    DnsTable,
    answer,
    from_header,
    refused,
    respond,
)
from tests.test_dns_limits import parses  # noqa: F401  (a fixture)

DOMAINS = ("mesh.", "corp.mesh.")
ADDRESSES = {"api": "127.128.1.2", "db": "::1"}


def wire_name(labels: list[bytes]) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0"


def domain_labels(domain: str) -> list[bytes]:
    return [label.encode() for label in domain.rstrip(".").split(".")]


def slow(wire: bytes, domain: str) -> tuple[bytes | None, int | None]:
    """What the message gets without the fast path: its header read, then dnspython."""
    decided = from_header(wire)
    if decided is not None:
        return decided
    return dns_wire.respond(wire, domain, ADDRESSES, UDP_MAX_ANSWER)


# --- generated queries -----------------------------------------------------------------------------

ASCII_LABEL = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1,
                      max_size=63).map(str.encode)  # fmt: skip
ODD_LABEL = st.sampled_from([
    b"xn--bcher-kva", "bücher".encode(), "ÉCOLE".encode(), b"a.b", b"\\046", b"\\.", b"*", b"@", b" ",
    b"\x00", b"\xff" * 63, b"\x04mesh", b"xmesh", b"mesh", b"MESH", b"MeSh", b"corp", b"CORP",
    b"api", b"API", b"mesh\x00", b"\xc0\x0c",
])  # fmt: skip
LABEL = st.one_of(ASCII_LABEL, ODD_LABEL, st.binary(min_size=1, max_size=63))


@st.composite
def qnames(draw: st.DrawFn, domain: str) -> bytes:
    """A name on the wire: random labels, often ending in the domain (any case), or a trap like it."""
    labels = draw(st.lists(LABEL, max_size=6))
    tail = draw(st.sampled_from(["none", "domain", "domain", "x-domain", "domain-label", "long"]))
    dom = domain_labels(domain)
    if tail == "domain":
        labels += [bytes(c ^ 0x20 if draw(st.booleans()) and chr(c).isalpha() else c for c in label)
                   for label in dom]  # fmt: skip
    elif tail == "x-domain":  # the domain as a suffix of a label, not a label: outside
        labels += [b"x" + dom[0], *dom[1:]]
    elif tail == "domain-label":  # a label that holds the domain's wire bytes: outside
        labels += [b"a" + wire_name(dom)[:-1]]
    elif tail == "long":  # past MAX_NAME octets, or just within
        labels = [b"a" * 63] * 3 + [b"b" * draw(st.integers(55, 63)), *dom]
    return wire_name(labels)


def opt_record(payload: int, ext_rcode: int, version: int, flags: int, rdata: bytes = b"",
               owner: bytes = b"\0") -> bytes:  # fmt: skip
    return owner + struct.pack("!HHBBHH", 41, payload, ext_rcode, version, flags, len(rdata)) + rdata


U16 = st.integers(0, 0xFFFF)
PLAIN_OPT = st.builds(opt_record, U16, st.integers(0, 255), st.sampled_from([0, 0, 0, 1, 255]), U16)
OPTIONS = (  # EDNS options as RDATA: dnspython checks some (a cookie cut short is FORMERR)
    b"\x00\x0a\x00\x08" + b"c" * 8,  # a client cookie
    b"\x00\x0a\x00\x03abc",  # a cookie too short: FORMERR
    b"\x00\x0c\x00\x04" + b"\0" * 4,  # padding
    b"\x00\x08\x00\x07\x00\x01\x18\x00\xc0\x00\x02",  # a client subnet
    b"\x00\x08\x00\x01\x00",  # a client subnet cut short
    b"\xfd\xe9\x00\x00",  # a local-use one, empty
)
ODD_ADDITIONAL = st.one_of(
    st.builds(lambda rdata, payload: opt_record(payload, 0, 0, 0, rdata), st.sampled_from(OPTIONS), U16),
    st.just(opt_record(1232, 0, 0, 0, owner=b"\xc0\x0c")),  # its owner a pointer (to the qname)
    st.just(b"\0\x00\x01\x00\x01\x00\x00\x00\x05\x00\x04\x7f\x00\x00\x01"),  # an A record, not an OPT
    st.binary(min_size=1, max_size=14),
)
SOA_RDATA = wire_name([b"ns"]) + wire_name([b"h"]) + b"\0\0\0\1" * 5
SOA = wire_name([b"mesh"]) + struct.pack("!HHIH", 6, 1, 5, len(SOA_RDATA)) + SOA_RDATA  # an IXFR's


def often(usual: st.SearchStrategy, odd: st.SearchStrategy) -> st.SearchStrategy:
    """`usual` nine times in ten: well-formed queries reach every rcode, not mostly FORMERR."""
    return st.sampled_from([usual] * 9 + [odd]).flatmap(lambda chosen: chosen)


# compression pointers in the question: into the header, or after a label to the name's own start
# (dnspython's BadPointer), or a label type that is no pointer (0x40)
POINTER_NAMES = [
    b"\xc0\x00",
    b"\xc0\x04",
    b"\xc0\x0b",
    b"\x03www\xc0\x0c",
    b"\x03www\xc0\x02",
    b"\x03www\x40",
]


def count(section: bytes, records: int) -> int:
    return records if section else 0


@st.composite
def queries(draw: st.DrawFn, domain: str) -> bytes:
    """A query message whose header passes from_header (so the two paths may differ past it)."""
    qname = draw(often(qnames(domain), st.sampled_from(POINTER_NAMES)))
    qtype = draw(st.one_of(st.sampled_from([1, 28, 6, 255, 252, 251, 65, 41, 0]), U16))
    qclass = draw(st.one_of(st.sampled_from([1, 1, 1, 3, 254, 255, 0]), U16))
    additional = draw(often(st.sampled_from([b""]) | PLAIN_OPT, ODD_ADDITIONAL))
    authority = draw(often(st.just(b""), st.just(SOA)))
    arcount = draw(often(st.just(count(additional, 1)), st.sampled_from([0, 1])))
    flags = draw(U16) & 0x07FF  # QR clear, opcode QUERY; AA, TC, RD, RA, Z, AD, CD and rcode random
    head = struct.pack("!6H", draw(U16), flags, 1, 0, count(authority, 1), arcount)
    trailing = draw(often(st.just(b""), st.sampled_from([b"\0", b"junk"])))
    wire = head + qname + struct.pack("!HH", qtype, qclass) + authority + additional + trailing
    return wire[: draw(often(st.just(len(wire)), st.sampled_from([len(wire) - 1, 13, 20])))]


@settings(max_examples=3000, deadline=None)
@given(st.data())
def test_the_fast_path_gives_the_slow_paths_bytes(data: st.DataObject) -> None:
    """Whenever refused() answers, dnspython's path answers the same bytes, REFUSED; and the whole core
    answers every query as dnspython's path does. A pure equivalence test: the code before the fast
    path had nothing to compare."""
    domain = data.draw(st.sampled_from(DOMAINS))
    wire = data.draw(queries(domain))
    if from_header(wire) is not None:
        event("decided by the header")
        return
    expected = slow(wire, domain)
    fast = refused(wire, domain)
    event(f"{'fast' if fast is not None else 'slow'} path: {dns.rcode.to_text(expected[1] or 0)}")
    if fast is not None:
        assert (fast, REFUSED) == expected, wire
    assert respond(wire, DnsTable(domain, ADDRESSES), UDP_MAX_ANSWER) == expected, wire


@settings(max_examples=1000, deadline=None)
@given(st.data())
def test_every_plain_query_refused_by_dnspython_is_refused_by_the_fast_path(data: st.DataObject) -> None:
    """The fast path's reach (a pure property, of the fast path only): a query of one question with no
    compression pointer, a name within MAX_NAME octets, then nothing or an OPT record of version 0
    without options, that dnspython's path refuses, is never left to dnspython."""
    domain = data.draw(st.sampled_from(DOMAINS))
    qname = data.draw(qnames(domain))
    qtype, qclass = data.draw(U16), data.draw(st.one_of(st.just(1), U16))
    edns = data.draw(st.booleans())
    opt = opt_record(data.draw(U16), data.draw(st.integers(0, 255)), 0, data.draw(U16)) if edns else b""
    flags = data.draw(U16) & 0x07FF
    wire = struct.pack("!6H", data.draw(U16), flags, 1, 0, 0, int(edns)) + qname
    wire += struct.pack("!HH", qtype, qclass) + opt
    if len(qname) > MAX_NAME:
        return
    if slow(wire, domain)[1] == REFUSED:
        assert refused(wire, domain) is not None, wire


@pytest.mark.parametrize(
    ("name", "inside"),
    [
        ("xmesh.", False),  # the domain as the end of a label
        ("api.xmesh.", False),
        ("mesh.example.com.", False),
        ("api.mesh.", True),
        ("API.MESH.", True),
        ("mesh.", True),  # the apex: dnspython answers its SOA
        ("MeSh.", True),
        (".", False),
    ],
)
def test_names_at_and_around_the_domain(name: str, inside: bool) -> None:
    """Around the domain's label boundary: outside is REFUSED by the fast path, inside is left to
    dnspython; with and without EDNS, the same bytes as dnspython's path."""
    for edns in (-1, 0):
        wire = dns.message.make_query(name, "A", use_edns=edns).to_wire()
        assert (refused(wire, "mesh.") is None) == inside, (name, edns)
        reply, rcode = respond(wire, DnsTable("mesh.", ADDRESSES))
        assert (reply, rcode) == slow(wire, "mesh.")
        assert (rcode == dns.rcode.REFUSED) != inside


def test_a_label_holding_the_domains_bytes_is_outside_it() -> None:
    """`\\x06a\\x04mesh\\x00` ends with the bytes of `mesh.` on the wire (`\\x04mesh\\x00`) but is the
    one-label name "a\\004mesh.": REFUSED, as dnspython says."""
    wire = struct.pack("!6H", 7, 0x0100, 1, 0, 0, 0) + b"\x06a\x04mesh\x00\x00\x01\x00\x01"
    reply = refused(wire, "mesh.")
    assert reply is not None and (reply, REFUSED) == slow(wire, "mesh.")


def test_what_the_hosts_resolvers_send_for_other_names_is_refused_unparsed(
    parses: list[int],  # noqa: F811
) -> None:
    """systemd-resolved offers the agent every name the host looks up: EDNS0, the DO bit or not, no
    options; glibc without EDNS; a class other than IN. None of them reaches dnspython's parser, and a
    mesh name still does."""
    refused_ones = [
        dns.message.make_query("www.example.com", "A", use_edns=0, payload=1232, want_dnssec=True),
        dns.message.make_query("www.example.com", "AAAA", use_edns=0, payload=512),
        dns.message.make_query("_https._tcp.example.org", "SRV"),
        dns.message.make_query("version.bind", "TXT", rdclass="CH"),
        dns.message.make_query("api.mesh", "A", rdclass="CH"),
    ]
    for query in refused_ones:
        reply = answer(query.to_wire(), DnsTable("mesh.", ADDRESSES))
        assert reply is not None and reply[3] & 0xF == dns.rcode.REFUSED  # (the spy sees from_wire)
    assert parses == []
    mesh = dns.message.make_query("api.mesh", "A").to_wire()
    assert answer(mesh, DnsTable("mesh.", ADDRESSES)) is not None and parses == [len(mesh)]


def test_refused_queries_do_not_load_dnspython() -> None:
    """dnspython is ~8 MiB of RSS, loaded with the first query it parses. With systemd-resolved every
    host lookup reaches the agent, so every agent on such a host carried it; now only a mesh name (or
    a query the fast path leaves to it) loads it."""
    code = (
        "import sys; from hostmesh.agent.dns import DnsTable, answer;"
        "t = DnsTable('mesh.', {'api': '127.128.1.2'});"
        "q = lambda name, edns: bytes.fromhex('1234010000010000000000' + ('01' if edns else '00'))"
        " + b''.join(bytes([len(x)]) + x.encode() for x in name.split('.')) + b'\\0\\0\\1\\0\\1'"
        " + (b'\\0\\0\\x29\\x04\\xd0\\0\\0\\x80\\0\\0\\0' if edns else b'');"
        "assert answer(q('www.example.com', False), t)[3] & 15 == 5;"
        "assert answer(q('www.example.com', True), t)[3] & 15 == 5;"
        "assert 'dns.message' not in sys.modules, 'imported for a REFUSED';"
        "assert answer(q('api.mesh', False), t)[3] & 15 == 0;"
        "assert 'dns.message' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
