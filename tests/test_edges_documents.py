"""Gateway and external-service documents (`hostmesh/gateways/<name>`, `hostmesh/external/<name>`):
validation (pure) and the `hostmesh gateway|external` verbs against the real Consul dev agent, with
the same versioned, check-and-set machinery as routes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hostmesh.registry.documents import doc_key
from hostmesh.registry.errors import InvalidDocument
from hostmesh.registry.schema import parse_external, parse_gateway
from tests.support import ConsulDev
from tests.test_cli_ops import fails, ok, run, svc, write

GATEWAY = {
    "service": "edge",
    "http": [
        {"hosts": ["a.example.test"], "service": "web"},
        {"hosts": ["*.b.example.test"], "prefix": "/api", "service": "api"},
    ],
    "tls": [{"hosts": ["db.example.test"], "service": "db"}],
}
EXTERNAL = {
    "service": "payments",
    "addresses": ["pay.example.test:443", "10.1.2.3:8443"],
    "protocol": "http",
    "tls": {"sni": "pay.example.test", "ca_file": "/etc/hostmesh/pay-ca.pem"},
    "via": "egress",
}
LONG_LABEL = "a" * 64  # one over the DNS bound (63): a resolver or TLS SNI refuses the name at connect time
NAME_253 = ".".join(["c" * 63] * 3 + ["c" * 61])  # the longest DNS name (253 characters)


def test_gateway_routes_by_host_and_path() -> None:
    gw = parse_gateway(GATEWAY)
    assert gw.http_route("a.example.test", b"/x") is not None
    assert gw.http_route("a.example.test", b"/x").service == "web"  # type: ignore[union-attr]
    assert gw.http_route("x.b.example.test", b"/api/1").service == "api"  # type: ignore[union-attr]
    assert gw.http_route("x.b.example.test", b"/other") is None
    assert gw.http_route("b.example.test", b"/api") is None  # the wildcard needs a label before it
    assert gw.http_route("unknown.test", b"/") is None
    assert gw.tls_route("db.example.test").service == "db"  # type: ignore[union-attr]
    assert gw.services() == {"web", "api", "db"}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"service": "edge"}, "http"),
        ({**GATEWAY, "http": [{"hosts": ["a b"], "service": "web"}]}, "http[0].hosts[0]"),
        ({**GATEWAY, "http": [{"hosts": ["a.test"], "service": "Web"}]}, "http[0].service"),
        ({**GATEWAY, "http": [{"hosts": ["a.test"], "service": "web", "prefix": "x"}]}, "http[0].prefix"),
        ({**GATEWAY, "tls": [{"hosts": ["a.test"], "service": "db", "prefix": "/"}]}, "tls[0].prefix"),
        ({**GATEWAY, "listeners": []}, "listeners"),
        ({**GATEWAY, "http": [{"hosts": [f"{LONG_LABEL}.test"], "service": "web"}]}, "http[0].hosts[0]"),
        (
            {**GATEWAY, "tls": [{"hosts": ["a.test", f"*.{LONG_LABEL}.test"], "service": "db"}]},
            "tls[0].hosts[1]",
        ),
    ],
)
def test_invalid_gateway_names_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidDocument) as err:
        parse_gateway(data)
    assert err.value.path == field


def test_external_service_parses() -> None:
    ext = parse_external(EXTERNAL)
    assert [str(a) for a in ext.addresses] == ["pay.example.test:443", "10.1.2.3:8443"]
    assert ext.tls is not None and ext.tls.sni == "pay.example.test" and ext.via == "egress"
    plain = parse_external({"service": "db-ext", "addresses": ["[::1]:5432"]})
    assert plain.protocol == "tcp" and plain.tls is None and plain.via is None


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"service": "x"}, "addresses"),
        ({"service": "x", "addresses": ["nope"]}, "addresses[0]"),
        ({"service": "x", "addresses": ["a.test:0"]}, "addresses[0]"),
        ({"service": "x", "addresses": ["a.test:\u00b2"]}, "addresses[0]"),  # isdigit(); int() refuses it
        ({"service": "x", "addresses": ["a.test:\u0663"]}, "addresses[0]"),  # isdigit(); int() reads 3
        ({"service": "x", "addresses": ["a.test:1"], "protocol": "udp"}, "protocol"),
        ({"service": "x", "addresses": ["a.test:1"], "tls": {"ca_file": "/x"}}, "tls.sni"),
        (
            {"service": "x", "addresses": ["a.test:1"], "tls": {"sni": "a.test", "ca_file": "x"}},
            "tls.ca_file",
        ),
        ({"service": "x", "addresses": ["a.test:1"], "via": "Egress"}, "via"),
        ({"service": "x", "addresses": [f"{LONG_LABEL}.invalid:443"]}, "addresses[0]"),
        ({"service": "x", "addresses": ["a.test:1", f"[{LONG_LABEL}.invalid]:443"]}, "addresses[1]"),
        ({"service": "x", "addresses": [f"{NAME_253}x:443"]}, "addresses[0]"),
        ({"service": "x", "addresses": ["a.test:1"], "tls": {"sni": f"{LONG_LABEL}.invalid"}}, "tls.sni"),
    ],
)
def test_invalid_external_names_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidDocument) as err:
        parse_external(data)
    assert err.value.path == field


@pytest.mark.parametrize("host", ["010.0.0.1", "127.1", "2130706433", "0x7f.1", "0x7f000001", "1.2.3"])
def test_an_address_the_resolver_would_read_as_another_ip_is_refused(host: str) -> None:
    """Not an IP address to `ipaddress`, and no DNS name either: the resolver (inet_aton) reads these
    as IPv4 addresses its own way (010.0.0.1 is 8.0.0.1, octal), so the agent would connect somewhere
    other than the address written."""
    with pytest.raises(InvalidDocument) as err:
        parse_external({"service": "x", "addresses": ["a.test:1", f"{host}:443"]})
    assert str(err.value) == (
        f"addresses[1]: {host!r} is neither an IP address (four decimal numbers, no leading zeros) nor "
        "a DNS name (whose last label is never a number)"
    )
    # names with digits stay names; an IP address stays one
    names = ["1.example.test:1", "a1.b2:2", "x.0a:3", "10.0.0.1:4"]
    ext = parse_external({"service": "x", "addresses": names})
    assert [a.host for a in ext.addresses] == ["1.example.test", "a1.b2", "x.0a", "10.0.0.1"]


@pytest.mark.parametrize("address", ["::1:443", "fe80::1%eth0:443", "[127.0.0.1]:443", "[a.example.test]:443",
                                     "127.0.0.1]:443", "[::1:443"])  # fmt: skip
def test_brackets_are_for_an_ipv6_address_alone(address: str) -> None:
    """`::1:443` was taken as [::1]:443, though it is an IPv6 address itself (its port left out?);
    brackets around an IPv4 address or a name, or only one of them, were dropped unseen."""
    with pytest.raises(InvalidDocument) as err:
        parse_external({"service": "x", "addresses": [address]})
    assert err.value.path == "addresses[0]"
    assert "an IPv6 address goes in brackets" in str(err.value) or "neither an IP address" in str(err.value)
    ext = parse_external({"service": "x", "addresses": ["[::1]:443", "[FE80::1%eth0]:443", "127.0.0.1:443"]})
    assert [str(a) for a in ext.addresses] == ["[::1]:443", "[fe80::1%eth0]:443", "127.0.0.1:443"]


def test_an_ipv6_zone_keeps_its_case() -> None:
    """The zone is an interface's name, which Linux compares case and all (getaddrinfo of
    fe80::1%LO: 'Name or service not known'): `[fe80::1%Eth0]:443` became %eth0, another interface
    or none, and every connection failed."""
    ext = parse_external({"service": "x", "addresses": ["[FE80::1%Eth0]:443", "[fe80::2%lo]:443"]})
    assert [str(a) for a in ext.addresses] == ["[fe80::1%Eth0]:443", "[fe80::2%lo]:443"]


@pytest.mark.parametrize(
    ("address", "why"),
    [("0.0.0.0:443", "any address"), ("[::]:443", "any address"), ("224.0.0.1:443", "multicast"),
     ("[ff02::1]:443", "multicast"), ("[::ffff:0.0.0.0]:443", "any address"),
     ("[::ffff:224.0.0.1]:443", "multicast"), ("255.255.255.255:443", "broadcast"),
     ("[::ffff:255.255.255.255]:443", "broadcast")],
)  # fmt: skip
def test_an_address_no_connection_goes_to_is_refused(address: str, why: str) -> None:
    """0.0.0.0 (or ::) was taken, and a connection to it reaches this host's own listeners, the
    caller's or the egress gateway's, not a service outside; a multicast address takes no TCP. Also
    written IPv4-mapped: a connection to [::ffff:0.0.0.0] reached the host's own 127.0.0.1 listener."""
    with pytest.raises(InvalidDocument) as err:
        parse_external({"service": "x", "addresses": [address]})
    assert str(err.value) == f"addresses[0]: {address!r} is no address to connect to ({why})"


