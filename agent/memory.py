"""Give memory back to the system after a burst: glibc's malloc_trim, every TRIM_SECONDS.

Decision: a proxy's memory follows its traffic. A burst of large transfers touches big buffers
(uvloop's 256 KiB TLS read buffer per connection, 256 KiB write buffers, 256 KiB chunks); when they
are freed, glibc keeps the pages in its heap (above its dynamic mmap threshold they no longer come
from mmap), so an agent that once moved 1 MiB responses stays ~8 MiB larger for good. Measured on
the bench's sequence (keep-alive, new connections, 1 MiB, keep-alive): peak RSS in the second
keep-alive run 39 MiB without trimming, 33 MiB with it; idle afterwards 41 -> 32 MiB.

Start-up leaves garbage too (modules compiled when their .pyc is missing or stale, agent.toml and
the saved snapshot parsed, the first TLS contexts built): `Trimmer.now()` collects and trims once
when the agent is ready, instead of idling on it until the first tick.

`malloc_trim(0)` returns free pages anywhere in the heap (MADV_DONTNEED), not only its top. It costs
~1 µs when there is nothing to give back and ~40 µs per 8 MiB given back (measured), so it runs
every second: what the first seconds of an agent's life leave (registration, the first watch
answers, the first mesh connections) and any burst are back within a second (bench idle RSS of an
L4 pair 29.4 -> 28.8 MiB against a 5 s period). Not glibc (musl, macOS): nothing to do, nothing loaded.

Each agent-to-agent TLS connection also keeps buffers of its own that only ever grow, in use, so
malloc_trim cannot give them back: uvloop's SSLProtocol mallocs a 256 KiB ciphertext read buffer per
connection and reads the socket into all of it, and copies each read into OpenSSL's incoming memory
BIO (its outgoing BIO takes a whole write's records before any is sent). One large transfer (the
bench's 1 MiB readiness probe) leaves the receiving agent ~0.5 MiB of them for the connection's life.
For every tracked connection quiet for a whole tick (`track_tls_reads`), a tick gives back the
whole pages of the read buffer and of each *empty* BIO's spare room (MADV_DONTNEED): between
callbacks the read buffer holds nothing (uvloop copies each read into its BIO at once), an empty
BIO's bytes are unused, and zero-filled pages are what either gets when written again. A connection
with traffic is left alone: its next read would fault the pages in again. The BIOs are reached
through the public BIO_ctrl, their BIO* read where CPython's _ssl keeps it (checked on a fresh
MemoryBIO first; without the match only the read buffer is given back). Measured with bench/rss.py
(settled idle, larger agent of the pair, A/B in one build): L7 31.7 -> 31.2 MiB, L4 30.9 -> 30.6;
a quiet tick costs two BIO_number_written calls per connection, a busy one the same.

uvloop's Loop object itself holds a 256,000-byte receive buffer inline (`Loop._recv_buffer`: every
read of a plain, non-buffered stream protocol lands there, e.g. Consul's and the admin API's
connections), and the whole object is zero-filled when the loop is made, so all of its ~62 pages
are resident in every agent from the start, whatever it reads. Each tick gives back the whole
pages certainly inside that buffer (`loop_recv_pages`): between callbacks it holds nothing (uvloop
copies each read into a bytes object within the read callback), and the next read faults in only
the pages it fills. A tick's madvise costs ~4 µs with none of them resident, ~40 µs with all.

Between ticks, the heap is kept (`hold_heap`): glibc's thresholds are set so that bulk traffic's
buffers (256 KiB reads, the TLS records of a whole write) neither come from mmap nor have the heap
top shrunk under them by `free` (up to HEAP_TOP_KEPT), so the next chunk reuses pages already there.
With glibc's defaults (dynamic thresholds: mmap from 128 KiB until such a block is freed, then the
heap top given back above twice the largest block freed so far) an L4 pair's first ~600 MiB of 1 MiB
responses cost ~370 page faults and brk calls per MiB, until a large enough block happened to be
freed (measured on bench scenario (c) alone: pair CPU per MiB 6.0 -> 3.8 ms in that phase; after it
~7 faults per MiB either way). A *low* fixed mmap threshold was tried before and cost 75 % of 1 MiB
throughput (an mmap, munmap and 64 page faults per 256 KiB chunk).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import mmap
import sys
from collections.abc import Callable
from typing import Any

TRIM_SECONDS = 1.0  # a burst's memory is back within this; ~1 µs a tick when there is nothing to give
# mallopt parameters (malloc.h) and the values `hold_heap` sets:
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 2 * 1024 * 1024  # above any data-path buffer (a 1 MiB mux write buffer plus a read chunk)
HEAP_TOP_KEPT = 4 * 1024 * 1024  # free heap top kept by `free` for the next buffers; the timer trims it


def _glibc(name: str) -> Any:
    """glibc's function `name`, or None when the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def hold_heap(mallopt: Any = None) -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring); False when not glibc."""
    mallopt = mallopt or _glibc("mallopt")  # tests pass their own
    if mallopt is None:
        return False
    # Both, and in this order: setting either one turns glibc's dynamic thresholds off.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, HEAP_TOP_KEPT))


