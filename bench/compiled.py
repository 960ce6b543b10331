"""The compiled build of this source tree, in a virtualenv of its own, for `make bench` and the tests.

It runs on the interpreter the .deb ships on and depends on, Debian's python3.11 (TARGET_PYTHON, as
packaging/build-deb.sh; installed from the machine's apt sources when missing, as root): what users
run is what the bench measures and the tests test (a self-built CPython differs: bench/README.md).
`pure_venv()` is the pure build (HOSTMESH_COMPILE=0) on the same interpreter, for comparisons.

`compiled_venv()` builds the sdist of a copy of the sources and gets the compiled wheel of it from
packaging/compiled_wheel.py (HOSTMESH_COMPILE=1, setup.py; kept in .cache/compiled-wheels, where
build-deb.sh finds it for the same sources, so `make test` compiles once), then installs the wheel
with its dependencies (from .cache/wheels when there, else the package index) and the test tools
into `.cache/compiled/<key>/venv`. The key is a hash of everything that goes into the wheel and of
the target's version, so an edit of any module builds afresh (a few minutes on a loaded 2-core
machine), and an unchanged tree reuses the venv. Only the newest build is kept.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHES = {"compiled": REPO / ".cache" / "compiled", "pure": REPO / ".cache" / "pure"}  # venvs, by build
WHEELS = REPO / ".cache" / "compiled-wheels"  # packaging/compiled_wheel.py's cache, shared with build-deb.sh
# packaging/build-deb.sh's: held while an sdist is made in this tree (setuptools writes its egg-info here)
SOURCE_TREE_LOCK = REPO / ".cache" / "source-tree.lock"
# the .deb's interpreter, as packaging/build-deb.sh (which TARGET_PYTHON also overrides)
TARGET_PYTHON = os.environ.get("TARGET_PYTHON", "/usr/bin/python3.11")
SOURCES = ("agent", "registry", "ca", "packaging/backend")
# README.md too: the wheel's metadata carries it, so it is in the compiled wheel's key (compiled_wheel.py)
BUILD_FILES = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md")
# what tests/test_compiled_build.py runs the compiled modules' test suites with
TEST_TOOLS = ("pytest>=8", "pytest-timeout>=2.3", "pytest-asyncio>=0.23", "hypothesis>=6.100")
# each step run here (apt, sdist, venv, pip, the wheel helper): above the compile's own bound in
# packaging/compiled_wheel.py (1,200 s), so a compile that runs out says so itself
STEP_TIMEOUT = 1500
ENSURE = REPO / "packaging" / "ensure-tools.sh"


class CompiledBuildError(RuntimeError):
    """The compiled build could not be made; the message says why (e.g. no C compiler)."""


@functools.cache  # asked by missing_compiler (up to twice) and source_key: one run of the interpreter
def _target_config() -> dict[str, str]:
    code = (
        "import json, sys, sysconfig\n"
        "cc = sysconfig.get_config_var('CC') or 'cc'\n"
        "print(json.dumps([cc, sysconfig.get_paths()['include'], sys.version]))"
    )
    out = subprocess.run([TARGET_PYTHON, "-c", code], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise CompiledBuildError(f"{TARGET_PYTHON} does not run: {out.stderr.strip()[-300:]}")
    cc, include, version = json.loads(out.stdout)
    return {"cc": cc, "include": include, "version": version}


def _no_target() -> str | None:
    if not Path(TARGET_PYTHON).exists():
        return f"no {TARGET_PYTHON} (the interpreter the .deb ships on; TARGET_PYTHON names another)"
    return None


def missing_compiler() -> str | None:
    """Why this machine cannot build C extensions for the target interpreter, or None when it can."""
    reason = _no_target()
    if reason:
        return reason
    config = _target_config()
    cc = config["cc"].split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc!r} is not on PATH)"
    header = Path(config["include"]) / "Python.h"
    if not header.exists():
        return f"no Python headers ({header} is missing)"
    return None


def _can_install() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def _debian_python() -> list[str]:
    # python3.11 and python3.11-config: ensure-tools.sh knows Debian's packages for both
    path = Path(TARGET_PYTHON)
    return [path.name, f"{path.name}-config"] if path.parent == Path("/usr/bin") else []


def ensure_target() -> str | None:
    """Why the target interpreter cannot run, or None; installed from apt first when missing, as root."""
    if not Path(TARGET_PYTHON).exists() and _can_install() and _debian_python():
        subprocess.run([str(ENSURE), _debian_python()[0]], timeout=STEP_TIMEOUT)
    return _no_target()


def ensure_compiler() -> str | None:
    """`missing_compiler()`, after installing what is missing from the machine's apt sources when
    run as root (as CI runs): the target interpreter, gcc, and its headers (python3.X-dev)."""
    reason = missing_compiler()
    if reason is None or not _can_install():
        return reason
    tools = ([] if shutil.which("gcc") else ["gcc"]) + _debian_python()
    if tools and subprocess.run([str(ENSURE), *tools], timeout=STEP_TIMEOUT).returncode != 0:
        return f"{reason}; installing {' '.join(tools)} failed"
    return missing_compiler()


def source_key() -> str:
    h = hashlib.sha256()
    files = [REPO / f for f in BUILD_FILES]
    for top in SOURCES:
        files += sorted(p for p in (REPO / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for f in files:
        h.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(_target_config()["version"].encode())
    return h.hexdigest()[:16]


def compiled_venv() -> Path:
    """The venv of the compiled build of this tree, built on first use (see the module docstring)."""
    reason = ensure_compiler()
    if reason:
        raise CompiledBuildError(reason)
    return _venv("compiled")


def pure_venv() -> Path:
    """The venv of the pure build of this tree (HOSTMESH_COMPILE=0) on the same interpreter, built
    on first use (seconds: nothing to compile): what `make bench BENCH_ARGS="--build pure"` and
    `python -m bench.hotpath --compare` set against the compiled build, so that they compare the
    builds, not two interpreters."""
    reason = ensure_target()
    if reason:
        raise CompiledBuildError(reason)
    return _venv("pure")


def compiled_python() -> str:
    return str(compiled_venv() / "bin" / "python")


def pure_python() -> str:
    return str(pure_venv() / "bin" / "python")


def _venv(build: str) -> Path:
    cache = CACHES[build]
    cache.mkdir(parents=True, exist_ok=True)
    key = source_key()
    home = cache / key
    with open(cache / ".lock", "w") as lock:  # the bench and a test run may ask at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (home / "complete").exists():
            _build(home, build)
            (home / "complete").write_text(key + "\n")
            for old in cache.iterdir():
                if old.is_dir() and old != home:
                    shutil.rmtree(old, ignore_errors=True)
    return home / "venv"


def _run(cmd: list[str], env: dict[str, str] | None = None, relay: bool = False) -> str:
    """`cmd`'s stdout; with `relay`, its stderr is passed on (the compiled wheel's helper says there
    whether it built the wheel or reused it)."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=STEP_TIMEOUT)
    if out.returncode != 0:
        tail = (out.stdout + out.stderr).strip().splitlines()[-25:]
        raise CompiledBuildError(f"{' '.join(cmd[:4])} … failed:\n" + "\n".join(tail))
    if relay:
        sys.stderr.write(out.stderr)
    return out.stdout


