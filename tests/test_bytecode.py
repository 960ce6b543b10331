"""agent/bytecode.py: the optimized bytecode cache the systemd unit's agent runs from, compiled by a
real child interpreter into a real directory. (That an agent run so stays within its memory budget
is tests/test_agent_memory.py's; that the unit sets it up, tests/test_systemd_units.py's.)"""

from __future__ import annotations

import importlib.util
import marshal
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import hostmesh.agent.run
from hostmesh.agent import bytecode
from hostmesh.agent.bytecode import WORKER_ENV

CHILD_TIMEOUT = 120  # a cold cache compiles the standard library and the dependencies: ~2-4 s idle


def cached(prefix: Path, source: str) -> Path:
    """Where an optimized (-OO) interpreter with this cache prefix looks for `source`'s bytecode."""
    saved = sys.pycache_prefix
    sys.pycache_prefix = str(prefix)
    try:
        return Path(importlib.util.cache_from_source(source, optimization=2))
    finally:
        sys.pycache_prefix = saved


def prepare(prefix: str) -> subprocess.CompletedProcess[str]:
    """What the agent's main() runs first under the unit's variables."""
    return subprocess.run(
        [sys.executable, "-OO", "-X", f"pycache_prefix={prefix}", "-c",
         "from hostmesh.agent.bytecode import prepare; prepare(); print('started')"],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT,
    )  # fmt: skip


def test_the_agents_modules_and_their_dependencies_are_compiled_once(tmp_path: Path) -> None:
    prefix = tmp_path / "bytecode"
    done = prepare(str(prefix))
    assert done.returncode == 0 and done.stdout == "started\n" and done.stderr == ""
    spec = importlib.util.find_spec("uvloop")
    assert spec is not None and spec.origin is not None
    sources = [
        str(Path(sysconfig.get_path("stdlib")) / "asyncio" / "base_events.py"),  # the standard library
        hostmesh.agent.run.__file__,  # hostmesh, where it is imported from
        str(Path(spec.origin).parent / "__init__.py"),  # a dependency
    ]
    pycs = [cached(prefix, s) for s in sources]
    for pyc in pycs:
        assert pyc.is_file() and pyc.name.endswith(".opt-2.pyc") and prefix in pyc.parents, pyc
    # nothing of the standard library's tests
    test_dir = Path(sysconfig.get_path("stdlib")) / "test"
    assert not cached(prefix, str(test_dir / "__init__.py")).exists()
    # a start with nothing stale rewrites nothing
    before = [p.stat().st_mtime_ns for p in pycs]
    assert prepare(str(prefix)).stdout == "started\n"
    assert [p.stat().st_mtime_ns for p in pycs] == before
    # docstrings are gone from what loads from it
    code = "import hostmesh.agent.run as r; print(r.__doc__)"
    out = subprocess.run(
        [sys.executable, "-OO", "-X", f"pycache_prefix={prefix}", "-c", code],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT,
    )  # fmt: skip
    assert out.stdout == "None\n"


def compile_as_root(prefix: Path) -> subprocess.CompletedProcess[str]:
    """What the unit's ExecStartPre runs as root (here as this user), under the unit's UMask=."""
    return subprocess.run(
        [sys.executable, "-I", "-B", "-m", "hostmesh.agent.bytecode", str(prefix)],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT, umask=0o077,
    )  # fmt: skip


def unwritable(prefix: Path) -> list[str]:
    """Makes `prefix` what root's cache is to the agent, one it reads and cannot write (its tree
    read-only), and returns the command prefix to run the agent so: for root, whom modes do not
    stop, a user namespace (util-linux's unshare), where root's override does not reach the files."""
    for root, _dirs, files in os.walk(prefix):
        for name in files:
            os.chmod(os.path.join(root, name), 0o444)
        os.chmod(root, 0o555)
    if os.geteuid() != 0:
        return []
    probe = ["unshare", "--user", "sh", "-c", f"! touch {prefix}/probe 2>/dev/null"]
    if shutil.which("unshare") is None or subprocess.run(probe, timeout=CHILD_TIMEOUT).returncode != 0:
        pytest.skip("root cannot give up writing the cache here: no unshare --user")
    return ["unshare", "--user"]


