"""The `hostmesh` command: one root group whose subcommands live with the package that owns them.

Subcommand modules are imported only when their command runs, so `hostmesh --version` and the
agent's own start-up do not pay for the operator tooling. User mistakes surface as one line on
stderr and a non-zero exit (click's UsageError / ClickException), never as a traceback.

`hostmesh agent run` is what systemd keeps running on every host, so its plain command lines skip
click altogether: `main()` recognises them and starts the agent directly, and the agent's process
never holds click and what it brings (uuid, platform, gettext, its option machinery: ~1.3 MiB of
RSS). Every other command line, `agent run --help` or a typo included, goes to the click tree,
which is built on first use (`cli`, `agent` below are module attributes made on demand).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import click

# command name -> "module:attribute" of a click command or group.
SUBCOMMANDS: dict[str, str] = {
    "ca": "hostmesh.ca.cli:ca",
    "agent": "hostmesh.agent.cli:agent",
    "status": "hostmesh.agent.status:status",
    "route": "hostmesh.registry.cli:route",
    "policy": "hostmesh.registry.cli:policy",
    "gateway": "hostmesh.registry.cli:gateway",
    "external": "hostmesh.registry.cli:external",
    "intention": "hostmesh.agent.check:intention",  # the registry's group plus `intention check`
    "check": "hostmesh.agent.check:check",
    "top": "hostmesh.agent.top:top",
    "ui": "hostmesh.agent.ui:ui",
    "services": "hostmesh.registry.cli:services",
    "acl": "hostmesh.registry.cli:acl",
    "apply": "hostmesh.registry.cli:apply_any",
    "version": "hostmesh.agent.status:version",
}

# `hostmesh --help` lists these instead of importing every subcommand's module (1.4 s -> well under
# 0.3 s); tests/test_cli_habits.py checks each equals the command's own first sentence. The modules
# themselves import their heavy code (asyncio, YAML, the schema, Consul, cryptography) only where a
# command runs, so `hostmesh <group> --help` and completion stay as cheap (the same test file checks).
SUMMARIES: dict[str, str] = {
    "acl": "Consul ACL rules for hostmesh's roles.",
    "agent": "The sidecar agent.",
    "apply": "Apply every document of FILE (route, policy, intention, gateway, external, nomad, by their "
    "kind: field).",
    "ca": "Run and manage the hostmesh certificate authority.",
    "check": "Preflight (Consul and the token's rights, the CA and its pin, agents' readiness, certificates "
    "and Consul sync) and an analysis of the routes, policies, intentions and gateways against the catalog.",
    "external": "Manage external service documents (hostmesh/external/<service> in Consul KV).",
    "gateway": "Manage gateway documents (hostmesh/gateways/<service> in Consul KV).",
    "intention": "Manage intentions: which services may call a service (hostmesh/intentions/<dst>).",
    "policy": "Manage policy documents (hostmesh/policies/<service> in Consul KV).",
    "route": "Manage route documents (hostmesh/routes/<service> in Consul KV).",
    "services": "Mesh services in Consul (meta hostmesh=1): instances, health and version.",
    "status": "What an agent has applied (document versions), and when its certificates expire "
    "(root_id: the root that signed each).",
    "top": "Live per-service traffic from the agents' metrics: request rate, success rate, p50/p99 "
    "latency, TCP connections; services sorted by request rate.",
    "ui": "Serve a live web view of the mesh: service graph with rates, errors and p99, intentions, "
    "agents' config lag behind Consul, certificate expiry.",
    "version": "Print the client's version (and, with --agent, the running agent's).",
}

# Root options that may also follow the subcommand (`hostmesh status -o json`): name -> takes a value.
GLOBAL_OPTIONS: dict[str, bool] = {
    "--consul": True,
    "--token": True,
    "--token-file": True,
    "--ca-file": True,
    "--client-cert": True,
    "--client-key": True,
    "--tls-server-name": True,
    "-o": True,
    "--output": True,
}

DEFAULT_AGENT_CONFIG = Path("/etc/hostmesh/agent.toml")


def default_agent_config() -> Path:
    """/etc/hostmesh/agent.toml, but in a Nomad allocation the task dir's agent.toml: a host's own
    agent.toml (a VM agent on the Nomad client) must never configure an allocation's agent."""
    import os

    if os.environ.get("NOMAD_ALLOC_ID"):
        return Path(os.environ.get("NOMAD_TASK_DIR") or ".") / "agent.toml"
    return DEFAULT_AGENT_CONFIG