def _build(home: Path, build: str) -> None:
    shutil.rmtree(home, ignore_errors=True)  # an interrupted build has no `complete` marker
    home.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="hostmesh-compiled-") as tmp:
        # From a copy of what the wheel is built from: a build writes into its tree (egg-info), and
        # `make deb` may be building in this one. The sdist, then the wheel from it, for the target
        # (the copy has no tests/, which the compiled wheel's key leaves out: build-deb.sh's sdist has).
        src = Path(tmp) / "src"
        for name in (*SOURCES, *BUILD_FILES):
            if (REPO / name).is_dir():
                shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, src / name)
        _run([sys.executable, "-m", "build", "--sdist", "--outdir", tmp, str(src)])
        (sdist,) = Path(tmp).glob("hostmesh-*.tar.gz")
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python"]
        if build == "compiled":
            helper = REPO / "packaging" / "compiled_wheel.py"
            wheel = _run(
                [sys.executable, str(helper), str(sdist), TARGET_PYTHON, str(WHEELS)], relay=True
            ).strip()
            tools: tuple[str, ...] = TEST_TOOLS
        else:
            _run([*pip, TARGET_PYTHON, "wheel", "-q", "--no-deps", "-w", tmp, str(sdist)],
                 env={**os.environ, "HOSTMESH_COMPILE": "0"})  # fmt: skip
            (pure,) = Path(tmp).glob("hostmesh-*-py3-none-any.whl")
            wheel, tools = str(pure), ()
        venv = home / "venv"
        # A venv's scripts name their interpreter by path, so it is built where it stays. Without pip,
        # as build-deb.sh: Debian's venv needs python3.11-venv for ensurepip, and this pip (--python)
        # installs into it all the same.
        _run([TARGET_PYTHON, "-m", "venv", "--without-pip", str(venv)])
        wheels = REPO / ".cache" / "wheels"
        _run([*pip, f"{venv}/bin/python", "install", "-q", "--find-links", str(wheels), wheel, *tools])
