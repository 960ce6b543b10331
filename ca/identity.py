"""SPIFFE workload identities: names only, no certificate parsing.

Split out of ca/pki.py so that modules which only name identities (config, snapshot, the data path's
peer checks) do not load `cryptography` (~9 MiB of RSS in every agent process); ca/pki.py re-exports
everything here, so `pki.Identity` and friends keep working.
"""

from __future__ import annotations

from hostmesh.ca.errors import InvalidRequest
from hostmesh.registry.names import SERVICE_NAME_MAX as SERVICE_NAME_MAX
from hostmesh.registry.names import valid_service_name as valid_service_name  # one rule for names
from hostmesh.registry.records import record

DEFAULT_TRUST_DOMAIN = "hostmesh.local"


def valid_trust_domain(td: str) -> bool:
    labels = td.split(".")
    return 0 < len(td) <= 255 and all(valid_service_name(label) for label in labels)


@record  # not a plain frozen dataclass: every agent holds it, and record frees the leftover class
class Identity:
    """A workload identity: `spiffe://<trust_domain>/svc/<service>`."""

    trust_domain: str
    service: str

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/svc/{self.service}"

    @property
    def dns_name(self) -> str:
        return f"{self.service}.svc.{self.trust_domain}"

    @classmethod
    def parse(cls, uri: str) -> Identity:
        prefix = "spiffe://"
        if not uri.startswith(prefix):
            raise InvalidRequest(f"not a SPIFFE ID: {uri!r}")
        td, _, path = uri[len(prefix) :].partition("/")
        kind, _, service = path.partition("/")
        if kind != "svc" or not valid_trust_domain(td) or not valid_service_name(service):
            raise InvalidRequest(f"not a hostmesh service identity: {uri!r}")
        return cls(td, service)

    @classmethod
    def from_sni(cls, sni: str) -> Identity | None:
        """`<service>.svc.<trust-domain>` -> Identity, or None for any other name."""
        service, sep, rest = sni.partition(".svc.")
        if not sep or not valid_service_name(service) or not valid_trust_domain(rest):
            return None
        return cls(rest, service)
