"""Listening sockets for an IP address, bound here and handed to the loop's `create_server(sock=...)`.

Decision: uvloop's `create_server(host, port)` resolves even an IP literal through getaddrinfo on
libuv's thread pool, which starts four threads (each with its own malloc arena) and imports the
`idna` codec (with `stringprep` and `unicodedata`): about 0.7 MiB of resident memory an idle agent
carries for good, for addresses that need no resolving (agent.toml's addresses are IP literals).
The socket is made as `create_server` makes it: SO_REUSEADDR, SO_REUSEPORT when asked, IPv6-only
for an IPv6 address, and the same "error while attempting to bind on address" error.
"""

from __future__ import annotations

import socket
from typing import Any


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
        try:
            sock.bind((host, port))
        except OSError as exc:
            why = (exc.strerror or str(exc)).lower()
            reason = f"error while attempting to bind on address {(host, port)!r}: {why}"
            raise OSError(exc.errno, reason) from None
    except BaseException:
        sock.close()
        raise
    return sock


def server_address(host: str, port: int, *, reuse_port: bool = False) -> dict[str, Any]:
    """`create_server`'s keyword arguments for `host`:`port`: a socket bound here for an IP address,
    else the host and port for the loop to resolve."""
    sock = listening_socket(host, port, reuse_port=reuse_port)
    if sock is not None:
        return {"sock": sock}
    return {"host": host, "port": port, "reuse_address": True, "reuse_port": reuse_port or None}
