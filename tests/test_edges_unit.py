"""The edges' pure parts: the ClientHello's SNI (TLS passthrough), [[gateways]] in agent.toml, the
host of an HTTP request at an ingress gateway."""

from __future__ import annotations

import ssl
from typing import Any

import pytest

from hostmesh.agent.config import ConfigError, parse_config
from hostmesh.agent.proxy.edges import _request_host, client_hello_sni

PIN = "sha256:" + "0" * 64


def client_hello(sni: str | None) -> bytes:
    """The first flight of a real TLS client (Python's ssl), as a passthrough listener reads it."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    if sni is None:
        ctx.check_hostname = False
        obj = ctx.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_sni_of_a_real_client_hello() -> None:
    hello = client_hello("db.example.test")
    assert client_hello_sni(hello) == ("db.example.test", True)
    for cut in (1, 4, 5, 40, len(hello) - 1):  # arrives in pieces: wait for more
        assert client_hello_sni(hello[:cut]) == (None, False)


def test_no_sni_or_not_tls_is_complete_without_a_name() -> None:
    assert client_hello_sni(client_hello(None)) == (None, True)
    assert client_hello_sni(b"GET / HTTP/1.1\r\n\r\n") == (None, True)
    assert client_hello_sni(b"\x16\x03\x01\x00\x05\x02\x00\x00\x00\x00") == (None, True)  # not a ClientHello
    assert client_hello_sni(b"\x16\x03\x01\x00\x04\x01\xff\xff\xff") == (None, True)  # truncated inside


@pytest.mark.parametrize(
    ("host", "want"),
    [
        (b"a.example.test", "a.example.test"),
        (b"A.Example.TEST:8443", "a.example.test"),
        (b"[::1]:80", "[::1]"),
    ],
)
def test_request_host(host: bytes, want: str) -> None:
    assert _request_host([(b"host", host)]) == want


def base(**extra: Any) -> dict[str, Any]:
    return {"ca": {"pin": PIN}, **extra}


INGRESS = {
    "name": "edge",
    "kind": "ingress",
    "listeners": [
        {"bind": "0.0.0.0:8443", "protocol": "https",
         "certificates": [{"hosts": ["a.test"], "cert_file": "/c.pem", "key_file": "/k.pem"}]},
        {"bind": "127.0.0.1:8080"},
    ],
}  # fmt: skip


def test_a_gateway_is_a_local_identity_with_its_kind() -> None:
    cfg = parse_config(base(gateways=[INGRESS, {"name": "out", "kind": "egress"}]))
    assert [(s.name, s.kind, s.meta) for s in cfg.services] == [
        ("edge", "ingress-gateway", {"hostmesh-kind": "ingress-gateway"}),
        ("out", "egress-gateway", {"hostmesh-kind": "egress-gateway"}),
    ]
    edge = cfg.gateways[0]
    assert [(str(x.bind), x.protocol) for x in edge.listeners] == [
        ("0.0.0.0:8443", "https"),
        ("127.0.0.1:8080", "http"),
    ]
    assert edge.listeners[0].certificates[0].hosts == ("a.test",)


@pytest.mark.parametrize(
    ("gateway", "message"),
    [
        ({**INGRESS, "kind": "sideways"}, "gateways[0].kind: must be ingress or egress"),
        ({**INGRESS, "listeners": []}, "gateways[0].listeners: an ingress gateway needs"),
        (
            {"name": "out", "kind": "egress", "listeners": [{"bind": "0.0.0.0:1"}]},
            "gateways[0].listeners: an egress",
        ),
        (
            {**INGRESS, "listeners": [{"bind": "0.0.0.0:1", "protocol": "https"}]},
            "certificates: an https listener",
        ),
        ({**INGRESS, "listeners": [{"bind": "0.0.0.0:1", "protocol": "quic"}]}, "protocol: must be one of"),
        ({**INGRESS, "name": "Edge"}, "gateways[0].name: must be a lowercase DNS label"),
        ({**INGRESS, "listners": []}, "gateways[0].listners: unknown key (did you mean 'listeners'?)"),
    ],
)
def test_gateway_mistakes_are_one_line_naming_the_key(gateway: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(base(gateways=[gateway]))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_gateway_and_service_names_are_unique() -> None:
    svc = {"name": "edge", "port": 80}
    with pytest.raises(ConfigError, match="service names must be unique"):
        parse_config(base(services=[svc], gateways=[INGRESS]))
