"""The agent's Nomad defaults (agent/nomad.py): agent.toml filled from the task's environment, pure
functions over a dict, plus load_config's handling of a missing agent.toml inside an allocation."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostmesh.agent.config import ConfigError, load_config, parse_config
from hostmesh.agent.nomad import NomadEnvError, with_allocation_defaults

PIN = "sha256:" + "ab" * 32
ALLOC = "5c6328f7-48c5-4d03-bada-91ef2e904d0d"


def task_env(tmp: Path, **extra: str) -> dict[str, str]:
    return {
        "NOMAD_ALLOC_ID": ALLOC,
        "NOMAD_ALLOC_DIR": str(tmp / "alloc"),
        "NOMAD_SECRETS_DIR": str(tmp / "secrets"),
        "NOMAD_TASK_DIR": str(tmp / "local"),
        "NOMAD_META_hostmesh_ca_pin": PIN,
        "NOMAD_META_hostmesh_service": "web",
        "NOMAD_META_hostmesh_port": "http",
        "NOMAD_PORT_http": "24001",
        "NOMAD_PORT_hostmesh_inbound": "24002",
        "NOMAD_IP_hostmesh_inbound": "10.1.2.3",
        "NOMAD_ADDR_hostmesh_inbound": "10.1.2.3:24002",
        "NOMAD_PORT_hostmesh_admin": "24003",
        **extra,
    }


def test_the_task_environment_describes_the_whole_agent(tmp_path: Path) -> None:
    env = task_env(
        tmp_path,
        NOMAD_META_hostmesh_protocol="http",
        NOMAD_META_hostmesh_health="/healthz",
        NOMAD_META_hostmesh_upstreams="api:api_up:http, db:15432",
        NOMAD_PORT_api_up="24004",
    )
    cfg = parse_config(with_allocation_defaults({}, env))
    assert cfg.node == ALLOC
    assert cfg.data_dir == tmp_path / "alloc" / "hostmesh"
    assert cfg.certs_dir == tmp_path / "secrets" / "hostmesh"
    assert (cfg.ca.pin, cfg.ca.token_file, cfg.ca.token_env) == (
        PIN, tmp_path / "secrets" / "nomad_token", "NOMAD_TOKEN"
    )  # fmt: skip
    assert (cfg.mesh_address, str(cfg.inbound), str(cfg.admin)) == (
        "10.1.2.3",
        "10.1.2.3:24002",
        "127.0.0.1:24003",
    )
    assert cfg.metrics is None and cfg.drain_seconds == 2.0
    (svc,) = cfg.services
    assert (svc.name, svc.port, svc.protocol, svc.health.http) == ("web", 24001, "http", "/healthz")
    assert [(u.service, str(u.bind), u.protocol) for u in svc.upstreams] == [
        ("api", "127.0.0.1:24004", "http"),
        ("db", "127.0.0.1:15432", None),
    ]
    assert cfg.nomad is not None and cfg.nomad.alloc_id == ALLOC
    assert cfg.nomad.identity_file == tmp_path / "secrets" / "nomad_token"


def test_agent_toml_wins_over_the_environment(tmp_path: Path) -> None:
    raw = {
        "node": "custom",
        "admin": "127.0.0.1:19000",
        "ca": {"pin": "sha256:" + "cd" * 32},
        "services": [{"name": "api", "port": 8080}],
        "nomad": {"poll_interval": 1},
    }
    cfg = parse_config(with_allocation_defaults(raw, task_env(tmp_path)))
    assert (cfg.node, str(cfg.admin), cfg.ca.pin) == ("custom", "127.0.0.1:19000", "sha256:" + "cd" * 32)
    assert [s.name for s in cfg.services] == ["api"]  # meta adds no service beside agent.toml's
    assert cfg.nomad is not None and (cfg.nomad.alloc_id, cfg.nomad.poll_interval) == (ALLOC, 1.0)


def test_upper_case_meta_and_ephemeral_ports(tmp_path: Path) -> None:
    env = {k: v for k, v in task_env(tmp_path).items() if "hostmesh_inbound" not in k and "admin" not in k}
    del env["NOMAD_META_hostmesh_service"]
    env.update(NOMAD_META_HOSTMESH_SERVICE="web", NOMAD_META_HOSTMESH_UPSTREAMS="db:15432")
    cfg = parse_config(with_allocation_defaults({}, env))
    assert [u.service for u in cfg.services[0].upstreams] == ["db"]
    assert (str(cfg.inbound), str(cfg.admin)) == ("127.0.0.1:0", "127.0.0.1:0")  # bound by the kernel


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("NOMAD_META_hostmesh_upstreams", "api", "meta hostmesh_upstreams[0]: 'api' is not SERVICE:PORT"),
        ("NOMAD_META_hostmesh_upstreams", "api:nolabel", "meta hostmesh_upstreams[0]: 'nolabel' is neither"),
        ("NOMAD_META_hostmesh_port", "nolabel", "meta hostmesh_port: 'nolabel' is neither a port label"),
        ("NOMAD_META_hostmesh_port", "\u0663", "meta hostmesh_port: '\u0663' is neither a port label"),
        ("NOMAD_META_hostmesh_port", "\u00b2", "meta hostmesh_port: '\u00b2' is neither a port label"),
    ],
)
def test_unusable_meta_is_one_line_naming_the_key(tmp_path: Path, key: str, value: str, message: str) -> None:
    with pytest.raises(NomadEnvError, match=message.replace("[", r"\[").replace("]", r"\]")):
        with_allocation_defaults({}, task_env(tmp_path, **{key: value}))


def test_load_config_needs_no_file_inside_an_allocation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "local" / "agent.toml"
    with pytest.raises(ConfigError, match="cannot read: No such file"):
        load_config(missing)  # outside an allocation a missing file is still an error
    for k, v in task_env(tmp_path, CONSUL_HTTP_ADDR="http://127.0.0.1:8500").items():
        monkeypatch.setenv(k, v)
    assert load_config(missing).services[0].name == "web"
    monkeypatch.setenv("NOMAD_META_hostmesh_port", "nolabel")
    with pytest.raises(ConfigError) as err:
        load_config(missing)
    assert str(err.value) == (
        f"{missing}: meta hostmesh_port: 'nolabel' is neither a port label of the group nor a port number"
    )


def test_a_nomad_table_outside_an_allocation_needs_the_allocation_id() -> None:
    raw = {"ca": {"pin": PIN}, "services": [{"name": "web", "port": 8080}], "nomad": {}}
    with pytest.raises(ConfigError, match=r"nomad\.alloc_id: is required outside a Nomad allocation"):
        parse_config(with_allocation_defaults(raw, {}))


def test_the_identity_named_hostmesh_is_preferred_over_the_default_one(tmp_path: Path) -> None:
    env = task_env(tmp_path)
    cfg = parse_config(with_allocation_defaults({}, env))
    assert (cfg.ca.token_file, cfg.ca.token_env) == (tmp_path / "secrets" / "nomad_token", "NOMAD_TOKEN")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "nomad_hostmesh.jwt").write_text("eyJ...")
    env["NOMAD_TOKEN_hostmesh"] = "eyJ..."
    cfg = parse_config(with_allocation_defaults({}, env))
    assert cfg.ca.token_file == tmp_path / "secrets" / "nomad_hostmesh.jwt"
    assert cfg.ca.token_env == "NOMAD_TOKEN_hostmesh"
    # `identity "hostmesh" { env = true }` beside `identity { file = true }` (the default one, exposed
    # so the agent can read its allocation): the named one goes to the CA, not the default file
    (tmp_path / "secrets" / "nomad_hostmesh.jwt").unlink()
    (tmp_path / "secrets" / "nomad_token").write_text("eyJ-default")
    cfg = parse_config(with_allocation_defaults({}, env))
    assert (cfg.ca.token_file, cfg.ca.token_env) == (None, "NOMAD_TOKEN_hostmesh")


@pytest.mark.parametrize(("var", "key"), [("NOMAD_ALLOC_DIR", "data_dir"), ("NOMAD_SECRETS_DIR", "cert_dir")])
def test_a_task_environment_without_its_dirs_is_refused(tmp_path: Path, var: str, key: str) -> None:
    """Without them the host's defaults were used (/var/lib/hostmesh, shared with a VM agent and every
    other allocation of the client), or an error named "None" as the identity's place."""
    env = task_env(tmp_path)
    del env[var]
    with pytest.raises(NomadEnvError, match=f"^{var} is not set .*else set {key}"):
        with_allocation_defaults({}, env)
    with_allocation_defaults({key: str(tmp_path / "given")}, env)  # named in agent.toml: fine


