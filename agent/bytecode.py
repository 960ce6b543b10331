"""The optimized bytecode an agent runs from, compiled ahead of it into a cache it reads.

The systemd unit runs the agent with PYTHONOPTIMIZE=2, as `python -OO`: no docstrings or asserts
in memory (the asserts only narrow types). Measured on the bench's idle L7 pair, settled, per
agent: the compiled build 30.6-30.7 -> 29.7-29.9 MiB, the pure one 29.8-29.9 -> 28.9-29.0 MiB.
It also sets PYTHONNODEBUGRANGES=1, as `python -X no_debug_ranges`: code is compiled without the
column positions of each instruction (PEP 657), which only place the ^^^ markers under the failing
expression of a traceback's line; the line numbers stay. Each code object's line table is smaller:
the compiled build's idle L7 agent 30.20 -> 30.07 MiB (medians of 5 interleaved bench.rss runs,
settled). The cache is compiled as the agent would compile (`prepare` passes the flag on; root's
compile is given it by the unit), for a compiler setting is not part of what makes a .pyc fresh.

Neither Debian's python3.11 nor pip ships such bytecode (.opt-2.pyc), and the agent may not write
next to the sources. Compiled by the agent's own process as each module loads, the compiler's
garbage stayed in its heap: 31.2 MiB idle, more than without -OO. So the unit also sets
PYTHONPYCACHEPREFIX (/var/cache/hostmesh), and this module compiles what is missing or
stale there: the standard library, hostmesh, and the distributions hostmesh requires (theirs too;
not the extras). ~1-3 s once after an install, an upgrade or a Python update; a stat and a 16-byte
read per file, ~0.1 s, when nothing is. Fresh means what the importer checks: the source's mtime
and size (compileall's own check reads the mtime alone, and a rebuilt package can keep a file's
mtime). What it wrote is synced, so a crash cannot leave a whole header over a short body, which
no later start would redo.

Who compiles. Bytecode in the cache runs as whoever loads it: a cache the agent's user could write
would run what was planted there at each start. Under systemd root compiles, before the agent
starts: the unit's `ExecStartPre=-+` runs `python -I -B -X no_debug_ranges -m
hostmesh.agent.bytecode PREFIX` with the agent's interpreter (`compile_for_the_agent`; -I: nothing
loads from the cache before it is checked, -B: nothing is written beside the sources; -X: the
variables' compile setting, which -I ignores). It moves aside and removes a prefix holding
anything not root's alone (the previous releases' cache was the agent's user's: anything in it may
be planted), refuses a prefix below a directory that is missing or another user may write (and
then, as whenever it does not finish, leaves no cache at that path), and leaves the tree root's,
mode 0755/0644: the agent reads it and cannot write it (not a CacheDirectory=, which systemd gives
to the unit's User= at each start; ProtectSystem=strict besides). Then the agent, before it loads
anything heavy, runs this module in a child process as its own user (`prepare`), into its
interpreter's prefix: the same walk, which finds nothing stale and so writes nothing. That check is
kept (~0.2 s a start) because it tells when root's compile did not happen: the child cannot write
what is stale, and the agent logs it. An agent run another way (by hand, in Nomad) with both
variables has that child compile into its prefix, which its user must then be able to write, as
before. The agent only reads the cache (PYTHONDONTWRITEBYTECODE=1), and so do its certificate
helper and workers, which inherit the variables; a worker does not prepare again (its primary did,
before starting it).

A compile that fails or runs out of time costs memory, never the start: root's is bounded below the
unit's start timeout and its failure ignored (the `-`); the agent says so in one line and compiles
what it loads itself (a cache it cannot write is found at the first stale file). Without both
settings nothing here runs. The .deb removes the cache at every install and upgrade (postinst) and
with itself (postrm), so nothing compiled for the previous release is loaded after it.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys

MARKER = ".hostmesh-bytecode"  # in the cache root's compile made: only such a cache (or LEGACY_CACHE)
# is moved or removed by it, never another directory a prefix was pointed at by mistake
# the unit's cache, made without a marker (and the agent's user's) while the unit had CacheDirectory=
LEGACY_CACHE = "/var/cache/hostmesh"
MAX_CACHE_ENTRIES = 100_000  # ~1,300 in a real cache; past this one is not checked further but replaced
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
    if not debug_ranges():  # (-X no_debug_ranges on the agent's command line is not inherited)
        args[2:2] = ["-X", "no_debug_ranges"]
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


def debug_ranges() -> bool:
    """Does this interpreter compile column positions into code (not with -X no_debug_ranges or
    PYTHONNODEBUGRANGES)? The flag is not in sys.flags; a compiled expression tells."""
    return next(iter(compile("0", "<debug ranges>", "eval").co_positions()))[2] is not None


def compile_cache(prefix: str) -> list[str]:
    """Compile (optimization 2) into `prefix` every source the agent may load whose bytecode there
    is missing or stale; the sources that did not compile. Nothing is written when nothing is
    stale, so a cache prepared by root reads fine; raises OSError at the first stale source whose
    bytecode cannot be written (said at once: compiling ~1,200 files only to lose each one took ~3 s)."""
    import importlib.util
    import py_compile
    import sysconfig

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
        except (py_compile.PyCompileError, ValueError):
            failed.append(source)  # not Python 3 (a template, a file for another Python)
        except OSError:
            if not os.path.isfile(source):
                continue  # listed in a RECORD, not installed (or gone since)
            if not os.access(source, os.R_OK):
                failed.append(source)
                continue
            raise  # the source reads: what failed is writing its bytecode
    if wrote:  # a file whose body a crash cut short behind a whole header would never be redone
        os.sync()
    return failed


def compile_for_the_agent(prefix: str) -> list[str]:
    """As root, before the agent starts (the unit's ExecStartPre): compile into `prefix`, a cache
    only root may write and the agent reads, after making sure no other user can have put anything
    there. Run as `python -I -B -X no_debug_ranges -m hostmesh.agent.bytecode PREFIX`: -I, so that
    nothing loads from the cache before it is checked (the unit's PYTHONPYCACHEPREFIX is ignored),
    -B, so that nothing is written beside the sources, and -X no_debug_ranges as the agent's
    PYTHONNODEBUGRANGES=1 (which -I ignores too).

    The directories above `prefix` must exist, be root's (or this user's) and not be writable by
    others unless sticky (/tmp): else OSError. `prefix` itself is taken out of the importer's way
    (renamed) before anything in it is read, and put back only when all of it is root's alone and
    not writable by others; otherwise it is removed and made anew. So whatever stops this midway
    (an error, a kill, the timeout) leaves no unchecked cache at that path. Only a cache this made
    (MARKER), or LEGACY_CACHE, is taken: a prefix pointed at another directory (/var/cache, the
    agent's data dir) is refused, never moved or removed. Refused for the directories above it,
    a cache it may take is removed all the same: the agent reads whatever is at that path."""
    if not os.path.isabs(prefix):
        raise OSError(f"{prefix}: not an absolute path")
    prefix = os.path.normpath(prefix)
    os.umask(0o022)  # the unit's UMask=0077 applies to ExecStartPre=+ too: the agent's user reads all of it
    me = os.geteuid()
    try:
        _check_above(prefix, me, links=True)  # as named (a link's own directory is in this chain) ...
        prefix = os.path.join(os.path.realpath(os.path.dirname(prefix)), os.path.basename(prefix))
        _check_above(prefix, me)  # ... and where it leads: /var/cache on another disk, linked
    except OSError:
        if os.path.lexists(prefix) and _ours_to_take(prefix, me):  # refused: leave the agent nothing
            try:  # to read there (what it reads is the path's); the refusal is what is said
                _remove(_moved_aside(prefix, "untrusted"))
            except OSError as exc:
                print(f"could not move {prefix} aside: {exc.strerror or exc}", file=sys.stderr)
        raise
    _remove_leftovers(prefix)
    if os.path.lexists(prefix):
        if not _ours_to_take(prefix, me):
            raise OSError(
                f"{prefix} is not a bytecode cache hostmesh made (no {MARKER} of root's in it): "
                "point PYTHONPYCACHEPREFIX at a directory of its own"
            )
        checking = _moved_aside(prefix, "checking")
        if _ours_throughout(checking, me):
            os.rename(checking, prefix)
        else:
            _remove(checking)
    if not os.path.lexists(prefix):
        os.mkdir(prefix, 0o755)  # fails if another made it meanwhile: the start goes on without a cache
        _write_marker(prefix)
    sys.pycache_prefix = prefix  # only now: from here on the importer may read it too
    return compile_cache(prefix)


def _check_above(prefix: str, me: int, links: bool = False) -> None:
    """The directories above `prefix`, from /: each there, a directory (or, with `links`, a symbolic
    link, whose target the caller checks), root's (or `me`'s), and not writable by other users
    unless sticky (only an entry's owner may rename or remove it there)."""
    import stat

    path, above = os.path.dirname(prefix), []
    while True:
        above.append(path)
        if path == os.path.dirname(path):
            break
        path = os.path.dirname(path)
    for path in reversed(above):  # from /: the first one others may write is the one to name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise OSError(
                f"{path} does not exist (made by nobody here: another user could make it first)"
            ) from None
        if st.st_uid not in (0, me):  # (a link's owner too: in a sticky directory it may replace it)
            raise OSError(f"{path} belongs to uid {st.st_uid}, who could replace what is below it")
        if links and stat.S_ISLNK(st.st_mode):
            continue  # root's, in a directory checked above: its target is checked by the caller
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(f"{path} is not a directory")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise OSError(f"{path} may be written by other users (mode {stat.S_IMODE(st.st_mode):04o})")


def _ours_to_take(prefix: str, me: int) -> bool:
    """`prefix` may be moved and removed: it holds root's MARKER (this made it), or it is the cache
    of releases whose unit gave it to the agent's user, made without one (LEGACY_CACHE)."""
    import stat

    if prefix == LEGACY_CACHE:
        return True
    try:
        st = os.lstat(os.path.join(prefix, MARKER))
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == me


def _ours_throughout(top: str, me: int) -> bool:
    """`top` is a directory, and it and everything in it (no symbolic link) is `me`'s and not
    writable by others: what root's compile wrote, nothing else. Entry by entry, stopping at the
    first that is not, and at MAX_CACHE_ENTRIES (~1,300 in a real cache: ~10 ms)."""
    import stat

    def ours(st: os.stat_result) -> bool:
        return not stat.S_ISLNK(st.st_mode) and st.st_uid == me and not st.st_mode & 0o022

    try:
        if not ours(os.lstat(top)) or not os.path.isdir(top):
            return False
        todo, seen = [top], 0
        while todo:
            with os.scandir(todo.pop()) as entries:
                for entry in entries:
                    seen += 1
                    if seen > MAX_CACHE_ENTRIES or not ours(entry.stat(follow_symlinks=False)):
                        return False
                    if entry.is_dir(follow_symlinks=False):
                        todo.append(entry.path)
    except OSError:
        return False
    return True


def _moved_aside(prefix: str, why: str) -> str:
    """Rename `prefix` out of the importer's way (a link is moved, not followed); its new name."""
    import time

    aside = f"{prefix}.{why}-{os.getpid()}-{time.time_ns()}"
    os.rename(prefix, aside)
    return aside


def _remove(path: str) -> None:
    """Remove what was taken out of the cache's way, as far as that goes; what is left is named on
    stderr (and removed at the next start, _remove_leftovers). A link is removed, not followed."""
    import shutil

    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)  # (fd-based on Linux: a link inside is removed, not followed)
        else:
            os.unlink(path)
    except Exception as exc:  # e.g. RecursionError on a tree planted thousands of levels deep
        print(f"left {path} (out of the cache's way): {exc.__class__.__name__}: {exc}", file=sys.stderr)


