"""Listening sockets for an IP address, bound here and handed to the loop's `create_server(sock=...)`.

Decision: uvloop's `create_server(host, port)` resolves even an IP literal through getaddrinfo on
libuv's thread pool, which starts four threads (each with its own malloc arena) and imports the
`idna` codec (with `stringprep` and `unicodedata`): about 0.7 MiB of resident memory an idle agent
carries for good, for addresses that need no resolving (agent.toml's addresses are IP literals).
The socket is made as `create_server` makes it: SO_REUSEADDR, SO_REUSEPORT when asked, IPv6-only
for an IPv6 address, and the same "error while attempting to bind on address" error.

Decision (`start_servers`): libuv accepts one connection each time a listening descriptor polls
readable, then polls again (libuv PR 3696), however many connections wait in the queue. A listener
whose clients open a connection per request then moves one connection per loop turn, and each
turn's fixed costs (the poll, a TLS record and a write on the agent connection) are paid per
connection instead of per batch. A listener that expects such clients registers its one socket under
ACCEPT_FDS descriptors (`dup`), so one turn accepts up to that many from the one queue: no
SO_REUSEPORT (nothing else may share the port) and no second queue to balance. Measured on the
2-core box (connection per request, 50 clients): the L7 pair went from 6.1-6.7k to 8.0-9.1k
requests/s, with 4 descriptors as with 16. A lone connection costs the other descriptors one
`accept` each that finds nothing (EAGAIN).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from typing import Any, Final

from hostmesh.registry.addresses import unmapped
from hostmesh.registry.names import port_number

ACCEPT_FDS: Final = 4  # descriptors per listener of connection-per-request clients (see above)
ALL_IPV4: Final = "0.0.0.0"  # the host of `:PORT`
MAX_QUOTED_PORT: Final = 20  # characters of a refused port quoted in its error (it may be a screenful)


class InvalidListen(ValueError):
    """A `--listen` address that cannot be served on as written; str() is one line naming it."""


def parse_listen(text: str, default_port: int, option: str = "--listen") -> tuple[str, int]:
    """(host, port) of a server command's `--listen` (`ca serve`, `ui`): HOST:PORT, [IPv6]:PORT,
    :PORT (every IPv4 interface), or HOST, [IPv6] or a bare IPv6 address on `default_port` (a bare
    one takes no port; one whose last group is decimal and the rest an address, as `::1:8080`, reads
    either way and is refused, naming both bracketed forms). The host as `listen_host` gives it;
    InvalidListen otherwise."""
    shape = InvalidListen(f"{option} {text!r}: expected HOST:PORT (an IPv6 address as [::1]:PORT)")
    port_text: str | None
    if "://" in text:  # the URL a server prints (`ui`: "hostmesh ui on http://..."), its ':'s read as IPv6
        raise InvalidListen(f"{option} {text!r}: expected HOST:PORT, not a URL")
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise shape
        if not _ipv6(host):
            raise InvalidListen(f"{option} {text!r}: only an IPv6 address goes in brackets")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        if not _ipv6(text):
            raise InvalidListen(
                f"{option} {text!r}: an IPv6 address with a port goes in brackets, as [::1]:PORT"
            )
        if why := ipv6_port_ambiguity(text):
            raise InvalidListen(f"{option} {text!r}: {why}")
        host, port_text = text, None
    else:
        host, colon, port_text = text.partition(":")
        host = host or (ALL_IPV4 if colon else "")
        port_text = port_text if colon else None
        if not host or "]" in host or not host.isprintable() or any(c.isspace() for c in host):
            raise shape
    port = default_port if port_text is None else port_number(port_text)
    if port is None:
        assert port_text is not None  # (the default is a port)
        if not (port_text.isascii() and port_text.isdigit()):
            raise InvalidListen(f"{option} {text!r}: expected HOST:PORT with a numeric port")
        raise InvalidListen(
            f"{option} {text!r}: port {port_text[:MAX_QUOTED_PORT]} is out of range (0-65535)"
        )
    return listen_host(host), port


def ipv6_port_ambiguity(text: str) -> str | None:
    """Why a bare IPv6 address is refused where a port may follow a host (`--listen`, `--advertise`)
    when its last group is decimal and the rest an address too: `::1:8080` is an address, but an
    operator who writes it means port 8080 on ::1. One line naming both bracketed forms; else None."""
    address, _, last = text.rpartition(":")
    if not (last.isascii() and last.isdigit() and _ipv6(address) and _ipv6(text)):
        return None
    bracketed = f"[{address}]:{last} for port {last} on {address}"
    return f"ambiguous: write {bracketed}, or [{text}] for the address {text}"


def _ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def listen_host(host: str) -> str:
    """The host to bind for a listen address's host as an operator wrote it, for every component's
    listen addresses (agent.toml, `ca serve --listen`, `ui --listen`): an IPv4-mapped address
    (::ffff:127.0.0.1) is the IPv4 address it maps, since the IPv6 sockets bound here are IPv6-only
    and cannot bind it ("invalid argument"), while bound as IPv4 it takes the connections the mapped
    address would on a dual-stack socket; anything else (a name, any other address) as written."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    target = unmapped(ip)
    return host if target is ip else str(target)


def listening_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket | None:
    """A socket bound to `host`:`port` (not yet listening: `create_server(sock=…, backlog=…)` does
    that), or None when `host` is not an IP address (the caller passes host and port instead)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.inet_pton(family, host)
    except (OSError, ValueError):  # a name, "" or an address with a zone: the loop resolves it
        return None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        bind_explained(sock, host, port)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_explained(sock: socket.socket, host: str, port: int) -> None:
    """`sock.bind((host, port))`, failing as the loop's `create_server` does: the same errno, and
    "error while attempting to bind on address" with the address, so the operator sees which one."""
    try:
        sock.bind((host, port))
    except OSError as exc:
        why = (exc.strerror or str(exc)).lower()
        reason = f"error while attempting to bind on address {(host, port)!r}: {why}"
        raise OSError(exc.errno, reason) from None


def server_address(host: str, port: int, *, reuse_port: bool = False) -> dict[str, Any]:
    """`create_server`'s keyword arguments for `host`:`port`: a socket bound here for an IP address,
    else the host and port for the loop to resolve."""
    sock = listening_socket(host, port, reuse_port=reuse_port)
    if sock is not None:
        return {"sock": sock}
    return {"host": host, "port": port, "reuse_address": True, "reuse_port": reuse_port or None}


async def start_servers(
    factory: Callable[[], asyncio.BaseProtocol],
    host: str,
    port: int,
    *,
    backlog: int,
    reuse_port: bool = False,
    accept_fds: int = 1,
    **kwargs: Any,
) -> list[asyncio.Server]:
    """Servers calling `factory` for the connections to `host`:`port`, one per descriptor of one
    listening socket: `accept_fds` of them for an IP address, one where the loop resolves a name.
    `kwargs` go to each `create_server` (e.g. `ssl`)."""
    loop = asyncio.get_running_loop()
    sock = listening_socket(host, port, reuse_port=reuse_port)
    if sock is None:
        where = server_address(host, port, reuse_port=reuse_port)
        return [await loop.create_server(factory, backlog=backlog, **where, **kwargs)]
    socks = [sock]
    servers: list[asyncio.Server] = []
    try:
        socks += [sock.dup() for _ in range(accept_fds - 1)]
        for s in socks:
            servers.append(await loop.create_server(factory, sock=s, backlog=backlog, **kwargs))
    except BaseException:
        for server in servers:
            server.close()
        for s in socks[len(servers) :]:
            s.close()
        raise
    return servers
