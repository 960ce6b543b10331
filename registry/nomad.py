"""Nomad's HTTP API, the few reads hostmesh makes: one allocation (is it still running?).

Settings are read as Nomad's own tools read them (NOMAD_ADDR, NOMAD_TOKEN, NOMAD_NAMESPACE,
NOMAD_REGION, NOMAD_CACERT, NOMAD_CLIENT_CERT, NOMAD_CLIENT_KEY), an explicit value winning over
the environment. python-nomad (requests) does the HTTP; it blocks, so every call runs in a thread
(`asyncio.to_thread`) and never on the event loop. python-nomad does not verify HTTPS unless told,
so we always pass `verify` (NOMAD_CACERT, else the system store).
"""

from __future__ import annotations

import asyncio
import enum
import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hostmesh.registry.errors import InvalidSettings, PermissionDenied, Unavailable

DEFAULT_ADDRESS = "http://127.0.0.1:4646"  # Nomad's own default
REQUEST_TIMEOUT = 5  # seconds per Nomad request; python-nomad's default too
TERMINAL_CLIENT_STATUSES = frozenset({"complete", "failed", "lost"})  # api-docs/allocations ClientStatus
STOPPING_DESIRED_STATUSES = frozenset({"stop", "evict"})  # DesiredStatus: the scheduler wants it gone


class AllocationState(enum.Enum):
    LIVE = "live"  # pending or running, and meant to run
    STOPPED = "stopped"  # terminal, or the scheduler stopped/evicted it
    GONE = "gone"  # Nomad does not know it (404): garbage-collected, or never existed


@dataclass(frozen=True, slots=True)
class NomadSettings:
    address: str = DEFAULT_ADDRESS
    token: str | None = None
    namespace: str | None = None
    region: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @classmethod
    def resolve(cls, environ: Mapping[str, str] | None = None, **explicit: str | None) -> NomadSettings:
        """Explicit values (agent.toml [nomad], CLI options) over the environment over the defaults."""
        env = os.environ if environ is None else environ
        names = {
            "address": "NOMAD_ADDR",
            "token": "NOMAD_TOKEN",
            "namespace": "NOMAD_NAMESPACE",
            "region": "NOMAD_REGION",
            "ca_file": "NOMAD_CACERT",
            "cert_file": "NOMAD_CLIENT_CERT",
            "key_file": "NOMAD_CLIENT_KEY",
        }
        values = {k: explicit.get(k) or env.get(var) or None for k, var in names.items()}
        address = (values.pop("address") or DEFAULT_ADDRESS).rstrip("/")
        if not address.startswith(("http://", "https://")):
            raise InvalidSettings(f"Nomad address {address!r} must start with http:// or https://")
        return cls(address, **values)


def allocation_state(alloc: Mapping[str, Any]) -> AllocationState:
    """What an allocation document (GET /v1/allocation/:id) says about its life."""
    if alloc.get("ClientStatus") in TERMINAL_CLIENT_STATUSES:
        return AllocationState.STOPPED
    if alloc.get("DesiredStatus") in STOPPING_DESIRED_STATUSES:
        return AllocationState.STOPPED
    return AllocationState.LIVE


class NomadAPI:
    """python-nomad over `settings`; each method is a coroutine that runs the blocking call in a thread."""

    def __init__(self, settings: NomadSettings) -> None:
        # python-nomad, imported on use (it pulls in requests); by name, since the repository's own
        # nomad/ folder (example jobs) would shadow it for mypy's module search
        nomad: Any = importlib.import_module("nomad")

        self.settings = settings
        s = settings
        cert: tuple[str, str] | tuple[()] = (s.cert_file, s.key_file) if s.cert_file and s.key_file else ()
        self._client = nomad.Nomad(
            address=s.address,
            token=s.token,
            namespace=s.namespace,
            region=s.region,
            verify=s.ca_file or True,  # requests takes a CA path or a bool
            cert=cert,
            timeout=REQUEST_TIMEOUT,
        )

    async def allocation(self, alloc_id: str) -> dict[str, Any] | None:
        """The allocation's document, or None when Nomad does not know it."""
        return await asyncio.to_thread(self._allocation, alloc_id)

    async def allocation_state(self, alloc_id: str) -> AllocationState:
        alloc = await self.allocation(alloc_id)
        return AllocationState.GONE if alloc is None else allocation_state(alloc)

    def _allocation(self, alloc_id: str) -> dict[str, Any] | None:
        nex: Any = importlib.import_module("nomad.api.exceptions")

        try:
            doc = self._client.allocation.get_allocation(alloc_id)
        except nex.URLNotFoundNomadException:
            return None
        except nex.URLNotAuthorizedNomadException:
            raise PermissionDenied(
                f"Nomad at {self.settings.address} refused to read allocation {alloc_id}: "
                "the token needs namespace read-job"
            ) from None
        except (nex.BaseNomadException, OSError) as exc:
            raise Unavailable(f"Nomad at {self.settings.address}: {_describe(exc)}") from None
        except Exception as exc:  # requests' own errors (connection refused, TLS) are not Nomad's
            raise Unavailable(f"Nomad at {self.settings.address}: {_describe(exc)}") from None
        if not isinstance(doc, dict):
            raise Unavailable(f"Nomad at {self.settings.address}: the allocation is not a JSON object")
        return doc


def _describe(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    nomad_exc = getattr(exc, "nomad_resp", None)
    if nomad_exc is not None and hasattr(nomad_exc, "status_code"):
        return f"HTTP {nomad_exc.status_code}"
    return text[:200] or exc.__class__.__name__
