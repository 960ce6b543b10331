"""CLI habits and the overwrite rule: two operators applying files without `version:` against a
real Consul; global options after the subcommand; `hostmesh version`; a cheap `--help`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner, Result

from hostmesh.agent.cli import SUBCOMMANDS, SUMMARIES, cli, click_root
from hostmesh.registry.documents import doc_key
from tests.support import ConsulDev


def operator(state: Path) -> CliRunner:
    """One operator: their own record of the versions they read."""
    return CliRunner(env={"HOSTMESH_STATE_DIR": str(state)})


def route(tmp_path: Path, name: str, canary: int) -> str:
    p = tmp_path / name
    p.write_text(
        yaml.safe_dump(
            {
                "service": "shared-web",
                "subsets": {"v1": {"version": "v1"}, "v2": {"version": "v2"}},
                "routes": [
                    {"to": [{"subset": "v1", "weight": 100 - canary}, {"subset": "v2", "weight": canary}]}
                ],
            }
        )
    )
    return str(p)


def live_canary(consul: ConsulDev) -> tuple[int, int]:
    doc = json.loads(consul.kv_get(doc_key("routes", "shared-web")) or b"{}")
    return doc["version"], doc["routes"][0]["to"][1]["weight"]


@pytest.mark.consul
def test_two_writers_without_version_never_overwrite_silently(consul: ConsulDev, tmp_path: Path) -> None:
    consul.kv_delete("hostmesh/routes/shared-web")
    alice, bob = operator(tmp_path / "alice"), operator(tmp_path / "bob")
    a_file, b_file = route(tmp_path, "a.yaml", 10), route(tmp_path, "b.yaml", 50)

    def apply(who: CliRunner, f: str, *extra: str) -> Result:
        return who.invoke(cli, ["route", "apply", "-f", f, "--consul", consul.url, *extra])

    assert apply(alice, a_file).exit_code == 0  # creating needs nothing
    assert live_canary(consul) == (1, 10)

    # Bob never read version 1: his file without version: is refused, with the diff shown.
    r = apply(bob, b_file)
    assert r.exit_code == 1
    assert "-    weight: 10" in r.stdout and "+    weight: 50" in r.stdout
    assert "is at version 1 and exists and you have not read it" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert live_canary(consul) == (1, 10)

    # Having read it, Bob may replace it; Alice edits her own file again meanwhile.
    assert bob.invoke(cli, ["route", "get", "shared-web", "--consul", consul.url]).exit_code == 0
    assert apply(bob, b_file).exit_code == 0
    assert live_canary(consul) == (2, 50)

    # Alice last wrote version 1: Bob's change since then is not replaced without her seeing it.
    r = apply(alice, route(tmp_path, "a2.yaml", 20))
    assert r.exit_code == 1 and "changed since you read version 1" in r.stderr
    assert live_canary(consul) == (2, 50)

    # --force writes, still with check-and-set over the version whose diff it showed.
    r = apply(alice, str(tmp_path / "a2.yaml"), "--force")
    assert r.exit_code == 0 and "version 3 written" in r.stdout
    assert live_canary(consul) == (3, 20)
    # ...and from then on Alice's own re-applies need nothing.
    assert apply(alice, route(tmp_path, "a3.yaml", 30)).exit_code == 0
    assert live_canary(consul) == (4, 30)


@pytest.mark.consul
def test_global_options_after_the_subcommand(consul: ConsulDev) -> None:
    r = CliRunner().invoke(cli, ["route", "list", "--consul", consul.url, "-o", "json"])
    assert r.exit_code == 0, r.output
    assert isinstance(json.loads(r.stdout), list)
    r = CliRunner().invoke(cli, ["version", "-o", "json"])
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)) == {"client"}
    r = CliRunner().invoke(cli, ["version", "--output=yaml"])
    assert yaml.safe_load(r.stdout)["client"]


def test_help_lists_commands_without_importing_them() -> None:
    code = (
        "import sys\n"
        "from hostmesh.agent.cli import click_root\n"
        "try:\n    click_root()(['--help'], prog_name='hostmesh')\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith(('hostmesh.registry.cli', 'hostmesh.ca.cli', "
        "'hostmesh.agent.status'))), file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stderr.strip() == "[]"
    for name in SUBCOMMANDS:
        assert name in out.stdout


def test_help_summaries_are_the_commands_own() -> None:
    root = click_root()
    ctx = click.Context(root)
    for name in SUBCOMMANDS:
        cmd = root.get_command(ctx, name)
        assert cmd is not None
        assert SUMMARIES[name] == cmd.get_short_help_str(limit=200), name