def test_the_cache_has_column_positions_only_where_the_agent_would_compile_them(tmp_path: Path) -> None:
    """The unit's PYTHONNODEBUGRANGES=1, or -X no_debug_ranges, which a child does not inherit: the
    cache holds what the agent itself would compile, with or without its code's column positions."""
    for flags, columns in ((["-X", "no_debug_ranges"], False), ([], True)):
        prefix = tmp_path / f"columns-{columns}"
        done = subprocess.run(
            [sys.executable, "-OO", *flags, "-X", f"pycache_prefix={prefix}", "-c",
             "from hostmesh.agent.bytecode import prepare; prepare()"],
            capture_output=True, text=True, timeout=CHILD_TIMEOUT,
        )  # fmt: skip
        assert done.returncode == 0 and done.stderr == "", done.stderr
        code = marshal.loads(cached(prefix, hostmesh.agent.run.__file__).read_bytes()[16:])
        assert any(p[2] is not None for p in code.co_positions()) is columns


def test_the_agent_reads_roots_cache_without_a_word(tmp_path: Path) -> None:
    """Under systemd root compiles the cache (ExecStartPre) and the agent may not write it: its own
    prepare finds nothing stale, says nothing, and its modules load optimized from that cache."""
    prefix = tmp_path / "hostmesh"  # as the unit's /var/cache/hostmesh
    done = compile_as_root(prefix)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert stat.S_IMODE(prefix.stat().st_mode) == 0o755  # the agent's user reads it (UMask=0077 in the unit)
    pyc = cached(prefix, hostmesh.agent.run.__file__)
    assert stat.S_IMODE(pyc.stat().st_mode) == 0o644 and stat.S_IMODE(pyc.parent.stat().st_mode) == 0o755
    code = (
        "from hostmesh.agent.bytecode import prepare; prepare()\n"
        "import hostmesh.agent.run as r; print(r.__doc__, r.__cached__)"
    )
    agent = subprocess.run(
        [*unwritable(prefix), sys.executable, "-OO", "-X", f"pycache_prefix={prefix}", "-c", code],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT,
    )  # fmt: skip
    assert agent.returncode == 0 and agent.stderr == "", agent.stderr
    assert agent.stdout == f"None {pyc}\n"


def test_roots_compile_replaces_a_cache_another_user_could_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache of a unit with CacheDirectory= (/var/cache/hostmesh, made without a marker)
    belonged to the agent's user, who may have planted bytecode in it: root's compile removes it all
    and compiles anew into a directory of its own. (In process, the legacy path pointed here.)"""
    if os.geteuid() != 0:
        pytest.skip("giving the cache to another user needs root")
    from hostmesh.agent import bytecode

    prefix = tmp_path / "hostmesh"
    planted = cached(prefix, hostmesh.agent.run.__file__)
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"planted")
    for path in (prefix, *prefix.rglob("*")):
        os.chown(path, 65534, 65534)
    monkeypatch.setattr(bytecode, "LEGACY_CACHE", str(prefix))
    monkeypatch.setattr(bytecode, "compile_cache", lambda prefix: [])  # (the compile itself: above)
    monkeypatch.setattr(sys, "pycache_prefix", sys.pycache_prefix)
    umask = os.umask(0o022)
    try:
        assert bytecode.compile_for_the_agent(str(prefix)) == []
    finally:
        os.umask(umask)
    assert prefix.stat().st_uid == 0 and not planted.exists()
    assert [p.name for p in prefix.iterdir()] == [".hostmesh-bytecode"]
    assert [p.name for p in tmp_path.iterdir()] == ["hostmesh"]


def test_roots_compile_takes_only_its_own_cache_or_the_legacy_one(tmp_path: Path) -> None:
    """A prefix named like hostmesh's directories but not its cache (its data dir, the CA's) is
    refused, its files kept: any name beginning with hostmesh was taken (review 3, F2)."""
    for name in ("hostmesh-ca", "hostmesh"):
        keys = tmp_path / name
        keys.mkdir()
        (keys / "root.key").write_text("a key")
        done = compile_as_root(keys)
        assert done.returncode == 1 and "is not a bytecode cache hostmesh made" in done.stderr, done.stderr
        assert (keys / "root.key").read_text() == "a key"


def test_refused_for_a_directory_above_it_roots_compile_still_removes_its_cache(tmp_path: Path) -> None:
    """Refused (here a directory above the cache others may write), root's compile left the cache
    it may take where the agent reads it (review 3, F1)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    prefix = shared / "hostmesh"
    assert compile_as_root(prefix).returncode == 0  # root's own, marked
    shared.chmod(0o777)
    done = compile_as_root(prefix)
    assert done.returncode == 1 and f"{shared} may be written by other users" in done.stderr
    assert list(shared.iterdir()) == []


