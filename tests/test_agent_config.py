"""agent.toml: defaults, the contract keys of docs/architecture.md, and one-line errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostmesh.agent.config import ConfigError, load_config, parse_config

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
        (
            minimal(services=[{"name": "web", "port": 1, "protocol": "udp"}]),
            "services[0].protocol: must be one of",
        ),
        ({"services": [{"name": "web", "port": 1}]}, "ca: is required"),
        (minimal(ca={"pin": "md5:00"}), "ca.pin: must be 'sha256:<64 hex>'"),
        (minimal(admin="localhost"), "admin: 'localhost' is not host:port"),
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


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text("node = \n")
    with pytest.raises(ConfigError, match=r"agent\.toml: not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


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
