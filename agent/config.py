"""agent.toml: parsed once into frozen dataclasses; every mistake is one line naming the key.

The keys of docs/architecture.md are the contract; additions are documented on the dataclass fields below.
Validation is pure (`parse_config(dict)`), so tests need no files.
"""

from __future__ import annotations

import binascii
import ipaddress
import os
import pwd
import re
import socket
import stat
import sys
import urllib.parse
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Any

from hostmesh.agent.audit import DEFAULT_ACCESS_SAMPLE
from hostmesh.ca.files import cert_dir, cert_paths, join_key_path
from hostmesh.ca.identity import DEFAULT_TRUST_DOMAIN, valid_service_name, valid_trust_domain
from hostmesh.registry.addresses import authority, undialable, unmapped
from hostmesh.registry.consul_settings import (
    ConsulLayer,
    ConsulSettings,
    normalize_url,
    others_can_read,
    resolve,
)
from hostmesh.registry.errors import InvalidSettings
from hostmesh.registry.files import ForeignOwner, check_owner, find_user
from hostmesh.registry.layout import (
    CONSUL_META_VALUE_MAX,
    DEFAULT_INTENTION_META,
    GATEWAY_KIND_META,
    GATEWAY_KINDS,
    HOSTMESH_META,
    METRICS_META,
    PROTOCOL_META,
    UPSTREAMS_META,
    VERSION_META,
)
from hostmesh.registry.listen import listen_host
from hostmesh.registry.names import holds_credentials, port_number
from hostmesh.registry.records import record

# This file as this process loaded it, CRC-32 (agent/configwire.py): a child of other code (an
# upgrade under a running agent) must not unpickle this process's AgentConfig, whose records pickle
# their fields by position. Taken at import, which is the agent's start.
LAYOUT_CODE = b"%08x" % binascii.crc32(Path(__file__).read_bytes())

DEFAULT_INBOUND = "0.0.0.0:15001"
DEFAULT_ADMIN = "127.0.0.1:15000"
DEFAULT_METRICS = "0.0.0.0:15090"
DEFAULT_DATA_DIR = "/var/lib/hostmesh"
DEFAULT_HEADER_READ_TIMEOUT = 10.0  # slow-client bound on a request head; generous for real clients
DEFAULT_BODY_IDLE_TIMEOUT = 15.0  # a request body may pause this long (real uploads never pause so long)
DEFAULT_BODY_MIN_RATE = 240.0  # bytes/s a request body must keep up after that grace (Kestrel's default)
DEFAULT_DRAIN_SECONDS = 10.0  # SIGTERM: how long open connections may finish before being cut
DEFAULT_MAX_CONNECTIONS = 10_000  # per agent: far above a sidecar's usual load, well below its fd limit
MAX_MAX_CONNECTIONS = 1_000_000  # a larger cap is a typo: no host holds that many sockets per process
DEFAULT_STREAM_IDLE_TIMEOUT = 3600.0  # Envoy's tcp_proxy default: pools (databases, brokers) send
# keepalives well within it, and a connection whose peer vanished without a FIN frees its slot in an hour
MAX_WORKERS = 64  # more processes than this cannot help a sidecar; catches typos like 1000
PROTOCOLS = ("tcp", "http", "udp")
DEFAULT_UDP_IDLE_TIMEOUT = 60.0  # seconds; Envoy's UDP proxy default (a DNS/statsd client is long gone)
DEFAULT_DNS = "127.0.0.1:15053"  # the documented mesh DNS port; loopback: only this host's resolver asks it
DEFAULT_DNS_DOMAIN = "mesh."
# bind = "auto": upstream addresses are hashed into this /16. Not 127.0.0.1 (apps' own ports) and not
# 127.64.0.0/10 (the fake instances of scale tests); 65,536 addresses make a collision rare, and a
# collision on the same port is refused at load like any two upstreams on one address.
AUTO_BIND_NET = ipaddress.ip_network("127.128.0.0/16")
AUTO_HTTP_PORT = 80  # bind = "auto" on an http upstream: apps call http://<name>.mesh/ unchanged
LOAD_BALANCERS = ("round_robin", "least_connections")
# agent.toml's size: every setting of examples/agent.toml takes 3.5 KiB and an upstream ~80 bytes, so
# a real one is a few KiB; a MiB is room to spare, and a wrong path (a log, an image) is refused, not
# read whole into a daemon's memory
MAX_CONFIG_BYTES = 1024 * 1024
PIN_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")  # the CA root's pin, as `hostmesh ca init` prints it


class ConfigError(Exception):
    """agent.toml is unusable; str() is one line naming the key."""


@record
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return authority(self.host, self.port)


@record
class UpstreamConfig:
    service: str
    bind: Address
    load_balancer: str = "round_robin"  # L4 pick: round_robin | least_connections
    connect_timeout: float = 1.0  # seconds per attempt to dial one instance's agent
    connect_budget: float = 3.0  # seconds in all, across instances, before the downstream is closed
    # what the upstream speaks while the registry does not say (no route document, no healthy
    # instance): "http" answers 503 UH then, not a reset; None: what the registry said last
    protocol: str | None = None
    # the app-facing listener may be on a non-loopback address (everyone who reaches it calls with the
    # local service's identity): refused at load unless the operator says so
    shared: bool = False
    auto: bool = False  # bind = "auto": the address was derived from the name (auto_bind)


@record
class HealthConfig:
    http: str | None = None  # path probed on 127.0.0.1:<port>
    tcp: bool = False  # connect probe
    interval: float = 5.0
    timeout: float = 2.0


