"""IP addresses as a socket sees them, one rule each: an IPv4-mapped address (::ffff:a.b.c.d) is the
IPv4 address it maps (a socket bound to or dialing it reaches that address's IPv4 host), and which
addresses reach no one peer. Used wherever an operator's address is read: agent.toml's listen
addresses and mesh_address, external documents, the DNS server, the CA; and how a host and port
are written together (`authority`, and a socket's peer: `peer_authority`)."""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def unmapped(ip: IPAddress) -> IPAddress:
    """`ip`, or the IPv4 address an IPv4-mapped one stands for (ipaddress calls ::ffff:0.0.0.0 no
    unspecified address and ::ffff:127.0.0.1 no loopback, where a socket treats them as both)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def authority(host: object, port: object) -> str:
    """`host:port` as a URL and an access line write it: an IPv6 address in brackets ([::1]:8080),
    so that the port is not read as the address's last group."""
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def peer_authority(peer: object) -> str | None:
    """A socket's address as its peer's (`getpeername()`, `peername` of a transport: `(host, port, ...)`)
    written as logs and audit lines name it, by `authority`; None when unknown (a connection gone
    before it was asked, a socket with no such address), for which each caller says its own."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return authority(peer[0], peer[1])
    return None


def undialable(ip: IPAddress) -> str | None:
    """Why a connection to `ip` reaches no one peer, however it is written (IPv4-mapped forms too):
    "any address" (0.0.0.0, ::: it reaches the dialer's own host), "multicast", "broadcast"; None
    for an address one can dial."""
    target = unmapped(ip)
    if target.is_unspecified:
        return "any address"
    if target.is_multicast:
        return "multicast"
    if target == LIMITED_BROADCAST:
        return "broadcast"
    return None
