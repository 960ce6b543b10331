"""The optimized bytecode an agent runs from, compiled ahead of it into a cache of its own.

The systemd unit runs the agent with PYTHONOPTIMIZE=2, as `python -OO`: no docstrings or asserts
in memory (the asserts only narrow types). Measured on the bench's idle L7 pair, settled, per
agent: the compiled build 30.6-30.7 -> 29.7-29.9 MiB, the pure one 29.8-29.9 -> 28.9-29.0 MiB.

Neither Debian's python3.11 nor pip ships such bytecode (.opt-2.pyc), and the agent may not write
next to the sources. Compiled by the agent's own process as each module loads, the compiler's
garbage stayed in its heap: 31.2 MiB idle, more than without -OO. So the unit also sets
PYTHONPYCACHEPREFIX (/var/cache/hostmesh/bytecode, systemd's CacheDirectory), and before it loads
anything heavy the agent runs this module in a child process (`prepare`), which compiles what is
missing or stale there: the standard library, hostmesh, and the distributions hostmesh requires
(theirs too; not the extras). ~1-3 s once after an install, an upgrade or a Python update; a stat
and a 16-byte read per file, ~0.1 s, when nothing is. Fresh means what the importer checks: the
source's mtime and size (compileall's own check reads the mtime alone, and a rebuilt package can
keep a file's mtime). What it wrote is synced, so a crash cannot leave a whole header over a short
body, which no later start would redo. The agent then only reads the cache
(PYTHONDONTWRITEBYTECODE=1), and so do its certificate helper and workers, which inherit both
variables; a worker does not prepare again (its primary did, before starting it).

A prepare that fails or runs out of time costs memory, never the start: the agent says so in one
line and compiles what it loads itself (a cache it cannot write is found before anything is
compiled). Without both settings nothing here runs.

The cache is as trusted as the agent's data directory: both belong to the agent's user alone
(mode 0700), and bytecode planted there runs as that user, whose keys are already beside it. The
.deb empties it at every install and upgrade (postinst), so nothing compiled for, or planted under,
the previous release is loaded after it.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys

PREPARE_TIMEOUT = 60.0  # a cold cache takes ~3 s on a loaded 2-core machine; the unit allows 90 s to start
# Parts of the standard library no agent loads (not walked: test/ alone holds ~40 % of its files),
# and trees in it that are not the standard library's
_STDLIB_SKIP = frozenset(
    ("test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
     "dist-packages", "__phello__", "__pycache__")
)  # fmt: skip
_REQUIREMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
WORKER_ENV = "HOSTMESH_WORKER"  # agent/run.py's: set in the environment of a worker process


def prepare() -> None:
    """In the agent, before it loads its modules: have a child compile the cache, when the agent
    runs optimized with a cache prefix; one line on stderr when that fails. A worker process skips
    it: the primary prepared the cache before it started any."""
    if sys.flags.optimize < 2 or not sys.pycache_prefix or os.environ.get(WORKER_ENV):
        return
    args = [sys.executable, "-OO", "-X", f"pycache_prefix={sys.pycache_prefix}", "-m", __name__]
    try:
        done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=PREPARE_TIMEOUT)
    except subprocess.TimeoutExpired:
        problem = f"not done within {PREPARE_TIMEOUT:g} s"
    except OSError as exc:
        problem = f"cannot run {sys.executable}: {exc.strerror}"
    else:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        if done.returncode == 0:
            return
        problem = lines[-1] if lines else f"exit status {done.returncode}"
    print(
        f"hostmesh: the bytecode cache {sys.pycache_prefix} was not prepared ({problem}); "
        "modules compile as they load, which leaves the agent ~1 MiB larger",
        file=sys.stderr,
        flush=True,
    )


def compile_cache(prefix: str) -> list[str]:
    """Compile (optimization 2) into `prefix` every source the agent may load whose bytecode there
    is missing or stale; the sources that did not compile. Raises OSError when `prefix` cannot be
    written (said at once: compiling ~1,200 files only to lose each one took ~3 s)."""
    import importlib.util
    import py_compile
    import sysconfig
    import tempfile

    os.makedirs(prefix, exist_ok=True)
    tempfile.TemporaryFile(dir=prefix).close()
    sources: list[str] = []
    for root, dirs, files in os.walk(sysconfig.get_path("stdlib")):
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP and not d.startswith("config-")]
        sources += [os.path.join(root, name) for name in files if name.endswith(".py")]
    for package in ("hostmesh.agent", "hostmesh.registry", "hostmesh.ca"):
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or ()) if spec else ():
            for root, dirs, files in os.walk(location):
                dirs[:] = [d for d in dirs if d != "__pycache__"]
                sources += [os.path.join(root, name) for name in files if name.endswith(".py")]
    sources += _required_sources()
    failed: list[str] = []
    wrote = False
    for source in sources:
        try:
            if _fresh(source):
                continue
            _compile(source)
            wrote = True
        except (OSError, py_compile.PyCompileError, ValueError):
            if not os.path.isfile(source):
                continue  # listed in a RECORD, not installed (or gone since)
            failed.append(source)
    if wrote:  # a file whose body a crash cut short behind a whole header would never be redone
        os.sync()
    return failed


def _fresh(source: str) -> bool:
    """Its bytecode is there and was compiled from this very source, as the importer decides it
    (magic, timestamp-checked, the source's mtime and size; compileall looks at the mtime only)."""
    import importlib.util

    st = os.stat(source)
    stamp = struct.pack("<III", 0, int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF)
    try:
        with open(importlib.util.cache_from_source(source, optimization=2), "rb") as cached:
            return cached.read(16) == importlib.util.MAGIC_NUMBER + stamp
    except OSError:
        return False


def _compile(source: str) -> None:
    import importlib.util
    import py_compile

    py_compile.compile(
        source, cfile=importlib.util.cache_from_source(source, optimization=2), optimize=2, doraise=True,
        invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP,  # (SOURCE_DATE_EPOCH would pick hashes)
    )  # fmt: skip


def _required_sources() -> list[str]:
    """The .py files of the distributions hostmesh requires, and of theirs (extras left out)."""
    from importlib import metadata

    seen: set[str] = set()
    todo = ["hostmesh"]
    out: list[str] = []
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a requirement this platform does not install (its marker said so)
        for requirement in dist.requires or ():
            match = _REQUIREMENT_NAME.match(requirement)
            if match and "extra ==" not in requirement:
                todo.append(match.group())
        if key != "hostmesh":  # hostmesh's own packages: compiled from where they are imported
            out += [str(f.locate()) for f in dist.files or () if f.suffix == ".py"]
    return out


if __name__ == "__main__":
    if not sys.pycache_prefix:
        sys.exit("no bytecode cache: set PYTHONPYCACHEPREFIX (or -X pycache_prefix)")
    try:
        failed = compile_cache(sys.pycache_prefix)
    except OSError as exc:
        sys.exit(f"cannot write {sys.pycache_prefix}: {exc.strerror or exc}")
    if failed:  # nothing imports them either (a template, a file for another Python): said, not fatal
        print(f"{len(failed)} source(s) did not compile, the first {failed[0]}", file=sys.stderr)