def agent_run_config(argv: list[str]) -> Path | None:
    """The agent.toml path of a plain `agent run [--config PATH]` command line (what systemd, workers
    and tests run), else None: click then parses it, with its help and errors (and refuses a global
    Consul option: `agent run` takes agent.toml's and the environment's, see `run_command`)."""
    args = list(argv)
    if args[:2] != ["agent", "run"]:
        return None
    rest = args[2:]
    if not rest:
        return default_agent_config()
    if len(rest) == 2 and rest[0] == "--config":
        value = rest[1]
    elif len(rest) == 1 and rest[0].startswith("--config="):
        value = rest[0].removeprefix("--config=")
    else:
        return None
    return Path(value) if value and not value.startswith("-") else None


def main() -> None:
    config_path = agent_run_config(sys.argv[1:])
    if config_path is None:
        try:
            click_root()(prog_name="hostmesh")
        except OSError as exc:
            if not _echo_failed(exc):
                raise
            _output_error(exc)
        return
    if sys.flags.optimize >= 2 and sys.pycache_prefix:  # the unit's PYTHONOPTIMIZE=2 (agent/bytecode.py)
        prepare_bytecode()
    # No cyclic collections while the agent's modules load (they allocate only long-lived objects;
    # ~12 % of the start's CPU): Agent.start turns it back on, with one full collection, at READY.
    gc.disable()
    from hostmesh.agent.run import AgentStartError
    from hostmesh.agent.run import main as run_agent

    try:
        run_agent(config_path)
    except AgentStartError as exc:  # shown exactly as on the other path
        start_failed(exc)
    except (EOFError, KeyboardInterrupt):  # click's Abort
        import click

        click.echo(file=sys.stderr)
        click.echo("Aborted!", file=sys.stderr)
        sys.exit(1)


def start_failed(exc: Exception) -> NoReturn:
    """Say why the agent cannot start and exit 1: under systemd as one of its log lines, at the error
    priority (registry/logs.py journal_error); elsewhere as click shows every command's error."""
    import click

    from hostmesh.registry import logs

    if not logs.journal_error(str(exc), "hostmesh.agent"):
        click.ClickException(str(exc)).show()
    sys.exit(1)


def prepare_bytecode() -> None:
    """agent/bytecode.py's `prepare` (a child compiles the cache), then that module let go again unless
    something else had loaded it: the agent calls it once, at start, and the rest of the module (the
    compile itself and root's checks, run by that child and the unit's ExecStartPre) held ~40 KiB in
    the agent for its life. Imported here, not at the top, for the same reason."""
    held = "hostmesh.agent.bytecode" in sys.modules
    from hostmesh.agent import bytecode

    bytecode.prepare()
    if not held:
        del sys.modules[bytecode.__name__]
        delattr(sys.modules["hostmesh.agent"], "bytecode")  # the package attribute the import set