@record
class ServiceConfig:
    name: str
    port: int
    protocol: str = "tcp"
    meta: dict[str, str] = field(default_factory=dict)
    health: HealthConfig = field(default_factory=HealthConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()
    kind: str = ""  # "": a service with an app; a gateway's identity: GATEWAY_KINDS[kind of [[gateways]]]


GATEWAY_PROTOCOLS = ("http", "https", "tls")  # tls: passthrough by SNI to a TCP mesh service


@record
class GatewayCertificate:
    """An operator's certificate for `hosts` on an HTTPS listener (chosen by SNI; re-read when the
    files change and on SIGHUP)."""

    hosts: tuple[str, ...]
    cert_file: Path
    key_file: Path


@record
class GatewayListener:
    bind: Address
    protocol: str  # http | https | tls
    certificates: tuple[GatewayCertificate, ...] = ()


@record
class GatewayConfig:
    """`[[gateways]]`: a mesh identity this agent serves as a gateway (README "Gateways").

    ingress: its listeners take traffic from outside and hand it to mesh services as `name`, routed by
    the document hostmesh/gateways/<name>. egress: it originates the connections to the external
    services whose document says `via = name`, for the callers each external's intentions allow."""

    name: str
    kind: str  # ingress | egress
    listeners: tuple[GatewayListener, ...] = ()


@record
class CAConfig:
    pin: str
    address: str | None = None  # None: discover `hostmesh-ca` in Consul
    token_file: Path | None = None
    # an environment variable holding the bootstrap credential when token_file has none (in a Nomad
    # allocation: NOMAD_TOKEN, the workload identity of `identity { env = true }`)
    token_env: str | None = None


@record
class NomadConfig:
    """`[nomad]`, or implied by NOMAD_ALLOC_ID: the agent is an allocation's sidecar (agent/nomad.py).
    Nomad API settings left out here come from NOMAD_ADDR, NOMAD_TOKEN, … as Nomad's tools read them;
    without a token the agent uses its workload identity (Nomad 1.7+ accepts it for its own allocation)."""

    alloc_id: str
    address: str | None = None
    token: str | None = None
    namespace: str | None = None
    region: str | None = None
    ca_file: str | None = None
    identity_file: Path | None = None  # ${NOMAD_SECRETS_DIR}/nomad_token
    poll_interval: float = 5.0  # seconds between reads of the allocation: a stopped one drains and exits


@record
class AccessLogConfig:
    """`access_log = { sample = 0.01 }`: the fraction of allowed connections/requests that write a JSON
    access line (failures always do; agent/audit.py). 1.0 logs every one, 0 none; lines need the
    `hostmesh.access` logger at INFO (log_level "info" or "debug")."""

    sample: float = DEFAULT_ACCESS_SAMPLE


@record
class TracingConfig:
    """`[tracing] otlp_endpoint = "http://host:4318"`, `sample = 0.01`: spans of proxied HTTP requests,
    head-sampled (a sampled caller's `traceparent` is followed, except from outside the mesh at an
    ingress gateway, which draws its own decision; errors are kept too), exported
    as OTLP/HTTP protobuf to `<otlp_endpoint>/v1/traces` (agent/tracing.py). No endpoint: off."""

    otlp_endpoint: str | None = None
    sample: float = 0.01
    errors: bool = True  # a request ending in a 5xx or with a response flag: exported whatever the sample


@record
class HttpConfig:
    """`http = { header_read_timeout = 10, body_idle_timeout = 15, body_min_rate = 240 }`: limits of
    the L7 (protocol = "http") data path."""

    # seconds for a request head to arrive, and for a new connection's first request to begin
    header_read_timeout: float = DEFAULT_HEADER_READ_TIMEOUT
    # a request body silent this long, or slower than body_min_rate bytes/s (0: no rate) once that
    # grace is used, gets 408 (flag SI) and its upstream connection closed: slow bodies hold nothing;
    # a client that takes no byte of its response this long is reset (SI) the same way
    body_idle_timeout: float = DEFAULT_BODY_IDLE_TIMEOUT
    body_min_rate: float = DEFAULT_BODY_MIN_RATE


@record
class AgentConfig:
    node: str
    mesh_address: str
    data_dir: Path
    inbound: Address
    admin: Address
    metrics: Address | None
    consul: ConsulLayer  # agent.toml's [consul] table; `consul_settings()` merges the environment in
    ca: CAConfig
    services: tuple[ServiceConfig, ...]
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    default_intention: str = "allow"  # Consul says the service has no intentions document (404): allow | deny
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    workers: int = 1
    log_level: str = "info"
    istio_metrics: bool = False  # also export Istio-compatible series (istio_requests_total, ...)
    log_format: str = "auto"  # json | text | auto (text only on a terminal outside systemd): registry/logs.py
    tracing: TracingConfig = field(default_factory=TracingConfig)
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    # downstream connections held at once (app connections to upstream listeners, mesh connections,
    # the app connection of each inbound L4 stream); beyond: 503 OM (HTTP) or a reset (TCP)
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # an L4 stream, a tunnel (101) or an HTTP exchange silent this long ends; 0: never
    stream_idle_timeout: float = DEFAULT_STREAM_IDLE_TIMEOUT
    cert_dir: Path | None = None  # keys and certificates; None: <data_dir>/certs (Nomad: the secrets dir)
    nomad: NomadConfig | None = None  # running as a Nomad allocation's sidecar

    @property
    def certs_dir(self) -> Path:
        return self.cert_dir if self.cert_dir is not None else cert_dir(self.data_dir)

    udp_idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT  # a UDP flow without a datagram this long ends
    dns: Address | None = None  # mesh DNS (agent/dns.py), UDP and TCP; None: off (dns = "")
    dns_shared: bool = False  # `dns` may be beyond loopback (refused at load otherwise)
    admin_shared: bool = False  # `admin` may be beyond loopback (refused at load otherwise)
    dns_domain: str = DEFAULT_DNS_DOMAIN  # absolute, lowercase: "<upstream>.mesh." is answered
    # [[gateways]]; each one is also in `services` (kind set, no app), so it gets a certificate,
    # a registration and its intentions like a service
    gateways: tuple[GatewayConfig, ...] = ()

    def service(self, name: str) -> ServiceConfig | None:
        return next((s for s in self.services if s.name == name), None)

    def consul_settings(self) -> ConsulSettings:
        """[consul] over the environment (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, …), as Consul's tools
        read them: what every Consul client of the agent (registration, watches, certs) uses."""
        return resolve(file=self.consul)


# The keys of each table. Every table's set is named here and listed in KEY_TABLES, from which the
# agent.toml reference (docs/reference/agent-toml.md) is checked: a key added here needs its line there.
UPSTREAM_KEYS = {
    "service", "bind", "load_balancer", "connect_timeout", "connect_budget", "protocol", "port", "shared",
}  # fmt: skip
HEALTH_KEYS = {"http", "tcp", "interval", "timeout"}
SERVICE_KEYS = {"name", "port", "protocol", "meta", "health", "upstreams"}
HTTP_KEYS = {"header_read_timeout", "body_idle_timeout", "body_min_rate"}
CA_KEYS = {"address", "pin", "token_file", "token_env"}
ACCESS_LOG_KEYS = {"sample"}
TRACING_KEYS = {"otlp_endpoint", "sample", "errors"}
GATEWAY_KEYS = {"name", "kind", "listeners"}
LISTENER_KEYS = {"bind", "protocol", "certificates"}
CERTIFICATE_KEYS = {"hosts", "cert_file", "key_file"}


# --- parsing --------------------------------------------------------------------------------


def _fail(path: str, problem: str) -> ConfigError:
    return ConfigError(f"{path}: {problem}")


def _check_keys(table: dict[str, Any], allowed: set[str], path: str) -> None:
    for key in table:
        if key not in allowed:
            where = f"{path}.{key}" if path else key
            hint = _closest(key, allowed)
            raise _fail(where, f"unknown key{f' (did you mean {hint!r}?)' if hint else ''}")


def _closest(key: str, allowed: set[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    return match[0] if match else None


def _str(table: dict[str, Any], key: str, path: str, default: str | None = None) -> str | None:
    value = table.get(key, default)
    if value is not None and not isinstance(value, str):
        raise _fail(f"{path}{key}", f"must be a string, got {type(value).__name__}")
    return value


def _number(table: dict[str, Any], key: str, path: str, default: float, lo: float, hi: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise _fail(f"{path}{key}", f"must be a number in {lo:g}..{hi:g}")
    return float(value)


def parse_address(text: Any, path: str) -> Address:
    if not isinstance(text, str):
        raise _fail(path, "must be a string like '127.0.0.1:15000'")
    host, sep, port_s = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):  # an IPv6 address in brackets
        host = host[1:-1]
    port = port_number(port_s)
    if not sep or not host or port is None or "[" in host or "]" in host:
        raise _fail(path, f"{text!r} is not host:port")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise _fail(path, f"{host!r} must be an IP address (or localhost)") from None
        host = "127.0.0.1"
    # an IPv4-mapped address ([::ffff:127.0.0.1]) is its IPv4 address (registry/listen.py): the
    # loopback and clash checks see the address the socket binds
    return Address(listen_host(host), port)


def auto_bind(service: str) -> str:
    """The loopback address of `bind = "auto"`: stable across hosts and restarts (a hash of the name,
    not of anything local), never the network or broadcast-looking .0/.255 host parts."""
    import hashlib

    n = int.from_bytes(hashlib.sha256(service.encode()).digest()[:2], "big")
    if n & 0xFF in (0, 0xFF):
        n ^= 0x01
    return str(AUTO_BIND_NET.network_address + n)


def _upstream_bind(raw: dict[str, Any], service: str, protocol: str | None, path: str) -> Address:
    port = raw.get("port")
    if raw["bind"] != "auto":
        if port is not None:
            raise _fail(f"{path}.port", 'only with bind = "auto" (otherwise the port is part of bind)')
        bind = parse_address(raw["bind"], f"{path}.bind")
    else:
        if port is None:
            if protocol != "http":
                raise _fail(
                    f"{path}.port", 'is required with bind = "auto" unless protocol = "http" (port 80)'
                )
            port = AUTO_HTTP_PORT
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise _fail(f"{path}.port", "must be an integer in 1..65535")
        bind = Address(auto_bind(service), port)
    shared = raw.get("shared", False)
    if not isinstance(shared, bool):
        raise _fail(f"{path}.shared", "must be true or false")
    _loopback_unless_shared(bind, shared, f"{path}.bind",
                            f"would call {service} with this service's identity",
                            "set shared = true on the upstream")  # fmt: skip
    return bind


def _loopback_unless_shared(addr: Address, shared: bool, path: str, exposure: str, opt_in: str) -> None:
    """Nothing listens beyond loopback unless configured to: `addr` (the value at `path`) on another
    address, wildcards included, is refused unless `shared`, saying what anyone who reaches it would
    get (`exposure`) and how to allow it (`opt_in`)."""
    if not shared and not ipaddress.ip_address(addr.host).is_loopback:
        raise _fail(path, f"{addr.host} is not a loopback address: anyone who reaches it {exposure} "
                    f"({opt_in} if that is intended)")  # fmt: skip


def _parse_upstream(raw: Any, path: str) -> UpstreamConfig:
    if not isinstance(raw, dict):
        raise _fail(path, "must be a table")
    _check_keys(raw, UPSTREAM_KEYS, path)
    service = _str(raw, "service", f"{path}.")
    if not service or not valid_service_name(service):
        raise _fail(f"{path}.service", "must be a lowercase DNS label")
    if "bind" not in raw:
        raise _fail(f"{path}.bind", "is required")
    lb = _str(raw, "load_balancer", f"{path}.", "round_robin")
    if lb not in LOAD_BALANCERS:
        raise _fail(f"{path}.load_balancer", f"must be one of {', '.join(LOAD_BALANCERS)}")
    protocol = _str(raw, "protocol", f"{path}.")
    if protocol is not None and protocol not in PROTOCOLS:
        raise _fail(f"{path}.protocol", f"must be one of {', '.join(PROTOCOLS)}")
    return UpstreamConfig(
        service=service,
        bind=_upstream_bind(raw, service, protocol, path),
        shared=bool(raw.get("shared", False)),
        auto=raw["bind"] == "auto",
        load_balancer=lb,
        connect_timeout=_number(raw, "connect_timeout", f"{path}.", 1.0, 0.01, 60),
        connect_budget=_number(raw, "connect_budget", f"{path}.", 3.0, 0.01, 300),
        protocol=protocol,
    )


def _parse_health(raw: Any, path: str) -> HealthConfig:
    if not isinstance(raw, dict):
        raise _fail(path, 'must be a table like { http = "/healthz" } or { tcp = true }')
    _check_keys(raw, HEALTH_KEYS, path)
    http = _str(raw, "http", f"{path}.")
    if http is not None and not http.startswith("/"):
        raise _fail(f"{path}.http", "must be a path starting with /")
    tcp = raw.get("tcp", False)
    if not isinstance(tcp, bool):
        raise _fail(f"{path}.tcp", "must be true or false")
    return HealthConfig(
        http=http,
        tcp=tcp,
        interval=_number(raw, "interval", f"{path}.", 5.0, 0.1, 3600),
        timeout=_number(raw, "timeout", f"{path}.", 2.0, 0.05, 60),
    )


# Consul's rules for service meta (it refuses a registration that breaks them, with a 400): keys of
# ASCII letters, digits, '-' and '_', at most 128 characters, none starting with `consul-`; values of
# at most 512 bytes (UTF-8); at most 64 pairs, the agent's own among them.
CONSUL_META_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")
CONSUL_META_PAIRS_MAX = 64
# what the agent registers itself (agent/run.py `_registration`)
AGENT_META = (
    HOSTMESH_META,
    PROTOCOL_META,
    METRICS_META,
    UPSTREAMS_META,
    VERSION_META,
    DEFAULT_INTENTION_META,
)


def _check_meta(meta: dict[str, str], path: str) -> None:
    """A service's `meta` as Consul will take it: checked here, since Consul would refuse the
    registration only once the agent runs."""
    for key, value in meta.items():
        if key in AGENT_META:
            raise _fail(f"{path}.{key}", f"is set by the agent ({', '.join(AGENT_META)} are)")
        if not CONSUL_META_KEY.fullmatch(key) or key.startswith("consul-"):
            raise _fail(f"{path}[{key[:140]!r}]", "a meta key is 1-128 of A-Z a-z 0-9 - _ and does "
                        "not start with consul- (Consul's rule)")  # fmt: skip
        if len(value.encode()) > CONSUL_META_VALUE_MAX:  # Consul counts bytes
            raise _fail(
                f"{path}.{key}", f"a meta value is at most {CONSUL_META_VALUE_MAX} bytes (Consul's rule)"
            )
    if len(meta) > CONSUL_META_PAIRS_MAX - len(AGENT_META):
        raise _fail(path, f"at most {CONSUL_META_PAIRS_MAX - len(AGENT_META)} pairs (Consul takes "
                    f"{CONSUL_META_PAIRS_MAX}, {len(AGENT_META)} of them the agent's)")  # fmt: skip


def _parse_service(raw: Any, path: str) -> ServiceConfig:
    if not isinstance(raw, dict):
        raise _fail(path, "must be a table")
    _check_keys(raw, SERVICE_KEYS, path)
    name = _str(raw, "name", f"{path}.")
    if not name or not valid_service_name(name):
        raise _fail(f"{path}.name", "must be a lowercase DNS label (a-z, 0-9, -)")
    port = raw.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise _fail(f"{path}.port", "must be an integer in 1..65535")
    protocol = _str(raw, "protocol", f"{path}.", "tcp")
    if protocol not in PROTOCOLS:
        raise _fail(f"{path}.protocol", f"must be one of {', '.join(PROTOCOLS)}")
    meta = raw.get("meta", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise _fail(f"{path}.meta", "must be a table of strings")
    _check_meta(meta, f"{path}.meta")
    ups_raw = raw.get("upstreams", [])
    if not isinstance(ups_raw, list):
        raise _fail(f"{path}.upstreams", "must be an array of tables ([[services.upstreams]])")
    upstreams = tuple(_parse_upstream(u, f"{path}.upstreams[{i}]") for i, u in enumerate(ups_raw))
    return ServiceConfig(
        name=name,
        port=port,
        protocol=protocol,
        meta=dict(meta),
        # UDP has no connect to probe: a udp service is probed only if its health table says how
        health=_parse_health(raw.get("health", {} if protocol == "udp" else {"tcp": True}), f"{path}.health"),
        upstreams=upstreams,
    )


def _parse_http(raw: Any) -> HttpConfig:
    if not isinstance(raw, dict):
        raise _fail("http", "must be a table like { header_read_timeout = 10 }")
    _check_keys(raw, HTTP_KEYS, "http")
    return HttpConfig(
        header_read_timeout=_number(
            raw, "header_read_timeout", "http.", DEFAULT_HEADER_READ_TIMEOUT, 0.05, 600
        ),
        body_idle_timeout=_number(raw, "body_idle_timeout", "http.", DEFAULT_BODY_IDLE_TIMEOUT, 0.05, 3600),
        body_min_rate=_number(raw, "body_min_rate", "http.", DEFAULT_BODY_MIN_RATE, 0, 1e9),
    )


# [consul]: Consul's client settings, with the environment variable each one overrides.
CONSUL_KEYS = {
    "address",  # CONSUL_HTTP_ADDR
    "token",  # CONSUL_HTTP_TOKEN (a token beats a token_file in the same place)
    "token_file",  # CONSUL_HTTP_TOKEN_FILE
    "ca_file",  # CONSUL_CACERT
    "cert_file",  # CONSUL_CLIENT_CERT
    "key_file",  # CONSUL_CLIENT_KEY
    "tls_server_name",  # CONSUL_TLS_SERVER_NAME
}

TOP_KEYS = {
    "node",
    "mesh_address",
    "data_dir",
    "inbound",
    "admin",
    "admin_shared",
    "metrics",
    "consul",
    "ca",
    "services",
    "trust_domain",
    "default_intention",
    "drain_seconds",
    "workers",
    "log_level",
    "log_format",
    "tracing",
    "istio_metrics",
    "access_log",
    "http",
    "max_connections",
    "stream_idle_timeout",
    "dns",
    "dns_shared",
    "dns_domain",
    "udp_idle_timeout",
    "cert_dir",
    "nomad",
    "gateways",
}
NOMAD_KEYS = {
    "alloc_id",
    "address",
    "token",
    "namespace",
    "region",
    "ca_file",
    "identity_file",
    "poll_interval",
}


def _parse_admin(text: Any, shared: bool) -> Address:
    """`admin`: on loopback unless admin_shared = true, as an upstream's bind (the API has no
    authentication; the Host check only stops a web page's DNS name)."""
    admin = parse_address(text, "admin")
    _loopback_unless_shared(admin, shared, "admin",
                            "reads this host's applied config (services, intentions, endpoints) and "
                            "its certificates' details", "set admin_shared = true")  # fmt: skip
    return admin


def _parse_dns(text: Any, shared: bool) -> Address | None:
    """`dns`: None for "" (off); on loopback unless dns_shared = true, as an upstream's bind."""
    if text == "":
        return None
    dns = parse_address(text, "dns")
    _loopback_unless_shared(dns, shared, "dns",
                            "would learn this host's upstreams and their listeners' addresses",
                            "set dns_shared = true")  # fmt: skip
    return dns


# the mesh domain's length: a name "<upstream>.<domain>." takes len(domain) + 66 of DNS's 255 octets
# (an upstream's label is 63 at most; the length bytes and the root's add 3), the SOA's hostmaster 13
MAX_DNS_DOMAIN = 189


def _parse_dns_domain(raw: dict[str, Any]) -> str:
    domain = (_str(raw, "dns_domain", "", DEFAULT_DNS_DOMAIN) or "").lower().rstrip(".")
    labels = domain.split(".")
    if not domain or not all(valid_service_name(label) for label in labels):
        raise _fail("dns_domain", "must be a DNS name like 'mesh' (lowercase labels a-z, 0-9, -)")
    if len(domain) > MAX_DNS_DOMAIN:
        raise _fail("dns_domain", f"at most {MAX_DNS_DOMAIN} characters (a name in it, and its SOA's "
                    "hostmaster.<domain>, must fit DNS's 255)")  # fmt: skip
    return domain + "."


# table path (`[]`: each entry of an array of tables) -> its keys
KEY_TABLES: dict[str, set[str]] = {
    "": TOP_KEYS,
    "consul": CONSUL_KEYS,
    "ca": CA_KEYS,
    "services[]": SERVICE_KEYS,
    "services[].health": HEALTH_KEYS,
    "services[].upstreams[]": UPSTREAM_KEYS,
    "http": HTTP_KEYS,
    "access_log": ACCESS_LOG_KEYS,
    "tracing": TRACING_KEYS,
    "nomad": NOMAD_KEYS,
    "gateways[]": GATEWAY_KEYS,
    "gateways[].listeners[]": LISTENER_KEYS,
    "gateways[].listeners[].certificates[]": CERTIFICATE_KEYS,
}


def parse_config(raw: dict[str, Any]) -> AgentConfig:
    _check_keys(raw, TOP_KEYS, "")
    node = _str(raw, "node", "", None) or socket.gethostname()
    mesh_address = _str(raw, "mesh_address", "", "127.0.0.1") or "127.0.0.1"
    try:
        ip = ipaddress.ip_address(mesh_address)
    except ValueError:
        raise _fail("mesh_address", f"{mesh_address!r} must be an IP address peers can dial") from None
    # an IPv4-mapped address is its IPv4 address (as a listen address, parse_address): ::ffff:0.0.0.0
    # is no unspecified address to ipaddress, yet a peer's connection to it reaches that peer itself
    if why := undialable(ip):
        raise _fail("mesh_address", f"{mesh_address!r} must be an IP address peers can dial ({why})")
    if (target := unmapped(ip)) is not ip:
        mesh_address = str(target)
    trust_domain = _str(raw, "trust_domain", "", DEFAULT_TRUST_DOMAIN) or DEFAULT_TRUST_DOMAIN
    if not valid_trust_domain(trust_domain):
        raise _fail("trust_domain", "must be a lowercase DNS name")

    consul_raw = raw.get("consul", {})
    if not isinstance(consul_raw, dict):
        raise _fail("consul", "must be a table")
    _check_keys(consul_raw, CONSUL_KEYS, "consul")
    c = {k: _str(consul_raw, k, "consul.") or None for k in CONSUL_KEYS}
    consul = ConsulLayer(
        address=c["address"],
        token=c["token"],
        token_file=c["token_file"],
        ca_file=c["ca_file"],
        cert_file=c["cert_file"],
        key_file=c["key_file"],
        tls_server_name=c["tls_server_name"],
    )
    if consul.address:
        try:
            normalize_url(consul.address)
        except InvalidSettings as exc:
            raise _fail("consul.address", str(exc)) from None

    ca_raw = raw.get("ca")
    if not isinstance(ca_raw, dict):
        raise _fail("ca", 'is required: a table with at least pin = "sha256:…"')
    _check_keys(ca_raw, CA_KEYS, "ca")
    pin = _str(ca_raw, "pin", "ca.")
    if not pin or normalized_pin(pin) is None:
        raise _fail("ca.pin", "must be 'sha256:<64 hex>' as printed by `hostmesh ca init`")
    token_file = _str(ca_raw, "token_file", "ca.")
    ca_address = _str(ca_raw, "address", "ca.")
    if ca_address:
        _check_ca_address(ca_address)
    ca = CAConfig(
        pin=pin,
        address=ca_address,
        token_file=Path(token_file) if token_file else None,
        token_env=_str(ca_raw, "token_env", "ca.") or None,
    )

    services_raw = raw.get("services", [])
    gateways = _parse_gateways(raw.get("gateways", []))
    if not isinstance(services_raw, list) or not (services_raw or gateways):
        raise _fail("services", "at least one [[services]] table is required (or a [[gateways]] table)")
    services = tuple(_parse_service(s, f"services[{i}]") for i, s in enumerate(services_raw))
    services += tuple(_gateway_service(g) for g in gateways)
    names = [s.name for s in services]
    if len(set(names)) != len(names):
        raise _fail("services", "service names must be unique (gateway names included)")
    default_intention = _str(raw, "default_intention", "", "allow")
    if default_intention not in ("allow", "deny"):
        raise _fail("default_intention", "must be allow or deny")
    workers = raw.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise _fail("workers", f"must be an integer in 1..{MAX_WORKERS}")
    log_level = _str(raw, "log_level", "", "info")
    if log_level not in ("debug", "info", "warning", "error"):
        raise _fail("log_level", "must be debug, info, warning or error")
    access_raw = raw.get("access_log", {})
    if not isinstance(access_raw, dict):
        raise _fail("access_log", "must be a table like { sample = 0.01 }")
    _check_keys(access_raw, ACCESS_LOG_KEYS, "access_log")
    access_log = AccessLogConfig(
        sample=_number(access_raw, "sample", "access_log.", DEFAULT_ACCESS_SAMPLE, 0.0, 1.0)
    )
    log_format = _str(raw, "log_format", "", "auto") or "auto"
    if log_format not in ("auto", "json", "text"):
        raise _fail("log_format", "must be json, text or auto")
    tracing = _parse_tracing(raw.get("tracing", {}))
    istio_metrics = raw.get("istio_metrics", False)
    if not isinstance(istio_metrics, bool):
        raise _fail("istio_metrics", "must be true or false")
    metrics_raw = raw.get("metrics", DEFAULT_METRICS)
    max_connections = raw.get("max_connections", DEFAULT_MAX_CONNECTIONS)
    if (
        isinstance(max_connections, bool)
        or not isinstance(max_connections, int)
        or not 1 <= max_connections <= MAX_MAX_CONNECTIONS
    ):
        raise _fail("max_connections", f"must be an integer in 1..{MAX_MAX_CONNECTIONS}")
    dns_shared = raw.get("dns_shared", False)
    if not isinstance(dns_shared, bool):
        raise _fail("dns_shared", "must be true or false")
    admin_shared = raw.get("admin_shared", False)
    if not isinstance(admin_shared, bool):
        raise _fail("admin_shared", "must be true or false")
    cert_dir_raw = _str(raw, "cert_dir", "")
    cfg = AgentConfig(
        node=node,
        mesh_address=mesh_address,
        data_dir=Path(_str(raw, "data_dir", "", DEFAULT_DATA_DIR) or DEFAULT_DATA_DIR),
        inbound=parse_address(raw.get("inbound", DEFAULT_INBOUND), "inbound"),
        admin=_parse_admin(raw.get("admin", DEFAULT_ADMIN), admin_shared),
        metrics=None if metrics_raw in ("", "off") else parse_address(metrics_raw, "metrics"),
        consul=consul,
        ca=ca,
        services=services,
        trust_domain=trust_domain,
        default_intention=default_intention,
        drain_seconds=_number(raw, "drain_seconds", "", DEFAULT_DRAIN_SECONDS, 0, 3600),
        workers=workers,
        log_level=log_level or "info",
        log_format=log_format,
        tracing=tracing,
        istio_metrics=istio_metrics,
        access_log=access_log,
        http=_parse_http(raw.get("http", {})),
        max_connections=max_connections,
        stream_idle_timeout=_number(
            raw, "stream_idle_timeout", "", DEFAULT_STREAM_IDLE_TIMEOUT, 0, 7 * 86400
        ),
        dns=_parse_dns(raw.get("dns", DEFAULT_DNS), dns_shared),
        dns_shared=dns_shared,
        admin_shared=admin_shared,
        dns_domain=_parse_dns_domain(raw),
        udp_idle_timeout=_number(raw, "udp_idle_timeout", "", DEFAULT_UDP_IDLE_TIMEOUT, 0.05, 86400),
        cert_dir=Path(cert_dir_raw) if cert_dir_raw else None,
        nomad=_parse_nomad(raw["nomad"]) if "nomad" in raw else None,
        gateways=gateways,
    )
    check_binds(cfg)
    return cfg


def _listens(cfg: AgentConfig) -> list[tuple[str, Address, str, bool]]:
    """Every socket the agent binds: (tcp | udp, address, the key that names it, whether the address
    was derived from the upstream's name by `bind = "auto"`)."""
    out = [("tcp", cfg.inbound, "inbound", False), ("tcp", cfg.admin, "admin", False)]
    if cfg.metrics is not None:
        out.append(("tcp", cfg.metrics, "metrics", False))
    if cfg.dns is not None:
        out += [("tcp", cfg.dns, "dns", False), ("udp", cfg.dns, "dns", False)]
    for i, svc in enumerate(cfg.services):
        for j, up in enumerate(svc.upstreams):
            transport = "udp" if up.protocol == "udp" else "tcp"
            out.append((transport, up.bind, f"services[{i}].upstreams[{j}].bind", up.auto))
    for i, gw in enumerate(cfg.gateways):
        for j, listener in enumerate(gw.listeners):
            out.append(("tcp", listener.bind, f"gateways[{i}].listeners[{j}].bind", False))
    return out


def check_binds(cfg: AgentConfig) -> None:
    """Two of the agent's own sockets on one address would fail its start (or a reload) with an
    error naming neither key: refused here, naming both (two local services with an auto upstream to
    one name derive one address). Port 0 is any free port."""
    seen: list[tuple[str, Address, str, bool]] = []
    for transport, addr, key, auto in _listens(cfg):
        if addr.port == 0:
            continue
        for other_transport, other, other_key, other_auto in seen:
            if (transport == other_transport and addr.port == other.port and key != other_key
                    and _overlap(transport, addr.host, other.host)):  # fmt: skip
                shown = f'{other_key} = "auto"' if other_auto else other_key
                raise _fail(
                    key,
                    f"listens on {addr}, as {shown} does ({other}): give one another port"
                    + (" or an explicit bind" if auto or other_auto else ""),
                )
        seen.append((transport, addr, key, auto))


def _overlap(transport: str, a: str, b: str) -> bool:
    """Whether sockets bound to hosts `a` and `b` (one port) would clash: the same host, or a wildcard
    of the other's family. The agent's TCP sockets are IPv6-only (registry/listen.py), so `0.0.0.0`
    and `[::]` both listen; its UDP sockets are dual-stack, so there `[::]` takes IPv4 too."""
    if a == b:
        return True
    try:
        ips = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return False
    for wild, other in (ips, ips[::-1]):
        if wild.is_unspecified and (
            wild.version == other.version or (transport == "udp" and wild.version == 6)
        ):
            return True
    return False


def _parse_nomad(raw: Any) -> NomadConfig:
    if not isinstance(raw, dict):
        raise _fail("nomad", "must be a table")
    _check_keys(raw, NOMAD_KEYS, "nomad")
    alloc_id = _str(raw, "alloc_id", "nomad.")
    if not alloc_id:
        raise _fail("nomad.alloc_id", "is required outside a Nomad allocation (NOMAD_ALLOC_ID unset)")
    identity = _str(raw, "identity_file", "nomad.")
    s = {k: _str(raw, k, "nomad.") or None for k in ("address", "token", "namespace", "region", "ca_file")}
    # checked here too (load_config also checks them merged with NOMAD_*), so parse_config alone
    # refuses what the watch could not use; registry/nomad.py loaded only where [nomad] is
    from hostmesh.registry.nomad import check_address, clean_token

    try:
        if s["address"] is not None:
            s["address"] = check_address(s["address"], "nomad.address")
        if s["token"] is not None:
            s["token"] = clean_token(s["token"], "nomad.token")  # the message never holds the token
    except InvalidSettings as exc:
        raise ConfigError(str(exc)) from None
    return NomadConfig(
        alloc_id=alloc_id,
        identity_file=Path(identity) if identity else None,
        poll_interval=_number(raw, "poll_interval", "nomad.", 5.0, 0.1, 3600),
        **s,
    )


def _gateway_service(g: GatewayConfig) -> ServiceConfig:
    """A gateway's identity as a local service: certificate, registration (meta hostmesh-kind) and
    intentions come from the service machinery; there is no app behind it (port 0, never probed)."""
    return ServiceConfig(
        name=g.name, port=0, meta={GATEWAY_KIND_META: GATEWAY_KINDS[g.kind]}, kind=GATEWAY_KINDS[g.kind]
    )


def _parse_gateways(raw: Any) -> tuple[GatewayConfig, ...]:
    if not isinstance(raw, list):
        raise _fail("gateways", "must be an array of tables ([[gateways]])")
    out = []
    for i, g in enumerate(raw):
        path = f"gateways[{i}]"
        if not isinstance(g, dict):
            raise _fail(path, "must be a table")
        _check_keys(g, GATEWAY_KEYS, path)
        name = _str(g, "name", f"{path}.")
        if not name or not valid_service_name(name):
            raise _fail(f"{path}.name", "must be a lowercase DNS label (a-z, 0-9, -)")
        kind = _str(g, "kind", f"{path}.")
        if kind not in GATEWAY_KINDS:
            raise _fail(f"{path}.kind", "must be ingress or egress")
        listeners_raw = g.get("listeners", [])
        if not isinstance(listeners_raw, list) or (kind == "ingress" and not listeners_raw):
            raise _fail(f"{path}.listeners", "an ingress gateway needs at least one [[gateways.listeners]]")
        if kind == "egress" and listeners_raw:
            raise _fail(f"{path}.listeners", "an egress gateway takes mesh traffic on the inbound port only")
        listeners = tuple(_parse_listener(x, f"{path}.listeners[{j}]") for j, x in enumerate(listeners_raw))
        out.append(GatewayConfig(name, kind, listeners))
    return tuple(out)


def _parse_listener(raw: Any, path: str) -> GatewayListener:
    if not isinstance(raw, dict):
        raise _fail(path, "must be a table")
    _check_keys(raw, LISTENER_KEYS, path)
    if "bind" not in raw:
        raise _fail(f"{path}.bind", "is required")
    protocol = _str(raw, "protocol", f"{path}.", "http")
    if protocol not in GATEWAY_PROTOCOLS:
        raise _fail(f"{path}.protocol", f"must be one of {', '.join(GATEWAY_PROTOCOLS)}")
    certs_raw = raw.get("certificates", [])
    if not isinstance(certs_raw, list) or (protocol == "https") != bool(certs_raw):
        raise _fail(f"{path}.certificates", "an https listener needs certificates; others take none")
    certs = []
    for k, c in enumerate(certs_raw):
        cpath = f"{path}.certificates[{k}]"
        if not isinstance(c, dict):
            raise _fail(cpath, "must be a table")
        _check_keys(c, CERTIFICATE_KEYS, cpath)
        hosts = c.get("hosts")
        if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and h for h in hosts):
            raise _fail(f"{cpath}.hosts", "must be a non-empty array of host names")
        files = []
        for key in ("cert_file", "key_file"):
            value = _str(c, key, f"{cpath}.")
            if not value:
                raise _fail(f"{cpath}.{key}", "is required")
            files.append(Path(value))
        certs.append(GatewayCertificate(tuple(h.lower() for h in hosts), files[0], files[1]))
    return GatewayListener(parse_address(raw["bind"], f"{path}.bind"), protocol, tuple(certs))


def normalized_pin(pin: str) -> str | None:
    """`sha256:<64 hex>` as the CA client compares it (agent/ca_client.py), None if `pin` is none."""
    value = pin.strip().lower()
    return value if PIN_PATTERN.fullmatch(value) else None


def ca_url(address: str) -> str:
    """The CA's URL from `[ca] address`: https:// is implied when it names only host:port."""
    return address if "//" in address else f"https://{address}"


def _check_ca_address(address: str) -> None:
    """`[ca] address`: the CA's https:// URL, or host:port; nothing after it, no whitespace."""
    if holds_credentials(address):
        raise _fail("ca.address", CREDENTIALS_UNUSED)
    parsed = _url(ca_url(address), ("https",))
    if parsed is None or any(c.isspace() for c in address) or parsed.path not in ("", "/"):
        raise _fail("ca.address", f"{address!r} must be the CA's URL, like https://10.0.0.2:15012")


# user:password@ in a URL would be dropped without a word (the CA authenticates agents by their join
# token and certificate; OTLP export sends no credentials), and an error must not echo a password.
CREDENTIALS_UNUSED = "user:password@ in the URL is not used by hostmesh: remove it"


def _url(text: str, schemes: tuple[str, ...]) -> urllib.parse.SplitResult | None:
    """`text` parsed as a URL with one of `schemes` and a host; None if it is not one (an unclosed
    [IPv6] literal or a port out of range makes urlsplit, or its port, raise ValueError)."""
    try:
        parsed = urllib.parse.urlsplit(text)
        parsed.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        return None
    return parsed if parsed.scheme in schemes and parsed.hostname else None


def _parse_tracing(raw: Any) -> TracingConfig:
    if not isinstance(raw, dict):
        raise _fail("tracing", 'must be a table like { otlp_endpoint = "http://host:4318", sample = 0.01 }')
    _check_keys(raw, TRACING_KEYS, "tracing")
    endpoint = _str(raw, "otlp_endpoint", "tracing.") or None
    if endpoint is not None and holds_credentials(endpoint):
        raise _fail("tracing.otlp_endpoint", CREDENTIALS_UNUSED)
    parsed = None if endpoint is None else _url(endpoint, ("http", "https"))
    if endpoint is not None and parsed is None:
        raise _fail("tracing.otlp_endpoint", "must be an http:// or https:// URL like http://host:4318")
    errors = raw.get("errors", True)
    if not isinstance(errors, bool):
        raise _fail("tracing.errors", "must be true or false")
    return TracingConfig(endpoint, _number(raw, "sample", "tracing.", 0.01, 0.0, 1.0), errors)


def load_config(path: Path, check_files: bool = True) -> AgentConfig:
    """agent.toml at `path`, parsed (in a Nomad allocation, with its environment's defaults); with
    `check_files`, also the Consul token and TLS files it names must be usable."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        if not os.environ.get("NOMAD_ALLOC_ID"):
            raise ConfigError(f"{path}: cannot read: No such file or directory") from None
        data = b""  # in a Nomad allocation the job's meta and ports may say it all (agent/nomad.py)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB, more than agent.toml may take"
        )
    try:
        raw = _parse_toml(data.decode())
    except ValueError as exc:  # tomllib.TOMLDecodeError, UnicodeDecodeError
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per level of nested arrays or inline tables
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    try:
        if in_allocation(raw, os.environ):  # a Nomad allocation's sidecar: defaults from its environment
            raw = _with_nomad_defaults(raw)
        cfg = parse_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if check_files:  # before any is read
        _check_regular_files(cfg, path)
    if cfg.nomad is not None:  # NOMAD_ADDR, NOMAD_TOKEN, …: refused here, not by the watch after the start
        _check_nomad(cfg.nomad, path, check_files)
    if not check_files:
        return cfg
    try:  # a wrong address, token file or TLS file is a start-up error, not a retry loop
        settings = cfg.consul_settings()
        settings.load_token()
        from hostmesh.registry.consul import ssl_context

        ssl_context(settings)
    except InvalidSettings as exc:
        raise ConfigError(f"{path}: [consul]: {exc}") from None
    return cfg


def _check_regular_files(cfg: AgentConfig, path: Path) -> None:
    """Every file agent.toml names that is there (files_the_agent_reads, and the Nomad identity file)
    must be a regular file (a symlink to one is): reading a FIFO (or a terminal) waits for a writer
    for good, and the start (or `agent validate`) hung without a word. (An operator's CLI reads
    `--token-file <(…)`: a daemon reads a file.) ConfigError, one line naming the setting."""
    try:
        named = files_the_agent_reads(cfg)
    except InvalidSettings:
        named = []  # the [consul] check after this one says why
    if cfg.nomad is not None and cfg.nomad.identity_file is not None:
        named.append(("[nomad] identity_file", cfg.nomad.identity_file))
    for name, file in named:
        try:
            mode = os.stat(file).st_mode
        except OSError:
            continue  # reading it says why, naming it
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{path}: {name} {file} is not a regular file ({_file_kind(mode)})")


def check_gateway_certificates(cfg: AgentConfig, path: Path) -> None:
    """An HTTPS gateway listener's certificates load, as the listener will load them at start
    (`agent validate`; not on a reload, where a pair that does not load keeps the one in use)."""
    for listener in (lst for gw in cfg.gateways for lst in gw.listeners if lst.certificates):
        from hostmesh.agent.proxy.edges import CertSet

        try:
            CertSet(listener)
        except OSError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _check_nomad(nomad: NomadConfig, path: Path, check_files: bool) -> None:
    """[nomad] merged with NOMAD_* as the agent's allocation watch will use it (agent/nomad.py): an
    address or token that cannot work is refused even without `check_files` (it names no file); the
    identity and TLS files with it. One line naming the setting, never a token's value."""
    from hostmesh.agent.nomad import check_settings

    try:
        check_settings(nomad, os.environ, check_files)
    except InvalidSettings as exc:
        raise ConfigError(f"{path}: [nomad]: {exc}") from None


def _parse_toml(text: str) -> dict[str, Any]:
    """tomllib.loads, with tomllib let go again unless something else had loaded it: an agent reads
    agent.toml at start and on reload only, and the parser held ~0.1 MiB for the agent's life.
    tomllib is imported with datetime's C module (`_lend_c_datetime`)."""
    held = "tomllib" in sys.modules
    lent = not held and _lend_c_datetime()
    try:
        import tomllib
    finally:
        if lent:
            del sys.modules["datetime"]

    try:
        return tomllib.loads(text)
    finally:
        if not held:
            for name in [m for m in sys.modules if m == "tomllib" or m.startswith("tomllib.")]:
                del sys.modules[name]


def _lend_c_datetime() -> bool:
    """Stand datetime's C module (_datetime) in for datetime while tomllib is imported (its only use
    of datetime is to import the classes), when no datetime is loaded yet; True if it did. They are
    the classes datetime.py exports: it runs its whole pure-Python implementation first, then replaces
    it with _datetime's and drops it, which left ~0.2 MiB of holes in an agent's heap (settled idle RSS
    of the bench's L7 pair ~0.13 MiB higher, interleaved runs). agent/certproc.py takes _datetime too."""
    if "datetime" in sys.modules:
        return False
    try:
        import _datetime
    except ImportError:  # an interpreter without it (PyPy): tomllib imports datetime.py
        return False
    sys.modules["datetime"] = _datetime
    return True


def in_allocation(raw: Mapping[str, Any], env: Mapping[str, str]) -> bool:
    """agent.toml is a Nomad allocation's sidecar's (agent/nomad.py fills in its defaults)."""
    return bool(env.get("NOMAD_ALLOC_ID")) or "nomad" in raw


def _with_nomad_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """agent.toml completed from the allocation's environment; agent/nomad.py is loaded only here."""
    from hostmesh.agent.nomad import NomadEnvError, with_allocation_defaults

    try:
        return with_allocation_defaults(raw, os.environ)
    except NomadEnvError as exc:
        raise ConfigError(str(exc)) from None


def env_or(value: str | None, env: str) -> str | None:
    return value if value is not None else os.environ.get(env)


def check_permissions(
    cfg: AgentConfig, config_path: Path | None = None, agent_user: str | None = None
) -> None:
    """Refuse to start on files others could change or read; ConfigError, one line with the fix.

    The data dir holds the service keys and the saved config: group/world-writable means anyone on
    the host could swap them. The join token and the keys are credentials: no group/world access;
    the Consul token file and the private keys of Consul's client certificate and of the gateways,
    and agent.toml when it holds a token itself: not readable by every user of the host (their group
    is the agent's own). Files that do not exist yet are fine (the agent
    creates them 0600 itself). The cert dir, the trust bundle and the certificates decide whom the
    mesh trusts: no group/world write, and no owner but root, this process's user, the service's
    or `agent_user` (whom `agent validate --user` checks for; registry/files.check_owner). In a
    Nomad allocation the Consul token file is the task's own, in its secrets dir (a `template`
    writes 0644 unless told otherwise): not checked there."""
    from hostmesh.ca.files import roots_path

    if agent_user:  # named before any file it may own is judged
        _agent_user(agent_user)
    if cfg.nomad is None:
        try:
            cfg.consul_settings().check_secrets_private()
        except InvalidSettings as exc:
            raise ConfigError(str(exc)) from None
    tokens = (("[consul] token", cfg.consul.token), ("[nomad] token", cfg.nomad and cfg.nomad.token))
    literal = next((key for key, value in tokens if value), None)
    if literal is not None and config_path is not None and (mode := others_can_read(config_path)):
        raise ConfigError(
            f"{config_path} holds {literal} and is readable by every user of this host (mode {mode:04o}); "
            f"fix: chmod 640 {config_path}, or name a token file instead"
        )
    for name, key in _private_keys_named(cfg):
        if mode := others_can_read(key):
            raise ConfigError(
                f"{name} {key} is readable by every user of this host (mode {mode:04o}); fix: chmod 600 {key}"
            )
    _check_mode(cfg.data_dir, 0o022, "writable", f"chmod 700 {cfg.data_dir}", "data_dir", directory=True)
    if cfg.ca.token_file is not None:
        token = cfg.ca.token_file
        _check_mode(token, 0o077, "readable", f"chmod 600 {token}", "[ca] token_file")
    owned = [("data_dir", cfg.data_dir)]  # what another user must not own: they could swap a key
    for certs in dict.fromkeys((cert_dir(cfg.data_dir), cfg.certs_dir)):
        _check_mode(certs, 0o022, "writable", f"chmod 700 {certs}", "cert dir", directory=True)
        owned.append(("cert dir", certs))
    roots = roots_path(cfg.certs_dir)
    _check_mode(roots, 0o022, "writable", f"chmod 600 {roots}", "the trust bundle")
    owned.append(("the trust bundle", roots))
    for svc in cfg.services:
        chain = cert_paths(cfg.certs_dir, svc.name)[0]
        for name, private in _service_keys(cfg.certs_dir, svc.name):
            _check_mode(private, 0o077, "readable", f"chmod 600 {private}", name)
            owned.append((name, private))
        _check_mode(chain, 0o022, "writable", f"chmod 600 {chain}", f"the certificate of {svc.name}")
        owned.append((f"the certificate of {svc.name}", chain))
    for name, path in owned:
        try:
            check_owner(path, name, agent_user)
        except ForeignOwner as exc:
            raise ConfigError(str(exc)) from None


def _service_keys(certs: Path, service: str) -> list[tuple[str, Path]]:
    """A service's private keys in the cert dir, by what each is: its key, and the one a join token
    is being spent with (agent/certs.py), which becomes its key."""
    return [
        (f"the key of {service}", cert_paths(certs, service)[1]),
        (f"the join key of {service}", join_key_path(certs, service)),
    ]


def _private_keys_named(cfg: AgentConfig) -> list[tuple[str, Path]]:
    """The gateways' private keys, by the setting naming each (none in a Nomad allocation, where they
    are the task's own, as the Consul files; Consul's client key is ConsulSettings.check_secrets_private's).
    Like the Consul token file, their group may read them (a service's own, as ssl-cert's); every
    user may not: a gateway's key serves its names."""
    if cfg.nomad is not None:  # the task's own files, a `template` writes 0644 unless told otherwise
        return []
    keys: list[tuple[str, Path]] = []
    for gw in cfg.gateways:
        for lst in gw.listeners:
            keys += [(f"gateway {gw.name}'s key_file", c.key_file) for c in lst.certificates]
    return keys


def files_the_agent_reads(cfg: AgentConfig) -> list[tuple[str, Path]]:
    """The files agent.toml names that the agent reads, by the setting naming each, those that exist:
    Consul's token and TLS files, the join token, the gateways' certificates, and the trust bundle,
    certificates and keys already in its cert dir. (Not agent.toml itself: Ansible validates a copy
    in a directory of its own.)"""
    from hostmesh.ca.files import roots_path

    consul = cfg.consul_settings()
    named: list[tuple[str, str | Path | None]] = [
        ("[consul] token_file", consul.token_file), ("[consul] ca_file", consul.ca_file),
        ("[consul] cert_file", consul.cert_file), ("[consul] key_file", consul.key_file),
        ("[ca] token_file", cfg.ca.token_file), ("the trust bundle", roots_path(cfg.certs_dir)),
    ]  # fmt: skip
    for svc in cfg.services:
        named += [(f"the certificate of {svc.name}", cert_paths(cfg.certs_dir, svc.name)[0])]
        named += _service_keys(cfg.certs_dir, svc.name)
    for gw in cfg.gateways:
        for lst in gw.listeners:
            for c in lst.certificates:
                named += [
                    (f"gateway {gw.name}'s cert_file", c.cert_file),
                    (f"gateway {gw.name}'s key_file", c.key_file),
                ]
    return [(name, Path(p)) for name, p in named if p is not None and os.path.lexists(p)]


# What the agent's unit hides from it (ProtectHome=yes, PrivateTmp=yes): a file named there is not
# the file the agent would open, whatever its mode
HIDDEN_BY_THE_UNIT = ("/home", "/root", "/run/user", "/tmp", "/var/tmp")
STATE_DIRECTORY = "/var/lib/hostmesh"  # the unit's StateDirectory=: systemd gives it to User= at each start


def check_readable_as(cfg: AgentConfig, user: str) -> None:
    """As root, for the systemd unit: refuse when `user` (the one the agent runs as) cannot read a
    file the agent reads (files_the_agent_reads), or write its data or cert dir (unless the unit's
    StateDirectory, which systemd gives to `user`), or when the file is where the unit hides it;
    ConfigError, one line. Checked by a child that takes the user's uid, gid and groups and opens
    each file, so the kernel decides (modes, ACLs, directories on the way), not a reading of mode
    bits. Root reads anything: a root-owned 0600 token file passed `validate` run as root, and the
    agent then failed at start, or at its first certificate request."""
    entry = _agent_user(user)
    files = files_the_agent_reads(cfg)
    for name, path in files:
        real = os.path.realpath(path)
        hidden = next((top for top in HIDDEN_BY_THE_UNIT if real == top or real.startswith(top + "/")), None)
        if hidden is not None:
            raise ConfigError(
                f"{name} {path}: the agent's unit hides {hidden} from it (ProtectHome=, PrivateTmp=); "
                "fix: keep it elsewhere, e.g. in /etc/hostmesh"
            )
    # systemd gives the StateDirectory and all in it to User= (and its group) at each start, but
    # only when the directory itself is not theirs already (then what is below it stays as it is),
    # and it follows no link (a data dir linked elsewhere is not given)
    state = Path(STATE_DIRECTORY)
    st = state.lstat() if state.is_dir() and not state.is_symlink() else None
    fixed = st is not None and (st.st_uid, st.st_gid) != (entry.pw_uid, entry.pw_gid)
    dirs = [
        (what, d) for what, d in (("data_dir", cfg.data_dir), ("cert dir", cfg.certs_dir))
        if d.is_dir() and not (fixed and d.resolve() == d and (d == state or state in d.parents))
    ]  # fmt: skip
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: whatever happens, it ends in os._exit, never in the CLI's own code
        try:
            said = b"the check did not finish"
            try:
                os.close(read)
                os.setgroups(os.getgrouplist(entry.pw_name, entry.pw_gid))
                os.setgid(entry.pw_gid)
                os.setuid(entry.pw_uid)
                said = (_unusable_as(user, files, dirs) or "ok").encode()
            except BaseException as exc:
                said = f"the check as {user} failed: {exc}".encode()
            os.write(write, said[:4000])
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        said_text = answer.read().decode(errors="replace")
    os.waitpid(pid, 0)
    if said_text != "ok":
        raise ConfigError(said_text or f"the check as {user} did not finish")


def _agent_user(user: str) -> pwd.struct_passwd:
    """The user `agent validate --user` names (a name, or a uid as systemd's User= may give one)."""
    entry = find_user(user)
    if entry is None:
        raise ConfigError(f"no user {user!r} on this host to check the files as")
    return entry


def _unusable_as(user: str, files: list[tuple[str, Path]], dirs: list[tuple[str, Path]]) -> str:
    """In check_readable_as's child, as `user`: the first file it cannot open or directory it cannot
    write, in one line with the fix; "" when none."""
    import errno

    for name, path in files:
        try:  # opening is the check (non-blocking: a FIFO would wait for a writer)
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError as exc:
            fix = (
                f"; fix: chown {user} {path} (and let {user} through the directories above it)"
                if exc.errno == errno.EACCES
                else ""
            )
            return f"{name} {path}: cannot read as {user}, whom the agent runs as ({exc.strerror}){fix}"
    for name, path in dirs:
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{name} {path}: cannot write as {user}, whom the agent runs as; fix: chown {user} {path}"
    return ""


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "not a file")


def _check_mode(path: Path, forbidden: int, what: str, fix: str, name: str, directory: bool = False) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"{name} {path}: cannot check its permissions: {exc.strerror}") from None
    if directory and not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{name} {path} is not a directory")
    if not directory and not stat.S_ISREG(st.st_mode):  # a FIFO would block its reader for good
        raise ConfigError(f"{name} {path} is not a regular file ({_file_kind(st.st_mode)})")
    mode = st.st_mode & 0o777
    if mode & forbidden:
        bits = mode & forbidden
        who = " and ".join(w for w, mask in (("group", 0o070), ("others", 0o007)) if bits & mask)
        raise ConfigError(f"{name} {path} is {what} by {who} (mode {mode:04o}); fix: {fix}")
