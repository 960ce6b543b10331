"""hostmesh's asyncio layer over Consul: KV with check-and-set, transactions, services, health.

py-consul supplies the API surface (URLs, parameters, response shapes); we plug in our own
asyncio HTTP client (registry/http.py) instead of its aiohttp one. Every Consul or transport error
is translated here into `registry.errors`, so nothing above this module knows about HTTP codes.
Honours `CONSUL_HTTP_ADDR` and `CONSUL_HTTP_TOKEN` like Consul's own tools.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import os
import sys
import types
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from hostmesh.registry.errors import Conflict, NotFound, PermissionDenied, Rejected, Unavailable
from hostmesh.registry.http import DEFAULT_TIMEOUT, HTTPClient


def _import_py_consul_api() -> None:
    """Load py-consul's API modules without its package __init__, which imports its `requests`-based
    client: that costs ~80 ms and ~14 MiB of RSS in every agent for a client we never use."""
    if "consul" in sys.modules:
        return
    spec = importlib.util.find_spec("consul")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("py-consul is not installed")
    pkg = types.ModuleType("consul")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    sys.modules["consul"] = pkg
    import consul.check
    import consul.exceptions

    pkg.Check = consul.check.Check  # type: ignore[attr-defined]  # what py-consul's modules import from the package
    for name in ("ACLDisabled", "ACLPermissionDenied", "ConsulException", "NotFound", "Timeout"):
        setattr(pkg, name, getattr(consul.exceptions, name))


_import_py_consul_api()

import consul.exceptions as cx  # noqa: E402

DEFAULT_CONSUL_URL = "http://127.0.0.1:8500"
BLOCKING_WAIT = 30.0  # seconds Consul holds a blocking query; short enough to notice a dead agent
BLOCKING_SLACK = 10.0  # client timeout beyond `wait`: Consul adds up to wait/16 jitter

T = TypeVar("T")


def consul_url_from_env(explicit: str | None = None) -> str:
    url = explicit or os.environ.get("CONSUL_HTTP_ADDR") or DEFAULT_CONSUL_URL
    if "//" not in url:
        scheme = "https" if os.environ.get("CONSUL_HTTP_SSL", "").lower() == "true" else "http"
        url = f"{scheme}://{url}"
    return url


class _Response(NamedTuple):
    """py-consul's `consul.base.Response`: what its callbacks read."""

    code: int
    headers: dict[str, str]
    body: str


class _AsyncHTTP:
    """py-consul's HTTP interface (what its endpoint classes call) over our asyncio client; returns
    coroutines py-consul passes through."""

    def __init__(self, client: HTTPClient) -> None:
        self.client = client
        self.timeout = DEFAULT_TIMEOUT

    def _call(
        self,
        method: str,
        callback: Callable[[Any], T],
        path: str,
        params: Any,
        data: Any,
        headers: dict[str, str] | None,
        timeout: float | None = None,
    ) -> Awaitable[T]:
        target = urllib.parse.quote(path, safe="/:")  # as py-consul's HTTPClient.uri, without the base
        if params:
            target = f"{target}?{urllib.parse.urlencode(params)}"

        async def run() -> T:
            resp = await self.client.request(method, target, data or b"", headers, timeout or self.timeout)
            titled = {k.title(): v for k, v in resp.headers.items()}  # py-consul reads "X-Consul-Index"
            return callback(_Response(resp.status, titled, resp.body.decode("utf-8", "replace")))

        return run()

    def get(self, callback, path, params=None, headers=None, raw=False, connections_timeout=None):
        return self._call("GET", callback, path, params, None, headers, connections_timeout)

    def put(self, callback, path, params=None, data="", headers=None, connections_timeout=None):
        return self._call("PUT", callback, path, params, data, headers, connections_timeout)

    def delete(self, callback, path, params=None, data="", headers=None, connections_timeout=None):
        return self._call("DELETE", callback, path, params, data, headers, connections_timeout)

    def post(self, callback, path, params=None, data="", headers=None, connections_timeout=None):
        return self._call("POST", callback, path, params, data, headers, connections_timeout)

    def close(self):
        return self.client.close()


class _PyConsul:
    """What py-consul's endpoint classes read from their `consul.base.Consul` (http, token, dc,
    consistency, prepare_headers), with only the endpoints used here, each module imported on first
    use: `consul.base` imports all sixteen, ~0.5 MiB of RSS in every agent (which calls kv and
    health only)."""

    def __init__(self, client: HTTPClient, token: str | None) -> None:
        self.http = _AsyncHTTP(client)
        self.token = os.getenv("CONSUL_HTTP_TOKEN", token)  # as consul.base.Consul: the environment wins
        self.dc = None
        self.consistency = "default"

    def prepare_headers(self, token: str | None = None) -> dict[str, str]:
        tok = token or self.token
        return {"X-Consul-Token": tok} if tok else {}

    @functools.cached_property
    def kv(self) -> Any:
        from consul.api.kv import KV

        return KV(self)

    @functools.cached_property
    def health(self) -> Any:
        from consul.api.health import Health

        return Health(self)

    @functools.cached_property
    def txn(self) -> Any:
        from consul.api.txn import Txn

        return Txn(self)

    @functools.cached_property
    def catalog(self) -> Any:
        from consul.api.catalog import Catalog

        return Catalog(self)

    @functools.cached_property
    def agent(self) -> Any:
        from consul.api.agent import Agent

        return Agent(self)


