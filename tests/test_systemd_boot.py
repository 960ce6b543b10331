"""The .deb's units under a real systemd: a minimal Debian 12 tree booted with `systemd-nspawn -b`.

tests/test_systemd_units.py checks the unit files offline; only a real service manager applies
the hardening (seccomp filter, ProcSubset=pid, MemoryDenyWriteExecute, …) to the running agent.
Here the package is installed into a booted container with its own network namespace (loopback
only), Consul runs there in dev mode, and both units are started, used, reloaded and stopped.

Opt-in, never part of `make test`: HOSTMESH_SYSTEMD_BOOT=1 (`make systemd-boot`). Needs root,
debootstrap and systemd-nspawn (installed by packaging/ensure-tools.sh) and Debian's mirror the
first time: the tree (~300 MB) is built once into .cache/nspawn and copied for each run.
Environment: HOSTMESH_DEB (a built .deb to use instead of building one), HOSTMESH_DEBIAN_MIRROR.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest

from tests.support import ANTI_ENTROPY_BOUND, REPO

BUILD_TIMEOUT = 600  # seconds; debootstrap downloads ~60 MB, the .deb build may fetch wheels
BOOT_TIMEOUT = 120  # the tree reaches multi-user.target in ~3 s on an idle machine
STEP_TIMEOUT = 90  # one command in the container (dpkg -i runs man-db's trigger)
SHUTDOWN_TIMEOUT = 60  # poweroff of the container after SIGTERM to systemd-nspawn
# WatchdogSec=30s: the agent pings every 15 s; one interval plus slack on a busy machine.
WATCHDOG_WAIT = 40.0
MESH_WAIT = 30.0  # web's first passing health check after (re-)registration: Consul runs it at once
HELLO = "hello-from-web"
MAX_EXPOSURE = 1.5  # `systemd-analyze security`, 0..10; the bound for both units
SUITE = "bookworm"
PACKAGES = "systemd,systemd-sysv,dbus,python3.11,adduser,init-system-helpers,curl"
MIRROR = os.environ.get("HOSTMESH_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PATH_IN = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("HOSTMESH_SYSTEMD_BOOT") != "1",
        reason="opt-in: HOSTMESH_SYSTEMD_BOOT=1 (make systemd-boot) boots a Debian tree with systemd-nspawn",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="systemd-nspawn needs root"),
    pytest.mark.timeout(2 * BUILD_TIMEOUT + BOOT_TIMEOUT + 20 * STEP_TIMEOUT),
]


def run(*cmd: str, timeout: float = STEP_TIMEOUT, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{' '.join(cmd)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def wait_for(what: str, probe: Callable[[], bool], timeout: float) -> None:
    """Poll `probe` until true; bounded in time and in count."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout * 10) + 1):
        if probe():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def base_tree() -> Path:
    """The pristine Debian tree, built once per package list (concurrent runs share one build)."""
    key = hashlib.sha256(f"{SUITE} {PACKAGES} {MIRROR}".encode()).hexdigest()[:12]
    cache = REPO / ".cache/nspawn"
    cache.mkdir(parents=True, exist_ok=True)
    tree = cache / f"{SUITE}-{key}"
    with open(cache / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not tree.is_dir():
            run(str(REPO / "packaging/ensure-tools.sh"), "debootstrap", "systemd-nspawn", "nsenter")
            partial = cache / f"{tree.name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            run(
                "debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(partial), MIRROR,
                timeout=BUILD_TIMEOUT,
            )  # fmt: skip
            partial.rename(tree)
    return tree


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("HOSTMESH_DEB")
    if given:
        return Path(given).resolve()
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "DIST": str(out), "PYTHON": str(REPO / ".venv/bin/python")}
    run(str(REPO / "packaging/build-deb.sh"), env=env, timeout=BUILD_TIMEOUT)
    (found,) = sorted(out.glob("hostmesh_*.deb"))
    return found


def consul_binary() -> Path:
    given = os.environ.get("CONSUL_BIN")
    if given:
        return Path(given)
    return Path(run(str(REPO / "scripts/install-consul.sh"), timeout=BUILD_TIMEOUT).strip())


