"""agent.toml: defaults, the contract keys of docs/architecture.md, and one-line errors that name the key."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from hostmesh.agent.config import MAX_CONFIG_BYTES, ConfigError, load_config, parse_config
from hostmesh.registry.listen import listening_socket

PIN = "sha256:" + "ab" * 32


def minimal(**extra: object) -> dict[str, object]:
    doc: dict[str, object] = {"ca": {"pin": PIN}, "services": [{"name": "web", "port": 8080}]}
    doc.update(extra)
    return doc


def test_design_example_parses(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        f"""
node = "vm-1"
mesh_address = "198.18.0.5"
data_dir = "{tmp_path}/data"
inbound = "0.0.0.0:15001"
admin = "127.0.0.1:15000"
metrics = "0.0.0.0:15090"
[consul]
address = "http://127.0.0.1:8500"
[ca]
address = "https://127.0.0.1:15012"
pin = "{PIN}"
token_file = "/etc/hostmesh/join-token"
[[services]]
name = "web"
port = 8080
protocol = "http"
meta = {{ version = "v1", zone = "a" }}
health = {{ http = "/healthz" }}
[[services.upstreams]]
service = "api"
bind = "127.0.0.1:9091"
"""
    )
    cfg = load_config(path)
    assert cfg.node == "vm-1" and cfg.mesh_address == "198.18.0.5"
    assert str(cfg.inbound) == "0.0.0.0:15001" and str(cfg.admin) == "127.0.0.1:15000"
    web = cfg.services[0]
    assert (web.name, web.port, web.protocol, web.meta) == (
        "web",
        8080,
        "http",
        {"version": "v1", "zone": "a"},
    )
    assert web.health.http == "/healthz"
    assert [(u.service, str(u.bind)) for u in web.upstreams] == [("api", "127.0.0.1:9091")]
    assert cfg.ca.token_file == Path("/etc/hostmesh/join-token")


def test_defaults_are_safe() -> None:
    cfg = parse_config(minimal())
    assert str(cfg.admin) == "127.0.0.1:15000"  # admin never open to the world by default
    assert cfg.services[0].protocol == "tcp" and cfg.services[0].health.tcp
    assert cfg.workers == 1 and cfg.default_intention == "allow"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (minimal(inbund="0.0.0.0:1"), "inbund: unknown key (did you mean 'inbound'?)"),
        (
            minimal(services=[{"name": "web", "port": 8080, "protocl": "tcp"}]),
            "services[0].protocl: unknown key",
        ),
        (
            minimal(services=[{"name": "web", "port": 70000}]),
            "services[0].port: must be an integer in 1..65535",
        ),
        (minimal(services=[{"name": "Web_1", "port": 1}]), "services[0].name: must be a lowercase DNS label"),
        # str.isdigit() takes both, so the CA's copy of the rule took them into SPIFFE IDs and DNS SANs
        (
            minimal(services=[{"name": "web\u00b2", "port": 1}]),
            "services[0].name: must be a lowercase DNS label",
        ),
        (
            minimal(services=[{"name": "web\u0663", "port": 1}]),
            "services[0].name: must be a lowercase DNS label",
        ),
        (
            minimal(services=[{"name": "web", "port": 1, "protocol": "sctp"}]),
            "services[0].protocol: must be one of tcp, http, udp",
        ),
        ({"services": [{"name": "web", "port": 1}]}, "ca: is required"),
        (minimal(ca={"pin": "md5:00"}), "ca.pin: must be 'sha256:<64 hex>'"),
        (minimal(admin="localhost"), "admin: 'localhost' is not host:port"),
        # str.isdigit() takes both; int() refuses the first and reads the second as port 3
        (minimal(admin="127.0.0.1:\u00b2"), "admin: '127.0.0.1:\u00b2' is not host:port"),
        (minimal(admin="127.0.0.1:\u0663"), "admin: '127.0.0.1:\u0663' is not host:port"),
        (minimal(admin="1.2.3.4]:1"), "admin: '1.2.3.4]:1' is not host:port"),
        (minimal(admin="127.0.0.1:" + "1" * 5000), "admin: '127.0.0.1:111"),  # int() refuses > 4300 digits
        (minimal(admin="[[127.0.0.1]]:1"), "admin: '[[127.0.0.1]]:1' is not host:port"),
        (minimal(ca={"pin": "sha256:" + "z" * 64}), "ca.pin: must be 'sha256:<64 hex>'"),
        (minimal(ca={"pin": PIN, "address": "not a url"}), "ca.address: 'not a url' must be the CA's URL"),
        (minimal(ca={"pin": PIN, "address": "http://10.0.0.2:15012"}), "ca.address: 'http://10.0.0.2:15012'"),
        (
            minimal(ca={"pin": PIN, "address": "https://10.0.0.2:99999"}),
            "ca.address: 'https://10.0.0.2:99999'",
        ),
        (minimal(tracing={"otlp_endpoint": "http://[::1"}), "tracing.otlp_endpoint: must be an http://"),
        (minimal(mesh_address="0.0.0.0"), "mesh_address: '0.0.0.0' must be an IP address peers can dial"),
        (minimal(workers=0), "workers: must be an integer in 1..64"),
        (minimal(services=[]), "services: at least one [[services]] table is required"),
        (
            minimal(services=[{"name": "web", "port": 1, "upstreams": [{"service": "api"}]}]),
            "services[0].upstreams[0].bind: is required",
        ),
        (
            minimal(services=[{"name": "a", "port": 1}, {"name": "a", "port": 2}]),
            "services: service names must be",
        ),
    ],
)
def test_mistakes_are_one_line_naming_the_key(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        (minimal(ca={"pin": PIN, "address": "https://ops:s3cret@10.0.0.2:15012"}), "ca.address"),
        (minimal(ca={"pin": PIN, "address": "ops:s3cret@10.0.0.2:15012"}), "ca.address"),
        (minimal(tracing={"otlp_endpoint": "http://ops:s3cret@127.0.0.1:4318"}), "tracing.otlp_endpoint"),
        # refused for the credentials before anything else: an error about the port would quote them
        (minimal(ca={"pin": PIN, "address": "https://ops:s3cret@10.0.0.2:99999"}), "ca.address"),
        (minimal(tracing={"otlp_endpoint": "http://ops:s3cret@[::1:4318"}), "tracing.otlp_endpoint"),
    ],
)
def test_credentials_in_a_url_are_refused_without_echoing_them(doc: dict[str, object], key: str) -> None:
    """They would be dropped without a word (neither the CA nor OTLP export uses them)."""
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    assert str(info.value) == f"{key}: user:password@ in the URL is not used by hostmesh: remove it"


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text("node = \n")
    with pytest.raises(ConfigError, match=r"agent\.toml: not valid TOML"):
        load_config(bad)
    bad.write_text("node = " + "[" * 2000 + "]" * 2000 + "\n")  # tomllib recurses per level
    with pytest.raises(ConfigError, match=r"agent\.toml: not valid TOML: nested too deeply$"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_an_agent_toml_past_the_size_limit_is_refused_naming_it_and_the_limit(tmp_path: Path) -> None:
    """agent.toml was read whole, whatever its size: 200 MiB of comments passed `agent validate`
    (2.6 s, 435 MB of memory). Past MAX_CONFIG_BYTES it is refused in one line; at it, it loads."""
    path = tmp_path / "agent.toml"
    head = f'[ca]\npin = "{PIN}"\n[[services]]\nname = "web"\nport = 8080\n#'.encode()
    path.write_bytes(head + b"x" * (MAX_CONFIG_BYTES - len(head) - 1) + b"\n")
    assert load_config(path, check_files=False).services[0].name == "web"
    with path.open("ab") as fh:
        fh.write(b"\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, check_files=False)
    assert (
        str(info.value)
        == f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB, more than agent.toml may take"
    )


def test_http_limits_are_configurable() -> None:
    assert parse_config(minimal()).http.header_read_timeout == 10.0
    assert parse_config(minimal(http={"header_read_timeout": 1})).http.header_read_timeout == 1.0
    with pytest.raises(ConfigError, match=r"^http\.header_read_timeout: must be a number"):
        parse_config(minimal(http={"header_read_timeout": 0}))
    http = parse_config(minimal()).http
    assert (http.body_idle_timeout, http.body_min_rate) == (15.0, 240.0)
    http = parse_config(minimal(http={"body_idle_timeout": 60, "body_min_rate": 0})).http
    assert (http.body_idle_timeout, http.body_min_rate) == (60.0, 0.0)
    with pytest.raises(ConfigError, match=r"^http\.body_idle_timeout: must be a number"):
        parse_config(minimal(http={"body_idle_timeout": "15s"}))


def test_consul_table_takes_consuls_client_settings_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    consul = {
        "address": "https://consul.internal:8501",
        "token_file": "/etc/hostmesh/consul-token",
        "ca_file": "/etc/consul/ca.pem",
        "cert_file": "/etc/consul/client.pem",
        "key_file": "/etc/consul/client-key.pem",
        "tls_server_name": "server.dc1.consul",
    }
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "http://127.0.0.1:8500")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-the-environment")
    monkeypatch.setenv("CONSUL_CACERT", "/env/ca.pem")
    got = parse_config(minimal(consul=consul)).consul_settings()
    assert got.url == "https://consul.internal:8501"
    assert (got.token, got.token_file) == (None, "/etc/hostmesh/consul-token")  # the file's, not the env's
    assert (got.ca_file, got.cert_file, got.key_file, got.tls_server_name) == (
        "/etc/consul/ca.pem",
        "/etc/consul/client.pem",
        "/etc/consul/client-key.pem",
        "server.dc1.consul",
    )
    # Unset in agent.toml: the environment's, as Consul's tools.
    assert parse_config(minimal()).consul_settings().token == "from-the-environment"


@pytest.mark.parametrize(
    ("consul", "message"),
    [
        ({"adress": "x"}, "consul.adress: unknown key"),
        (
            {"address": "ftp://consul:21"},
            "consul.address: Consul address 'ftp://consul:21': the scheme must be",
        ),
        ({"token": 5}, "consul.token: must be a string"),
    ],
)
def test_bad_consul_table_is_one_line(consul: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(minimal(consul=consul))
    assert str(err.value).startswith(message), str(err.value)


def test_unreadable_consul_token_file_stops_the_start_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    path = tmp_path / "agent.toml"
    missing = tmp_path / "consul-token"
    path.write_text(
        f'[consul]\ntoken_file = "{missing}"\n[ca]\npin = "{PIN}"\n[[services]]\nname = "web"\nport = 8080\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"{path}: [consul]: Consul token file {missing}: cannot read: No such file or directory"
    )


def test_an_upstream_may_declare_its_protocol() -> None:
    def up(**kw: object) -> dict[str, object]:
        return minimal(services=[{"name": "web", "port": 8080, "upstreams": [{"service": "api",
                                  "bind": "127.0.0.1:9091", **kw}]}])  # fmt: skip

    assert parse_config(up()).services[0].upstreams[0].protocol is None  # learnt from the registry
    assert parse_config(up(protocol="http")).services[0].upstreams[0].protocol == "http"
    with pytest.raises(
        ConfigError, match=r"^services\[0\]\.upstreams\[0\]\.protocol: must be one of tcp, http"
    ):
        parse_config(up(protocol="grpc"))


def test_connection_cap_and_stream_idle_timeout() -> None:
    cfg = parse_config(minimal())
    assert (cfg.max_connections, cfg.stream_idle_timeout) == (10_000, 3600.0)
    cfg = parse_config(minimal(max_connections=500, stream_idle_timeout=0))
    assert (cfg.max_connections, cfg.stream_idle_timeout) == (500, 0.0)
    with pytest.raises(ConfigError, match=r"^max_connections: must be an integer in 1\.\.1000000$"):
        parse_config(minimal(max_connections=0))
    with pytest.raises(ConfigError, match=r"^stream_idle_timeout: must be a number"):
        parse_config(minimal(stream_idle_timeout=-1))


def _with_upstream(**kw: object) -> dict[str, object]:
    return minimal(services=[{"name": "web", "port": 8080, "upstreams": [{"service": "api", **kw}]}])


def test_an_upstream_on_a_non_loopback_address_is_refused_unless_shared() -> None:
    """An upstream listener on 0.0.0.0 lets anyone on the network call api as `web`: refused with
    one line saying why; `shared = true` is the operator saying it is intended."""
    for host in ("0.0.0.0", "198.18.0.5", "[::]"):
        with pytest.raises(ConfigError) as err:
            parse_config(_with_upstream(bind=f"{host}:9091"))
        msg = str(err.value)
        assert msg.startswith("services[0].upstreams[0].bind: ") and "\n" not in msg
        assert "not a loopback address" in msg and "call api with this service's identity" in msg
        assert "shared = true" in msg
        shared = parse_config(_with_upstream(bind=f"{host}:9091", shared=True)).services[0].upstreams[0]
        assert shared.shared and shared.bind.port == 9091
    for host in ("127.0.0.1", "127.5.6.7", "[::1]", "localhost"):
        assert not parse_config(_with_upstream(bind=f"{host}:9091")).services[0].upstreams[0].shared
    with pytest.raises(ConfigError, match=r"^services\[0\]\.upstreams\[0\]\.shared: must be true or false"):
        parse_config(_with_upstream(bind="127.0.0.1:9091", shared="yes"))


def test_the_admin_api_on_a_non_loopback_address_is_refused_unless_admin_shared() -> None:
    """`admin` was taken whatever it was: on 0.0.0.0 anyone on the network read /v1/config (this
    host's services, intentions and endpoints) and /v1/certs, with no authentication (the Host check
    stops only a web page's DNS name). Refused with one line naming the key, as `dns` and an
    upstream's bind are; `admin_shared = true` says it is intended."""
    for host in ("0.0.0.0", "198.18.0.5", "[::]"):
        with pytest.raises(ConfigError) as err:
            parse_config(minimal(admin=f"{host}:15000"))
        msg = str(err.value)
        assert msg.startswith(f"admin: {host.strip('[]')} is not a loopback address: ") and "\n" not in msg
        assert "applied config" in msg and msg.endswith("(set admin_shared = true if that is intended)")
        cfg = parse_config(minimal(admin=f"{host}:15000", admin_shared=True))
        assert cfg.admin_shared and cfg.admin.port == 15000
    for host in ("127.0.0.1", "127.5.6.7", "[::1]", "localhost"):
        cfg = parse_config(minimal(admin=f"{host}:15000"))
        assert not cfg.admin_shared and ipaddress.ip_address(cfg.admin.host).is_loopback
    with pytest.raises(ConfigError, match=r"^admin_shared: must be true or false$"):
        parse_config(minimal(admin_shared="yes"))


def test_mesh_dns_on_a_non_loopback_address_is_refused_unless_dns_shared() -> None:
    """`dns` was taken whatever it was, where an upstream's bind is checked: on 0.0.0.0 anyone on the
    network could ask this host's upstreams and their listeners' addresses. Refused with one line
    naming the key, as an upstream's bind (the same check); `dns_shared = true` says it is intended."""
    for host in ("0.0.0.0", "198.18.0.5", "[::]"):
        with pytest.raises(ConfigError) as err:
            parse_config(minimal(dns=f"{host}:15053"))
        msg = str(err.value)
        assert msg.startswith(f"dns: {host.strip('[]')} is not a loopback address: ") and "\n" not in msg
        assert "this host's upstreams" in msg and msg.endswith("(set dns_shared = true if that is intended)")
        cfg = parse_config(minimal(dns=f"{host}:15053", dns_shared=True))
        assert cfg.dns_shared and cfg.dns is not None and cfg.dns.port == 15053
    for host in ("127.0.0.1", "127.5.6.7", "[::1]", "localhost"):
        cfg = parse_config(minimal(dns=f"{host}:15053"))
        assert not cfg.dns_shared and cfg.dns is not None
    assert parse_config(minimal(dns="")).dns is None  # off: nothing to check
    with pytest.raises(ConfigError, match=r"^dns_shared: must be true or false$"):
        parse_config(minimal(dns="", dns_shared="yes"))


def test_an_ipv4_mapped_address_is_its_ipv4_address_and_the_listener_binds_it() -> None:
    """`[::ffff:127.0.0.1]` was refused as "not a loopback address" though it is one, and with
    `shared = true` `[::ffff:0.0.0.0]` passed `agent validate` while the start failed ("cannot listen
    on [::ffff:0.0.0.0]:…: Invalid argument": the agent's TCP sockets are IPv6-only, and such a
    socket cannot bind an IPv4-mapped address). Either is its IPv4 address, which the listener binds."""
    cfg = parse_config(minimal(
        inbound="[::ffff:127.0.0.1]:0", admin="[::ffff:127.0.0.1]:0", metrics="[::FFFF:7f00:1]:0",
        dns="[::ffff:127.0.0.1]:0",
        services=[{"name": "web", "port": 8080, "upstreams": [
            {"service": "api", "bind": "[::ffff:127.0.0.2]:9091"},
            {"service": "db", "bind": "[0:0:0:0:0:ffff:7f00:3]:9092", "shared": True},
            {"service": "all", "bind": "[::ffff:0.0.0.0]:9093", "shared": True},
            {"service": "logs", "bind": "[::ffff:127.0.0.4]:9094", "protocol": "udp"}]}],
    ))  # fmt: skip
    assert cfg.dns is not None and cfg.metrics is not None
    binds = [u.bind for u in cfg.services[0].upstreams]
    assert [a.host for a in (cfg.inbound, cfg.admin, cfg.metrics, cfg.dns)] == ["127.0.0.1"] * 4
    assert [str(a) for a in binds] == ["127.0.0.2:9091", "127.0.0.3:9092", "0.0.0.0:9093", "127.0.0.4:9094"]
    for addr in (cfg.admin, *binds[:2]):  # (port 0: what the agent's TCP listener binds, on any port)
        sock = listening_socket(addr.host, 0)
        assert sock is not None
        sock.close()
    # one socket, however it is spelled: the clash is said at load, not at the start
    with pytest.raises(ConfigError, match=r"^metrics: listens on 127\.0\.0\.1:15000, as admin does"):
        parse_config(minimal(admin="[::ffff:127.0.0.1]:15000", metrics="127.0.0.1:15000"))


@pytest.mark.parametrize(
    "address, why",
    [("::ffff:0.0.0.0", "any address"), ("224.0.0.1", "multicast"), ("::ffff:239.1.2.3", "multicast"),
     ("ff02::1", "multicast"), ("255.255.255.255", "broadcast"), ("::ffff:255.255.255.255", "broadcast")],
)  # fmt: skip
def test_a_mesh_address_no_peer_can_dial_is_refused_however_it_is_written(address: str, why: str) -> None:
    """`0.0.0.0` and `::` were refused, but `::ffff:0.0.0.0` (which ipaddress says is not unspecified,
    and a peer's connection to it reaches the peer itself) and multicast addresses passed, and were
    registered in Consul for every caller to dial."""
    with pytest.raises(ConfigError) as err:
        parse_config(minimal(mesh_address=address))
    assert str(err.value) == f"mesh_address: {address!r} must be an IP address peers can dial ({why})"


def test_an_ipv4_mapped_mesh_address_is_its_ipv4_address() -> None:
    """Registered as written, `::ffff:198.18.0.5` had peers dial it over an IPv6 socket, which a host
    with IPv6 disabled cannot open; it is the IPv4 address, as a listen address is."""
    assert parse_config(minimal(mesh_address="::ffff:198.18.0.5")).mesh_address == "198.18.0.5"


def test_bind_auto_derives_a_stable_loopback_address_and_the_natural_port() -> None:
    from hostmesh.agent.config import auto_bind

    up = parse_config(_with_upstream(bind="auto", protocol="http")).services[0].upstreams[0]
    assert up.auto and up.bind.port == 80 and up.bind.host == auto_bind("api")
    import ipaddress

    addr = ipaddress.ip_address(up.bind.host)
    assert addr in ipaddress.ip_network("127.128.0.0/16")  # not 127.0.0.1, not the tests' 127.64/10
    assert auto_bind("api") == auto_bind("api") != auto_bind("apj")  # a function of the name only
    tcp = parse_config(_with_upstream(bind="auto", port=5432)).services[0].upstreams[0]
    assert str(tcp.bind) == f"{auto_bind('api')}:5432"
    with pytest.raises(ConfigError, match=r"^services\[0\]\.upstreams\[0\]\.port: is required with bind"):
        parse_config(_with_upstream(bind="auto"))
    with pytest.raises(ConfigError, match=r"^services\[0\]\.upstreams\[0\]\.port: only with bind = \"auto\""):
        parse_config(_with_upstream(bind="127.0.0.1:9091", port=80))
    # two local services with an auto upstream to the same name would share one listener (one identity)
    two = minimal(services=[
        {"name": "web", "port": 8080, "upstreams": [{"service": "api", "bind": "auto", "port": 81}]},
        {"name": "cron", "port": 8081, "upstreams": [{"service": "api", "bind": "auto", "port": 81}]},
    ])  # fmt: skip
    with pytest.raises(ConfigError) as err:
        parse_config(two)
    assert str(err.value) == (
        f"services[1].upstreams[0].bind: listens on {auto_bind('api')}:81, as services[0].upstreams[0].bind"
        f' = "auto" does ({auto_bind("api")}:81): give one another port or an explicit bind'
    )


def test_dns_keys() -> None:
    cfg = parse_config(minimal())
    assert str(cfg.dns) == "127.0.0.1:15053" and cfg.dns_domain == "mesh."
    cfg = parse_config(minimal(dns="127.0.0.1:5353", dns_domain="Mesh.Example."))
    assert str(cfg.dns) == "127.0.0.1:5353" and cfg.dns_domain == "mesh.example."
    assert parse_config(minimal(dns="")).dns is None
    with pytest.raises(ConfigError, match=r"^dns_domain: must be a DNS name"):
        parse_config(minimal(dns_domain="me sh"))
    with pytest.raises(ConfigError, match=r"^dns: 'nope' is not host:port"):
        parse_config(minimal(dns="nope"))


def test_validate_without_files_checks_the_config_only(tmp_path: Path) -> None:
    """`hostmesh agent validate --no-files` (Ansible installing into another root, where the token
    file agent.toml names is that root's): the config is checked, the files it names are not."""
    from click.testing import CliRunner

    from hostmesh.agent.check import validate

    path = tmp_path / "agent.toml"
    body = f'[consul]\ntoken_file = "{tmp_path}/absent"\n[ca]\npin = "{PIN}"\n[[services]]\nname = "web"\n'
    path.write_text(body + "port = 8080\n")
    with_files = CliRunner().invoke(validate, ["--config", str(path)])
    assert with_files.exit_code == 1 and "cannot read" in with_files.output
    without = CliRunner().invoke(validate, ["--config", str(path), "--no-files"])
    assert without.exit_code == 0, without.output
    path.write_text(body + "port = 0\n")
    bad = CliRunner().invoke(validate, ["--config", str(path), "--no-files"])
    assert bad.exit_code == 1 and "services[0].port" in bad.output


def _with_meta(meta: dict[str, str]) -> dict[str, object]:
    return minimal(services=[{"name": "web", "port": 8080, "meta": meta}])


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"bad.key": "v"}, "services[0].meta['bad.key']: a meta key is 1-128 of A-Z a-z 0-9 - _"),
        ({"consul-zone": "v"}, "services[0].meta['consul-zone']: a meta key"),
        ({"k" * 129: "v"}, "a meta key is 1-128"),
        ({"zone": "v" * 513}, "services[0].meta.zone: a meta value is at most 512 bytes"),
        ({"zone": "é" * 257}, "services[0].meta.zone: a meta value is at most 512 bytes"),  # 514 bytes
        ({f"k{i}": "v" for i in range(59)}, "services[0].meta: at most 58 pairs"),
        ({"upstreams": "x"}, "services[0].meta.upstreams: is set by the agent"),
        ({"hostmesh_version": "x"}, "services[0].meta.hostmesh_version: is set by the agent"),
        ({"metrics_addr": "x"}, "services[0].meta.metrics_addr: is set by the agent"),
        ({"default_intention": "x"}, "services[0].meta.default_intention: is set by the agent"),
    ],
)
def test_service_meta_consul_would_refuse_is_one_line_at_validation(
    meta: dict[str, str], message: str
) -> None:
    """Consul answers 400 to such a registration only once the agent runs (the instance would never
    appear while `agent validate` had said ok): refused here, naming the key."""
    with pytest.raises(ConfigError) as err:
        parse_config(_with_meta(meta))
    assert message in str(err.value)


