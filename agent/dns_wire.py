"""The mesh DNS core (agent/dns.py): one query message in, its reply out. The 12-byte header is read
first: a message that is not one small question is refused from its header alone (agent/dns.py's
header_reply), so dnspython never parses what a query cannot be; dnspython does the wire format of
the rest. Imported on the first query only."""

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

from hostmesh.agent.dns import HEADER_LEN, header_reply

ANSWER_TTL = 5  # seconds: addresses change only with a reload of agent.toml; short so one is seen soon
# A query is one question (a name of at most 255 bytes: 271 bytes with the header) and at most an OPT
# record (11 bytes, plus options: a cookie is 44, a client subnet ~24), padded to RFC 8467's 128-byte
# blocks: 384 bytes at most. RFC 1035's 512 leaves room and is the size every client assumes a query
# fits. Bigger is not a query: it is FORMERR from its header, unparsed. The bound keeps what dnspython
# may be made to parse small: measured on this code, a 64 KiB message of 10,873 questions (pointers
# to one 125-label name) took 1.2-1.7 s and a 64 KiB OPT of 16,365 empty options 100 ms, each a stall
# of the agent's event loop (its data path); at 512 bytes the worst OPT is 118 options, 0.9 ms.
MAX_QUERY_SIZE = 512
MAX_AUTHORITY = 1  # an IXFR query carries the client's SOA there (RFC 1995 §3): NOTIMP, not FORMERR
MAX_ADDITIONAL = 1  # the OPT record (RFC 6891 §6.1.1: at most one); we do not do TSIG
EDNS_VERSION = 0  # the highest we speak; a query of a higher version gets BADVERS (RFC 6891 §6.1.3)
ZONE_TRANSFERS = (dns.rdatatype.AXFR, dns.rdatatype.IXFR)  # not served: NOTIMP


@functools.lru_cache(maxsize=4)  # the domain changes only on reload
def _domain(text: str) -> dns.name.Name:
    return dns.name.from_text(text)


@functools.lru_cache(maxsize=4)
def _soa(domain: dns.name.Name) -> dns.rrset.RRset:
    """The zone's SOA: in the authority section of every negative answer, so the host's resolver may
    cache it (RFC 2308) for ANSWER_TTL, as it caches an address; and the answer at the zone's apex."""
    text = f"{domain} hostmaster.{domain} 1 {ANSWER_TTL} {ANSWER_TTL} {ANSWER_TTL} {ANSWER_TTL}"
    return dns.rrset.from_text(domain, ANSWER_TTL, dns.rdataclass.IN, dns.rdatatype.SOA, text)


def respond(
    wire: bytes, domain_text: str, addresses: Mapping[str, str], max_size: int = 65535
) -> tuple[bytes | None, int | None]:
    """The reply to one query message and its rcode, EDNS-extended (BADVERS is 16: 0 in the header,
    1 in the OPT record); (None, None): drop it."""
    if len(wire) < HEADER_LEN:
        return None, None  # not even a header: nothing to answer to
    _qid, flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!6H", wire)
    if flags & dns.flags.QR:
        return None, None  # a response (or a reflection of one): never answer it
    if dns.opcode.from_flags(flags) != dns.opcode.QUERY:
        return _header_only(wire, dns.rcode.NOTIMP)
    if (
        qdcount != 1
        or ancount
        or nscount > MAX_AUTHORITY
        or arcount > MAX_ADDITIONAL
        or len(wire) > MAX_QUERY_SIZE
    ):
        return _header_only(wire, dns.rcode.FORMERR)  # not one question: unparsed
    try:
        query = dns.message.from_wire(wire)
    except Exception:  # untrusted bytes: whatever dnspython rejects (or trips on) is a malformed query
        return _header_only(wire, dns.rcode.FORMERR)
    # EDNS version 0 if the query had EDNS, offering what this server reads: MAX_QUERY_SIZE
    response = dns.message.make_response(query, our_payload=MAX_QUERY_SIZE)
    response.flags &= ~dns.flags.RA  # we recurse for nobody
    if query.edns > EDNS_VERSION:
        response.set_rcode(dns.rcode.BADVERS)
    else:
        _resolve(query.question[0], _domain(domain_text), addresses, response)
    rcode = int(response.rcode())
    try:
        return response.to_wire(max_size=max_size), rcode
    except dns.exception.TooBig:  # cannot happen (one question, one record: < 512 bytes), but never
        # send a cut message: the header alone, truncated, so the client asks again over TCP
        return header_reply(wire, rcode & 0xF, truncated=True), rcode & 0xF


def _header_only(wire: bytes, rcode: int) -> tuple[bytes | None, int | None]:
    reply = header_reply(wire, rcode)
    return reply, None if reply is None else rcode


def _resolve(question: dns.rrset.RRset, domain: dns.name.Name, addresses: Mapping[str, str],
             response: dns.message.Message) -> None:  # fmt: skip
    name, rdtype = question.name, question.rdtype
    if question.rdclass != dns.rdataclass.IN or not name.is_subdomain(domain):
        response.set_rcode(dns.rcode.REFUSED)
        return
    if rdtype in ZONE_TRANSFERS:
        response.set_rcode(dns.rcode.NOTIMP)
        return
    response.flags |= dns.flags.AA
    labels = name.relativize(domain).labels
    if not labels:  # the domain itself: it exists, holds its SOA only
        if rdtype in (dns.rdatatype.SOA, dns.rdatatype.ANY):
            response.answer.append(_soa(domain))
        else:
            response.authority.append(_soa(domain))
        return
    addr = addresses.get(labels[0].decode("ascii", "replace").lower()) if len(labels) == 1 else None
    if addr is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
        response.authority.append(_soa(domain))
        return
    family = dns.rdatatype.A if ipaddress.ip_address(addr).version == 4 else dns.rdatatype.AAAA
    if rdtype in (family, dns.rdatatype.ANY):
        response.answer.append(dns.rrset.from_text(name, ANSWER_TTL, dns.rdataclass.IN, family, addr))
    else:  # any other type of an existing name: NOERROR, no records (NODATA), cacheable likewise
        response.authority.append(_soa(domain))