def _echo_failed(exc: OSError) -> bool:
    """Was `exc` raised by click.echo writing a command's output (a full disk, a broken terminal)?
    Every command prints through it; any other OSError is the command's own and keeps its traceback."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    frame = tb.tb_frame
    return frame.f_code.co_name == "echo" and frame.f_globals.get("__name__") == "click.utils"


def _output_error(exc: OSError) -> None:
    """One line for a command whose output could not be written (click handles only EPIPE itself)."""
    import click

    # stdout points at /dev/null from here on: the interpreter's flush at exit would fail again
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    with contextlib.suppress(OSError):  # (stderr may be what failed)
        click.echo(f"Error: cannot write the output: {exc.strerror or exc}", err=True)
    sys.exit(1)


def _version() -> str:
    # the dist-info folder's name, as the agent's build info reads it: importlib.metadata (email,
    # zipfile, csv, …) would double what `hostmesh version` imports and cost ~2 MiB of RSS; in an
    # agent (admin.agent_version) the one it started with, not one an upgrade installed since
    from hostmesh.registry.version import release

    found = release()
    return "0+unknown" if found == "unknown" else found  # "unknown": a source tree without an install


def hoist_global_options(root: click.Group, ctx: click.Context, args: list[str]) -> list[str]:
    """Move root options found after the subcommand to the front, unless the command they follow
    defines an option of that name itself (`route get -o yaml` keeps its own `-o`)."""
    import click

    i = 0
    while i < len(args) and args[i].startswith("-"):  # the root's own options come first
        name = args[i].split("=", 1)[0]
        i += 2 if GLOBAL_OPTIONS.get(name) and "=" not in args[i] else 1
    if i >= len(args):
        return args
    head, rest = args[:i], args[i:]
    cmd: click.Command | None = root
    depth = 0
    while isinstance(cmd, click.Group) and depth < len(rest):  # find the command the options belong to
        sub = cmd.get_command(ctx, rest[depth])
        if sub is None:
            break
        cmd, depth = sub, depth + 1
    own: set[str] = set()
    if cmd is not None and cmd is not root:
        for p in cmd.params:
            own.update(getattr(p, "opts", ()))
            own.update(getattr(p, "secondary_opts", ()))
    moved: list[str] = []
    kept: list[str] = rest[:depth]
    j = depth
    while j < len(rest):
        arg = rest[j]
        if arg == "--":
            kept += rest[j:]
            break
        name = arg.split("=", 1)[0]
        if name in GLOBAL_OPTIONS and name not in own:
            takes = GLOBAL_OPTIONS[name] and "=" not in arg
            moved += rest[j : j + (2 if takes else 1)]
            j += 2 if takes else 1
            continue
        kept.append(arg)
        j += 1
    return [*head, *moved, *kept]


@functools.cache
def click_root() -> click.Group:
    """The root group (`hostmesh ...`)."""
    import click

    # A usage mistake (an unknown option, a missing argument) exits 1 like every other error, not
    # click's 2: `intention check` answers 2 for "denied", and a script must not read a typo as that.
    click.UsageError.exit_code = 1

    def print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value and not ctx.resilient_parsing:
            click.echo(f"hostmesh, version {_version()}")
            ctx.exit()

    class LazyGroup(click.Group):
        """A group that imports a subcommand's module only when that subcommand is invoked."""

        def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
            if ctx.parent is None:
                args = hoist_global_options(self, ctx, args)
            return super().parse_args(ctx, args)

        def list_commands(self, ctx: click.Context) -> list[str]:
            return sorted(SUBCOMMANDS)

        def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
            rows = [(name, SUMMARIES.get(name, "")) for name in self.list_commands(ctx)]
            with formatter.section("Commands"):
                formatter.write_dl(rows)

        def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
            target = SUBCOMMANDS.get(cmd_name)
            if target is None:
                return None
            module_name, _, attr = target.partition(":")
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name != module_name:
                    raise
                return None  # the owning package has not implemented this command yet
            command = getattr(module, attr)
            assert isinstance(command, click.Command)
            return command

    @click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
    @click.option(
        "--version",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=print_version,
        help="Show the version and exit.",
    )
    @click.option(
        "--consul",
        "consul_url",
        default=None,
        metavar="URL",
        help="Consul HTTP address [default: $CONSUL_HTTP_ADDR, else http://127.0.0.1:8500].",
    )
    @click.option("--token", default=None, help="Consul ACL token [default: $CONSUL_HTTP_TOKEN].")
    @click.option(
        "--token-file",
        default=None,
        metavar="PATH",
        help="File holding the Consul ACL token [$CONSUL_HTTP_TOKEN_FILE].",
    )
    @click.option(
        "--ca-file",
        default=None,
        metavar="PATH",
        help="CA bundle verifying Consul's HTTPS certificate [$CONSUL_CACERT].",
    )
    @click.option(
        "--client-cert",
        default=None,
        metavar="PATH",
        help="Client certificate for Consul [$CONSUL_CLIENT_CERT].",
    )
    @click.option("--client-key", default=None, metavar="PATH", help="Its private key [$CONSUL_CLIENT_KEY].")
    @click.option(
        "--tls-server-name",
        default=None,
        metavar="NAME",
        help="Name expected in Consul's certificate [$CONSUL_TLS_SERVER_NAME].",
    )
    @click.option(
        "-o",
        "--output",
        type=click.Choice(["table", "json", "yaml"]),
        default="table",
        help="Output format where a command prints data.",
    )
    @click.pass_context
    def cli(
        ctx: click.Context,
        consul_url: str | None,
        token: str | None,
        token_file: str | None,
        ca_file: str | None,
        client_cert: str | None,
        client_key: str | None,
        tls_server_name: str | None,
        output: str,
    ) -> None:
        """hostmesh: a service mesh for VMs, bare metal and Nomad allocations.

        Consul settings: an option here, else the environment (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN,
        CONSUL_HTTP_TOKEN_FILE, CONSUL_CACERT, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY, CONSUL_HTTP_SSL,
        CONSUL_TLS_SERVER_NAME), as Consul's own CLI reads them. `agent run` reads agent.toml's
        [consul] table, then the environment, and refuses these options.
        """
        from hostmesh.registry.consul_settings import ConsulLayer

        ctx.ensure_object(dict)
        ctx.obj["consul"] = ConsulLayer(
            address=consul_url,
            token=token,
            token_file=token_file,
            ca_file=ca_file,
            cert_file=client_cert,
            key_file=client_key,
            tls_server_name=tls_server_name,
        )
        ctx.obj["consul_url"] = consul_url  # the address alone (None: not given); clients use obj["consul"]
        ctx.obj["output"] = output

    return cli


