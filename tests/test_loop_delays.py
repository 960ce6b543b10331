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

# seconds: a busy loop's CPU wait against its clock time less its CPU time, each read a few µs apart
WAIT_ACCOUNTING_SLACK = 0.05
LINUX_SCHEDSTAT = Path("/proc/self/schedstat").exists() and hasattr(os, "sched_setaffinity")


@pytest.mark.skipif(not LINUX_SCHEDSTAT, reason="CPU wait is read from Linux's schedstat")
def test_cpu_wait_is_the_time_the_process_was_ready_but_another_held_its_cpu() -> None:
    # The child burns the same CPU time twice on one CPU: first with two CPU-bound rivals on that CPU
    # stopped, then with them running. A process that never blocks is, at every moment, on a CPU,
    # waiting for one, or (on a VM) held by the hypervisor, so in each phase its CPU wait is at most the
    # phase's clock time less its CPU time, however loaded the machine (a wait read as clock time would
    # exceed it); with the rivals running, their fair two thirds of the CPU make it at least about twice
    # its CPU time. Not "more than alone": the machine's other load is not pinned and moves between
    # CPUs, and in a CI run it made the child wait 1.04 s alone and 1.02 s with the rivals for its 0.3 s.
    child = textwrap.dedent(
        """
        import os, signal, subprocess, sys, time
        from hostmesh.agent.observe import LoopDelays
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        rivals = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
        def burn():
            before = LoopDelays.cpu_wait_seconds()
            start, began = time.process_time(), time.monotonic()
            deadline = began + 20
            while time.process_time() - start < 0.3 and time.monotonic() < deadline:
                pass
            waited = LoopDelays.cpu_wait_seconds() - before
            not_running = (time.monotonic() - began) - (time.process_time() - start)
            return waited, not_running
        try:
            for rival in rivals:
                os.sched_setaffinity(rival.pid, {cpu})
                rival.send_signal(signal.SIGSTOP)
            alone = burn()
            for rival in rivals:
                rival.send_signal(signal.SIGCONT)
            shared = burn()
            print(*alone, *shared)
        finally:
            for rival in rivals:
                rival.kill()
                rival.wait()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=90, check=True
    )
    alone, alone_not_running, shared, shared_not_running = map(float, out.stdout.split())
    for waited, not_running in ((alone, alone_not_running), (shared, shared_not_running)):
        assert waited <= not_running + WAIT_ACCOUNTING_SLACK, out.stdout
    assert shared >= 0.4, out.stdout  # ~0.6 s: the rivals' fair two thirds of the CPU, for 0.3 s of its own


@pytest.mark.skipif(not LINUX_SCHEDSTAT, reason="CPU wait is read from Linux's schedstat")
def test_cpu_wait_does_not_count_the_time_the_process_slept() -> None:
    # A one-thread child sleeps 0.3 s: at every moment it is on a CPU, waiting for one, or blocked, and
    # it was blocked for at least the 0.3 s, so its CPU wait is at most its clock time less its CPU time
    # less 0.3 s, however loaded the machine (a wait that counted the sleep would exceed that by 0.3 s).
    # A child, not this test's process: a pytest worker's other threads wait on the run queue too.
    child = textwrap.dedent(
        """
        import time
        from hostmesh.agent.observe import LoopDelays
        before = LoopDelays.cpu_wait_seconds()
        start, began = time.process_time(), time.monotonic()
        time.sleep(0.3)
        waited = LoopDelays.cpu_wait_seconds() - before
        print(waited, (time.monotonic() - began) - (time.process_time() - start))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=90, check=True
    )
    waited, not_running = map(float, out.stdout.split())
    assert waited <= not_running - 0.3 + WAIT_ACCOUNTING_SLACK, out.stdout


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