def test_service_meta_within_consuls_rules_is_taken() -> None:
    meta = {"version": "v2", "zone": "eu-1", "team_name": "x" * 512, **{f"k{i}": "v" for i in range(55)}}
    assert parse_config(_with_meta(meta)).services[0].meta == meta


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"admin": "127.0.0.1:15001"}, "admin: listens on 127.0.0.1:15001, as inbound does (0.0.0.0:15001)"),
        ({"metrics": "127.0.0.1:15000"}, "metrics: listens on 127.0.0.1:15000, as admin does"),
        ({"dns": "127.0.0.1:15000"}, "dns: listens on 127.0.0.1:15000, as admin does"),
        (
            {"services": [{"name": "web", "port": 8080,
                           "upstreams": [{"service": "api", "bind": "127.0.0.1:15000"}]}]},
            "services[0].upstreams[0].bind: listens on 127.0.0.1:15000, as admin does",
        ),
    ],
)  # fmt: skip
def test_two_of_the_agents_own_sockets_on_one_address_are_refused_naming_both(
    extra: dict[str, object], message: str
) -> None:
    """`agent validate` said ok, and the start failed with an error naming neither key."""
    with pytest.raises(ConfigError) as err:
        parse_config(minimal(**extra))
    assert str(err.value).startswith(message), str(err.value)


def test_sockets_that_do_not_clash_are_taken() -> None:
    """Another host with the same port, another transport (a udp upstream on the admin's TCP port),
    and port 0 are no clash."""
    doc = minimal(
        admin="127.0.0.2:15090",
        metrics="127.0.0.1:15090",  # not a wildcard: 127.0.0.2 is another address
        inbound="127.0.0.1:0",
        services=[{"name": "web", "port": 8080, "upstreams": [
            {"service": "stats", "bind": "127.0.0.1:15000", "protocol": "udp"}]}],
    )  # fmt: skip
    assert parse_config(doc).admin.port == 15090
    # the agent's TCP sockets are IPv6-only: an IPv4 and an IPv6 wildcard on one port both listen
    dual = minimal(inbound="[::]:15001", admin="127.0.0.1:15001", metrics="[::1]:15000")
    assert parse_config(dual).inbound.host == "::"
    with pytest.raises(ConfigError, match=r"admin: listens on 127\.0\.0\.1:15001, as inbound does"):
        parse_config(minimal(inbound="0.0.0.0:15001", admin="127.0.0.1:15001", metrics="[::]:15001"))
