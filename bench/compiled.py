"""The compiled build of this source tree, in a virtualenv of its own, for `make bench` and the tests.

`compiled_venv()` builds the sdist and, from it, the compiled wheel (HOSTMESH_COMPILE=1, setup.py),
and installs the wheel with its dependencies (from .cache/wheels when there, else the package index)
and the test tools into `.cache/compiled/<key>/venv`. The key is a hash of everything that goes
into the wheel, so an edit of any module builds afresh (a few minutes on a loaded 2-core machine),
and an unchanged tree reuses the venv. Only the newest build is kept.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "compiled"
SOURCES = ("agent", "registry", "ca", "packaging/backend")
BUILD_FILES = ("setup.py", "pyproject.toml", "MANIFEST.in")  # README.md too, but no code reads it
# what tests/test_compiled_build.py runs the compiled modules' test suites with
TEST_TOOLS = ("pytest>=8", "pytest-timeout>=2.3", "pytest-asyncio>=0.23", "hypothesis>=6.100")
BUILD_TIMEOUT = 1200  # mypy + gcc at -O3 on a loaded 2-core machine, plus a cold package download


class CompiledBuildError(RuntimeError):
    """The compiled build could not be made; the message says why (e.g. no C compiler)."""


def missing_compiler() -> str | None:
    """Why this machine cannot build C extensions for this interpreter, or None when it can."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc!r} is not on PATH)"
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.exists():
        return f"no Python headers ({header} is missing)"
    return None


def ensure_compiler() -> str | None:
    """`missing_compiler()`, after installing what is missing from the machine's apt sources when
    run as root (as CI runs): gcc, and the headers of a Debian interpreter (python3.X-dev)."""
    reason = missing_compiler()
    if reason is None or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return reason
    tools = [] if shutil.which("gcc") else ["gcc"]
    include = sysconfig.get_paths()["include"]
    if include.startswith("/usr/include/python3") and not (Path(include) / "Python.h").exists():
        tools.append(f"python{sysconfig.get_python_version()}-config")  # in python3.X-dev
    ensure = REPO / "packaging" / "ensure-tools.sh"
    if tools and subprocess.run([str(ensure), *tools], timeout=BUILD_TIMEOUT).returncode != 0:
        return f"{reason}; installing {' '.join(tools)} failed"
    return missing_compiler()


def source_key() -> str:
    h = hashlib.sha256()
    files = [REPO / f for f in BUILD_FILES]
    for top in SOURCES:
        files += sorted(p for p in (REPO / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for f in files:
        h.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def compiled_venv() -> Path:
    """The venv of the compiled build of this tree, built on first use (see the module docstring)."""
    reason = ensure_compiler()
    if reason:
        raise CompiledBuildError(reason)
    CACHE.mkdir(parents=True, exist_ok=True)
    key = source_key()
    home = CACHE / key
    with open(CACHE / ".lock", "w") as lock:  # the bench and a test run may ask at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (home / "complete").exists():
            _build(home)
            (home / "complete").write_text(key + "\n")
            for old in CACHE.iterdir():
                if old.is_dir() and old != home:
                    shutil.rmtree(old, ignore_errors=True)
    return home / "venv"


def compiled_python() -> str:
    return str(compiled_venv() / "bin" / "python")


def _run(cmd: list[str], **kw: object) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT, **kw)  # type: ignore[call-overload]
    if out.returncode != 0:
        tail = (out.stdout + out.stderr).strip().splitlines()[-25:]
        raise CompiledBuildError(f"{' '.join(cmd[:4])} … failed:\n" + "\n".join(tail))


def _build(home: Path) -> None:
    shutil.rmtree(home, ignore_errors=True)  # an interrupted build has no `complete` marker
    home.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="hostmesh-compiled-") as tmp:
        # From a copy of what the sdist holds: a build writes into its tree (egg-info), and `make deb`
        # may be building in this one. The sdist, then the wheel from it (`python -m build` without
        # --sdist/--wheel; given both, it would build the wheel in the tree, with what build/ holds).
        src = Path(tmp) / "src"
        for name in (*SOURCES, *BUILD_FILES, "README.md"):
            if (REPO / name).is_dir():
                shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, src / name)
        env = {**os.environ, "HOSTMESH_COMPILE": "1"}
        _run([sys.executable, "-m", "build", "--outdir", tmp, str(src)], env=env)
        (wheel,) = Path(tmp).glob("hostmesh-*-cp*.whl")
        venv = home / "venv"
        # a venv's scripts name their interpreter by path, so it is built where it stays
        _run([sys.executable, "-m", "venv", str(venv)])
        wheels = REPO / ".cache" / "wheels"
        _run(
            [
                str(venv / "bin" / "pip"),
                "install",
                "-q",
                "--find-links",
                str(wheels),
                str(wheel),
                *TEST_TOOLS,
            ],
        )