@dataclass(frozen=True, slots=True)
class KVEntry:
    key: str
    value: bytes
    modify_index: int

    def json(self) -> Any:
        return json.loads(self.value)


@dataclass(frozen=True, slots=True)
class ServiceInstance:
    """One passing (or not) instance of a service, as the health endpoint reports it."""

    id: str
    service: str
    node: str
    address: str
    port: int
    meta: dict[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    status: str = "passing"  # worst check status: passing | warning | critical


@dataclass(frozen=True, slots=True)
class ServiceRegistration:
    name: str
    id: str
    address: str
    port: int
    meta: dict[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    checks: tuple[dict[str, Any], ...] = ()  # Consul check definitions (Name, CheckID, HTTP/TTL, …)


async def _translate(awaitable: Awaitable[T], what: str) -> T:
    try:
        return await awaitable
    except cx.ACLPermissionDenied as exc:
        raise PermissionDenied(f"Consul ACL denied {what}: {_first_line(exc)}") from None
    except cx.ACLDisabled as exc:
        raise PermissionDenied(f"Consul refused {what} (401): {_first_line(exc)}") from None
    except cx.NotFound:
        raise NotFound(f"{what}: not found") from None
    except cx.Timeout:
        raise Unavailable(f"Consul timed out on {what}") from None
    except (cx.BadRequest, cx.ClientError) as exc:
        text = _first_line(exc)
        status = int(text[:3]) if text[:3].isdigit() else 400
        raise Rejected(status, f"Consul rejected {what}: {text}") from None
    except cx.ConsulException as exc:
        raise Unavailable(f"Consul failed {what}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def _instance(entry: dict[str, Any]) -> ServiceInstance:
    svc = entry["Service"]
    node = entry["Node"]
    statuses = {c.get("Status", "passing") for c in entry.get("Checks", [])}
    status = "critical" if "critical" in statuses else "warning" if "warning" in statuses else "passing"
    return ServiceInstance(
        id=svc["ID"],
        service=svc["Service"],
        node=node["Node"],
        address=svc.get("Address") or node.get("Address", ""),
        port=int(svc["Port"]),
        meta=dict(svc.get("Meta") or {}),
        tags=tuple(svc.get("Tags") or ()),
        status=status,
    )


class ConsulClient:
    """Async Consul client. Use `async with ConsulClient(url) as c:` or call `close()`."""

    def __init__(self, url: str | None = None, token: str | None = None) -> None:
        self.url = consul_url_from_env(url)
        self._http = HTTPClient(self.url)
        self._token = token if token is not None else os.environ.get("CONSUL_HTTP_TOKEN")
        self._api = _PyConsul(self._http, self._token)
        # A second connection pool for blocking queries, so a 30 s long-poll never delays a write.
        self._blocking_http = HTTPClient(self.url)
        self._blocking_api = _PyConsul(self._blocking_http, self._token)

    async def __aenter__(self) -> ConsulClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.close()
        await self._blocking_http.close()

    def _headers(self) -> dict[str, str]:
        return {"X-Consul-Token": self._token} if self._token else {}

    # --- KV ---------------------------------------------------------------------------------

    async def kv_get(self, key: str) -> KVEntry | None:
        _, item = await _translate(self._api.kv.get(key), f"read of {key}")
        return (
            None if item is None else KVEntry(item["Key"], item.get("Value") or b"", int(item["ModifyIndex"]))
        )

    async def kv_get_blocking(
        self, key: str, index: int | None, wait: float = BLOCKING_WAIT
    ) -> tuple[int, KVEntry | None]:
        """Long-poll a key: returns when its index moves past `index` or after `wait` seconds."""
        self._blocking_api.http.timeout = wait + BLOCKING_SLACK
        idx, item = await _translate(
            self._blocking_api.kv.get(key, index=index or None, wait=f"{int(wait)}s"), f"watch of {key}"
        )
        entry = (
            None if item is None else KVEntry(item["Key"], item.get("Value") or b"", int(item["ModifyIndex"]))
        )
        return int(idx), entry

    async def kv_list(self, prefix: str) -> list[KVEntry]:
        _, items = await _translate(self._api.kv.get(prefix, recurse=True), f"list of {prefix}")
        return [KVEntry(i["Key"], i.get("Value") or b"", int(i["ModifyIndex"])) for i in items or []]

    async def kv_put(self, key: str, value: bytes | str, cas: int | None = None) -> None:
        """Write `key`; with `cas` (0 = must not exist) raise `Conflict` when another writer got there first.

        Exactly-one guarantees must rest on `cas=0` (create-if-absent) of a unique key: measured on
        Consul 1.8.7, two *concurrent* writers with the same `cas=N>0` can both succeed (plain PUT and
        txn alike), while concurrent `cas=0` creations always have exactly one winner
        (tests/test_registry_consul.py shows both).
        """
        ok = await _translate(self._api.kv.put(key, value, cas=cas), f"write of {key}")
        if not ok:
            raise Conflict(f"{key} was changed by someone else (check-and-set index {cas} is stale)")

    async def kv_delete(self, key: str, cas: int | None = None, recurse: bool = False) -> None:
        ok = await _translate(self._api.kv.delete(key, cas=cas, recurse=recurse or None), f"delete of {key}")
        if not ok:
            raise Conflict(f"{key} was changed by someone else (check-and-set index {cas} is stale)")

    async def txn(self, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Atomic KV transaction. `ops` are Consul TxnOps; values may be given as bytes/str and are
        base64-encoded here. Raises `Conflict` when any check-and-set in it fails (nothing applied)."""
        payload = []
        for op in ops:
            kv = dict(op["KV"])
            if isinstance(kv.get("Value"), (bytes, str)):
                raw = kv["Value"].encode() if isinstance(kv["Value"], str) else kv["Value"]
                kv["Value"] = base64.b64encode(raw).decode()
            payload.append({"KV": kv})
        try:
            result = await _translate(self._api.txn.put(payload), "transaction")
        except Rejected as exc:
            if exc.status == 409:
                raise Conflict(
                    "a concurrent write changed the document first (check-and-set failed)"
                ) from None
            raise
        return list((result or {}).get("Results") or [])

    # --- services and health ----------------------------------------------------------------

    async def register_service(self, reg: ServiceRegistration) -> None:
        payload: dict[str, Any] = {
            "Name": reg.name,
            "ID": reg.id,
            "Address": reg.address,
            "Port": reg.port,
            "Meta": reg.meta,
            "Tags": list(reg.tags),
            "Checks": list(reg.checks),
        }
        await self._raw(
            "PUT",
            "/v1/agent/service/register?replace-existing-checks=true",
            payload,
            f"registration of {reg.id}",
        )

    async def deregister_service(self, service_id: str) -> None:
        await self._raw(
            "PUT", f"/v1/agent/service/deregister/{service_id}", None, f"deregistration of {service_id}"
        )

    async def check_ttl(self, check_id: str, status: str = "pass", note: str = "") -> None:
        """Update a TTL check: status is pass | warn | fail."""
        q = f"?note={note}" if note else ""
        what = f"TTL update of {check_id}"
        try:
            await self._raw("PUT", f"/v1/agent/check/{status}/{check_id}{q}", None, what)
        except Unavailable as exc:
            # Consul 1.8 answers 500 `Unknown check "<id>"` once its agent forgot the check (a client
            # agent rebuilt or restarted without its data dir): that is NotFound, so the caller
            # registers again instead of retrying the update forever.
            if "Unknown check" in str(exc):
                raise NotFound(f"{what}: not found (Consul forgot the check)") from None
            raise

    async def health_service(
        self, name: str, passing: bool = True, index: int | None = None, wait: float = BLOCKING_WAIT
    ) -> tuple[int, list[ServiceInstance]]:
        """Instances of `name` (only passing ones by default). With `index`, a blocking query."""
        api = self._blocking_api if index else self._api
        if index:
            api.http.timeout = wait + BLOCKING_SLACK
        kwargs: dict[str, Any] = {"passing": passing}
        if index:
            kwargs.update(index=index, wait=f"{int(wait)}s")
        idx, entries = await _translate(api.health.service(name, **kwargs), f"health of {name}")
        return int(idx), [_instance(e) for e in entries or []]

    async def catalog_services(self) -> dict[str, list[str]]:
        _, services = await _translate(self._api.catalog.services(), "catalog listing")
        return dict(services or {})

    async def agent_node_name(self) -> str:
        me = await _translate(self._api.agent.self(), "agent self")
        return str(me["Config"]["NodeName"])

    async def agent_services(self) -> dict[str, Any]:
        return dict(await _translate(self._api.agent.services(), "agent services"))

    async def agent_checks(self) -> dict[str, Any]:
        return dict(await _translate(self._api.agent.checks(), "agent checks"))

    async def _raw(self, method: str, path: str, payload: Any, what: str) -> Any:
        body = b"" if payload is None else json.dumps(payload).encode()
        resp = await self._http.request(method, path, body, self._headers())
        if resp.status == 403:
            raise PermissionDenied(f"Consul ACL denied {what}: {resp.body.decode(errors='replace').strip()}")
        if resp.status == 404:
            raise NotFound(f"{what}: not found")
        if 400 <= resp.status < 500:
            raise Rejected(
                resp.status, f"Consul rejected {what}: {resp.body.decode(errors='replace').strip()}"
            )
        if resp.status >= 500:
            raise Unavailable(
                f"Consul failed {what}: {resp.status} {resp.body.decode(errors='replace').strip()}"
            )
        return resp.json() if resp.body.strip() else None
