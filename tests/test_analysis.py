"""Pure tests of hostmesh.registry.analysis: documents against a catalog, no Consul."""

from __future__ import annotations

from typing import Any

import pytest

from hostmesh.registry.analysis import Catalog, Finding, Instance, analyze, has_errors

THIS_RELEASE = "0.3.0"
LABELLED = {"hostmesh_version": THIS_RELEASE}  # what an agent of this release registers


def inst(
    service: str,
    node: str = "vm-1",
    protocol: str = "http",
    upstreams: str = "",
    release: str | None = THIS_RELEASE,
    **meta: str,
) -> Instance:
    """An agent's instance; `release` None: an agent of 0.2 or older (it registers no release)."""
    labelled = {} if release is None else {"hostmesh_version": release}
    return Instance(
        service,
        f"{service}-{node}",
        node,
        {"hostmesh": "1", "protocol": protocol, "upstreams": upstreams, **labelled, **meta},
    )


CATALOG = Catalog(
    (
        inst("web", upstreams="api,db"),
        inst("api", "vm-2", version="v1"),
        inst("api", "vm-3", version="v2"),
        inst("db", "vm-4", protocol="tcp"),
    )
)

CLEAN: dict[str, dict[str, Any]] = {
    "routes": {
        "api": {
            "service": "api",
            "version": 3,
            "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
            "routes": [
                {"match": {"path": {"prefix": "/api/v2"}}, "to": [{"subset": "v2"}]},
                {
                    "match": {"path": {"prefix": "/api"}},
                    "to": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}],
                },
                {"to": [{"subset": "v1"}]},
            ],
        },
        "db": {"service": "db", "protocol": "tcp", "routes": [{"to": [{"weight": 100}]}]},
    },
    "policies": {"api": {"service": "api", "load_balancer": {"type": "least_request"}}},
    "intentions": {
        "api": {
            "service": "api",
            "default": "deny",
            "rules": [
                {"source": "web", "action": "allow"},
                {"source": "web", "action": "deny", "permissions": [{"path": {"prefix": "/admin"}}]},
            ],
        },
        "db": {
            "service": "db",
            "rules": [{"source": "api", "action": "deny"}, {"source": "*", "action": "allow"}],
        },
    },
}


def codes(findings: list[Finding]) -> set[tuple[str, str, str]]:
    return {(f.severity, f.code, f.subject) for f in findings}


