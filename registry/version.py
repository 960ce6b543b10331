"""hostmesh's installed version, for metrics and build info in every process (agent, CA).

Read from the dist-info folder's name on sys.path: importlib.metadata would cost ~2 MiB of RSS in
every agent (see agent/cli.py, which uses it for `--version` only).
"""

from __future__ import annotations

import functools
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


@functools.cache
def release() -> str:
    """This process's release: the installed version when first asked, then the same for the
    process's life. An upgrade replaces the dist-info folder under a running agent, which still runs
    the code it loaded: asked again, installed_version() names the new release, and the Ansible role
    (which restarts an agent whose /v1/version differs from the installed `hostmesh --version`) found
    an agent of the old release current. The agent asks at its start (agent/run.py)."""
    return installed_version()
