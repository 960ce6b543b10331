"""`route|policy|gateway|external|intention list` with a token that may not read the documents,
against a Consul with ACLs on (default deny): Consul leaves the keys such a token may not read out
of a list without a word, so "no route documents" would be a permission error reported as
something else. The CLI reads the folder key itself, which Consul does refuse (403), and says so."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from hostmesh.agent.cli import cli
from hostmesh.registry import acl
from tests.consul_secure import SecureConsulDev
from tests.test_cli_ops import fails, ok, route_doc, write

pytestmark = pytest.mark.consul

_names = itertools.count()
BLIND_RULES = 'key_prefix "elsewhere/" { policy = "read" }'  # a token with no read below hostmesh/


def svc(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


class Tokens:
    def __init__(self, dev: SecureConsulDev) -> None:
        self.operator = dev.token_for("operator-lists", acl.operator_policy())
        self.blind = dev.token_for("blind-lists", BLIND_RULES)


@pytest.fixture(scope="module")
def tokens(secure: SecureConsulDev) -> Tokens:
    return Tokens(secure)


def hm(secure: SecureConsulDev, token: str, *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env=secure.client_env(token), catch_exceptions=False)


def document(group: str, service: str) -> dict[str, Any]:
    return {
        "route": route_doc(service),
        "policy": {"service": service},
        "intention": {"service": service, "rules": [{"source": "web", "action": "allow"}]},
        "gateway": {"service": service, "http": [{"hosts": ["shop.example.com"], "service": "web"}]},
        "external": {"service": service, "addresses": ["api.example.com:443"]},
    }[group]


FOLDERS = {
    "route": "routes",
    "policy": "policies",
    "intention": "intentions",
    "gateway": "gateways",
    "external": "external",
}


@pytest.mark.parametrize("group", sorted(FOLDERS))
def test_a_token_that_cannot_read_the_folder_is_told_so(
    secure: SecureConsulDev, tokens: Tokens, tmp_path: Path, group: str
) -> None:
    s = svc(group)
    ok(hm(secure, tokens.operator, group, "apply", "-f", write(tmp_path, document(group, s))))
    assert s in ok(hm(secure, tokens.operator, group, "list"))

    folder = f"hostmesh/{FOLDERS[group]}/"
    for fmt in ([], ["-o", "json"]):
        result = hm(secure, tokens.blind, group, "list", *fmt)
        assert fails(result) == f"Error: Consul ACL denied list of {folder}: the token lacks key:read on it"
        assert result.stdout == ""


def test_a_token_that_reads_only_some_documents_is_warned(
    secure: SecureConsulDev, tokens: Tokens, tmp_path: Path
) -> None:
    shown, hidden = svc("shown"), svc("hidden")
    for s in (shown, hidden):
        ok(hm(secure, tokens.operator, "route", "apply", "-f", write(tmp_path, route_doc(s))))
    some = secure.token_for("some-lists", f'key "hostmesh/routes/{shown}" {{ policy = "read" }}')
    result = hm(secure, some, "route", "list")
    assert result.exit_code == 0, result.output
    assert shown in result.stdout and hidden not in result.stdout
    assert result.stderr.strip() == (
        "warning: the token lacks key:read on hostmesh/routes/: documents it may not read are not listed"
    )
    assert hm(secure, tokens.operator, "route", "list").stderr == ""  # no warning when all is readable


def test_history_a_token_cannot_read_is_a_permission_error_not_no_history(
    secure: SecureConsulDev, tokens: Tokens, tmp_path: Path
) -> None:
    s = svc("hist")
    ok(hm(secure, tokens.operator, "route", "apply", "-f", write(tmp_path, route_doc(s))))
    live_only = secure.token_for("live-only", f'key "hostmesh/routes/{s}" {{ policy = "read" }}')
    assert s in ok(hm(secure, live_only, "route", "get", s))  # it may read the document, not its history
    line = fails(hm(secure, live_only, "route", "history", s))
    assert (
        line
        == f"Error: Consul ACL denied list of hostmesh/history/routes/{s}/: the token lacks key:read on it"
    )
    assert "1" in ok(hm(secure, tokens.operator, "route", "history", s))  # (the operator's token: version 1)
    missing = svc("none")  # a document that never existed, with a token that may read histories
    assert (
        fails(hm(secure, tokens.operator, "route", "history", missing))
        == f"Error: no history for routes/{missing}"
    )