def with_doc(kind: str, key: str, data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    docs = {k: dict(v) for k, v in CLEAN.items()}
    docs.setdefault(kind, {})[key] = data
    return docs


def test_clean_mesh_has_no_findings() -> None:
    assert analyze(CLEAN, CATALOG) == []


def test_route_for_unknown_service() -> None:
    found = analyze(
        with_doc("routes", "billing", {"service": "billing", "routes": [{"to": [{"weight": 100}]}]}), CATALOG
    )
    assert codes(found) == {("warning", "unknown-service", "routes/billing")}
    assert "hostmesh route delete billing" in found[0].fix


def test_subset_without_instances_is_an_error_when_traffic_goes_there() -> None:
    doc = {
        "service": "api",
        "subsets": {"v1": {"version": "v1"}, "v3": {"version": "v3"}},
        "routes": [{"to": [{"subset": "v1", "weight": 50}, {"subset": "v3", "weight": 50}]}],
    }
    found = analyze(with_doc("routes", "api", doc), CATALOG)
    assert codes(found) == {("error", "empty-subset", "routes/api")}
    assert "v3" in found[0].message and "503" in found[0].message
    assert has_errors(found)
    doc["routes"] = [{"to": [{"subset": "v1"}]}]
    assert codes(analyze(with_doc("routes", "api", doc), CATALOG)) == {
        ("warning", "empty-subset", "routes/api")
    }


def test_l7_route_on_tcp_service() -> None:
    doc = {"service": "db", "routes": [{"match": {"path": {"prefix": "/"}}, "to": [{"weight": 100}]}]}
    assert codes(analyze(with_doc("routes", "db", doc), CATALOG)) == {("error", "route-on-tcp", "routes/db")}


def test_a_route_document_without_protocol_on_a_tcp_service_is_an_error() -> None:
    """Without a match it was passed in silence, though its callers speak HTTP to the tcp app (400 DPE)."""
    found = analyze(
        with_doc("routes", "db", {"service": "db", "routes": [{"to": [{"weight": 100}]}]}), CATALOG
    )
    assert codes(found) == {("error", "route-on-tcp", "routes/db")}
    assert "says http (the default when not given)" in found[0].message and "400 DPE" in found[0].message
    tcp = {"service": "db", "protocol": "tcp", "routes": [{"to": [{"weight": 100}]}]}
    assert analyze(with_doc("routes", "db", tcp), CATALOG) == []


def test_a_gateways_own_policy_is_not_called_unused() -> None:
    """A gateway lists no upstreams, yet applies its policy (a rate limit per client): `check` told
    the operator to delete it."""
    edge = inst("edge", "vm-7", **{"hostmesh-kind": "ingress"})  # (its upstreams meta is empty)
    gateway = Catalog((*CATALOG.instances, edge))
    assert analyze(with_doc("policies", "edge", {"service": "edge"}), gateway) == []
    # nor counted among the policies an agent's silence leaves undecided
    silent = Instance("cron", "cron-vm-9", "vm-9", {"hostmesh": "1", "protocol": "http", **LABELLED})
    assert (
        analyze(with_doc("policies", "edge", {"service": "edge"}), Catalog((*gateway.instances, silent)))
        == []
    )


UDP = Catalog(
    (
        *CATALOG.instances,
        inst("dns", "vm-5", protocol="udp", version="v1"),
        inst("dns", "vm-6", protocol="udp", version="v2"),
    )
)
DNS_SPLIT = {
    "service": "dns",
    "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
    "routes": [{"to": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 10}]}],
}


def test_a_service_registered_http_and_udp_is_http_to_check() -> None:
    """Its callers take it for http (an instance says http): an http document fits, and check said
    "the document says udp" of it. From the review of the udp split."""
    cat = Catalog(
        (*CATALOG.instances, inst("dns", "vm-5", protocol="udp"), inst("dns", "vm-6", protocol="http"))
    )
    found = analyze(with_doc("routes", "dns", {"service": "dns", "routes": [{"to": [{"weight": 100}]}]}), cat)
    assert [f for f in found if f.code == "protocol-mismatch"] == []


def test_a_udp_services_split_is_followed_only_as_protocol_udp() -> None:
    """A udp service's document saying tcp (or http, the default) was passed in silence, though its
    callers split no flow by it; a udp document for a tcp or http service is not followed either."""
    assert analyze(with_doc("routes", "dns", {**DNS_SPLIT, "protocol": "udp"}), UDP) == []
    for protocol in ("tcp", "http"):
        found = analyze(with_doc("routes", "dns", {**DNS_SPLIT, "protocol": protocol}), UDP)
        assert codes(found) == {("error", "protocol-mismatch", "routes/dns")}
        assert found[0].message.startswith(f"dns is registered as udp, but the document says {protocol}")
        assert found[0].fix.startswith("set protocol: udp")
    tcp_doc = {"service": "db", "protocol": "udp", "routes": [{"to": [{"weight": 100}]}]}
    found = analyze(with_doc("routes", "db", tcp_doc), CATALOG)
    assert codes(found) == {("error", "protocol-mismatch", "routes/db")}
    assert "registered as tcp: tcp callers send each connection to any instance" in found[0].message
    found = analyze(with_doc("routes", "api", {"service": "api", "protocol": "udp"}), CATALOG)
    # (and api's policy, a balancer, is not applied to plain connections: see policy-ignored)
    assert codes(found) == {
        ("error", "protocol-mismatch", "routes/api"),
        ("error", "policy-ignored", "policies/api"),
    }
    assert "http callers take api for plain connections" in found[1].message


