"""Previous hostmesh releases, built from this repository's own history for mixed-version tests.

A release is installed into a virtualenv of its own under `.cache/releases/<commit>` (kept between
runs; a fresh machine builds it once, from `git archive` of the commit, with the same package index
as `make venv`). Tests then start agents from that venv beside agents of the working tree.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tests.support import REPO

# Release -> commit. Tags (`v0.1.0`) are not kept by every clone, so the commit is what we build.
RELEASES = {"0.1.0": "0569bee", "0.2.0": "102ce70"}
BUILD_TIMEOUT = 600  # venv + dependencies from the package index on a cold cache


class ReleaseUnavailable(Exception):
    """The commit of a release is not in this clone's history."""


def release_command(version: str) -> list[str]:
    """The `hostmesh` command of `version`, building it on first use."""
    commit = RELEASES[version]
    home = REPO / ".cache" / "releases" / commit
    venv = home / "venv"
    done = home / "complete"
    if not done.exists():
        home.mkdir(parents=True, exist_ok=True)
        with open(home / ".lock", "w") as lock:  # test workers (make unit runs several) may ask at once
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                _build(version, commit, venv)
                done.write_text(commit + "\n")
    return [str(venv / "bin" / "hostmesh")]


def _build(version: str, commit: str, venv: Path) -> None:
    known = subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"], check=False, capture_output=True
    )
    if known.returncode != 0:
        raise ReleaseUnavailable(f"commit {commit} (release {version}) is not in this clone's history")
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "src.tar"
        subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), commit], check=True)
        src = Path(tmp) / "src"
        with tarfile.open(archive) as tar:
            tar.extractall(src, filter="data")
        # A venv's scripts name their interpreter by path, so it is built where it stays; an
        # interrupted build has no `complete` marker and is redone from scratch (--clear). Without a
        # pip of its own: the tests run only its `hostmesh`, and ensurepip's install of pip into it took
        # ~10-15 s of each release's ~35 s on a loaded machine; this venv's pip installs into it instead.
        subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(venv)], check=True)
        pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
        subprocess.run([*pip, "install", "-q", str(src)], check=True, timeout=BUILD_TIMEOUT)


def release_command_or_skip(version: str) -> list[str]:
    """`release_command(version)`, or the calling test skipped with why (a clone without its commit)."""
    import pytest

    try:
        return release_command(version)
    except ReleaseUnavailable as exc:
        pytest.skip(str(exc))