class Container:
    """A booted tree; `sh` runs a command inside it (all its namespaces, its root)."""

    def __init__(self, nspawn: subprocess.Popen[bytes], leader: int, console: Path) -> None:
        self.nspawn = nspawn
        self.leader = leader
        self.console = console

    def argv(self, *cmd: str) -> list[str]:
        # -C: the container's cgroup namespace; env -i: nothing of the test's environment inside.
        return ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w",
                "env", "-i", f"PATH={PATH_IN}", *cmd]  # fmt: skip

    def run(
        self, *cmd: str, check: bool = True, timeout: float = STEP_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.argv(*cmd), capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, (
                f"{' '.join(cmd)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
            )
        return result

    def sh(self, script: str, check: bool = True) -> str:
        return self.run("/bin/sh", "-ec", script, check=check).stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, check=False).stdout

    def http(self, url: str) -> tuple[int, str]:
        result = self.run(
            "curl", "-sS", "-m", "5", "-o", "/dev/stdout", "-w", "\n%{http_code}", url, check=False
        )
        body, _, code = result.stdout.rpartition("\n")
        return int(code or 0), body.rstrip("\n")


def find_leader(nspawn: subprocess.Popen[bytes]) -> int | None:
    """The container's PID 1 as this machine sees it: the child of systemd-nspawn running systemd."""
    for task in Path(f"/proc/{nspawn.pid}/task").glob("*/children"):
        for pid in task.read_text().split():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            except FileNotFoundError:
                continue
    return None


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory, deb: Path) -> Iterator[Container]:
    base = base_tree()
    work = tmp_path_factory.mktemp("nspawn")
    root = work / "root"
    run("cp", "-a", "--reflink=auto", str(base), str(root), timeout=BUILD_TIMEOUT)
    shutil.copy2(consul_binary(), root / "usr/local/bin/consul")
    (root / "srv/hostmesh").mkdir(parents=True)
    shutil.copy2(deb, root / "srv/hostmesh/hostmesh.deb")
    console = work / "console.log"
    machine = f"hostmesh-test-{os.getpid()}"
    # --register=no --keep-unit: no machined or host systemd (PID 1 here is not systemd);
    # --private-network: the container has a loopback of its own and no other interface.
    nspawn = subprocess.Popen(
        ["systemd-nspawn", "-q", "-D", str(root), f"--machine={machine}", "--register=no", "--keep-unit",
         "--private-network", "-b"],
        stdin=subprocess.DEVNULL, stdout=open(console, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )  # fmt: skip
    try:
        leader: list[int] = []

        def booted() -> bool:
            assert nspawn.poll() is None, f"systemd-nspawn exited {nspawn.returncode}:\n{console.read_text()}"
            pid = find_leader(nspawn)
            if pid is not None:
                leader[:] = [pid]
            return pid is not None

        wait_for("the container's systemd", booted, BOOT_TIMEOUT)
        box = Container(nspawn, leader[0], console)
        # systemctl answers once PID 1 has set up its private socket: "initializing", "starting", …
        wait_for(
            "the container's service manager",
            lambda: box.run("systemctl", "is-system-running", check=False).stdout.strip() != "",
            BOOT_TIMEOUT,
        )
        state = box.run("systemctl", "is-system-running", "--wait", check=False, timeout=BOOT_TIMEOUT)
        assert state.stdout.strip() in ("running", "degraded"), state.stdout + console.read_text()
        yield box
    finally:
        nspawn.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
        try:
            nspawn.wait(timeout=SHUTDOWN_TIMEOUT)
        except subprocess.TimeoutExpired:
            nspawn.kill()
            nspawn.wait(timeout=SHUTDOWN_TIMEOUT)
        shutil.rmtree(root, ignore_errors=True)


AGENT_TOML = """\
node = "nspawn-1"
mesh_address = "127.0.0.1"
inbound = "127.0.0.1:15001"
admin = "127.0.0.1:15000"
metrics = "127.0.0.1:15090"
drain_seconds = 1
[ca]
address = "https://127.0.0.1:15012"
pin = "{pin}"
token_file = "/etc/hostmesh/join-token"
[[services]]
name = "web"
port = 8080
protocol = "http"
health = {{ http = "/" }}
[[services.upstreams]]
service = "web"
bind = "127.0.0.1:9091"
"""
SECOND_UPSTREAM = '[[services.upstreams]]\nservice = "web"\nbind = "127.0.0.1:9092"\n'
LOW_PORT_DROPIN = (
    "[Service]\nCapabilityBoundingSet=CAP_NET_BIND_SERVICE\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n"
)
LOW_PORT_UPSTREAM = '[[services.upstreams]]\nservice = "web"\nbind = "127.0.0.1:81"\n'
CACHE = "/var/cache/hostmesh"  # the unit's PYTHONPYCACHEPREFIX (agent/bytecode.py)
HARDENING_DENIALS = re.compile(r"Operation not permitted|Permission denied|Bad system call|PermissionError")


def unlisted(box: Container, service: str) -> bool:
    return catalog(box, service) == []


def catalog(box: Container, service: str) -> list[str]:
    code, body = box.http(f"http://127.0.0.1:8500/v1/catalog/service/{service}")
    assert code == 200, body
    return [entry["ServiceID"] for entry in json.loads(body)]


@contextmanager
def journals_on_failure(box: Container) -> Iterator[None]:
    """A failing step prints the units' journals (the last 200 lines each, timed to the µs): an
    intermittent failure (a stop that once exited 1) is explained by the run that saw it."""
    try:
        yield
    except BaseException:
        for unit in ("hostmesh-agent", "hostmesh-ca"):
            argv = ("journalctl", "-u", unit, "--no-pager", "-n", "200", "-o", "short-precise")
            print(f"--- {' '.join(argv)} ---\n{box.run(*argv, check=False).stdout}", flush=True)
        raise


def test_units_run_hardened_under_systemd(container: Container) -> None:
    with journals_on_failure(container):
        exercise_units(container)


def exercise_units(box: Container) -> None:
    box.run("dpkg", "-i", "/srv/hostmesh/hostmesh.deb")  # real maintainer scripts, real systemctl
    # Consul in dev mode on the container's loopback, as a transient unit.
    box.run("systemd-run", "--unit=consul", "--property=Type=exec", "/usr/local/bin/consul", "agent",
            "-dev", "-bind=127.0.0.1", "-client=127.0.0.1", "-log-level=warn")  # fmt: skip
    wait_for(
        "Consul's leader",
        lambda: box.http("http://127.0.0.1:8500/v1/status/leader")[1].strip('"\n') != "",
        60,
    )

    # The CA as docs/getting-started.md has it: init as root, then the unit (running as hostmesh).
    init = box.run("hostmesh", "ca", "init", "--data-dir", "/var/lib/hostmesh-ca").stdout
    pin = re.search(r"sha256:[0-9a-f]{64}", init)
    assert pin, init
    box.run("systemctl", "enable", "--now", "hostmesh-ca")
    assert box.show("hostmesh-ca", "ActiveState", "SubState") == {
        "ActiveState": "active",
        "SubState": "running",
    }
    wait_for("the CA in Consul", lambda: catalog(box, "hostmesh-ca") != [], 30)

    # The app: a static file server, and the agent that serves it with an upstream to itself.
    box.sh(f"mkdir -p /srv/www && echo {HELLO} > /srv/www/index.html")
    box.run("systemd-run", "--unit=webapp", "--property=DynamicUser=yes", "/usr/bin/python3.11", "-m",
            "http.server", "8080", "--bind", "127.0.0.1", "--directory", "/srv/www")  # fmt: skip
    box.sh(
        "hostmesh ca token create --service web --ttl 1h > /etc/hostmesh/join-token\n"
        "chown hostmesh /etc/hostmesh/join-token && chmod 0600 /etc/hostmesh/join-token"
    )
    box.sh(f"cat > /etc/hostmesh/agent.toml <<'EOF'\n{AGENT_TOML.format(pin=pin.group(0))}EOF\n"
           "chgrp hostmesh /etc/hostmesh/agent.toml && chmod 0640 /etc/hostmesh/agent.toml")  # fmt: skip
    # The bytecode cache as a unit with CacheDirectory= left it: the agent's user's, who may have
    # planted something there. Root's compile before the start (ExecStartPre) replaces it.
    box.sh(
        f"install -d -o hostmesh -g hostmesh -m 0700 {CACHE}\ninstall -o hostmesh /dev/null {CACHE}/planted"
    )
    box.run("systemctl", "enable", "--now", "hostmesh-agent")  # Type=notify: returns after READY=1
    agent = box.show("hostmesh-agent", "ActiveState", "SubState", "MainPID", "StatusText", "ExecStartPre")
    assert (agent["ActiveState"], agent["SubState"]) == ("active", "running"), box.journal("hostmesh-agent")
    assert agent["StatusText"] == "serving 1 service(s)"
    assert agent["ExecStartPre"].endswith(" ; code=exited ; status=0 }"), agent["ExecStartPre"]
    print(f"hostmesh-agent ExecStartPre, a cold cache: {agent['ExecStartPre']}")
    # root's, read by the agent: its own check of the cache (prepare) found nothing stale, said nothing
    assert (
        box.sh(f"stat -c '%U %a' {CACHE}; test ! -e {CACHE}/planted; find {CACHE} ! -user root")
        == "root 755\n"
    )
    assert "was not prepared" not in box.journal("hostmesh-agent"), box.journal("hostmesh-agent")
    assert box.http("http://127.0.0.1:15000/ready") == (200, '{"ready":true}')
    # /v1/memory reads /proc/self/status (ProcSubset=pid) and calls malloc_trim through ctypes
    # (MemoryDenyWriteExecute): both allowed by the hardening.
    assert box.http("http://127.0.0.1:15000/v1/memory")[0] == 200
    # The hardening is in force on the running processes: a seccomp filter, no new privileges, not
    # root, and a /proc of their own (ProtectProc=invisible, ProcSubset=pid).
    for unit in ("hostmesh-agent", "hostmesh-ca"):
        pid = box.show(unit, "MainPID")["MainPID"]
        status = box.sh(f"grep -E '^(Seccomp|NoNewPrivs|Uid):' /proc/{pid}/status")
        assert re.search(r"Seccomp:\s+2", status) and re.search(r"NoNewPrivs:\s+1", status), status
        assert not re.search(r"Uid:\s+0\s", status), status
        proc = box.sh(f"grep ' /proc ' /proc/{pid}/mountinfo")  # the process's own mount table
        assert "hidepid=invisible" in proc and "subset=pid" in proc, proc

    # A request through the mesh: upstream listener -> mTLS -> the agent's inbound -> the app. Until
    # Consul has run web's health check once (it starts critical at each registration) the
    # upstream resets the caller with UH: wait for that, bounded.
    wait_for(
        "a request through the mesh", lambda: box.http("http://127.0.0.1:9091/") == (200, HELLO), MESH_WAIT
    )
    metrics = box.http("http://127.0.0.1:15090/metrics")[1]
    inbound = re.search(
        r'hostmesh_requests_total\{[^}]*reporter="destination"[^}]*source_service="web"[^}]*\} ([0-9.]+)',
        metrics,
    )
    assert inbound and float(inbound.group(1)) >= 1, metrics  # the inbound saw web's certificate
    wait_for("web registered in Consul", lambda: catalog(box, "web") == ["web-nspawn-1"], 30)

    # Restart=on-failure: a killed agent comes back, ready again, from the certificates it kept.
    box.run("systemctl", "kill", "--signal=SIGKILL", "hostmesh-agent")
    wait_for(
        "the agent's restart",
        lambda: (
            box.show("hostmesh-agent", "NRestarts", "ActiveState")
            == {"NRestarts": "1", "ActiveState": "active"}
        ),
        60,
    )
    wait_for("/ready after the restart", lambda: box.http("http://127.0.0.1:15000/ready")[0] == 200, 60)
    wait_for(
        "the mesh after the restart", lambda: box.http("http://127.0.0.1:9091/") == (200, HELLO), MESH_WAIT
    )
    agent = box.show("hostmesh-agent", "MainPID", "StatusText")

    # The watchdog: systemd records each WATCHDOG=1 keep-alive the event loop sends.
    first = box.show("hostmesh-agent", "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
    wait_for(
        "a watchdog keep-alive",
        lambda: (
            box.show("hostmesh-agent", "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"] != first
        ),
        WATCHDOG_WAIT,
    )

    # systemctl reload: SIGHUP, same process, the new upstream listens.
    box.sh(f"cat >> /etc/hostmesh/agent.toml <<'EOF'\n{SECOND_UPSTREAM}EOF")
    box.run("systemctl", "reload", "hostmesh-agent")
    wait_for("the reloaded upstream", lambda: box.http("http://127.0.0.1:9092/") == (200, HELLO), 30)
    after = box.show("hostmesh-agent", "MainPID", "ActiveState", "NRestarts", "StatusText")
    assert (after["MainPID"], after["ActiveState"], after["NRestarts"]) == (agent["MainPID"], "active", "1")
    assert after["StatusText"] == "serving 1 service(s); reloaded /etc/hostmesh/agent.toml"
    # A broken file: refused, the agent keeps serving and says so in `systemctl status`.
    box.sh("cp /etc/hostmesh/agent.toml /tmp/agent.toml.good && echo 'node = ' >> /etc/hostmesh/agent.toml")
    box.run("systemctl", "reload", "hostmesh-agent")
    wait_for(
        "the refused reload in STATUS",
        lambda: "reload refused" in box.show("hostmesh-agent", "StatusText")["StatusText"],
        30,
    )
    assert box.http("http://127.0.0.1:9091/") == (200, HELLO)
    box.sh("cp /tmp/agent.toml.good /etc/hostmesh/agent.toml")
    box.run("systemctl", "reload", "hostmesh-ca")  # the CA's reload path exists and keeps it up
    assert box.show("hostmesh-ca", "ActiveState")["ActiveState"] == "active"

    # What systemd itself scores for the installed units (online: the real service manager).
    for unit in ("hostmesh-agent", "hostmesh-ca"):
        report = box.run("systemd-analyze", "security", "--no-pager", f"{unit}.service").stdout
        score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", report)
        assert score and float(score.group(1)) < MAX_EXPOSURE, report
        print(f"systemd-analyze security {unit}: {score.group(1)}")

    # A port below 1024 with the drop-in the README gives (the capability in the bounding set too:
    # AmbientCapabilities= alone was refused, "permission denied" on bind).
    box.sh(
        f"mkdir -p /etc/systemd/system/hostmesh-agent.service.d\n"
        f"printf '%s' '{LOW_PORT_DROPIN}' > /etc/systemd/system/hostmesh-agent.service.d/low-port.conf\n"
        f"printf '%s' '{LOW_PORT_UPSTREAM}' >> /etc/hostmesh/agent.toml\n"
        "systemctl daemon-reload"
    )
    box.run("systemctl", "restart", "hostmesh-agent")
    assert box.show("hostmesh-agent", "ActiveState")["ActiveState"] == "active", box.journal("hostmesh-agent")
    wait_for("the upstream on port 81", lambda: box.http("http://127.0.0.1:81/") == (200, HELLO), MESH_WAIT)

    # A clean stop: exit 0 (not a signal), deregistered from Consul.
    for unit, service in (("hostmesh-agent", "web"), ("hostmesh-ca", "hostmesh-ca")):
        box.run("systemctl", "stop", unit)
        state = box.show(unit, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
        assert state == {
            "ActiveState": "inactive",
            "Result": "success",
            "ExecMainCode": "1",
            "ExecMainStatus": "0",
        }
        # Deregistered from the box's Consul agent at once; its catalog follows through Consul's
        # own sync, which can lag to the next anti-entropy round.
        code, local = box.http("http://127.0.0.1:8500/v1/agent/services")
        assert code == 200 and all(s["Service"] != service for s in json.loads(local).values()), local
        wait_for(f"{service} to leave the catalog", partial(unlisted, box, service), ANTI_ENTROPY_BOUND)
        journal = box.journal(unit).splitlines()
        denials = [ln for ln in journal if HARDENING_DENIALS.search(ln)]
        assert denials == [], f"{unit}: {denials}"
        for line in journal:  # shown with -s: what an operator would see in `journalctl -p warning`
            if re.search(r'"level":"(warning|error|critical)"', line):
                print(f"{unit} journal: {line}")
