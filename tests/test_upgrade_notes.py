"""The README's upgrade and downgrade notes (Upgrading without dropping traffic) name what the previous
release and this one read differently in agent.toml, asked of both releases' own code: the previous
one is built from this repository's history (tests/releases.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from hostmesh.agent import config as agent_config
from hostmesh.agent.config import ConfigError, parse_config
from tests.releases import release_command_or_skip
from tests.support import REPO

PREVIOUS = "0.2.0"  # the release an upgrade comes from and a downgrade goes to
PIN = "sha256:" + "0" * 64


def previous_command() -> list[str]:
    return release_command_or_skip(PREVIOUS)


def upgrade_notes() -> str:
    readme = (REPO / "README.md").read_text()
    return readme[
        readme.index("### Upgrading without dropping traffic") : readme.index("### Rotating the CA root")
    ]


def paragraph(text: str, opening: str) -> str:
    """The paragraph that opens with `opening`."""
    start = text.index(f"\n\n{opening}") + 2
    end = text.find("\n\n", start)
    return text[start : end if end != -1 else len(text)]


def test_a_previous_release_file_this_release_refuses_is_in_the_upgrade_notes(tmp_path: Path) -> None:
    """0.2 serves mesh DNS on any address; 0.3 wants `dns_shared = true` beyond loopback, a key 0.2
    refuses: the notes say to add it with the package."""
    config = tmp_path / "agent.toml"
    config.write_text(
        f'dns = "0.0.0.0:15053"\n[ca]\npin = "{PIN}"\n[[services]]\nname = "web"\nport = 8080\n'
    )
    old = subprocess.run(
        [*previous_command(), "agent", "validate", "--no-files", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert old.returncode == 0, old.stderr
    with pytest.raises(ConfigError, match="dns_shared = true"):
        parse_config(
            {"dns": "0.0.0.0:15053", "ca": {"pin": PIN}, "services": [{"name": "web", "port": 8080}]}
        )
    before_upgrade = paragraph(upgrade_notes(), "Before a rolling upgrade")
    assert "`dns_shared = true`" in before_upgrade and "hostmesh_agent_dns_shared: true" in before_upgrade


def test_every_agent_toml_key_the_previous_release_lacks_is_in_the_downgrade_notes() -> None:
    """The previous release refuses a file with a key it does not know, so a downgrade starts by
    removing each one: the notes name them all."""
    python = Path(previous_command()[0]).parent / "python"
    script = (
        "import json, hostmesh.agent.config as c;"
        "print(json.dumps({n: sorted(getattr(c, n)) for n in dir(c) if n.endswith('_KEYS')}))"
    )
    old = json.loads(subprocess.run([str(python), "-c", script], capture_output=True, text=True,
                                    check=True, timeout=60).stdout)  # fmt: skip
    new_keys = {
        key
        for name in dir(agent_config)
        if name.endswith("_KEYS")
        for key in set(getattr(agent_config, name)) - set(old.get(name, []))
    }
    assert new_keys, "no key is new since the previous release: update PREVIOUS"
    downgrade = paragraph(upgrade_notes(), "**Downgrade.**")
    assert {key for key in new_keys if f"`{key}`" not in downgrade} == set()