def _remove_leftovers(prefix: str) -> None:
    """What an earlier start took out of the cache's way and could not remove, or left while
    checking (killed midway): `<prefix>.checking-*`, `<prefix>.untrusted-*`."""
    parent, name = os.path.split(prefix)
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for other in names:
        if other.startswith((f"{name}.checking-", f"{name}.untrusted-")):
            _remove(os.path.join(parent, other))


def _write_marker(prefix: str) -> None:
    with open(os.path.join(prefix, MARKER), "w") as f:
        f.write("optimized bytecode for hostmesh's agent, compiled by root (agent/bytecode.py)\n")


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


def main(argv: list[str]) -> None:
    """`python -m hostmesh.agent.bytecode`: the agent's child (prepare), into the interpreter's
    cache prefix; `python -I -B -X no_debug_ranges -m hostmesh.agent.bytecode PREFIX`: root, before
    the agent starts (compile_for_the_agent). One line on stderr and a non-zero exit when nothing
    could be done."""
    if len(argv) > 1:
        sys.exit("usage: python -m hostmesh.agent.bytecode [PREFIX]")
    if argv:
        import signal

        prefix = argv[0]
        # bounded below the unit's TimeoutStartSec=90s, which counts ExecStartPre: the agent starts anyway
        signal.signal(signal.SIGALRM, lambda *_: sys.exit(f"{prefix}: not done within {PREPARE_TIMEOUT:g} s"))
        signal.alarm(int(PREPARE_TIMEOUT))
        compile = compile_for_the_agent
    elif sys.pycache_prefix:
        prefix, compile = sys.pycache_prefix, compile_cache
    else:
        sys.exit("no bytecode cache: set PYTHONPYCACHEPREFIX (or -X pycache_prefix)")
    try:
        failed = compile(prefix)
    except Exception as exc:  # (compile_for_the_agent's refusals are OSError(text): no strerror)
        why = (
            getattr(exc, "strerror", None) or f"{exc}"
            if isinstance(exc, OSError)
            else f"{exc.__class__.__name__}: {exc}"
        )
        sys.exit(f"cannot {'prepare' if argv else 'write'} {prefix}: {why}")
    if failed:  # nothing imports them either (a template, a file for another Python): said, not fatal
        print(f"{len(failed)} source(s) did not compile, the first {failed[0]}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
