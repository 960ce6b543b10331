"""The PEP 517 backend of hostmesh: setuptools', plus mypy as a build requirement when the compiled
build is asked for (HOSTMESH_COMPILE=1), so the pure build never downloads a compiler it does not use.
setup.py asks compile_requested() and packs_relocations() too.
"""

from __future__ import annotations

import os
import platform

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 (the other hooks, unchanged)

RELR_GLIBC = (2, 36)  # the first glibc that loads packed relative relocations (DT_RELR)
MYPY = "mypy==2.4.1"  # the mypyc the compiled modules are checked against (pyproject's dev mypy)


def compile_requested() -> bool:
    value = os.environ.get("HOSTMESH_COMPILE", "0").strip()
    if value not in ("0", "1", ""):
        raise SystemExit(f"HOSTMESH_COMPILE must be 0 or 1, not {value!r}")
    return value == "1"


def get_requires_for_build_wheel(config_settings=None):  # type: ignore[no-untyped-def]
    extra = [MYPY] if compile_requested() else []
    return [*_setuptools.get_requires_for_build_wheel(config_settings), *extra]


def packs_relocations() -> bool:
    """Whether the compiled build's libraries get packed relative relocations (setup.py link_flags):
    only where this host's glibc loads them; such a library then needs that glibc where it runs."""
    libc, version = platform.libc_ver()
    have = tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) if libc == "glibc" else ()
    return have >= RELR_GLIBC