@functools.cache
def click_agent() -> click.Group:
    """`hostmesh agent ...` (the runner itself is hostmesh.agent.run.main)."""
    import click

    @click.group()
    def agent() -> None:
        """The sidecar agent."""

    @agent.command("run")
    @click.option(
        "--config",
        "config_path",
        # readable=False: load_config says why a file cannot be read, in one line, as the plain path
        type=click.Path(path_type=Path, readable=False),
        default=default_agent_config,
        show_default=str(DEFAULT_AGENT_CONFIG),
        help="agent.toml [in a Nomad allocation: $NOMAD_TASK_DIR/agent.toml, which may be absent]",
    )
    @click.pass_context
    def run_command(ctx: click.Context, config_path: Path) -> None:
        """Run the sidecar agent in the foreground (systemd runs it as hostmesh-agent.service)."""
        layer = (ctx.find_root().obj or {}).get("consul")
        given = [
            option
            for option, value in (
                ("--consul", layer.address),
                ("--token", layer.token),
                ("--token-file", layer.token_file),
                ("--ca-file", layer.ca_file),
                ("--client-cert", layer.cert_file),
                ("--client-key", layer.key_file),
                ("--tls-server-name", layer.tls_server_name),
            )
            if value
        ] if layer is not None else []  # fmt: skip
        if given:  # one place for the settings of every process of the agent: its workers and
            # certificate helpers run the config it runs, and a reload reads the file again
            raise click.ClickException(
                "agent run takes its Consul address, token and TLS settings from agent.toml [consul] or "
                "the environment (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_CACERT, …), not from "
                f"{', '.join(given)}"
            )
        prepare_bytecode()  # as main()'s plain `agent run` does (the unit's optimized bytecode)
        from hostmesh.agent.run import AgentStartError
        from hostmesh.agent.run import main as run_agent

        try:
            run_agent(config_path)
        except AgentStartError as exc:
            start_failed(exc)

    @agent.command("wait-ready")
    @click.option(
        "--admin",
        default=None,
        metavar="ADDR",
        help="The agent's admin address [default: 127.0.0.1:$NOMAD_PORT_hostmesh_admin, else the one the "
        "agent wrote to $NOMAD_ALLOC_DIR/hostmesh/admin.addr, else 127.0.0.1:15000].",
    )
    @click.option("--timeout", type=click.FloatRange(min=0), default=60.0, show_default=True, help="Seconds.")
    def wait_ready_command(admin: str | None, timeout: float) -> None:
        """Exit 0 once the agent serves (its /ready is 200), 1 after TIMEOUT: a Nomad prestart task
        (sidecar = false) that holds the app back until its upstream ports accept connections."""
        import os

        from hostmesh.agent.waitready import wait_ready

        ok, detail = wait_ready(admin, os.environ, timeout)
        if not ok:
            raise click.ClickException(f"agent not ready after {timeout:g}s: {detail}")
        click.echo(f"agent at {detail} is ready")

    from hostmesh.agent.check import validate

    agent.add_command(validate)
    return agent


def __getattr__(name: str) -> Any:
    """`cli` (the root group, as tests and `python -m` users know it) and `agent`, built on first use."""
    if name == "cli":
        return click_root()
    if name == "agent":
        return click_agent()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
