"""What kept an agent's event loop from running, on /metrics (agent/observe.py LoopDelays): the time its
threads waited for a CPU, and Python's collections with their pauses."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hostmesh.agent.observe import LoopDelays, health_families
from hostmesh.registry.promtext import Families, generate_latest

LINUX_SCHEDSTAT = Path("/proc/self/schedstat").exists() and hasattr(os, "sched_setaffinity")


@pytest.mark.skipif(not LINUX_SCHEDSTAT, reason="CPU wait is read from Linux's schedstat")
def test_cpu_wait_is_the_time_the_process_was_ready_but_another_held_its_cpu() -> None:
    # The child burns the same CPU time twice on one CPU: first with two CPU-bound rivals on that CPU
    # stopped, then with them running. With them running it waits about twice as long as it runs. Its
    # own CPU time is the yardstick, not the clock. Two rivals, not one: the machine's other load is
    # not pinned, and the scheduler may move a busy process onto this CPU for one phase and off it for
    # the other (with one rival, under a CPU hog: 0.30 s waited alone, 0.35 s with the rival).
    child = textwrap.dedent(
        """
        import os, signal, subprocess, sys, time
        from hostmesh.agent.observe import LoopDelays
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        rivals = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
        def burn():
            before = LoopDelays.cpu_wait_seconds()
            start, deadline = time.process_time(), time.monotonic() + 20
            while time.process_time() - start < 0.3 and time.monotonic() < deadline:
                pass
            return LoopDelays.cpu_wait_seconds() - before
        try:
            for rival in rivals:
                os.sched_setaffinity(rival.pid, {cpu})
                rival.send_signal(signal.SIGSTOP)
            alone = burn()
            for rival in rivals:
                rival.send_signal(signal.SIGCONT)
            shared = burn()
            print(alone, shared)
        finally:
            for rival in rivals:
                rival.kill()
                rival.wait()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=90, check=True
    )
    alone, shared = map(float, out.stdout.split())
    assert shared - alone >= 0.1, out.stdout  # ~0.6 s: the rivals' fair two thirds of the CPU


@pytest.mark.skipif(not LINUX_SCHEDSTAT, reason="CPU wait is read from Linux's schedstat")
def test_cpu_wait_does_not_count_the_time_the_process_slept() -> None:
    before = LoopDelays.cpu_wait_seconds()
    assert before is not None
    subprocess.run(["sleep", "0.3"], check=True, timeout=10)  # this process blocked, not ready, meanwhile
    assert LoopDelays.cpu_wait_seconds() - before < 0.25


def test_collections_and_their_pauses_are_counted_by_generation() -> None:
    delays = LoopDelays()
    delays.install()
    try:
        gc.collect(1)
        gc.collect(2)
    finally:
        delays.uninstall()
    gc.collect(1)  # after uninstall: not counted
    assert delays.collections[1] == 1 and delays.collections[2] == 1
    assert delays.pause_seconds[1] > 0 and delays.pause_seconds[2] > 0
    text = generate_latest(Families(delays.families())).decode()
    assert 'hostmesh_gc_collections_total{generation="2"} 1.0' in text
    assert "# TYPE hostmesh_gc_pause_seconds_total counter" in text


def test_the_agent_exposition_carries_the_loop_delays() -> None:
    names = {f.name for f in health_families()}
    if LINUX_SCHEDSTAT:
        assert "hostmesh_process_cpu_wait_seconds" in names
