"""Pure tier: the config line the primary sends its workers (agent/workers.py): what the worker
runs, and the one-line refusal of a line it cannot trust to decode into this code's config."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hostmesh.agent.config import parse_config
from hostmesh.agent.configwire import CONFIG_CODE, CONFIG_PREFIX, config_line, decode_config

RAW = {"ca": {"pin": "sha256:" + "ab" * 32}, "workers": 2, "services": [{"name": "web", "port": 8080}]}


def test_a_worker_decodes_exactly_the_config_its_primary_runs() -> None:
    config = parse_config(RAW)
    line = config_line(config)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_config(line.strip()) == config


@pytest.mark.parametrize(
    "line, says",
    [
        (CONFIG_PREFIX + b"0123456789abcdef " + b"gASV", "the agent runs other hostmesh code"),
        (CONFIG_PREFIX + CONFIG_CODE + b" gASVnot-a-pickle", "the agent's config does not decode"),
    ],
    ids=["other-code", "corrupt"],
)
def test_a_line_from_other_code_or_corrupt_is_a_one_line_refusal(line: bytes, says: str) -> None:
    """A worker started after an upgrade replaced the code under a running primary (slotted
    dataclasses unpickle by position: fields would land in the wrong places, silently)."""
    with pytest.raises(ValueError, match=says):
        decode_config(line)


def test_the_code_a_config_line_names_is_the_one_loaded_at_start_not_the_file_on_disk_later() -> None:
    """The certificate helper's parent imports agent/configwire.py first at its first renewal: read
    then, the checksum was of whatever an upgrade had put on disk since the start, so a helper of the
    new code took the old agent's pickled config as its own and read fields into the wrong places."""
    code = (
        "import pathlib, hostmesh.agent.config as loaded\n"
        "pathlib.Path.read_bytes = lambda self: b'# an upgrade replaced this file'\n"  # the file changes
        "import hostmesh.agent.configwire as wire\n"
        "print(wire.CONFIG_CODE == loaded.LAYOUT_CODE)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "True"


# A stand-in for a worker's end of the pipe (a real process and real pipes; the real worker cannot be
# made to answer 16 MiB cheaply): its first metrics answer is one line longer than MAX_LINE.
OVERSIZED_WORKER = """
import sys
first = True
while line := sys.stdin.buffer.readline():
    cmd, tag = line.split()
    if cmd == b"metrics" and first:
        first = False
        sys.stdout.buffer.write(tag + b" [" + b"0," * (int(sys.argv[1]) // 2) + b"0]\\n")
    elif cmd == b"metrics":
        sys.stdout.buffer.write(tag + b" []\\n")
    else:
        sys.stdout.buffer.write(tag + b" pong\\n")
    sys.stdout.buffer.flush()
"""


def test_an_answer_past_the_line_limit_is_skipped_and_the_pipe_serves_on() -> None:
    """The question-and-answer on a worker's pipe (WorkerSet._ask, scrapes and pings alike) let the
    reader's ValueError for a line past MAX_LINE escape: /metrics failed, and a ping that read such a
    late answer ended the primary's pings for good (a stuck worker was then never replaced)."""
    import asyncio
    from pathlib import Path

    from hostmesh.agent.workers import MAX_LINE, WorkerSet, WorkerState

    async def run() -> tuple[list[list[object]], list[list[object]], bytes | None]:
        workers = WorkerSet(Path("agent.toml"), None, 2, 0)
        w = workers.workers[0]
        w.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", OVERSIZED_WORKER, str(MAX_LINE),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=MAX_LINE,
        )  # fmt: skip
        w.state = WorkerState.SERVING
        w.last = [("hostmesh_x", "counter", "", "hostmesh_x_total", {}, 7.0)]
        try:
            oversized = await workers.samples()  # its last samples stand in
            after = await workers.samples()  # the rest of the long line skipped, this one answered
            pong = await workers._ask(w, "ping", 5)
        finally:
            w.proc.kill()
            await w.proc.wait()
        return oversized, after, pong

    oversized, after, pong = asyncio.run(run())
    assert oversized[0] == [("hostmesh_x", "counter", "", "hostmesh_x_total", {}, 7.0)]
    assert after[0] == []
    assert pong == b"pong\n"