def test_dns_bounds_are_checked_where_names_are_written() -> None:
    """A label is 1..63 characters and a name 253 (RFC 1035): what the resolver and TLS SNI take at
    connect time. Both bounds themselves pass; one over is refused in one line saying which."""
    label63 = "b" * 63
    ext = parse_external({"service": "x", "addresses": [f"{label63}.test:1", f"{NAME_253}:2"],
                          "tls": {"sni": NAME_253}})  # fmt: skip
    assert [len(a.host) for a in ext.addresses] == [68, 253]
    assert ext.tls is not None and len(ext.tls.sni) == 253
    gw = parse_gateway(
        {"service": "edge", "http": [{"hosts": [f"*.{label63}.test", NAME_253], "service": "web"}]}
    )
    assert gw.http_route(f"x.{label63}.test", b"/") is not None
    with pytest.raises(InvalidDocument) as err:
        parse_external({"service": "x", "addresses": [f"{LONG_LABEL}.invalid:443"]})
    assert str(err.value) == "addresses[0]: label aaaaaaaaaaaaaaaaaaaa... is 64 characters (at most 63)"


@pytest.mark.consul
@pytest.mark.parametrize(
    ("group", "kind", "base"), [("gateway", "gateways", GATEWAY), ("external", "external", EXTERNAL)]
)
def test_cli_manages_edge_documents_like_routes(
    consul: ConsulDev, tmp_path: Path, group: str, kind: str, base: dict[str, Any]
) -> None:
    name = svc(group)
    f = write(tmp_path, {**base, "service": name})
    assert ok(run(consul, group, "apply", "-f", f)).strip().endswith(f"{kind}/{name}: version 1 written")
    assert json.loads(consul.kv_get(doc_key(kind, name)) or b"")["version"] == 1
    changed = {**base, "service": name, "description": "second"}
    ok(run(consul, group, "apply", "-f", write(tmp_path, changed, "v2.yaml")))
    assert "description: second" in ok(run(consul, group, "get", name))
    listing = ok(run(consul, group, "list"))
    assert name in listing and "INVALID" not in listing
    assert "*" in ok(run(consul, group, "history", name))
    ok(run(consul, group, "rollback", name, "--to", "1"))
    assert "description" not in ok(run(consul, group, "get", name, "-o", "json"))
    ok(run(consul, group, "delete", name))
    assert consul.kv_get(doc_key(kind, name)) is None
    bad = write(tmp_path, {**base, "service": name, "bogus": 1}, "bad.yaml")
    assert "bogus: unknown field" in fails(run(consul, group, "apply", "-f", bad))


@pytest.mark.consul
def test_cli_refuses_an_external_name_no_resolver_takes(consul: ConsulDev, tmp_path: Path) -> None:
    """Accepted, it failed every connection (the agent could not resolve it, nor send it as SNI)."""
    name = svc("external")
    for field, doc in (
        ("addresses[0]", {**EXTERNAL, "service": name, "addresses": [f"{LONG_LABEL}.invalid:443"]}),
        ("tls.sni", {**EXTERNAL, "service": name, "tls": {"sni": f"{LONG_LABEL}.invalid"}}),
    ):
        line = fails(run(consul, "external", "apply", "-f", write(tmp_path, doc, f"{field}.yaml")))
        assert f"{field}: label aaaaaaaaaaaaaaaaaaaa... is 64 characters (at most 63)" in line
    assert consul.kv_get(doc_key("external", name)) is None
