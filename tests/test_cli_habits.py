"""CLI habits and the overwrite rule: two operators applying files without `version:` against a
real Consul; global options after the subcommand; `hostmesh version`; a cheap `--help`."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
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


def route(tmp_path: Path, name: str, canary: int, service: str = "shared-web") -> str:
    p = tmp_path / name
    p.write_text(
        yaml.safe_dump(
            {
                "service": service,
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
def test_a_dry_run_exits_1_where_the_apply_would_be_refused(consul: ConsulDev, tmp_path: Path) -> None:
    """A CI job runs `apply --dry-run` before the merge: it exited 0 with "applying would need
    version: 1" (or "would be refused", "split the file") in its output, and the apply after the
    merge failed. It exits 1 now, with the reason as the apply's one-line error, after the diff;
    for every apply command (they share one), and 0 where the apply would write."""
    service = f"dry-web-{uuid.uuid4().hex[:8]}"  # new to this Consul: version 1 once alice applies it
    alice, bob = operator(tmp_path / "alice"), operator(tmp_path / "bob")
    a_file, b_file = route(tmp_path, "a.yaml", 10, service), route(tmp_path, "b.yaml", 50, service)
    assert alice.invoke(cli, ["route", "apply", "-f", a_file, "--consul", consul.url]).exit_code == 0
    any_kind = tmp_path / "any.yaml"
    any_kind.write_text("kind: route\n" + Path(b_file).read_text())
    for command in (["route", "apply", "-f", b_file], ["apply", "-f", str(any_kind)]):
        r = bob.invoke(cli, [*command, "--dry-run", "--consul", consul.url])
        assert r.exit_code == 1, r.output
        assert "+    weight: 50" in r.stdout and f"routes/{service}: dry run, nothing written" in r.stdout
        assert r.stderr == f"Error: routes/{service}: applying would need version: 1 in the file or --force\n"
        forced = bob.invoke(cli, [*command, "--dry-run", "--force", "--consul", consul.url])
        assert forced.exit_code == 0 and "dry run, nothing written" in forced.stdout, forced.output
    live = json.loads(consul.kv_get(doc_key("routes", service)) or b"{}")
    assert (live["version"], live["routes"][0]["to"][1]["weight"]) == (1, 10)


@pytest.mark.consul
def test_global_options_after_the_subcommand(consul: ConsulDev) -> None:
    r = CliRunner().invoke(cli, ["route", "list", "--consul", consul.url, "-o", "json"])
    assert r.exit_code == 0, r.output
    assert isinstance(json.loads(r.stdout), list)
    r = CliRunner().invoke(cli, ["version", "-o", "json"])
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)) == {"client", "compiled", "compiled_modules"}
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


# What a help, `version` or completion run must not import: the Consul client and the document
# code, the CA's cryptography, and every heavy dependency (the agent's, the CA's, the YAML parser).
NOT_FOR_HELP = (
    "asyncio", "ssl", "yaml", "cryptography", "jwt", "httptools", "uvloop", "dns", "re2", "nomad",
    "prometheus_client", "opentelemetry", "asyncio_dgram", "importlib.metadata",
    "hostmesh.registry.consul", "hostmesh.registry.http", "hostmesh.registry.documents",
    "hostmesh.registry.schema", "hostmesh.registry.analysis", "hostmesh.ca.pki", "hostmesh.ca.service",
    "hostmesh.ca.store", "hostmesh.agent.run",
)  # fmt: skip

# Runs in a fresh interpreter through the console script's entry point (hostmesh.agent.cli:main):
# every command line below, one after the other, then which of NOT_FOR_HELP each one loaded first.
HELP_RUNS = """
import json, os, sys
from hostmesh.agent.cli import SUBCOMMANDS, click_root, main
import click

heavy = json.loads(sys.argv[1])
def loaded():
    return {h for h in heavy for m in list(sys.modules) if m == h or m.startswith(h + ".")}

def run(argv, env=None):
    sys.argv = ["hostmesh", *argv]
    os.environ.update(env or {})
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None), (argv, exc.code)
    for k in env or {}:
        del os.environ[k]