@pytest.mark.parametrize(
    ("service", "protocol", "what"),
    [
        ("api", "http", "requests routed to it (10%) fail with 503"),
        ("db", "tcp", "connections routed to it (10%) are reset (flag UH)"),
        ("dns", "udp", "flows routed to it (10%) are not opened: their datagrams are dropped"),
    ],
)
def test_an_empty_subset_says_what_becomes_of_the_calls_sent_there(
    service: str, protocol: str, what: str
) -> None:
    """A tcp or udp service's operator was told its connections or flows fail with 503."""
    subsets = {"v1": {"version": "v1"}, "v2": {"version": "v9"}}
    doc = {**DNS_SPLIT, "service": service, "protocol": protocol, "subsets": subsets}
    found = analyze(with_doc("routes", service, doc), UDP)
    empty = [f for f in found if f.code == "empty-subset" and "subset v2" in f.message]
    assert [f.severity for f in empty] == ["error"]
    assert empty[0].message == f"subset v2 (version=v9) has no instance; {what}"


def test_weights_that_do_not_add_up_written_around_the_cli() -> None:
    doc = {
        "service": "api",
        "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
        "routes": [{"to": [{"subset": "v1", "weight": 90}, {"subset": "v2", "weight": 20}]}],
    }
    found = analyze(with_doc("routes", "api", doc), CATALOG)
    assert codes(found) == {("error", "weights", "routes/api")}
    assert "110" in found[0].message


def test_other_invalid_document() -> None:
    found = analyze(
        with_doc("policies", "api", {"service": "api", "load_balancer": {"type": "fastest"}}), CATALOG
    )
    assert codes(found) == {("error", "invalid", "policies/api")}
    assert "load_balancer.type" in found[0].message


def test_document_stored_under_another_name() -> None:
    found = analyze(with_doc("policies", "web", {"service": "api"}), CATALOG)
    assert codes(found) == {("error", "key-mismatch", "policies/web")}


def test_policy_no_upstream_uses() -> None:
    found = analyze(with_doc("policies", "web", {"service": "web"}), CATALOG)
    assert codes(found) == {("warning", "unused-policy", "policies/web")}


def test_unused_policy_is_not_claimed_when_an_agent_does_not_advertise_its_upstreams() -> None:
    """An agent with ~50 upstreams registers no list (it would not fit in Consul's meta): whether a
    policy nobody else calls is unused cannot be told, and `check` says so once rather than nothing
    (it said "No findings" with 101 unused policies in a 300-service catalog)."""
    many = Instance("cron", "cron-vm-9", "vm-9", {"hostmesh": "1", "protocol": "http", **LABELLED})
    catalog = Catalog((*CATALOG.instances, many))
    found = analyze(with_doc("policies", "web", {"service": "web"}), catalog)
    assert codes(found) == {("info", "unused-policy-unknown", "policies")}
    assert found[0].message.startswith("1 policy has no caller among the agents that list their upstreams")
    assert "the agents of cron do not list theirs" in found[0].message
    assert analyze(with_doc("policies", "api", {"service": "api"}), catalog) == []  # web's agent calls api


def test_intention_naming_unknown_services() -> None:
    doc = {"service": "billing", "rules": [{"source": "wbe", "action": "allow"}]}
    found = analyze(with_doc("intentions", "billing", doc), CATALOG)
    assert codes(found) == {
        ("warning", "unknown-service", "intentions/billing"),
        ("warning", "unknown-source", "intentions/billing rule 0"),
    }


def test_l7_permission_on_tcp_service() -> None:
    doc = {
        "service": "db",
        "rules": [{"source": "web", "action": "allow", "permissions": [{"methods": ["GET"]}]}],
    }
    found = analyze(with_doc("intentions", "db", doc), CATALOG)
    assert codes(found) == {("error", "l7-on-tcp", "intentions/db rule 0")}
    assert "grants nothing" in found[0].message


