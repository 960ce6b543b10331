"""hostmesh's installed version, for metrics and build info in every process (agent, CA).

Read from the dist-info folder's name on sys.path: importlib.metadata would cost ~2 MiB of RSS in
every agent (see agent/cli.py, which uses it for `--version` only).
"""

from __future__ import annotations

import os
import sys


def installed_version() -> str:
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.startswith("hostmesh-") and name.endswith(".dist-info"):
                return name[len("hostmesh-") : -len(".dist-info")]
    return "unknown"