MADV_DONTNEED = 4  # <sys/mman.h> on Linux: the pages are freed, read back as zeros
BIO_CTRL_PENDING, BIO_C_GET_BUF_MEM_PTR = 10, 115  # <openssl/bio.h>


class _TlsBuffers:
    """A tracked mesh connection's TLS buffers, and what the trim tick saw of it."""

    __slots__ = ("bios", "conn", "given", "length", "proto", "seen", "start")

    def __init__(self, conn: Any, proto: Any, bios: tuple[int, ...], start: int, length: int) -> None:
        self.conn = conn
        self.proto = proto  # held so its buffers stay allocated while listed; dropped after close
        self.bios = bios  # its memory BIOs' BIO*; () where they cannot be reached
        self.start, self.length = start, length  # the read buffer's whole pages
        self.seen: int | None = None  # its traffic count at the last tick
        self.given = False  # its pages given back since that traffic


_tls_reads: dict[int, _TlsBuffers] = {}  # by id(conn)
_lib: dict[str, Any] = {}  # "madvise", and "BIO_ctrl" where memory BIOs can be reached


class _BufMem(ctypes.Structure):  # OpenSSL's BUF_MEM (<openssl/buffer.h>, public)
    _fields_ = (("length", ctypes.c_size_t), ("data", ctypes.c_void_p), ("max", ctypes.c_size_t))


def _load() -> bool:
    """madvise, and OpenSSL's BIO_ctrl when a memory BIO's BIO* sits where CPython's _ssl keeps it
    (checked on a fresh one); False when not glibc."""
    if not _lib:
        madvise = _glibc("madvise")
        if madvise is None:
            return False
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _lib["madvise"] = madvise
        try:
            import _ssl
            import ssl

            crypto = ctypes.CDLL(_ssl.__file__)  # the libcrypto the ssl module uses
            ctrl, moved = crypto.BIO_ctrl, crypto.BIO_number_written
            ctrl.restype = ctypes.c_long
            ctrl.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p)
            moved.restype, moved.argtypes = ctypes.c_uint64, (ctypes.c_void_p,)
            probe = ssl.MemoryBIO()
            probe.write(b"probe")
            if ctrl(_bio_ptr(probe), BIO_CTRL_PENDING, 0, None) == 5 and moved(_bio_ptr(probe)) == 5:
                _lib["BIO_ctrl"], _lib["BIO_number_written"] = ctrl, moved
        except (OSError, AttributeError, ImportError):
            pass
    return True


def _bio_ptr(bio: Any) -> int:
    """The BIO* of an ssl.MemoryBIO: the first field after the object header (CPython's _ssl.c)."""
    return ctypes.c_void_p.from_address(id(bio) + _HEADER).value or 0


_HEADER = ctypes.sizeof(ctypes.c_ssize_t) + ctypes.sizeof(ctypes.c_void_p)  # PyObject_HEAD


