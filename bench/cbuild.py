"""The bench's C helpers, built with the system C compiler at first use and kept in `.cache/bench-c/`.

bench/pace.c (the fixed-rate client of (d)) and bench/allocount.c (`make profile`'s allocator
counter) are each one file with no dependency beyond libc; each build is named by a hash of its
source, flags and compiler, so an edit builds afresh (and the build before it is removed) and an
unchanged file is reused. A build goes to a temporary name first and is renamed into place, so two
runs building at once both end with a whole file. Where no compiler is found the caller gets a
`CBuildError` that says so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench-c"
BUILD_TIMEOUT_S = 120.0  # a one-file build takes a second; minutes mean a wedged compiler
CFLAGS = ("-O2", "-Wall")


class CBuildError(RuntimeError):
    """A C helper could not be built; the message says why (no compiler, or its errors)."""


def c_compiler() -> str | None:
    """The compiler to use: $CC (default `cc`), else gcc; None when neither is on PATH."""
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def build(source: Path, *, shared: bool = False, libs: tuple[str, ...] = ()) -> Path:
    """The executable (or, `shared`, the shared library) built from `source`, from the cache when
    this source was built before with the same flags and compiler."""
    cc = c_compiler()
    if cc is None:
        raise CBuildError(f"no C compiler ($CC, cc or gcc) on PATH to build {source.name}")
    flags = [*CFLAGS, *(("-shared", "-fPIC") if shared else ())]
    key = hashlib.sha256("\0".join([cc, *flags, *libs]).encode() + b"\0" + source.read_bytes()).hexdigest()
    out = CACHE / f"{source.stem}-{key[:16]}{'.so' if shared else ''}"
    if out.exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", dir=CACHE)
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *flags, "-o", tmp, str(source), *libs],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-10:]
            raise CBuildError(f"{Path(cc).name} could not build {source.name}:\n" + "\n".join(tail))
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
        for old in CACHE.glob(f"{source.stem}-*"):  # earlier builds of this source: only the newest is kept
            if old != out:
                old.unlink(missing_ok=True)
    except subprocess.TimeoutExpired:
        raise CBuildError(
            f"{Path(cc).name} did not build {source.name} within {BUILD_TIMEOUT_S:g}s"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