def test_roots_compile_replaces_a_cache_with_anything_of_another_users_inside(tmp_path: Path) -> None:
    """A directory of the agent's user inside root's cache (or a symbolic link) could hold bytecode
    it planted: the whole cache is moved aside and made again, not only its top checked."""
    if os.geteuid() != 0:
        pytest.skip("giving part of the cache to another user needs root")
    prefix = tmp_path / "cache"  # not named for hostmesh: taken for the marker root's compile left
    assert compile_as_root(prefix).returncode == 0 and (prefix / ".hostmesh-bytecode").stat().st_uid == 0
    planted = cached(prefix, hostmesh.agent.run.__file__)
    os.chown(planted.parent, 65534, 65534)
    # the importer's header of the real one (fresh for its source), then the planter's code
    evil = planted.read_bytes()[:16] + marshal.dumps(compile("raise SystemExit('planted')", "x", "exec"))
    planted.unlink()
    planted.write_bytes(evil)
    os.chown(planted, 65534, 65534)
    done = compile_as_root(prefix)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert planted.stat().st_uid == 0 and planted.read_bytes() != evil
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # nothing left aside


def test_roots_compile_takes_no_cache_it_did_not_make_and_checks_nothing_in_place(tmp_path: Path) -> None:
    """A prefix pointed at a shared directory (here one with another program's files, as /var/cache)
    is refused and left as it is: root removed it, being not root's alone (review 2, F2). A
    directory above the prefix that does not exist is refused too (another user could make it
    first). A cache is checked out of the importer's way: one left by a start killed midway
    (`<prefix>.checking-*`) is removed by the next."""
    shared = tmp_path / "cache"
    (shared / "man").mkdir(parents=True)
    (shared / "man" / "index.db").write_text("another program's")
    done = compile_as_root(shared)
    assert done.returncode == 1 and "is not a bytecode cache hostmesh made" in done.stderr, done.stderr
    assert (shared / "man" / "index.db").read_text() == "another program's"
    missing = compile_as_root(tmp_path / "none" / "hostmesh")
    assert missing.returncode == 1
    why = "does not exist (made by nobody here: another user could make it first)"
    assert missing.stderr.endswith(f"{tmp_path / 'none'} {why}\n"), missing.stderr
    prefix = tmp_path / "hostmesh"
    (tmp_path / "hostmesh.checking-1-2" / "deep").mkdir(parents=True)  # a killed start's
    assert compile_as_root(prefix).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "hostmesh"]
    assert not (tmp_path / "hostmesh.checking-1-2").exists()


