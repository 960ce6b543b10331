"""The `hostmesh` command: one root group whose subcommands live with the package that owns them.

Subcommand modules are imported only when their command runs, so `hostmesh --version` and the
agent's own start-up do not pay for the operator tooling. User mistakes surface as one line on
stderr and a non-zero exit (click's UsageError / ClickException), never as a traceback.
"""

from __future__ import annotations

import importlib

import click

# command name -> "module:attribute" of a click command or group.
SUBCOMMANDS: dict[str, str] = {
    "ca": "hostmesh.ca.cli:ca",
    "agent": "hostmesh.agent.run:agent",
    "status": "hostmesh.agent.status:status",
    "route": "hostmesh.registry.cli:route",
    "policy": "hostmesh.registry.cli:policy",
    "intention": "hostmesh.registry.cli:intention",
    "services": "hostmesh.registry.cli:services",
}


def _version() -> str:
    # importlib.metadata (email, zipfile, csv, …) costs ~2 MiB of RSS: loaded for --version only
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hostmesh")
    except PackageNotFoundError:  # running from a source tree without an install
        return "0+unknown"


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"hostmesh, version {_version()}")
        ctx.exit()


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when that subcommand is invoked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

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
    callback=_print_version,
    help="Show the version and exit.",
)
@click.option(
    "--consul",
    "consul_url",
    envvar="CONSUL_HTTP_ADDR",
    default="http://127.0.0.1:8500",
    show_default=True,
    help="Consul HTTP address (default $CONSUL_HTTP_ADDR).",
)
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json", "yaml"]),
    default="table",
    help="Output format where a command prints data.",
)
@click.pass_context
def cli(ctx: click.Context, consul_url: str, output: str) -> None:
    """hostmesh: a service mesh for VMs, bare metal and Nomad allocations."""
    ctx.ensure_object(dict)
    ctx.obj["consul_url"] = consul_url
    ctx.obj["output"] = output


def main() -> None:
    cli(prog_name="hostmesh")


if __name__ == "__main__":
    main()
