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