# uvloop's UV_STREAM_RECV_BUF_SIZE (uvloop/includes/consts.pxi): the size of Loop._recv_buffer
UVLOOP_RECV_BUF = 256_000
_UVLOOP_LOOP = ("uvloop.loop", "Loop")  # the Cython class (uvloop.Loop is its Python subclass)
MAX_LOOP_FIELDS = 4096  # the Loop's other fields take ~500 bytes: above this, the layout is not the known one


def loop_recv_pages(loop: Any) -> tuple[int, int]:
    """The whole pages certainly inside uvloop's receive buffer in `loop` (see the module
    docstring), as (start, length); length 0 for another loop or an unexpected layout. The buffer
    starts after the object header and at most `spare` bytes in (the Loop's other fields, on either
    side of it), so [spare, header + UVLOOP_RECV_BUF) lies in it whatever the order of those fields."""
    base = next((c for c in type(loop).__mro__ if (c.__module__, c.__name__) == _UVLOOP_LOOP), None)
    if base is None:
        return 0, 0
    spare = base.__basicsize__ - UVLOOP_RECV_BUF
    if not _HEADER <= spare <= MAX_LOOP_FIELDS:
        return 0, 0
    return _interior(id(loop) + spare, _HEADER + UVLOOP_RECV_BUF - spare)


