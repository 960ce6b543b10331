"""The compiled wheel (HOSTMESH_COMPILE=1, setup.py) of an sdist for one interpreter: built once and
kept in a cache that its two builders share, packaging/build-deb.sh (the .deb) and bench/compiled.py
(`make bench`, tests/test_compiled_build.py), so `make test` compiles the tree once, not once each.
Both build for the interpreter the .deb ships on (TARGET_PYTHON, Debian's /usr/bin/python3.11).

    python packaging/compiled_wheel.py SDIST TARGET_PYTHON CACHE_DIR    # prints the wheel's path

Run by the build frontend's interpreter (it needs pip >= 22.3 for `--python`); the wheel is built
from the sdist, which proves the sdist holds everything the build needs. The key is a hash of the
target's `sys.version` and of the sdist's files except its test files (and egg-info's file list,
which names them): no build step reads them, and bench/compiled.py's sdist, made from a copy of
the tree without them, then has the key of build-deb.sh's. Any other edit builds afresh. A build
goes into `<key>.tmp` and is renamed into place when complete, so an interrupted one is never
used; only the newest wheel is kept.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

BUILD_TIMEOUT = 1200  # mypy + gcc at -O3 on a loaded 2-core machine, plus a cold package download
NOT_IN_WHEEL = ("tests/", "hostmesh.egg-info/SOURCES.txt")  # sdist members no build step reads


def wheel_key(sdist: Path, target_python: str) -> str:
    version = subprocess.run(
        [target_python, "-c", "import sys; print(sys.version)"], capture_output=True, check=True, timeout=60
    ).stdout
    h = hashlib.sha256(version)
    with tarfile.open(sdist) as tar:
        for m in sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name):
            inner = m.name.partition("/")[2]  # without the hostmesh-<version>/ prefix
            if inner.startswith(NOT_IN_WHEEL):
                continue
            data = tar.extractfile(m)
            assert data is not None  # a regular file
            h.update(inner.encode() + b"\0" + data.read() + b"\0")
    return h.hexdigest()[:16]


def log(msg: str) -> None:
    print(f"compiled wheel: {msg}", file=sys.stderr, flush=True)


def compiled_wheel(sdist: Path, target_python: str, cache: Path) -> Path:
    """The compiled wheel of `sdist` for `target_python`: from `cache` when built before, else built."""
    key = wheel_key(sdist, target_python)
    home = cache / key
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:  # `make deb` and a test run may ask at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = sorted(home.glob("hostmesh-*-cp*.whl"))
        if found:
            log(f"reused {found[0]} (key {key}: built earlier from the same sources for {target_python})")
            return found[0]
        partial = cache / f"{key}.tmp"
        shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted build
        start = time.monotonic()
        cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", target_python]
        cmd += ["wheel", "--no-deps", "-w", str(partial), str(sdist)]
        env = {**os.environ, "HOSTMESH_COMPILE": "1"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=BUILD_TIMEOUT)
        if out.returncode != 0:
            tail = (out.stdout + out.stderr).strip().splitlines()[-40:]
            raise RuntimeError("pip wheel (HOSTMESH_COMPILE=1) failed:\n" + "\n".join(tail))
        partial.rename(home)
        for old in cache.iterdir():
            if old.is_dir() and old != home:
                shutil.rmtree(old, ignore_errors=True)
        (wheel,) = home.glob("hostmesh-*-cp*.whl")
        log(f"built {wheel} in {time.monotonic() - start:.0f} s (key {key})")
        return wheel


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python packaging/compiled_wheel.py SDIST TARGET_PYTHON CACHE_DIR")
    try:
        print(compiled_wheel(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])))
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        sys.exit(f"compiled wheel: {exc}")