def test_a_compile_stopped_while_it_checks_the_cache_leaves_none_to_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped (its 60 s alarm, an OOM kill, the unit's timeout) while it checked a cache in place,
    root's compile left that unchecked cache for the agent to read (review 2, F1): it checks it out
    of the importer's way. Here the check is stopped by the alarm's SystemExit."""
    from hostmesh.agent import bytecode

    prefix = tmp_path / "hostmesh"
    prefix.mkdir()
    (prefix / ".hostmesh-bytecode").write_bytes(b"")  # (root's: one it made)
    (prefix / "planted.opt-2.pyc").write_bytes(b"")

    def stopped(top: str, me: int) -> bool:
        assert not prefix.exists()  # what the agent would read is already out of the way
        raise SystemExit("not done within 60 s")

    monkeypatch.setattr(bytecode, "_ours_throughout", stopped)
    umask = os.umask(0o022)
    try:
        with pytest.raises(SystemExit):
            bytecode.compile_for_the_agent(str(prefix))
    finally:
        os.umask(umask)
    assert not prefix.exists()
    (aside,) = tmp_path.glob("hostmesh.checking-*")
    monkeypatch.undo()
    assert compile_as_root(prefix).returncode == 0  # the next start removes what was left, and compiles
    assert [p.name for p in tmp_path.iterdir()] == ["hostmesh"] and not aside.exists()
    assert not (prefix / "planted.opt-2.pyc").exists()


def test_roots_compile_follows_a_link_above_the_cache_only_where_nobody_else_may_change_it(
    tmp_path: Path,
) -> None:
    """/var/cache moved to another disk and linked: the cache is compiled where the link leads, the
    directories on both ways checked (it refused any link: review 2, suspected 2). A link in a
    directory others may write is refused: they could point it elsewhere."""
    (tmp_path / "disk").mkdir()
    (tmp_path / "cache").symlink_to(tmp_path / "disk")
    done = compile_as_root(tmp_path / "cache" / "hostmesh")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert (tmp_path / "disk" / "hostmesh" / ".hostmesh-bytecode").is_file()
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "cache").symlink_to(tmp_path / "disk")
    shared.chmod(0o777)
    refused = compile_as_root(shared / "cache" / "hostmesh")
    assert refused.returncode == 1 and f"{shared} may be written by other users" in refused.stderr
    if os.geteuid() == 0:  # a link another user made in a sticky directory: theirs to re-point (review 3, F3)
        sticky = tmp_path / "sticky"
        sticky.mkdir()
        (sticky / "cache").symlink_to(tmp_path / "disk")
        os.chown(sticky / "cache", 65534, 65534, follow_symlinks=False)
        sticky.chmod(0o1777)
        theirs = compile_as_root(sticky / "cache" / "hostmesh")
        assert theirs.returncode == 1 and f"{sticky / 'cache'} belongs to uid 65534" in theirs.stderr


@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_roots_compile_refuses_a_cache_below_a_directory_others_write(tmp_path: Path, mode: int) -> None:
    """Whoever may write a directory above the cache may swap the cache for one of theirs."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    done = compile_as_root(shared / "hostmesh")
    assert done.returncode == 1 and not (shared / "hostmesh").exists()
    why = f"{shared} may be written by other users (mode {mode:04o})"
    assert done.stderr == f"cannot prepare {shared}/hostmesh: {why}\n"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/dev/null is not a directory")
def test_a_cache_that_cannot_be_written_costs_a_line_not_the_start() -> None:
    done = prepare("/dev/null/bytecode")
    assert done.returncode == 0 and done.stdout == "started\n"
    (line,) = done.stderr.splitlines()
    assert line.startswith("hostmesh: the bytecode cache /dev/null/bytecode was not prepared (cannot write")
    assert line.endswith("modules compile as they load, which leaves the agent ~1 MiB larger")


def test_nothing_runs_without_both_settings_nor_in_a_worker(tmp_path: Path) -> None:
    never = f"pycache_prefix={tmp_path / 'never'}"
    for flags, env in (
        (["-X", never], {}),  # not optimized
        (["-OO"], {}),  # no cache
        (["-OO", "-X", never], {WORKER_ENV: "1"}),  # a worker: its primary prepared the cache
    ):
        done = subprocess.run(
            [sys.executable, *flags, "-c", "from hostmesh.agent.bytecode import prepare; prepare()"],
            capture_output=True, text=True, timeout=CHILD_TIMEOUT, env={**os.environ, **env},
        )  # fmt: skip
        assert done.returncode == 0 and done.stderr == ""
    assert not (tmp_path / "never").exists()
    assert WORKER_ENV == hostmesh.agent.run.WORKER_ENV


def test_bytecode_is_fresh_only_for_the_very_source_it_was_compiled_from(tmp_path: Path) -> None:
    """compileall's own check reads the source's mtime only: a source rewritten under the same mtime
    (a package rebuilt with its files' dates clamped) kept its old bytecode. Size counts too here,
    as it does for the importer."""
    source = tmp_path / "mod.py"
    source.write_text("VALUE = 1\n")
    saved = sys.pycache_prefix
    sys.pycache_prefix = str(tmp_path / "bytecode")
    try:
        assert not bytecode._fresh(str(source))
        bytecode._compile(str(source))
        assert bytecode._fresh(str(source))
        stamp = source.stat().st_mtime_ns
        source.write_text("VALUE = 22\n")  # another size, the same mtime
        os.utime(source, ns=(stamp, stamp))
        assert not bytecode._fresh(str(source))
        bytecode._compile(str(source))
        assert bytecode._fresh(str(source))
    finally:
        sys.pycache_prefix = saved


def test_a_source_that_does_not_compile_is_skipped_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dependency may ship a file no Python 3 compiles (nothing imports it either): the others are
    compiled all the same. (py_compile raises its own error type, not SyntaxError.)"""
    bad, good = tmp_path / "bad.py", tmp_path / "good.py"
    bad.write_text("print 'python 2'\n")
    good.write_text("VALUE = 1\n")
    monkeypatch.setattr(bytecode, "_required_sources", lambda: [str(bad), str(good)])
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "bytecode"))
    assert bytecode.compile_cache(str(tmp_path / "bytecode")) == [str(bad)]
    assert bytecode._fresh(str(good)) and not bytecode._fresh(str(bad))
