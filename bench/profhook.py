"""`hostmesh` with a counting profiler switched on and off by signals; bench/profile_l7.py drives it.

    python bench/profhook.py agent run --config agent.toml      # env HOSTMESH_PROFILE_DIR=<dir>

SIGUSR1 starts a window in the mode written in <dir>/mode (``calls``: cProfile, which counts every
Python call and every C call made from Python; ``alloc``: calls into CPython's allocator, counted by
the hook library named in HOSTMESH_ALLOCOUNT_LIB, plus the net change in allocated blocks), then
writes <dir>/started-<pid>. SIGUSR2 ends the window and writes <dir>/result-<pid> (JSON); with
HOSTMESH_PROFILE_PSTATS set, a ``calls`` window also leaves cProfile's own dump in <dir>/pstats-<pid>. Counts,
not times: they do not depend on how loaded the machine is. Signal handlers run in the main thread,
which is the thread that runs the agent's event loop, so cProfile sees the proxy's work.
"""

from __future__ import annotations

import cProfile
import ctypes
import gc
import json
import os
import pstats
import re
import signal
import sys
from pathlib import Path
from typing import Any

DOMAINS = ("raw", "mem", "obj")  # PyMem_SetAllocator domains, in CPython's enum order

_dir = Path(os.environ.get("HOSTMESH_PROFILE_DIR", "."))
_lib: Any = None
_state: dict[str, Any] = {}


def _load_lib() -> Any:
    path = os.environ.get("HOSTMESH_ALLOCOUNT_LIB")
    if not path:
        return None
    lib = ctypes.PyDLL(path)  # PyDLL: the GIL stays held, as PyMem_SetAllocator requires
    lib.allocount_install.restype = ctypes.c_int
    lib.allocount_calls.restype = ctypes.c_ulonglong
    lib.allocount_calls.argtypes = [ctypes.c_int]
    lib.allocount_bytes.restype = ctypes.c_ulonglong
    lib.allocount_bytes.argtypes = [ctypes.c_int]
    lib.allocount_install()
    return lib


def _alloc_counters() -> dict[str, int]:
    collections = sum(s["collections"] for s in gc.get_stats())
    out = {"blocks": sys.getallocatedblocks(), "gc_collections": collections}
    if _lib is not None:
        for i, d in enumerate(DOMAINS):
            out[f"{d}_calls"] = int(_lib.allocount_calls(i))
            out[f"{d}_bytes"] = int(_lib.allocount_bytes(i))
    return out


def _write(name: str, doc: Any) -> None:
    tmp = _dir / f".{name}.tmp"
    tmp.write_text(json.dumps(doc))
    tmp.replace(_dir / name)  # the driver never reads half a file


def _start(_sig: int, _frame: object) -> None:
    mode = (_dir / "mode").read_text().strip()
    _state.clear()
    _state["mode"] = mode
    if mode == "alloc":
        _state["before"] = _alloc_counters()
    else:
        prof = cProfile.Profile(builtins=True)
        _state["prof"] = prof
        prof.enable()
    _write(f"started-{os.getpid()}", {"mode": mode})


def _module(filename: str) -> str:
    """A file's name from its package down (``l7/http1.py``), ``~`` for C."""
    parts = Path(filename).parts
    for top in ("agent", "hostmesh"):  # an editable install runs agent/..., a wheel hostmesh/agent/...
        if top in parts:
            i = len(parts) - 1 - parts[::-1].index(top)
            return "/".join(parts[i + 1 :])
    return "/".join(parts[-2:])


def _label(key: tuple[str, int, str]) -> tuple[str, bool]:
    filename, line, name = key
    if filename == "~":  # a C function: cProfile names it "<built-in method x>" or "<method 'y' of 'z'>"
        return re.sub(r" at 0x[0-9a-f]+", "", name), True  # no addresses: labels compare across runs
    return f"{_module(filename)}:{line}({name})", False


def _stop(_sig: int, _frame: object) -> None:
    mode = _state.get("mode")
    doc: dict[str, Any] = {"mode": mode}
    if mode == "alloc":
        after = _alloc_counters()
        doc["delta"] = {k: after[k] - v for k, v in _state["before"].items()}
    elif mode == "calls":
        prof = _state["prof"]
        prof.disable()
        stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
        if os.environ.get("HOSTMESH_PROFILE_PSTATS"):  # the raw profile too, callers and all (--pstats)
            prof.dump_stats(_dir / f"pstats-{os.getpid()}")
        funcs: dict[str, list[Any]] = {}
        modules: dict[str, list[int]] = {}  # file -> [its Python calls, C calls made from it]
        for key, (_cc, ncalls, _tt, _ct, callers) in stats.items():
            label, is_c = _label(key)
            funcs.setdefault(label, [label, 0, is_c])[1] += ncalls
            if not is_c:
                modules.setdefault(_module(key[0]), [0, 0])[0] += ncalls
                continue
            for caller, (_ccc, nc, *_rest) in callers.items():
                modules.setdefault(_module(caller[0]), [0, 0])[1] += nc
        doc["functions"] = list(funcs.values())
        doc["modules"] = modules
    _state.clear()
    _write(f"result-{os.getpid()}", doc)


def main() -> None:
    global _lib
    _lib = _load_lib()
    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
    from hostmesh.agent.cli import main as hostmesh_main

    sys.argv = ["hostmesh", *sys.argv[1:]]
    hostmesh_main()


if __name__ == "__main__":
    main()
