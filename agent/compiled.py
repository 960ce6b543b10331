"""Which build of hostmesh is running: the compiled one or pure Python.

The compiled build (HOSTMESH_COMPILE=1 at build time, what the .deb ships; see setup.py) turns the
modules below into C extensions with mypyc; the pure build is the same code run by the interpreter.
A compiled wheel also carries the .py files, and Python imports the extension when both are there,
so what counts is where each module is (or would be) loaded from. This module imports nothing of
hostmesh's: `hostmesh version` must not load the data plane to answer (tests/test_cli_habits.py).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from typing import Any, TypeVar

_T = TypeVar("_T")

try:  # mypyc's class decorators: read at build time, the identity at run time (no mypy installed)
    from mypy_extensions import mypyc_attr, trait
except ImportError:

    def trait(cls: _T) -> _T:
        return cls

    def mypyc_attr(*attrs: str, **kwattrs: object) -> Any:  # type: ignore[misc]
        return lambda cls: cls


# Sans-IO, on every request's (or mux frame's) path, chosen by profile: with py-spy on an L7 pair
# under load, http1 held 17-18 % of each agent's samples, normalize 1-1.3 %, retry and flags 0.5 %,
# match 0.2 %; wire frames every L4 (and mux) stream. balancer, outlier and ratelimit (<= 0.1 %) are
# left to the interpreter: compiling them would not pay. setup.py reads this tuple.
MODULES = (
    "hostmesh.agent.l7.http1",
    "hostmesh.agent.l7.normalize",
    "hostmesh.agent.l7.match",
    "hostmesh.agent.l7.flags",
    "hostmesh.agent.l7.retry",
    "hostmesh.agent.proxy.wire",
    "hostmesh.agent.proxy.http_conn",
    "hostmesh.agent.proxy.http_upstream",
    "hostmesh.agent.proxy.stream_transport",
    "hostmesh.agent.proxy.mux",
    "hostmesh.agent.proxy.http_outbound",
    "hostmesh.agent.proxy.http_inbound",
)


def _origin(name: str) -> str | None:
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__file__", None)
    try:
        spec = importlib.util.find_spec(name)  # imports only the (docstring-only) parent packages
    except ImportError:
        return None
    return spec.origin if spec is not None else None


def compiled_modules() -> list[str]:
    """The modules of MODULES that this interpreter runs (or would run) as compiled extensions."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return [name for name in MODULES if (_origin(name) or "").endswith(suffixes)]
