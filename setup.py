"""The optional compiled build: with HOSTMESH_COMPILE=1, mypyc compiles the L7 hot modules into C
extensions and the wheel is platform-specific (cp311-…-linux_x86_64); otherwise (the default, and
every editable install) the wheel is the pure py3-none-any one. Metadata lives in pyproject.toml;
this file only adds the extensions. packaging/backend/hostmesh_build.py adds mypy to the build
requirements when (and only when) the compiled build is asked for.

A compiled wheel still carries every .py file: Python imports the extension when one sits beside the
source (extension loaders come first), so `hostmesh version` tells which build is running.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent / "packaging" / "backend"))
from hostmesh_build import compile_requested, packs_relocations

PACKAGES = {"agent": "agent", "registry": "registry", "ca": "ca"}  # import name part -> source folder
# mypy names the modules `hostmesh.agent.…` through the tree of links with the installed layout that
# `make typecheck` uses (pyproject's mypy_path): the folders are hostmesh.* only by package-dir.
MIRROR = Path(".typecheck")
# Link flags of every extension (setup.py's own, beside mypyc's compile flags). Measured on the bench's
# idle L7 agent (bench.rss, settled; see bench/README.md "The compiled build's library"):
# - the version script keeps only the module init functions (PyInit_*) in the dynamic symbol table:
#   mypyc leaves its ~2,200 functions and tables global, and the loader reads all of their symbols,
#   names and hash table (~170 KiB, resident in every agent); a symbol the library no longer exports
#   is also reached directly, not through the GOT or the PLT. The shims find the library's
#   modules through capsules, never through symbols. (-fvisibility=hidden would do the same at
#   compile time, but GCC then inlines more: +220 KiB of code, all of it resident.)
# - packed relative relocations (DT_RELR, glibc >= 2.36; build-deb.sh then depends on it): the
#   loader reads ~7,600 relocations at load, 24 bytes each (~180 KiB, resident), ~3 KiB packed.
#   Only where the building host's glibc has them: a library built on an older one is linked without.
EXPORTS_MAP = Path(__file__).resolve().parent / "packaging" / "backend" / "mypyc-exports.map"


def link_flags() -> list[str]:
    relr = ["-Wl,-z,pack-relative-relocs"] if packs_relocations() else []
    return [f"-Wl,--version-script={EXPORTS_MAP}", *relr]


MYPYC_FLAGS = [
    # only the compiled modules' own type errors stop the build; third-party packages are absent
    # from the isolated build environment, so an ignore that is needed in the venv may be unused here
    "--follow-imports=silent",
    "--no-warn-unused-ignores",
    "--python-version=3.11",
]


# setup.py also runs for metadata and the sdist (egg_info, dist_info, sdist), before the build
# requirements are installed: mypyc runs only for a command that builds the extensions. Editable
# installs (editable_wheel, develop) are always pure: tests of the source tree run the source.
BUILDS = {"bdist_wheel", "build_ext", "build", "install"}


def extensions() -> list:
    if not compile_requested() or not BUILDS & set(sys.argv[1:]):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        sys.exit("HOSTMESH_COMPILE=1: mypyc (package mypy) is not installed in the build environment")
    top = MIRROR / "hostmesh"
    top.mkdir(parents=True, exist_ok=True)
    for name, folder in PACKAGES.items():
        link = top / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("..", "..", folder), target_is_directory=True)
    modules = runpy.run_path("agent/compiled.py")["MODULES"]  # the runtime's own list (no hostmesh imports)
    paths = [str(MIRROR / Path(*m.split("."))) + ".py" for m in modules]
    built = mypycify(
        [*MYPYC_FLAGS, "--config-file", "pyproject.toml", *paths],
        group_name="hostmesh.agent._compiled",
        target_dir=str(Path("build") / "mypyc-c"),
    )
    for ext in built:
        ext.extra_link_args = [*(ext.extra_link_args or []), *link_flags()]
    return built


setup(ext_modules=extensions())
