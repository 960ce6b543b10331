"""The mesh DNS core (agent/dns.py): one query message in, its reply out; dnspython does the wire
format. Imported on the first query only."""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections.abc import Mapping

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

ANSWER_TTL = 5  # seconds: addresses change only with a reload of agent.toml; short so one is seen soon
HEADER_LEN = 12


@functools.lru_cache(maxsize=4)  # the domain changes only on reload
def _domain(text: str) -> dns.name.Name:
    return dns.name.from_text(text)


def answer(
    wire: bytes, domain_text: str, addresses: Mapping[str, str], max_size: int = 65535
) -> bytes | None:
    """The reply to one query message, or None to drop it."""
    try:
        query = dns.message.from_wire(wire)
    except Exception:  # untrusted bytes: whatever dnspython rejects (or trips on) is a malformed query
        return _formerr(wire)
    if query.flags & dns.flags.QR:
        return None
    response = dns.message.make_response(query)
    response.flags &= ~dns.flags.RA  # we recurse for nobody
    if query.opcode() != dns.opcode.QUERY:
        response.set_rcode(dns.rcode.NOTIMP)
    elif len(query.question) != 1:
        response.set_rcode(dns.rcode.FORMERR)
    else:
        _resolve(query.question[0], _domain(domain_text), addresses, response)
    try:
        return response.to_wire(max_size=max_size)
    except dns.exception.TooBig:  # cannot happen with one record, but never send a cut message
        response.answer.clear()
        response.flags |= dns.flags.TC
        return response.to_wire(max_size=max_size)


def _formerr(wire: bytes) -> bytes | None:
    """A FORMERR echoing the query's id, opcode and RD; None if not even the header is readable."""
    if len(wire) < HEADER_LEN:
        return None
    qid, flags = struct.unpack_from("!HH", wire)
    if flags & dns.flags.QR:
        return None  # a response (or a reflection of one): never answer it
    out_flags = dns.flags.QR | (flags & (0x7800 | dns.flags.RD)) | dns.rcode.FORMERR  # 0x7800: opcode
    return struct.pack("!HHHHHH", qid, out_flags, 0, 0, 0, 0)


def _resolve(question: dns.rrset.RRset, domain: dns.name.Name, addresses: Mapping[str, str],
             response: dns.message.Message) -> None:  # fmt: skip
    name, rdtype = question.name, question.rdtype
    if question.rdclass != dns.rdataclass.IN or not name.is_subdomain(domain):
        response.set_rcode(dns.rcode.REFUSED)
        return
    response.flags |= dns.flags.AA
    labels = name.relativize(domain).labels
    if not labels:  # the domain itself: it exists, holds no records of its own
        return
    addr = addresses.get(labels[0].decode("ascii", "replace").lower()) if len(labels) == 1 else None
    if addr is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
        return
    family = dns.rdatatype.A if ipaddress.ip_address(addr).version == 4 else dns.rdatatype.AAAA
    if rdtype in (family, dns.rdatatype.ANY):
        response.answer.append(dns.rrset.from_text(name, ANSWER_TTL, dns.rdataclass.IN, family, addr))
    # any other type of an existing name: NOERROR, no records (NODATA)
