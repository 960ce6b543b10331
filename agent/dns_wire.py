"""The mesh DNS core's slow path (agent/dns.py): one query message in, its reply out, with dnspython
doing the wire format. agent/dns.py has already read the 12-byte header (what cannot be one small
question is refused from it, unparsed) and answered REFUSED itself from the raw bytes for a plain
query outside the domain; what comes here is parsed. Imported on the first such query only.
"""

from __future__ import annotations

import functools
import ipaddress
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

from hostmesh.agent.dns import EDNS_VERSION, MAX_QUERY_SIZE, header_reply

ANSWER_TTL = 5  # seconds: addresses change only with a reload of agent.toml; short so one is seen soon
ZONE_TRANSFERS = (dns.rdatatype.AXFR, dns.rdatatype.IXFR)  # not served: NOTIMP
# EDNS padding of a reply (dnspython pads one to a padded query to RFC 8467's 468-byte block): none.
# Padding hides sizes on an encrypted transport; ours are cleartext UDP and TCP, where it hid nothing
# and made a 41-byte query's reply 468 bytes, reflected to the query's source (spoofable with
# `dns_shared`), and at any rate once the answer was kept (ANSWER_CACHE, outside the parse budget)
NO_PADDING = 0


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
    """The reply to one query message whose header agent/dns.py's from_header passed, and its rcode,
    EDNS-extended (BADVERS is 16: 0 in the header, 1 in the OPT record)."""
    try:
        query = dns.message.from_wire(wire)
    except Exception:  # untrusted bytes: whatever dnspython rejects (or trips on) is a malformed query
        return _header_only(wire, dns.rcode.FORMERR)
    # EDNS version 0 if the query had EDNS, offering what this server reads: MAX_QUERY_SIZE
    response = dns.message.make_response(query, our_payload=MAX_QUERY_SIZE, pad=NO_PADDING)
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
    # a listener on a zoned address (fe80::1%eth0, shared): no record holds a zone, and the address
    # without it is none to connect to (dnspython refused the text: SERVFAIL): NODATA
    if rdtype in (family, dns.rdatatype.ANY) and "%" not in addr:
        response.answer.append(dns.rrset.from_text(name, ANSWER_TTL, dns.rdataclass.IN, family, addr))
    else:  # any other type of an existing name: NOERROR, no records (NODATA), cacheable likewise
        response.authority.append(_soa(domain))
