"""The .deb: built by packaging/build-deb.sh, installed with dpkg on this machine, run, purged.

These tests change the machine they run on (a package, a system user, files under /opt, /etc,
/var/lib): they need root and dpkg, and they purge any `hostmesh` package present before and
after. The build reuses the dependency wheels cached in .cache/wheels.

The maintainer scripts are exercised both ways: on this machine there is no running systemd
(no /run/systemd/system), and a second test makes one appear, with a `systemctl` that records its
calls first on PATH (dpkg passes PATH through to maintainer scripts).
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.compiled import SOURCE_TREE_LOCK
from hostmesh.agent.compiled import MODULES
from hostmesh.agent.run import STOP_CONSUL_CALL, STOP_SLACK_SECONDS
from hostmesh.registry.http import CUT_TAKEN, SERVER_CLOSE_GRACE
from tests.support import (
    DPKG_LOCK,
    REPO,
    RESTART_NOTIFIED,
    ConsulDev,
    free_port,
    install_role_playbook,
    packs_relocations,
    wait_deregistered,
    wait_until,
)

BUILD_TIMEOUT = 600  # seconds; a cold build downloads ~12 MB of wheels, a warm one takes ~15 s
DPKG_TIMEOUT = 120
LINTIAN_TIMEOUT = 900  # lintian reads every file of the ~1,000 in the package: minutes on a busy machine
pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("dpkg") is None, reason="installs a .deb: needs root and dpkg"
    ),
    # each test may build the package (the module's first) and install, upgrade and purge it
    # (man-db's trigger runs on each): far beyond the suite's default per-test bound
    pytest.mark.timeout(BUILD_TIMEOUT + 4 * DPKG_TIMEOUT + LINTIAN_TIMEOUT),
]

AGENT_READY_TIMEOUT = 30.0  # the agent is ready in ~1 s with Consul and the CA up; CI can be slow
INSTALLED_PATHS = [
    "/opt/hostmesh",
    "/usr/bin/hostmesh",
    "/lib/systemd/system/hostmesh-agent.service",
    "/lib/systemd/system/hostmesh-ca.service",
    "/etc/hostmesh",
    "/var/lib/hostmesh",
]


def run(*cmd: str, env: dict[str, str] | None = None, timeout: float = DPKG_TIMEOUT) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def installed() -> bool:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Status}", "hostmesh"], capture_output=True, text=True
    )
    return result.returncode == 0 and result.stdout.strip() not in ("", "not-installed")


def purge(env: dict[str, str] | None = None) -> None:
    if installed():
        run("dpkg", "--purge", "hostmesh", env=env)


def user_exists(name: str) -> bool:
    return subprocess.run(["getent", "passwd", name], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def dist(packages_dist: Path) -> Path:
    """The run's one build of the packages (tests/conftest.py, which test_ansible shares)."""
    # whether the compiled wheel was built or reused (tests/test_compiled_build.py, run before this
    # module in `make unit`, leaves it in the shared cache): shown with -s and in a failure's report
    print((packages_dist / "compiled-wheel.log").read_text())
    return packages_dist


def blocked_on(path: Path) -> bool:
    """Whether a process waits for a lock on `path` (a `->` line of /proc/locks names its inode)."""
    inode = f":{path.stat().st_ino} "
    return any("->" in line and inode in line for line in Path("/proc/locks").read_text().splitlines())