def test_an_external_services_intentions_are_known_and_decided_per_connection() -> None:
    """`check` called an external's intentions unknown and advised deleting them (which drops a
    `default: deny`), and passed L7 rules on it, or on a udp service, that never apply."""
    ext = {"service": "pay", "addresses": ["pay.example.com:443"]}
    rule = {"source": "web", "action": "allow", "permissions": [{"methods": ["GET"]}]}
    docs = {
        "external": {"pay": ext},
        "intentions": {"pay": {"service": "pay", "default": "deny", "rules": [rule]}},
    }
    found = analyze(docs, CATALOG)
    assert codes(found) == {("error", "l7-on-tcp", "intentions/pay rule 0")}
    assert found[0].message.startswith("pay is an external service, so this L7 rule")
    udp = Catalog((Instance("dns", "dns-1", "n1", {"protocol": "udp"}), Instance("web", "web-1", "n2")))
    found = analyze({"intentions": {"dns": {"service": "dns", "rules": [rule]}}}, udp)
    assert codes(found) == {("error", "l7-on-tcp", "intentions/dns rule 0")}
    assert found[0].message.startswith("dns is udp, so this L7 rule")
    assert "grants nothing (its flows are decided without it)" in found[0].message


def test_a_policy_its_callers_never_apply_is_an_error() -> None:
    """`apply` refuses a policy with HTTP-only fields for a tcp, udp or external service; one stored
    around the CLI (or before that rule) was passed by `check` (an external's was called unknown)."""
    limits = {"service": "db", "connection_limits": {"max_connections": 10}}
    found = analyze(with_doc("policies", "db", limits), CATALOG)  # db: registered tcp, called by web
    assert codes(found) == {("error", "policy-ignored", "policies/db")}
    assert found[0].message == "db is a tcp service: its callers never apply this policy's connection_limits"
    assert 'serve db as protocol = "http"' in found[0].fix
    ext = {"service": "pay", "addresses": ["pay.example.com:443"]}
    limited = {"service": "pay", "rate_limit": {"requests_per_second": 5}}
    found = analyze({"external": {"pay": ext}, "policies": {"pay": limited}}, CATALOG)
    assert codes(found) == {("error", "policy-ignored", "policies/pay")}
    assert found[0].message == "pay is an external service: its callers never apply this policy's rate_limit"
    assert found[0].fix == "`hostmesh policy delete pay`"
    # the route document decides first, as for agents and `apply`: api (registered http) made tcp
    # ignores its policy; db (registered tcp) made http applies it
    tcp_api = {"service": "api", "protocol": "tcp", "routes": [{"to": [{"weight": 100}]}]}
    docs = {**with_doc("routes", "api", tcp_api)}
    assert ("error", "policy-ignored", "policies/api") in codes(analyze(docs, CATALOG))
    http_db = {"service": "db", "routes": [{"to": [{"weight": 100}]}]}
    docs = with_doc("routes", "db", http_db)
    docs["policies"] = {"db": limits}
    assert ("error", "policy-ignored", "policies/db") not in codes(analyze(docs, CATALOG))
    # a gateway is registered tcp, but applies its own policy (a rate limit per client) to HTTP
    gateway = Catalog(
        (*CATALOG.instances, inst("edge", "vm-9", protocol="tcp", **{"hostmesh-kind": "ingress"}))
    )
    edge = {"service": "edge", "rate_limit": {"requests_per_second": 50}}
    assert analyze(with_doc("policies", "edge", edge), gateway) == []
    # what a tcp service does take is not reported
    balanced = {"service": "db", "load_balancer": {"type": "round_robin"}}
    assert codes(analyze(with_doc("policies", "db", balanced), CATALOG)) == set()