def test_in_an_allocation_the_default_config_is_the_task_dirs_never_the_hosts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hostmesh.agent.cli import DEFAULT_AGENT_CONFIG, agent_run_config

    assert agent_run_config(["agent", "run"]) == DEFAULT_AGENT_CONFIG
    monkeypatch.setenv("NOMAD_ALLOC_ID", ALLOC)
    monkeypatch.setenv("NOMAD_TASK_DIR", str(tmp_path / "local"))
    assert agent_run_config(["agent", "run"]) == tmp_path / "local" / "agent.toml"


def test_a_reload_keeps_the_running_nomad_settings_and_says_they_need_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """[nomad] is documented as restart: a reload logs it and keeps the running values. It was not in
    RESTART_KEYS: a reload replaced it silently while the allocation watch, started at start-up,
    kept reading Nomad with the old settings."""
    from hostmesh.agent.run import Agent

    env = task_env(tmp_path)
    running = parse_config(with_allocation_defaults({"nomad": {"address": "http://127.0.0.1:4646"}}, env))
    edited = parse_config(
        with_allocation_defaults({"nomad": {"address": "http://127.0.0.1:4747", "poll_interval": 0.5}}, env)
    )
    assert edited.nomad != running.nomad
    with caplog.at_level("WARNING", logger="hostmesh.agent"):
        kept = Agent(running)._keeping_restart_keys(edited)
    assert kept.nomad == running.nomad
    assert [r.getMessage() for r in caplog.records] == [
        "reload: nomad changed; these need a restart and keep their running values"
    ]


def test_without_the_inbound_port_the_allocation_is_registered_at_loopback_and_warned_about(
    tmp_path: Path,
) -> None:
    """No port `hostmesh_inbound`: the agent listens, and registers its services, at 127.0.0.1, which
    other hosts' agents cannot dial. It still works within one client, so it is a warning, not a refusal."""
    from hostmesh.agent.nomad import INBOUND_LABEL, loopback_warning

    env = {k: v for k, v in task_env(tmp_path).items() if INBOUND_LABEL not in k}
    cfg = parse_config(with_allocation_defaults({}, env))
    assert (cfg.mesh_address, str(cfg.inbound)) == ("127.0.0.1", "127.0.0.1:0")
    warning = loopback_warning(cfg.mesh_address)
    assert warning is not None and "no other host can reach them" in warning and INBOUND_LABEL in warning
    assert (
        loopback_warning(parse_config(with_allocation_defaults({}, task_env(tmp_path))).mesh_address) is None
    )