def test_the_build_waits_while_another_makes_an_sdist_in_the_tree(tmp_path: Path) -> None:
    """build-deb.sh makes its sdist in the tree, whose hostmesh.egg-info setuptools rewrites meanwhile:
    while another build (`make unit` may run the packaging tests on several workers at once) or
    test_compiled_build's sdist holds .cache/source-tree.lock, it waits, and builds once that is
    released."""
    lock_path = SOURCE_TREE_LOCK
    lock_path.parent.mkdir(exist_ok=True)
    env = {**os.environ, "DIST": str(tmp_path), "PYTHON": str(REPO / ".venv/bin/python"), "WHEELS_ONLY": "1"}
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as the other build does
        build = subprocess.Popen(
            [str(REPO / "packaging/build-deb.sh")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            wait_until(lambda: blocked_on(lock_path) or build.poll() is not None, BUILD_TIMEOUT, "the build")
            assert build.poll() is None and blocked_on(lock_path), build.communicate()
            assert not list(tmp_path.glob("hostmesh-*.tar.gz"))
        except BaseException:
            build.kill()
            build.communicate()
            raise
    _, err = build.communicate(timeout=BUILD_TIMEOUT)
    assert build.returncode == 0, err.decode()[-3000:]
    assert list(tmp_path.glob("hostmesh-*.tar.gz")) and list(tmp_path.glob("hostmesh-*-py3-none-any.whl"))


@pytest.fixture(scope="module")
def deb(dist: Path) -> Path:
    debs = sorted(dist.glob("hostmesh_*.deb"))
    assert len(debs) == 1, debs
    return debs[0]


@pytest.fixture
def clean_machine() -> Iterator[None]:
    """No hostmesh package before or after; one such test at a time on this machine (several
    checkouts may run their suites at once, and they share dpkg's database). The lock is the one
    packaging/ensure-tools.sh takes to install, so no apt-get of another test worker runs meanwhile."""
    with open(DPKG_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held for seconds by the other run: its own tests are bounded
        purge()
        try:
            yield
        finally:
            purge()


def assert_all_gone() -> None:
    left = [p for p in INSTALLED_PATHS if os.path.lexists(p)]
    assert left == [], f"left behind after purge: {left}"
    assert not user_exists("hostmesh")
    assert subprocess.run(["getent", "group", "hostmesh"], capture_output=True).returncode != 0
    assert not installed()


def test_artifacts(dist: Path, deb: Path) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    sdist = dist / f"hostmesh-{version}.tar.gz"
    wheel = dist / f"hostmesh-{version}-py3-none-any.whl"
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    assert f"hostmesh-{version}/agent/sdnotify.py" in names
    assert f"hostmesh-{version}/pyproject.toml" in names
    with zipfile.ZipFile(wheel) as whl:
        wnames = whl.namelist()
        entry_points = next(n for n in wnames if n.endswith("entry_points.txt"))
        assert "hostmesh = hostmesh.agent.cli:main" in whl.read(entry_points).decode()
    assert "hostmesh/agent/sdnotify.py" in wnames and "hostmesh/ca/pki.py" in wnames
    assert not any(n.startswith(("agent/", "ca/", "registry/")) for n in wnames)  # namespaced only
    assert not any(n.endswith(".so") for n in wnames)  # the pure wheel: no extension, whatever build/ held
    # Every package of the source tree is in the wheel (an editable install hides a missing one).
    for top in ("agent", "registry", "ca"):
        for init in sorted((REPO / top).glob("**/__init__.py")):
            assert f"hostmesh/{init.relative_to(REPO).as_posix()}" in wnames, init

    fields = run("dpkg-deb", "-f", str(deb), "Package", "Version", "Depends", "Architecture")
    assert "Package: hostmesh" in fields and f"Version: {version}" in fields
    assert "python3.11" in fields
    # the compiled build's library has packed relative relocations (setup.py link_flags), which a
    # glibc before 2.36 refuses to load: the package says so rather than install where it cannot run
    libc = re.search(r"libc6 \(>= ([\d.]+)\)", fields)
    assert libc and (tuple(map(int, libc.group(1).split("."))) >= (2, 36)) == packs_relocations(), fields
    contents = run("dpkg-deb", "-c", str(deb))
    for path in (
        "./opt/hostmesh/bin/hostmesh",
        "./lib/systemd/system/hostmesh-agent.service",
        "./lib/systemd/system/hostmesh-ca.service",
        "./etc/hostmesh/agent.toml.example",
    ):
        assert path in contents, path
    assert re.search(r"\./usr/bin/hostmesh -> /opt/hostmesh/bin/hostmesh", contents)
    assert "__pycache__" in contents  # byte-code shipped, so dpkg owns and removes it
    # the compiled build (setup.py): the hot modules as extensions for the interpreter it depends on
    site = r"\./opt/hostmesh/lib/python3\.11/site-packages/hostmesh/"
    for module in MODULES:
        path = module.removeprefix("hostmesh.").replace(".", "/")
        assert re.search(site + re.escape(path) + r"\.cpython-311-[\w-]+\.so\n", contents), module
    conffiles = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True, text=True)
    assert conffiles.stdout.split() == ["/etc/hostmesh/agent.toml.example"]


def test_install_run_purge_without_systemd(deb: Path, clean_machine: None) -> None:
    if Path("/run/systemd/system").is_dir():
        pytest.skip("this machine runs systemd; the other test covers that path")
    run("dpkg", "-i", str(deb))
    assert installed()
    assert run("/usr/bin/hostmesh", "--version").startswith("hostmesh, version ")
    # The service user can run it too (the units run as `hostmesh`).
    assert user_exists("hostmesh")
    assert "version" in run("runuser", "-u", "hostmesh", "--", "/usr/bin/hostmesh", "--version")
    # The venv runs on Debian's interpreter and names no build path.
    exe = run("/opt/hostmesh/bin/python", "-c", "import sys, os; print(os.path.realpath(sys.executable))")
    assert exe.strip().startswith("/usr/bin/python3")
    head = Path("/opt/hostmesh/bin/hostmesh").read_text().splitlines()[0]
    assert head == "#!/opt/hostmesh/bin/python3.11" or head == "#!/opt/hostmesh/bin/python", head
    # Config: root-owned, readable by the service group; state belongs to the service user.
    st = os.stat("/etc/hostmesh")
    assert (st.st_uid, oct(st.st_mode & 0o777)) == (0, "0o750")
    assert Path("/var/lib/hostmesh").owner() == "hostmesh"
    assert oct(os.stat("/var/lib/hostmesh").st_mode & 0o777) == "0o700"  # as agent-toml.md says
    conffiles = run("dpkg-query", "-W", "-f=${Conffiles}", "hostmesh")
    assert "/etc/hostmesh/agent.toml.example" in conffiles
    # The example config is valid for the agent's own parser.
    check = "from pathlib import Path; from hostmesh.agent.config import load_config as f; f(Path('{}'))"
    run("/opt/hostmesh/bin/python", "-c", check.format("/etc/hostmesh/agent.toml.example"))

    # Files an operator adds (config, token) go too on purge.
    Path("/etc/hostmesh/agent.toml").write_text("# operator's config\n")
    run("dpkg", "-r", "hostmesh")
    assert not os.path.lexists("/usr/bin/hostmesh") and not os.path.lexists("/opt/hostmesh")
    assert Path("/etc/hostmesh/agent.toml").exists()  # remove keeps configuration
    run("dpkg", "--purge", "hostmesh")
    assert_all_gone()


@pytest.fixture
def fake_running_systemd(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """Make `[ -d /run/systemd/system ]` true and put a recording `systemctl` first on PATH."""
    created = not Path("/run/systemd/system").exists()
    if created:
        Path("/run/systemd/system").mkdir(parents=True)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "systemctl.calls"
    calls.touch()
    fake = bindir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}
    try:
        yield env, calls
    finally:
        purge(env)
        if created:
            Path("/run/systemd/system").rmdir()


def policy_allows(action: str) -> bool:
    """What /usr/sbin/policy-rc.d (Debian's switch that containers and chroots use to forbid service
    actions) says of `action`; the maintainer scripts act through deb-systemd-invoke, which asks it."""
    helper = Path("/usr/sbin/policy-rc.d")
    if not os.access(helper, os.X_OK):
        return True
    rc = subprocess.run(
        [str(helper), "hostmesh-agent.service", action], capture_output=True, timeout=30
    ).returncode
    return rc in (0, 104)


def test_maintainer_scripts_with_running_systemd(
    deb: Path, clean_machine: None, fake_running_systemd: tuple[dict[str, str], Path]
) -> None:
    env, calls = fake_running_systemd

    def take() -> list[str]:
        lines = calls.read_text().splitlines()
        calls.write_text("")
        return lines

    run("dpkg", "-i", str(deb), env=env)
    assert take() == ["daemon-reload"]  # fresh install: units known, nothing started or enabled

    # upgrade (same version): running units restarted, the agent once this release takes its config
    agent_toml = Path("/etc/hostmesh/agent.toml")
    agent_toml.write_text(
        f'node = "vm-1"\n[ca]\naddress = "https://127.0.0.1:9"\npin = "sha256:{"0" * 64}"\n'
        '[[services]]\nname = "web"\nport = 9\n'
    )
    run("dpkg", "-i", str(deb), env=env)
    probe = "is-active --quiet hostmesh-agent.service"
    restart = "try-restart hostmesh-agent.service hostmesh-ca.service"
    assert take() == ["daemon-reload", probe, *([restart] if policy_allows("try-restart") else [])]
    ca_only = "try-restart hostmesh-ca.service"

    # a join token the agent's user cannot read (written by root 0600): the restart would fail on it
    token = Path("/etc/hostmesh/join-token")
    token.write_text("hmt1.a.b\n")
    token.chmod(0o600)
    agent_toml.write_text(agent_toml.read_text().replace("[ca]\n", f'[ca]\ntoken_file = "{token}"\n'))
    out = subprocess.run(
        ["dpkg", "-i", str(deb)], capture_output=True, text=True, env=env, timeout=DPKG_TIMEOUT
    )
    assert out.returncode == 0, out.stderr
    assert "NOT restarting hostmesh-agent" in out.stderr, out.stderr
    assert f"[ca] token_file {token}: cannot read as hostmesh" in out.stderr, out.stderr
    assert take() == ["daemon-reload", probe, *([ca_only] if policy_allows("try-restart") else [])]
    # the same token readable by the user a drop-in runs the agent as: that user is the one checked
    dropin = Path("/etc/systemd/system/hostmesh-agent.service.d/user.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text("[Service]\nUser=nobody\n")
    os.chown(token, pwd.getpwnam("nobody").pw_uid, -1)
    out = subprocess.run(
        ["dpkg", "-i", str(deb)], capture_output=True, text=True, env=env, timeout=DPKG_TIMEOUT
    )
    assert out.returncode == 0, out.stderr
    assert f"[ca] token_file {token}: cannot read as nobody" in out.stderr, out.stderr  # /etc/hostmesh: 0750
    assert take() == ["daemon-reload", probe, *([ca_only] if policy_allows("try-restart") else [])]
    elsewhere = Path(tempfile.mkdtemp(dir="/run")) / "join-token"  # where nobody may read it
    elsewhere.parent.chmod(0o755)
    shutil.move(token, elsewhere)
    agent_toml.write_text(agent_toml.read_text().replace(str(token), str(elsewhere)))
    out = subprocess.run(
        ["dpkg", "-i", str(deb)], capture_output=True, text=True, env=env, timeout=DPKG_TIMEOUT
    )
    assert out.returncode == 0 and "NOT restarting" not in out.stderr, out.stderr
    assert take() == ["daemon-reload", probe, *([restart] if policy_allows("try-restart") else [])]
    dropin.unlink()
    shutil.rmtree(elsewhere.parent)
    agent_toml.write_text(agent_toml.read_text().replace(f'token_file = "{elsewhere}"\n', ""))

    # one it refuses (0.1 took a non-loopback upstream bind): not restarted, left running on the new files
    agent_toml.write_text(
        agent_toml.read_text() + '[[services.upstreams]]\nservice = "api"\nbind = "0.0.0.0:9091"\n'
    )
    out = subprocess.run(
        ["dpkg", "-i", str(deb)], capture_output=True, text=True, env=env, timeout=DPKG_TIMEOUT
    )
    assert out.returncode == 0, out.stderr
    assert "NOT restarting hostmesh-agent" in out.stderr and "is not a loopback address" in out.stderr, (
        out.stderr
    )
    assert take() == ["daemon-reload", probe, *([ca_only] if policy_allows("try-restart") else [])]

    run("dpkg", "-i", str(deb), env={**env, "HOSTMESH_NO_RESTART": "1"})  # the Ansible role drains first
    assert take() == ["daemon-reload"]

    Path("/etc/systemd/system/multi-user.target.wants").mkdir(parents=True, exist_ok=True)
    link = Path("/etc/systemd/system/multi-user.target.wants/hostmesh-agent.service")
    link.symlink_to("/lib/systemd/system/hostmesh-agent.service")
    run("dpkg", "--purge", "hostmesh", env=env)
    stop = ["stop hostmesh-agent.service hostmesh-ca.service"] if policy_allows("stop") else []
    assert take() == [*stop, "daemon-reload", "daemon-reload"]
    assert not os.path.lexists(link)
    assert_all_gone()


def system_python_has_apt() -> bool:
    found = subprocess.run(["/usr/bin/python3", "-c", "import apt"], capture_output=True, check=False)
    return found.returncode == 0


@pytest.mark.skipif(
    shutil.which("ansible-playbook", path=str(Path(sys.executable).parent)) is None
    or not Path("/usr/bin/python3").exists()
    or not system_python_has_apt(),
    reason="the Ansible role's apt install: ansible-core (make venv) and Debian's python3-apt",
)
def test_the_role_installs_a_package_built_again_with_the_same_version(
    deb: Path, clean_machine: None, tmp_path: Path
) -> None:
    """`make deb` of a newer commit keeps the version (pyproject.toml's): the install role on a real host
    (hostmesh_install_root /) copied the new package and then left the old one installed, since apt
    installs only another version than the installed one, and the agent ran the old code. And when that
    install failed (dpkg busy), the next runs found the package file current and never installed it."""
    rebuilt = tmp_path / "rebuilt.deb"
    tree = tmp_path / "tree"
    run("dpkg-deb", "-R", str(deb), str(tree))
    marker = tree / "usr/share/doc/hostmesh/built-again"
    marker.write_text("the same version, built again\n")
    run("dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(rebuilt))
    version = f"0.0.0~rebuilt{os.getpid()}"  # the package file's name on the host: none there yet
    delivered = Path(f"/var/cache/hostmesh_{version}.deb")
    playbook = install_role_playbook(tmp_path)
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible/ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_ROLES_PATH": str(REPO / "ansible/roles"), "ANSIBLE_HOME": str(tmp_path / "ansible-home"),
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp")}  # fmt: skip

    def role(package: Path, succeeds: bool = True) -> str:
        variables = {"ansible_python_interpreter": "/usr/bin/python3", "hostmesh_install_method": "deb",
                     "hostmesh_install_deb_src": str(package),
                     "hostmesh_install_version": version}  # fmt: skip
        done = subprocess.run(
            [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-c", "local",
             "-e", json.dumps(variables), str(playbook)],
            env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT,
        )  # fmt: skip
        assert (done.returncode == 0) == succeeds, done.stdout[-6000:] + done.stderr[-2000:]
        return done.stdout

    try:
        assert RESTART_NOTIFIED in role(deb)
        assert installed() and not Path("/usr/share/doc/hostmesh/built-again").exists()
        # dpkg busy (unattended-upgrades, another apt): the install of the rebuilt package fails, and
        # the next run must install it still, though the package file on the host is already the new one
        with open("/var/lib/dpkg/lock-frontend", "w") as busy:
            fcntl.lockf(busy, fcntl.LOCK_EX | fcntl.LOCK_NB)
            out = role(rebuilt, succeeds=False)
        assert RESTART_NOTIFIED not in out and not Path("/usr/share/doc/hostmesh/built-again").exists()
        assert "frontend lock" in out and "the next run installs it again" in out, out[-6000:]
        out = role(rebuilt)
        assert Path("/usr/share/doc/hostmesh/built-again").exists(), out[-6000:]
        assert RESTART_NOTIFIED in out
        out = role(rebuilt)  # and a run with nothing new changes nothing
        assert re.search(r"^localhost\s*:.*changed=0", out, re.MULTILINE), out[-6000:]
    finally:
        delivered.unlink(missing_ok=True)


def test_lintian_is_clean(deb: Path) -> None:
    """No error or warning outside packaging/debian/lintian-overrides, whose every entry has a reason."""
    subprocess.run([str(REPO / "packaging/ensure-tools.sh"), "lintian"], check=True, timeout=LINTIAN_TIMEOUT)
    result = subprocess.run(
        ["lintian", "--fail-on", "error,warning", "--tag-display-limit", "0", str(deb)],
        capture_output=True,
        text=True,
        timeout=LINTIAN_TIMEOUT,
    )
    tags = [ln for ln in result.stdout.splitlines() if re.match(r"^[EW]: ", ln)]
    assert result.returncode == 0 and tags == [], "\n".join(tags) or result.stderr
    lines = (REPO / "packaging/debian/lintian-overrides").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("hostmesh:"):
            assert i > 0 and lines[i - 1].startswith("#"), f"override without a reason: {line}"


def test_docs_man_page_and_completions_are_shipped(deb: Path) -> None:
    names = run("dpkg-deb", "-c", str(deb))
    for path in (
        "./usr/share/doc/hostmesh/copyright",
        "./usr/share/doc/hostmesh/changelog.gz",
        "./usr/share/doc/hostmesh/docs/architecture.md",
        "./usr/share/doc/hostmesh/docs/reference/agent-toml.md",
        "./usr/share/doc/hostmesh/docs/schema/route.json",
        "./usr/share/doc/hostmesh/examples/route-web-canary.yaml",
        "./usr/share/man/man1/hostmesh.1.gz",
        "./usr/share/bash-completion/completions/hostmesh",
        "./usr/share/zsh/vendor-completions/_hostmesh",
        "./usr/share/fish/vendor_completions.d/hostmesh.fish",
        "./usr/share/lintian/overrides/hostmesh",
    ):
        assert path in names, path


# a Markdown link's target: [text](target), the target without spaces (none of ours has one)
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_links_in_the_shipped_docs_lead_to_shipped_files(deb: Path, tmp_path: Path) -> None:
    """The README and docs/ are installed in /usr/share/doc/hostmesh, not in a checkout: a relative
    link there must name a file the package ships, in the layout the package gives it."""
    run("dpkg-deb", "-x", str(deb), str(tmp_path))
    doc = tmp_path / "usr/share/doc/hostmesh"
    pages = sorted(doc.rglob("*.md"))
    assert doc / "README.md" in pages and doc / "docs/README.md" in pages
    dangling = []
    for page in pages:
        for target in MARKDOWN_LINK.findall(page.read_text()):
            path = target.partition("#")[0]
            if not path or re.match(r"[a-z][a-z0-9+.-]*:", path):  # an anchor on the page, a URL
                continue
            if not (page.parent / path).exists():
                dangling.append(f"{page.relative_to(doc)} -> {target}")
    assert dangling == [], dangling


# --- the installed agent against a test Consul --------------------------------------------------


def command_exists(*argv: str) -> bool:
    result = subprocess.run(["/usr/bin/hostmesh", *argv, "--help"], capture_output=True, timeout=60)
    return result.returncode == 0


def recv_notify(sock: socket.socket, want: str, timeout: float) -> dict[str, str]:
    """Read sd_notify datagrams until one carries `want` (e.g. READY=1); bounded in time."""
    deadline = time.monotonic() + timeout
    for _ in range(1000):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            break
        fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
        key, _, value = want.partition("=")
        if fields.get(key) == value:
            return fields
    raise AssertionError(f"no {want} from the agent within {timeout:g}s")


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def test_installed_agent_runs_against_consul(
    deb: Path, clean_machine: None, consul: ConsulDev, tmp_path: Path
) -> None:
    run("dpkg", "-i", str(deb))
    assert command_exists("agent", "run") and command_exists("ca", "serve")
    # the compiled build's extensions load on the interpreter the package depends on
    build = json.loads(run("/usr/bin/hostmesh", "version", "-o", "json"))
    assert build["compiled"] is True and build["compiled_modules"] == list(MODULES)

    env = {**os.environ, "CONSUL_HTTP_ADDR": consul.url}
    env.pop("NOTIFY_SOCKET", None)
    ca_dir = tmp_path / "ca"
    init = run("/usr/bin/hostmesh", "ca", "init", "--data-dir", str(ca_dir), env=env)
    pin_match = re.search(r"sha256:[0-9a-f]{64}", init)
    assert pin_match, init
    ca_port = free_port()
    ca_proc = subprocess.Popen(
        ["/usr/bin/hostmesh", "ca", "serve", "--data-dir", str(ca_dir), "--listen", f"127.0.0.1:{ca_port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "ca.log", "wb"),  # noqa: SIM115
    )  # fmt: skip
    agent: subprocess.Popen[bytes] | None = None
    try:
        wait_until(lambda: http_port_open(ca_port) or ca_proc.poll() is not None, 30, "the CA to listen")
        assert ca_proc.poll() is None, (tmp_path / "ca.log").read_text()
        token = run("/usr/bin/hostmesh", "ca", "token", "create", "--service", "debtest", env=env)
        token_file = tmp_path / "join-token"
        token_file.write_text(token.strip().splitlines()[-1] + "\n")
        token_file.chmod(0o600)

        admin = free_port()
        config = tmp_path / "agent.toml"
        config.write_text(
            f'node = "debtest-node"\ndrain_seconds = 1\nmesh_address = "127.0.0.1"\n'
            f'data_dir = "{tmp_path / "agent-data"}"\n'
            f'inbound = "127.0.0.1:{free_port()}"\nadmin = "127.0.0.1:{admin}"\n'
            f'metrics = "127.0.0.1:{free_port()}"\n'
            f'[consul]\naddress = "{consul.url}"\n'
            f'[ca]\naddress = "https://127.0.0.1:{ca_port}"\npin = "{pin_match.group(0)}"\n'
            f'token_file = "{token_file}"\n'
            f'[[services]]\nname = "debtest"\nport = {free_port()}\nprotocol = "tcp"\n'
            "health = { tcp = true }\n"
        )
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(tmp_path / "notify.sock"))
            agent_env = {**env, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
            started = time.monotonic()
            agent = subprocess.Popen(
                ["/usr/bin/hostmesh", "agent", "run", "--config", str(config)],
                env=agent_env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "agent.log", "wb"),  # noqa: SIM115
            )  # fmt: skip
            try:
                recv_notify(notify, "READY=1", AGENT_READY_TIMEOUT)
                print(f"installed agent: READY=1 {time.monotonic() - started:.2f}s after exec")
            except AssertionError as exc:
                logs = (tmp_path / "agent.log").read_text()[-4000:]
                logs += (tmp_path / "ca.log").read_text()[-2000:]
                raise AssertionError(f"{exc} (exit {agent.poll()})\n{logs}") from None

            # Registration may follow READY=1 (it is not needed to serve); /ready waits for it, so
            # once /ready says 200 Consul lists the service.
            def registered() -> list[str]:
                return [s["ServiceID"] for s in consul.get_json("/v1/catalog/service/debtest")]

            ready = f"http://127.0.0.1:{admin}/ready"
            wait_until(lambda: http_status(ready) == 200, AGENT_READY_TIMEOUT, "the agent's /ready")
            assert registered() == ["debtest-debtest-node"]

            agent.send_signal(signal.SIGTERM)
            stopping = recv_notify(notify, "STOPPING=1", AGENT_READY_TIMEOUT)
            # drain_seconds = 1, one service, the HTTP servers' last answers
            needs = 1 + 2 * STOP_CONSUL_CALL + SERVER_CLOSE_GRACE + CUT_TAKEN + STOP_SLACK_SECONDS
            assert stopping["EXTEND_TIMEOUT_USEC"] == str(int(needs * 1_000_000))
            assert agent.wait(timeout=AGENT_READY_TIMEOUT) == 0, (tmp_path / "agent.log").read_text()
            wait_deregistered(consul, "debtest", "debtest-debtest-node", (tmp_path / "agent.log").read_text())
    finally:
        for proc in (agent, ca_proc):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def http_port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
