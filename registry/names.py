"""The rule for service names, in one place: one lowercase DNS label. Names appear in SPIFFE IDs and
DNS SANs (ca/identity.py), documents (registry/schema.py) and agent.toml; this module loads nothing
else, so a command's `--help` that checks no name does not pay for the schema."""

from __future__ import annotations

import re

SERVICE_NAME_MAX = 63  # one DNS label
# ASCII only: str.isdigit() would also take '²' and '٣' (the CA's own copy of the rule once did)
NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


def valid_service_name(name: str) -> bool:
    """One lowercase DNS label of at most SERVICE_NAME_MAX characters."""
    return len(name) <= SERVICE_NAME_MAX and NAME_RE.fullmatch(name) is not None