first, runs = {}, 0
def help_of(*words):
    global runs
    run([*words, "--help"])  # before the walk below looks into the command: the run is the first to load it
    runs += 1
    for h in loaded() - set(first):
        first[h] = " ".join(["hostmesh", *words, "--help"])

for argv in (["--version"], ["version"], ["version", "-o", "json"]):
    run(argv)
    for h in loaded() - set(first):
        first[h] = " ".join(["hostmesh", *argv])
help_of()
for name in sorted(SUBCOMMANDS):
    help_of(name)
    cmd = click_root().get_command(click.Context(click_root()), name)
    for sub, subcmd in getattr(cmd, "commands", {}).items():
        help_of(name, sub)
        for subsub in getattr(subcmd, "commands", {}):
            help_of(name, sub, subsub)
for words in ("hostmesh ", "hostmesh route ", "hostmesh ca nomad ", "hostmesh route apply --"):
    cword = str(len(words.split()) - (0 if words.endswith(" ") else 1))
    run([], {"_HOSTMESH_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": cword})
    for h in loaded() - set(first):
        first[h] = "completion of " + repr(words)
run([], {"_HOSTMESH_COMPLETE": "bash_source"})
print(json.dumps({"first": first, "runs": runs}), file=sys.stderr)
"""


def test_help_version_and_completion_import_no_command_code() -> None:
    """`hostmesh --help`, every `hostmesh <group> [<command>] --help`, `hostmesh version` and shell
    completion build the click commands only: none of them loads asyncio, YAML, the schema, the
    Consul client or cryptography (what made them take most of a second)."""
    out = subprocess.run(
        [sys.executable, "-c", HELP_RUNS, json.dumps(NOT_FOR_HELP)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stderr.strip().splitlines()[-1])
    assert report["runs"] > 60  # every group's commands were walked, not just the root
    assert report["first"] == {}, f"loaded by (module: first command line): {report['first']}"
    assert "route" in out.stdout and "_HOSTMESH_COMPLETE" in out.stdout  # help and completion did run


def test_help_summaries_are_the_commands_own() -> None:
    root = click_root()
    ctx = click.Context(root)
    for name in SUBCOMMANDS:
        cmd = root.get_command(ctx, name)
        assert cmd is not None
        assert SUMMARIES[name] == cmd.get_short_help_str(limit=200), name


# Every command that prints data, with what it needs in Consul (the route below): each must print the
# same data as JSON and as YAML, with -o given after the subcommand.
DATA_COMMANDS = (
    ("services",),
    ("route", "list"),
    ("route", "get", "out-web"),
    ("route", "history", "out-web"),
    ("policy", "list"),
    ("intention", "list"),
    ("gateway", "list"),
    ("external", "list"),
    ("version",),
)


@pytest.mark.consul
@pytest.mark.parametrize("command", DATA_COMMANDS, ids=" ".join)
def test_every_data_command_honours_output(
    consul: ConsulDev, tmp_path: Path, command: tuple[str, ...]
) -> None:
    runner = operator(tmp_path / "state")
    doc = {"service": "out-web", "routes": [{"to": [{"weight": 100}]}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    applied = runner.invoke(
        cli, ["--consul", consul.url, "route", "apply", "--force", "-f", str(tmp_path / "r.yaml")]
    )
    assert applied.exit_code == 0, applied.output
    parsed = {}
    for fmt in ("json", "yaml"):
        r = runner.invoke(cli, ["--consul", consul.url, *command, "-o", fmt])
        assert r.exit_code == 0, (fmt, r.output)
        parsed[fmt] = json.loads(r.stdout) if fmt == "json" else yaml.safe_load(r.stdout)
        assert isinstance(parsed[fmt], dict | list), (fmt, r.stdout)
    assert parsed["json"] == parsed["yaml"]


def test_output_that_cannot_be_written_is_one_line_not_a_traceback() -> None:
    """A full disk under `hostmesh … > file` (here /dev/full): the command says so and fails."""
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "-m", "hostmesh.agent.cli", "acl", "policy", "operator"],
                             stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 1
    assert out.stderr == "Error: cannot write the output: No space left on device\n"
