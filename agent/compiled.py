"""Which build of hostmesh is running: the compiled one or pure Python.

The compiled build (HOSTMESH_COMPILE=1 at build time, what the .deb ships; see setup.py) turns the
modules below into C extensions with mypyc; the pure build is the same code run by the interpreter.
A compiled wheel also carries the .py files, and Python imports the extension when both are there,
so what counts is where each module is (or would be) loaded from. This module imports nothing of
hostmesh's: `hostmesh version` must not load the data plane to answer (tests/test_cli_habits.py).
It also gives the compiled modules mypyc's class decorators (`trait`, `mypyc_attr`): mypyc reads them
at build time; at run time, where mypy is not installed (the .deb), they are the identity.
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


# Chosen by profile (py-spy on an L7 pair under wrk load; shares of each agent's samples, which count
# the C calls a line makes, writes and TLS included). Sans-IO: http1 held 17-18 %, normalize 1-1.3 %,
# retry and flags 0.5 %, match 0.2 %; wire frames every mux stream. With those six compiled, the
# connection modules held most of it: http_conn 39-42 %, mux 20-22 %, http_upstream 12 %, http_outbound
# 8 % (caller side), http_inbound 2.5 % (app side; 23 % with what it calls), stream_transport 1-1.6 %
# (39-48 % with what it calls). Compiling them too took pair CPU per keep-alive request from 257-263 to
# 187-208 µs (medians of 6-8 interleaved runs; pure Python 298), for +0.7 MiB idle RSS per agent
# (31.4 -> 32.1, the extension's pages); without stream_transport and http_inbound it was 205-212 µs
# for 0.1-0.2 MiB less (without either alone: within the noise), so they stay. -Os instead of -O3
# saved 0.4 MiB and cost 15 % more CPU. Left to the interpreter: outlier (only with outlier detection),
# and pump (no L7 samples; its classes have interpreted subclasses in edges, inbound and outbound).
# balancer and ratelimit: the outbound picks an instance, takes and gives back a request-limit slot
# and counts the instance's in-flight requests for every L7 request; compiled, its request path took
# ~3,900 fewer instructions per keep-alive request (~104,900 -> ~101,000, callgrind, access-log lines
# left out), for +0.1 MiB settled idle RSS per agent (31.1-31.2 -> 31.3).
# limits (the agent's connection cap): the outbound's L7 path takes and gives back a slot of it for
# every new app connection; interpreted, those were attribute reads and writes of an interpreted
# object (~1,100 instructions per connection of ~50,000, callgrind, `Connection: close`).
# reqstats: the request series' children (agent/metrics.py's were interpreted promtext objects: two to
# six calls and bucket scans per request per agent). RequestMetrics.observe went from 4,100-4,700 to
# 570-690 instructions per request per agent (callgrind, keep-alive GETs; 16,100 -> 2,250 with
# `istio_metrics`), about 3.4 % of each agent's request path.
# setup.py reads this tuple.
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
    "hostmesh.agent.proxy.limits",
    "hostmesh.agent.l7.balancer",
    "hostmesh.agent.l7.ratelimit",
    "hostmesh.agent.reqstats",
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
