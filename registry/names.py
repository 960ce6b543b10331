"""What operators write as names and ports, one rule each: service names (one lowercase DNS label:
they appear in SPIFFE IDs and DNS SANs, ca/identity.py; in documents, registry/schema.py; in
agent.toml), the bounds of DNS names, port numbers, and credentials in an address. This module loads
nothing else, so a command's `--help` that checks no name does not pay for the schema."""

from __future__ import annotations

import re

MAX_LABEL = 63  # characters of one DNS label (RFC 1035)
MAX_HOST_NAME = 253  # characters of a whole DNS name, dots included: a longer one cannot be resolved
SERVICE_NAME_MAX = MAX_LABEL  # a service name is one label
# ASCII only: str.isdigit() would also take '²' and '٣' (the CA's own copy of the rule once did)
NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
MAX_PORT_DIGITS = 5  # before int(): thousands of digits make it raise ValueError (int max str digits)


def valid_service_name(name: str) -> bool:
    """One lowercase DNS label of at most SERVICE_NAME_MAX characters."""
    return len(name) <= SERVICE_NAME_MAX and NAME_RE.fullmatch(name) is not None


def port_number(text: str, lowest: int = 0) -> int | None:
    """`text` as a port in lowest..65535, or None: ASCII digits only (str.isdigit() also takes '²',
    which int() refuses, and '٣', which int() reads as 3), at most MAX_PORT_DIGITS of them."""
    if not (text.isascii() and text.isdigit()) or len(text) > MAX_PORT_DIGITS:
        return None
    port = int(text)
    return port if lowest <= port <= 65535 else None


def holds_credentials(address: str) -> bool:
    """Whether an address (a URL, or host:port without a scheme) may hold `user:password@`: any `@`,
    since a password may hold `/`, `?` or `#` and so end the host part where a parser would not
    look for it. Checked before anything else about the address: an error about its port or its
    host would quote it, password and all. (No address hostmesh takes has an `@` of its own.)"""
    return "@" in address


def printable(text: str, limit: int) -> str:
    """`text` on one line, without control characters, at most `limit` characters: a peer's or the
    catalog's text on its way to a terminal or a log line."""
    flat = " ".join(text.split())
    return "".join(c if c.isprintable() else "?" for c in flat)[:limit]