def test_shadowed_intention_rules() -> None:
    doc = {
        "service": "api",
        "rules": [
            {"source": "web", "action": "deny", "permissions": [{"path": {"prefix": "/admin"}}]},
            {
                "source": "web",
                "action": "allow",
                "permissions": [{"path": {"exact": "/admin/users"}, "methods": ["GET"]}],
            },
            {"source": "web", "action": "allow", "permissions": [{"path": {"exact": "/health"}}]},
            {"source": "*", "action": "deny"},
            {"source": "*", "action": "deny"},
        ],
    }
    found = analyze(with_doc("intentions", "api", doc), CATALOG)
    assert codes(found) == {
        ("warning", "shadowed-rule", "intentions/api rule 1"),
        ("warning", "shadowed-rule", "intentions/api rule 4"),
    }


def test_shadowed_route() -> None:
    doc = {
        "service": "api",
        "routes": [
            {"match": {"path": {"prefix": "/api"}}, "to": [{"weight": 100}]},
            {"match": {"path": {"prefix": "/api/v2"}, "methods": ["GET"]}, "to": [{"weight": 100}]},
            {
                "match": {"path": {"prefix": "/api"}, "headers": {"x-canary": {"exact": "1"}}},
                "to": [{"weight": 100}],
            },
        ],
    }
    found = analyze(with_doc("routes", "api", doc), CATALOG)
    assert {(f.code, f.message.split(":")[0]) for f in found} == {
        ("shadowed-route", "routes[1] never matches"),
        ("shadowed-route", "routes[2] never matches"),
    }


def test_errors_come_first_and_serialise() -> None:
    docs = with_doc("routes", "billing", {"service": "billing"})
    docs["intentions"] = {
        "db": {
            "service": "db",
            "rules": [{"source": "web", "action": "deny", "permissions": [{"methods": ["POST"]}]}],
        }
    }
    found = analyze(docs, CATALOG)
    assert [f.severity for f in found] == ["error", "warning"]
    assert set(found[0].to_json()) == {"severity", "code", "subject", "message", "fix"}


def test_the_ca_instance_does_not_hide_an_unused_policy() -> None:
    ca = Instance("hostmesh-ca", "hostmesh-ca-1", "vm-0", {"hostmesh": "1", "trust_domain": "hostmesh.local"})
    catalog = Catalog((*CATALOG.instances, ca))
    assert {f.code for f in analyze(with_doc("policies", "web", {"service": "web"}), catalog)} == {
        "unused-policy"
    }


def test_invalid_gateway_and_external_documents_are_found_too() -> None:
    """`check` read every document kind but judged only routes, policies and intentions: an external
    document with a list for `via`, which an egress gateway's agent refuses, passed unseen."""
    docs = with_doc("external", "pay", {"service": "pay", "via": ["egw"]})
    docs["gateways"] = {"edge": {"service": "edge", "listeners": "all"}}
    found = analyze(docs, CATALOG)
    assert codes(found) == {("error", "invalid", "external/pay"), ("error", "invalid", "gateways/edge")}
    assert all(f.message.startswith("rejected by agents: ") for f in found)


