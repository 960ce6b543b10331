"""The config an agent runs, handed to a child process over its stdin: one `config …` line.

Workers (agent/workers.py) and the certificate helper (agent/certproc.py) run what the agent runs,
not what agent.toml says by then: an edit that needs a restart, a half-written file, or one the
agent refused on reload would otherwise split the processes, or stop every renewal (the helper
re-read the file, and a refused edit left on disk expired the host's certificates 8 h later).

The line is the agent's own AgentConfig, pickled, base64, behind a checksum of agent/config.py as
this process loaded it: a child started after an upgrade replaced the code under the agent must not
unpickle fields into the wrong places (dataclasses with slots pickle by position). Pickle, because
the bytes come only from the parent's own pipe and are the exact object it runs (restart-only keys
already resolved).

Cost: every agent makes this line at its first renewal, so it is kept small: `_pickle`, the C
pickler `pickle` wraps (0.3 MiB of RSS, most of it the shared library's pages), and CRC-32 from
binascii (loaded already) rather than `pickle` and `hashlib` (0.37 and 0.70 MiB, measured in an
agent). CRC-32 tells two releases' files apart; nothing adversarial reaches it."""

from __future__ import annotations

import base64
import os
from typing import Any

from hostmesh.agent.config import LAYOUT_CODE

try:
    from _pickle import dumps, loads
except ImportError:  # an interpreter without CPython's accelerator
    from pickle import dumps, loads

CONFIG_PREFIX = b"config "
MAX_CONFIG_LINE = 16 * 1024 * 1024  # a pickled AgentConfig is ~1-50 KiB


# agent/config.py as this process loaded it: taken when that module was imported (an agent's start),
# not here, which the agent imports first at its first renewal, after an upgrade may have replaced it
CONFIG_CODE = LAYOUT_CODE


def config_line(config: Any) -> bytes:
    """The `config` line carrying `config`."""
    return CONFIG_PREFIX + CONFIG_CODE + b" " + base64.b64encode(dumps(config)) + b"\n"


def decode_config(line: bytes) -> Any:
    """The config of a `config` line; ValueError when it cannot be this code's (see CONFIG_CODE)."""
    code, _, data = line[len(CONFIG_PREFIX) :].partition(b" ")
    if code != CONFIG_CODE:
        raise ValueError("the agent runs other hostmesh code (upgraded since it started): restart the agent")
    try:
        return loads(base64.b64decode(data))  # the parent's own pipe: see the module docstring
    except Exception as exc:  # truncated or corrupt: the same verdict, in one line
        raise ValueError(f"the agent's config does not decode: {type(exc).__name__}: {exc}") from None


def read_config_line(fd: int = 0) -> tuple[Any, bytes]:
    """A child's first read: the config its parent runs, and any bytes read past its line. Read
    before an event loop starts, straight from `fd`. EOFError when the parent sent nothing."""
    buf = b""
    while b"\n" not in buf:
        chunk = os.read(fd, 65536)
        if not chunk:
            raise EOFError("the agent sent no config")
        if len(buf) > MAX_CONFIG_LINE:
            raise ValueError(f"the agent's first line is longer than {MAX_CONFIG_LINE} bytes")
        buf += chunk
    line, rest = buf.split(b"\n", 1)
    if not line.startswith(CONFIG_PREFIX):
        raise ValueError(f"the agent's first line is not a config: {line[:40]!r}")
    return decode_config(line), rest
