"""Every command the prose docs show an operator to type exists (a claim in the README that is not
true is a bug; tests/test_reference.py keeps the generated docs/reference/ in step, this the prose).

It reads README.md, ansible/README.md, docs/*.md, bench/README.md and examples/*.md: the lines of
their shell code blocks and their inline code spans. Each `hostmesh ...` must name an existing
subcommand path and only options of the commands it passes (click's params, --help included, as
the CLI's own parser sees them: the root's Consul options may also follow a subcommand); each
`make <target>` a target of the Makefile. Pure: the Markdown and click's command objects, no
Consul and no process per command.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from hostmesh.agent.cli import GLOBAL_OPTIONS, cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted(
    [
        ROOT / "README.md",
        ROOT / "ansible/README.md",
        ROOT / "bench/README.md",
        *ROOT.glob("docs/*.md"),  # not docs/reference/: generated, and checked by test_reference
        *ROOT.glob("examples/*.md"),
    ]
)
SHELL_FENCES = {"", "sh", "bash", "shell", "console"}  # other blocks (toml, yaml, hcl, ini) are files
PLACEHOLDER = "PLACEHOLDER"  # what `<svc>`, `<admin address>` stand for: any one word
ELLIPSES = {"...", "…"}  # "and the rest": no word of its own


def shell_texts(text: str) -> Iterator[tuple[int, str]]:
    """(line number, shell text) of each line of a shell code block, comments cut and `\\`
    continuations joined, and of each inline code span (a span may wrap across lines)."""
    fence, shell = "", False  # the open block's fence, and whether it holds shell
    command, start = "", 0
    paragraph: list[tuple[int, str]] = []
    for n, line in enumerate([*text.splitlines(), ""], 1):
        opening = re.match(r"\s*(```|~~~)\s*(\w*)", line)
        if not fence and opening:
            yield from spans(paragraph)
            paragraph, fence, shell = [], opening[1], opening[2] in SHELL_FENCES
        elif fence and line.strip() == fence:
            fence = ""
        elif fence and shell:
            start = start if command else n
            command += re.sub(r"(^|\s)#.*", "", line).rstrip()  # a comment runs to the line's end
            if command.endswith("\\"):
                command = command[:-1] + " "
            else:
                yield start, command
                command = ""
        elif not fence and line.strip():
            paragraph.append((n, line))
        elif not fence:
            yield from spans(paragraph)
            paragraph = []


def spans(paragraph: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """The inline code spans of one paragraph (`x` or ``x``, as Markdown pairs them)."""
    if not paragraph:
        return
    first, text = paragraph[0][0], "\n".join(line for _, line in paragraph)
    for m in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", text, re.DOTALL):
        yield first + text.count("\n", 0, m.start()), " ".join(m[2].split())


def simple_commands(shell: str) -> Iterator[list[str]]:
    """The words of each simple command of one shell line (split at `|`, `&&`, `;`, ...), without
    redirections, the `$ `, `sudo [-u USER]` and `NAME=value` before the command, and `...`."""
    shell = re.sub(r"<[^<>\s][^<>]*>", PLACEHOLDER, shell)
    lexer = shlex.shlex(shell, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, ""  # comments are cut already; keep a URL's #
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: not a command line (prose, an output sample)
        return
    words: list[str] = []
    redirect = False  # the next word is a redirection's target
    for token in [*tokens, ";"]:
        if re.fullmatch(r"[|&;()]+", token):
            while words and (words[0] in ("sudo", "$") or re.match(r"[A-Za-z_]\w*=", words[0])):
                with_user = words[0] == "sudo" and words[1:2] in (["-u"], ["-g"])
                words = words[3 if with_user else 1 :]
            if words:
                yield words
            words, redirect = [], False
        elif redirect:
            redirect = False
        elif re.fullmatch(r"[<>&]+", token):
            if words and words[-1].isdigit():  # the descriptor of `2>&1`, `2> err`: not a word
                words.pop()
            redirect = True
        elif token not in ELLIPSES:
            words.append(token)


def options(cmd: click.Command, ctx: click.Context) -> dict[str, bool]:
    """The options `cmd` accepts at its place in the command line -> whether one takes a value."""
    own = {
        opt: not (p.is_flag or p.count)
        for p in cmd.get_params(ctx)  # with --help / -h
        if isinstance(p, click.Option)
        for opt in [*p.opts, *p.secondary_opts]
    }
    return own if ctx.parent is None else {**GLOBAL_OPTIONS, **own}  # cli.hoist_global_options


def hostmesh_problem(args: list[str]) -> str | None:
    """What of `hostmesh ARGS` does not exist, or None."""
    cmd: click.Command = cli
    ctx = click.Context(cli, info_name="hostmesh")
    words = iter(args)
    for arg in words:
        if arg == "--":
            return None
        if arg.startswith("-") and arg != "-":
            known = options(cmd, ctx)
            name = arg.split("=", 1)[0]
            if name not in known and arg[:2] in known and not arg.startswith("--"):
                name = arg[:2]  # -ojson
            if name not in known:
                return f"`{ctx.command_path}` has no option {name}"
            if known[name] and name == arg:
                next(words, None)  # its value
        elif isinstance(cmd, click.Group):
            if arg == PLACEHOLDER:
                return None  # `hostmesh <group> --help`: any command
            sub = cmd.get_command(ctx, arg)
            if sub is None:
                return f"`{ctx.command_path}` has no command {arg!r}"
            cmd, ctx = sub, click.Context(sub, parent=ctx, info_name=arg)
    return None


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {t for m in re.finditer(r"^([^\s:=#][^:=]*?)\s*:(?!=)", text, re.M) for t in m[1].split()}


def make_problem(args: list[str], targets: set[str]) -> str | None:
    if {"-C", "-f", "--directory", "--file"} & set(args):
        return None  # another Makefile
    missing = [a for a in args if not a.startswith("-") and "=" not in a and a not in targets]
    return f"the Makefile has no target {', '.join(missing)}" if missing else None


def problems(name: str, text: str) -> list[str]:
    """One line per command of the document `name` (`text`) that names something that does not exist."""
    targets, out = make_targets(), []
    for n, shell in shell_texts(text):
        for words in simple_commands(shell):
            if words[0] == "hostmesh" or words[0].endswith("/bin/hostmesh"):
                problem = hostmesh_problem(words[1:])
            elif words[0] == "make":
                problem = make_problem(words[1:], targets)
            else:
                continue
            if problem:
                out.append(f"{name}:{n}: {shlex.join(words)}: {problem}")
    return out


def test_the_parser_finds_what_an_operator_is_shown() -> None:
    doc = (
        "Run `hostmesh route list -o json` or `hostmesh\nstatus --bogus`, ``hostmesh intention ``.\n"
        "\n"
        "```sh\n"
        "sudo -u consul HOSTMESH_X=1 hostmesh ca token create \\\n"
        "    --service <its service> --ttl 1h > web.token   # a comment, --not-an-option\n"
        "hostmesh route get web 2>&1 | jq . && hostmesh route nope ; make unit lint\n"
        "X=$(hostmesh ca roots --data-dir ...) make flet\n"
        "$ hostmesh status -o yaml --agent=127.0.0.1:15000 ; hostmesh top -ojson --verbose\n"
        "```\n"
        "```toml\n"
        "hostmesh = 'not a command'\n"
        "```\n"
    )
    assert [(n, w) for n, s in shell_texts(doc) for w in simple_commands(s)] == [
        (1, ["hostmesh", "route", "list", "-o", "json"]),
        (1, ["hostmesh", "status", "--bogus"]),
        (2, ["hostmesh", "intention"]),
        (5, ["hostmesh", "ca", "token", "create", "--service", PLACEHOLDER, "--ttl", "1h"]),
        (7, ["hostmesh", "route", "get", "web"]),
        (7, ["jq", "."]),
        (7, ["hostmesh", "route", "nope"]),
        (7, ["make", "unit", "lint"]),
        (8, ["hostmesh", "ca", "roots", "--data-dir"]),
        (8, ["make", "flet"]),
        (9, ["hostmesh", "status", "-o", "yaml", "--agent=127.0.0.1:15000"]),
        (9, ["hostmesh", "top", "-ojson", "--verbose"]),
    ]
    assert problems("doc.md", doc) == [
        "doc.md:1: hostmesh status --bogus: `hostmesh status` has no option --bogus",
        "doc.md:7: hostmesh route nope: `hostmesh route` has no command 'nope'",
        "doc.md:8: make flet: the Makefile has no target flet",
        "doc.md:9: hostmesh top -ojson --verbose: `hostmesh top` has no option --verbose",
    ]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_in_the_docs_exists(doc: Path) -> None:
    found = problems(str(doc.relative_to(ROOT)), doc.read_text())
    assert not found, "commands the docs show that do not exist:\n" + "\n".join(found)