def _interior(addr: int, size: int) -> tuple[int, int]:
    """The whole pages inside [addr, addr + size): (start, length), length 0 when none."""
    page = mmap.PAGESIZE
    start, end = -(-addr // page) * page, (addr + size) // page * page
    return start, max(0, end - start)


def track_tls_reads(conn: Any) -> None:
    """Have the trim tick give back the pages of `conn`'s TLS buffers once it is quiet
    (see the module docstring). `conn` is a mux connection (`transport`, `streams`, `closed`); on a
    plain transport, a loop other than uvloop's or a C library other than glibc, nothing is done."""
    transport = conn.transport
    proto = next((r for r in gc.get_referents(transport) if type(r).__name__ == "SSLProtocol"), None)
    if proto is None or not hasattr(proto, "get_buffer") or not _load():
        return
    import ssl

    view = proto.get_buffer(0)  # uvloop: the whole buffer, allocated once per connection at its full size
    start, length = _interior(ctypes.addressof(ctypes.c_char.from_buffer(view)), len(view))
    bios = tuple(_bio_ptr(r) for r in gc.get_referents(proto) if isinstance(r, ssl.MemoryBIO))
    if "BIO_ctrl" not in _lib:
        bios = ()
    _tls_reads[id(conn)] = _TlsBuffers(conn, proto, bios, start, length)


def release_tls_reads() -> None:
    """Give back the pages of the tracked TLS connections' read buffers and empty memory BIOs once a
    connection has been quiet for a whole tick (nothing through its BIOs since the last tick: not
    between the requests of steady traffic; an L7 connection keeps pooled streams open, so "no
    stream" would never hold), and only once per quiet spell (a madvise of 256 KiB costs ~10 µs even
    with nothing resident); forget the closed ones."""
    # BIOs are only listed where BIO_ctrl and BIO_number_written were found (_load)
    madvise = _lib["madvise"]
    ctrl: Any = _lib.get("BIO_ctrl")
    moved: Any = _lib.get("BIO_number_written")
    ptr = ctypes.c_void_p()
    for key, bufs in list(_tls_reads.items()):
        conn, bios = bufs.conn, bufs.bios
        transport = conn.transport
        if conn.closed or transport is None or transport.is_closing():
            del _tls_reads[key]
            continue
        if bios:
            sig = sum(moved(bio) for bio in bios)  # bytes in and out so far
        elif conn.streams:
            continue
        else:
            sig = conn.last_id  # without the BIOs: streams opened so far
        if sig != bufs.seen:  # traffic since the last tick: wait for a quiet one
            bufs.seen, bufs.given = sig, False
            continue
        if bufs.given:
            continue
        bufs.given = True
        if bufs.length:
            madvise(bufs.start, bufs.length, MADV_DONTNEED)
        for bio in bios:  # a BIO's buffer is only ever grown; what lies beyond its data is unused
            if ctrl(bio, BIO_CTRL_PENDING, 0, None) == 0 and ctrl(
                bio, BIO_C_GET_BUF_MEM_PTR, 0, ctypes.byref(ptr)
            ):
                mem = _BufMem.from_address(ptr.value or 0)
                if mem.length == 0 and mem.data:
                    b_start, b_length = _interior(mem.data, mem.max)
                    if b_length:
                        madvise(b_start, b_length, MADV_DONTNEED)


def start_trimming(
    loop: asyncio.AbstractEventLoop, trim: Any = None, release: Callable[[], None] | None = None
) -> Trimmer | None:
    """Schedule malloc_trim every TRIM_SECONDS on `loop`, after `release` (which gives back memory
    that is not malloc's, e.g. the loop's read buffer) and after giving back uvloop's receive buffer
    pages (loop_recv_pages); None when the C library is not glibc."""
    trim = trim or _glibc("malloc_trim")  # tests pass their own
    if trim is None:
        return None
    handle: list[asyncio.TimerHandle] = []
    trimmer = Trimmer(handle, trim, release, loop if _load() else None)

    def tick() -> None:
        trimmer.now(collect=False)
        handle[0] = loop.call_later(TRIM_SECONDS, tick)

    handle.append(loop.call_later(TRIM_SECONDS, tick))
    return trimmer


def freeze_startup_objects() -> None:
    """Collect start-up's garbage, then freeze what is left (`gc.freeze`): the modules, the config
    snapshot, the TLS contexts (~27K objects) live as long as the agent, and frozen they are no
    longer walked by the collections traffic triggers. A full collection of a running L7 agent took
    23-36 ms (measured on the 2-core box, after load) and 0.02 ms with them frozen: a pause every
    request in flight would wait out. What start-up leaves in a cycle and drops later stays: bounded,
    once."""
    gc.collect()
    gc.freeze()


class Trimmer:
    """The running trim timer; `now()` trims at once, `cancel()` stops it."""

    def __init__(
        self,
        handle: list[asyncio.TimerHandle],
        trim: Any,
        release: Callable[[], None] | None = None,
        recv_loop: Any = None,
    ) -> None:
        self._handle = handle
        self._trim = trim
        self._release = release
        # the pages of `recv_loop`'s receive buffer (loop_recv_pages; length 0: none), and the loop
        # itself, held: the pages are given back only while they are still that loop's
        self._recv_loop = recv_loop
        self._recv = loop_recv_pages(recv_loop) if recv_loop is not None else (0, 0)

    def now(self, collect: bool = True) -> None:
        """Give free pages back at once (after start-up, or a late import); `collect` first frees
        cyclic garbage (a full collection: for start-up, not for the middle of traffic)."""
        if collect:
            gc.collect()
        if self._release is not None:
            self._release()
        if self._recv[1]:
            _lib["madvise"](self._recv[0], self._recv[1], MADV_DONTNEED)
        if _tls_reads:
            release_tls_reads()
        self._trim(0)

    def cancel(self) -> None:
        self._handle[0].cancel()


_STATUS_BYTES = {"VmRSS": "rss_bytes", "VmHWM": "peak_rss_bytes"}  # /proc/self/status, in kB there


def usage() -> dict[str, Any]:
    """The admin API's /v1/memory: resident and peak memory, threads, and the Python modules loaded
    (what grows an agent's footprint; tests check that the lazy ones stay out). Sizes are None where
    /proc is not available."""
    out: dict[str, Any] = {"rss_bytes": None, "peak_rss_bytes": None, "threads": None}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in _STATUS_BYTES:
                    out[_STATUS_BYTES[key]] = int(value.split()[0]) * 1024
                elif key == "Threads":
                    out["threads"] = int(value)
    except (OSError, ValueError):
        pass
    out["modules"] = sorted(sys.modules)
    return out