def test_a_document_older_agents_cannot_read_is_a_warning_naming_them() -> None:
    """An agent of 0.2 or older (no release in its meta) refuses a `protocol: udp` route and never reads
    a tcp one (registry/features.py): `check` names the document, the release it needs and the agents."""
    old = Catalog((*UDP.instances, inst("cron", "vm-9", release=None)))
    found = analyze(with_doc("routes", "dns", {**DNS_SPLIT, "protocol": "udp"}), old)
    # a warning: what a rolling upgrade brings into force, so `check` passes before it (review K5)
    older = "warning", "older-agents"
    assert codes(found) == {(*older, "routes/dns"), (*older, "routes/db")}
    udp = next(f for f in found if f.subject == "routes/dns")
    assert "protocol: udp" in udp.message and "hostmesh 0.3.0" in udp.message
    assert "vm-9/cron (0.2 or older)" in udp.message and "1 registered agent(s)" in udp.message
    assert (
        analyze(with_doc("routes", "dns", {**DNS_SPLIT, "protocol": "udp"}), UDP) == []
    )  # every agent of this release
    # a release that reads it, a later one, and one that does not read as a version are not older
    newer = [inst("cron", "vm-9", release=r) for r in ("0.3.0", "0.4.1rc1", "unknown")]
    assert (
        analyze(
            with_doc("routes", "dns", {**DNS_SPLIT, "protocol": "udp"}), Catalog((*UDP.instances, *newer))
        )
        == []
    )
    # the CA registers hostmesh=1 without a protocol: not an agent
    ca = Instance("hostmesh-ca", "hostmesh-ca-vm-5", "vm-5", {"hostmesh": "1"})
    assert (
        analyze(with_doc("routes", "dns", {**DNS_SPLIT, "protocol": "udp"}), Catalog((*UDP.instances, ca)))
        == []
    )


def test_a_gateway_document_is_checked_against_the_catalog() -> None:
    """An ingress gateway's document handing requests to a service nobody registered (a typo) fails
    each of them with 503, and one for a gateway nobody runs does nothing: `check` named neither (it
    read gateway documents only to say whether they parse)."""
    catalog = Catalog((*CATALOG.instances, inst("edge", "vm-9", **{"hostmesh-kind": "ingress"})))
    edge = {"service": "edge", "http": [{"hosts": ["shop.example.com"], "service": "api"},
                                        {"hosts": ["x.example.com"], "prefix": "/x/", "service": "apii"}],
            "tls": [{"hosts": ["db.example.com"], "service": "db"}]}  # fmt: skip
    found = analyze({"gateways": {"edge": edge}}, catalog)
    assert [(f.severity, f.code, f.subject) for f in found] == [("error", "unknown-service", "gateways/edge")]
    assert "apii" in found[0].message and "503" in found[0].message
    assert analyze({"gateways": {"edge": {**edge, "http": edge["http"][:1]}}}, catalog) == []
    lone = analyze({"gateways": {"edge": {**edge, "http": edge["http"][:1]}}}, CATALOG)
    assert [(f.severity, f.code, f.subject) for f in lone] == [
        ("warning", "unknown-service", "gateways/edge")
    ]
    assert "`hostmesh gateway delete edge`" in lone[0].fix


def test_an_external_named_like_a_mesh_service_or_via_no_egress_gateway_is_an_error() -> None:
    """An external document for a name mesh instances are registered under sends every call to that
    service out to its addresses (its callers' agents take the document's word), and one `via` a name
    no egress gateway runs under has every call reset: `check` named neither (it read external
    documents only to say whether they parse)."""
    catalog = Catalog((*CATALOG.instances, inst("out", "vm-9", **{"hostmesh-kind": "egress-gateway"})))
    pay = {"service": "pay", "addresses": ["127.0.0.1:443"], "via": "out"}
    assert analyze({"external": {"pay": pay}}, catalog) == []
    shadow = analyze({"external": {"api": {**pay, "service": "api"}}}, catalog)
    assert [(f.severity, f.code, f.subject) for f in shadow] == [
        ("error", "external-shadows-service", "external/api")
    ]
    assert "mesh instances of api are registered" in shadow[0].message
    for via, what in (("ot", "no instance of it is registered"), ("web", "it is not an egress gateway")):
        found = analyze({"external": {"pay": {**pay, "via": via}}}, catalog)
        assert [(f.severity, f.code, f.subject) for f in found] == [
            ("error", "unknown-egress-gateway", "external/pay")
        ]
        assert found[0].message.startswith(f"via {via}, but {what}: every call to pay is reset (")
    assert analyze({"external": {"pay": pay}}, CATALOG)[0].code == "unknown-egress-gateway"  # nobody runs out
