"""Contract tests: the Nomad test double (tests/nomad_double.py) answers like the samples in Nomad's
API docs (tests/nomad_samples/, each file naming its doc page), and python-nomad, the client hostmesh
uses, reads it as it reads Nomad. What hostmesh's Nomad tests prove is only as good as this."""

from __future__ import annotations

import http.client
import json
import socket
import stat
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from hostmesh.registry.errors import PermissionDenied
from hostmesh.registry.nomad import AllocationState, NomadAPI, NomadSettings, allocation_state
from tests.nomad_double import NomadDouble, sample

pytestmark = pytest.mark.nomad_double


@pytest.fixture
def nomad() -> Iterator[NomadDouble]:
    with NomadDouble() as double:
        yield double


def same_shape(doc: Any, want: Any, path: str = "$") -> list[str]:
    """Where `doc` differs in shape from the documented `want`: every documented key present with a
    value of the same JSON type (null in the sample says nothing of the type), recursively. Maps
    keyed by data (task names, score names) are compared through their first entry."""
    problems: list[str] = []
    if want is None:
        return problems
    if isinstance(want, dict):
        if not isinstance(doc, dict):
            return [f"{path}: {type(doc).__name__}, documented object"]
        data_keyed = path.endswith(("TaskStates", "TaskResources", "Scores", "NodesAvailable"))
        if data_keyed:
            if want and doc:
                problems += same_shape(next(iter(doc.values())), next(iter(want.values())), f"{path}.*")
            return problems
        for key, value in want.items():
            if key not in doc:
                problems.append(f"{path}.{key}: missing")
            else:
                problems += same_shape(doc[key], value, f"{path}.{key}")
        return problems
    if isinstance(want, list):
        if not isinstance(doc, list):
            return [f"{path}: {type(doc).__name__}, documented list"]
        if want and doc:
            problems += same_shape(doc[0], want[0], f"{path}[0]")
        return problems
    kinds = (bool,) if isinstance(want, bool) else (int, float) if isinstance(want, int | float) else (str,)
    if not isinstance(doc, kinds) or (isinstance(doc, bool) and not isinstance(want, bool)):
        return [f"{path}: {doc!r}, documented like {want!r}"]
    return problems


def get(url: str, token: str | None = None) -> tuple[int, str, dict[str, str]]:
    req = urllib.request.Request(url, headers={"X-Nomad-Token": token} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def test_the_shape_check_catches_a_drift() -> None:
    documented = sample("allocation_read.json")
    drifted = json.loads(json.dumps(documented))
    del drifted["ClientStatus"]
    drifted["Job"]["TaskGroups"][0]["Tasks"][0]["KillTimeout"] = "5s"
    assert same_shape(drifted, documented) == [
        "$.Job.TaskGroups[0].Tasks[0].KillTimeout: '5s', documented like 5000000000",
        "$.ClientStatus: missing",
    ]


def test_allocation_read_has_the_documented_shape(nomad: NomadDouble) -> None:
    alloc = nomad.add_allocation("shop", "web", ("web", "hostmesh"), http=24001)
    status, body, headers = get(f"{nomad.url}/v1/allocation/{alloc.id}", nomad.management_token)
    assert status == 200 and headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    assert same_shape(doc, sample("allocation_read.json")) == []
    assert (doc["ID"], doc["JobID"], doc["TaskGroup"], doc["Namespace"]) == (
        alloc.id,
        "shop",
        "web",
        "default",
    )
    assert (
        set(doc["TaskStates"]) == {"web", "hostmesh"} and int(headers["X-Nomad-Index"]) == doc["ModifyIndex"]
    )
    assert allocation_state(doc) is AllocationState.LIVE
    nomad.stop_allocation(alloc.id)  # as `nomad alloc stop` leaves it
    doc = json.loads(get(f"{nomad.url}/v1/allocation/{alloc.id}", nomad.management_token)[1])
    assert (doc["DesiredStatus"], doc["ClientStatus"], doc["TaskStates"]["web"]["State"]) == (
        "stop", "complete", "dead"
    )  # fmt: skip
    assert allocation_state(doc) is AllocationState.STOPPED


def test_tokens_are_checked_as_nomad_checks_them(nomad: NomadDouble) -> None:
    """Nomad looks the allocation up before the token's read-job (nomad/alloc_endpoint.go GetAlloc):
    one it does not know is 404 for any token it accepts, and one in a namespace the token may not
    read-job is hidden as `Unknown allocation`, which its HTTP agent answers with 500 (Nomad's own
    TestAllocEndpoint_GetAlloc_ACL: no token, or a token without read-job: "expected unknown
    alloc"); the request's namespace plays no part. A token Nomad does not know is 403."""
    alloc = nomad.add_allocation("shop", "web", ("web",))
    url = f"{nomad.url}/v1/allocation/{alloc.id}"
    hidden = (500, f'Unknown allocation "{alloc.id}"')
    assert get(url)[:2] == hidden  # the anonymous policy
    assert get(url, "not-a-token")[:2] == (403, "Permission denied")
    assert get(url, nomad.acl_token("prod"))[:2] == hidden
    assert get(url, nomad.acl_token("default"))[0] == 200
    assert get(f"{url}?namespace=prod", nomad.acl_token("default"))[0] == 200
    prod = nomad.add_allocation("batch", "reports", ("worker",), namespace="prod")
    assert get(f"{nomad.url}/v1/allocation/{prod.id}", nomad.acl_token("prod"))[0] == 200
    unknown = f"{nomad.url}/v1/allocation/{'0' * 8}-0000-0000-0000-{'0' * 12}"
    assert get(unknown, nomad.management_token)[:2] == (404, "alloc not found")
    assert get(unknown, nomad.acl_token("prod"))[:2] == (404, "alloc not found")


def test_a_workload_identity_is_checked_as_nomad_checks_it(nomad: NomadDouble) -> None:
    """A workload identity's implicit policy grants Variables and service registrations, no read-job
    (workload-identity docs): it reads allocations only once a policy granting read-job is attached to
    its job; before, Nomad hides its allocation as it does from any token without read-job. Nomad
    refuses the identity of an allocation that is terminal or unknown with 403 on every endpoint
    (nomad/auth.go VerifyClaim; Alloc.GetAlloc answers ErrPermissionDenied on authErr)."""
    alloc = nomad.add_allocation("shop", "web", ("web",))
    elsewhere = nomad.add_allocation("shop", "web", ("web",), namespace="prod")
    url = f"{nomad.url}/v1/allocation/{alloc.id}"
    services = f"{nomad.url}/v1/services"
    token = nomad.identity(alloc, "web")
    assert get(url, token)[:2] == (500, f'Unknown allocation "{alloc.id}"')  # the implicit policy only
    assert get(services, token)[0] == 200
    nomad.attach_read_job("shop")
    assert get(url, token)[0] == 200
    assert get(f"{nomad.url}/v1/allocation/{elsewhere.id}", token)[0] == 500  # read-job of its namespace
    nomad.stop_allocation(alloc.id)
    assert get(url, nomad.management_token)[0] == 200
    assert get(url, token)[:2] == (403, "Permission denied")  # the identity of a terminal allocation
    assert get(services, token)[:2] == (403, "Permission denied")
    nomad.forget_allocation(alloc.id)
    assert get(url, nomad.management_token)[:2] == (404, "alloc not found")
    assert get(url, token)[:2] == (403, "Permission denied")  # ... or of one Nomad no longer knows


def test_jwks_has_the_documented_shape_and_verifies_identities(nomad: NomadDouble) -> None:
    status, body, _ = get(nomad.jwks_url)  # no token: Nomad serves its public keys to anyone
    assert status == 200
    doc = json.loads(body)
    documented = sample("jwks.json")
    assert same_shape(doc, documented) == []
    assert {k for key in doc["keys"] for k in key} == set(documented["keys"][0])
    alloc = nomad.add_allocation("shop", "web", ("web",))
    token = nomad.identity(alloc, "web")
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "RS256", "kid": doc["keys"][0]["kid"], "typ": "JWT"}
    key = jwt.PyJWK(doc["keys"][0])
    claims = jwt.decode(token, key.key, algorithms=["RS256"], audience="hostmesh")
    documented_claims = sample("workload_identity_claims.json")
    assert set(documented_claims) <= set(claims)
    assert same_shape(claims, documented_claims) == []
    assert claims["sub"] == "global:default:shop:web:web"
    assert {"iat", "nbf", "exp", "jti", "aud"} <= set(claims)


def test_task_environment_is_what_nomad_documents(nomad: NomadDouble, tmp_path) -> None:
    alloc = nomad.add_allocation("shop", "web", ("web", "hostmesh"), hostmesh_inbound=24100)
    env = nomad.task_environment(alloc, "hostmesh", tmp_path)
    secrets = env["NOMAD_SECRETS_DIR"]
    token = Path(secrets, "nomad_token").read_text()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["nomad_task"] == "hostmesh"
    # the default identity: Nomad gives it its own audience and no expiry (it takes no ttl), so no CA
    # requiring `exp` takes it; a double that gave it aud hostmesh and an `exp` let the end-to-end
    # tests bootstrap with it, which no real allocation can
    assert claims["aud"] == "nomadproject.io" and "exp" not in claims
    assert (
        env["NOMAD_PORT_hostmesh_inbound"] == "24100"
        and env["NOMAD_ADDR_hostmesh_inbound"] == "127.0.0.1:24100"
    )
    assert "NOMAD_TOKEN" not in env
    assert "NOMAD_TOKEN" in nomad.task_environment(alloc, "web", tmp_path, file=False)
    # Nomad gives a task no NOMAD_ADDR (only NOMAD_ADDR_<port label>): a double that did hid from the
    # tests that an allocation's agent reads the Nomad address from what the job sets, or nowhere
    assert "NOMAD_ADDR" not in env


async def test_python_nomad_reads_the_double(nomad: NomadDouble) -> None:
    alloc = nomad.add_allocation("shop", "web", ("web",))
    api = NomadAPI(NomadSettings.resolve({"NOMAD_ADDR": nomad.url, "NOMAD_TOKEN": nomad.management_token}))
    assert await api.allocation_state(alloc.id) is AllocationState.LIVE
    nomad.stop_allocation(alloc.id)
    assert await api.allocation_state(alloc.id) is AllocationState.STOPPED
    nomad.forget_allocation(alloc.id)
    assert await api.allocation_state(alloc.id) is AllocationState.GONE
    denied = NomadAPI(NomadSettings.resolve({"NOMAD_ADDR": nomad.url, "NOMAD_TOKEN": "wrong"}))
    with pytest.raises(PermissionDenied, match="needs namespace read-job"):
        await denied.allocation_state(alloc.id)


async def test_a_token_without_read_job_is_a_refusal_not_nomad_failing(nomad: NomadDouble) -> None:
    """Nomad hides an allocation from a token without read-job in its namespace (an ACL token of
    another namespace, a workload identity with no policy attached) as `Unknown allocation`, answered
    with 500: it was read as Nomad failing ("HTTP 500"), to retry for good, and the missing read-job
    was never named, by the CA (503 to every bootstrap) nor by the agent."""
    alloc = nomad.add_allocation("shop", "web", ("web",))
    for token in (nomad.acl_token("prod"), nomad.identity(alloc, "web")):
        api = NomadAPI(NomadSettings.resolve({"NOMAD_ADDR": nomad.url, "NOMAD_TOKEN": token}))
        with pytest.raises(PermissionDenied, match=f"refused to read allocation {alloc.id}: .*read-job"):
            await api.allocation_state(alloc.id)


# --- the Task API (Nomad 1.5+): the same API on a unix socket, authentication always required ------


def get_unix(path: str, url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """A GET over the unix socket at `path`, as curl --unix-socket does in the Task API docs."""
    conn = http.client.HTTPConnection("localhost", timeout=5)
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.sock.settimeout(5)
    conn.sock.connect(path)
    try:
        conn.request("GET", url, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a unix socket's path holds at most 107 bytes, which pytest's
    tmp_path, an allocation id and secrets/api.sock can pass (Nomad keeps its own paths short so)."""
    with tempfile.TemporaryDirectory(prefix="nd", dir="/tmp") as d:
        yield Path(d)


def test_the_task_api_authenticates_every_request_as_nomad_does(nomad: NomadDouble, short_dir: Path) -> None:
    """api-docs/task-api: at ${NOMAD_SECRETS_DIR}/api.sock, usable by any user when the task sets no
    `user`, and always asking for a token, even where Nomad's HTTP API asks none (the JWKS); the
    token in X-Nomad-Token or `Authorization: Bearer` (http.go parseToken); none is 401, one Nomad does
    not accept 403 (http.go authMiddleware writes http.StatusText), then the endpoint's own rules."""
    alloc = nomad.add_allocation("shop", "web", ("web", "hostmesh"))
    env = nomad.task_environment(alloc, "hostmesh", short_dir, task_api=True)
    sock = Path(env["NOMAD_SECRETS_DIR"], "api.sock")
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o666
    assert "NOMAD_ADDR" not in env  # Nomad sets none; the socket is where the docs say
    identity = Path(env["NOMAD_SECRETS_DIR"], "nomad_token").read_text()
    path = f"/v1/allocation/{alloc.id}"
    assert get_unix(str(sock), path) == (401, "Unauthorized")
    assert get_unix(str(sock), "/.well-known/jwks.json") == (401, "Unauthorized")
    assert get_unix(str(sock), path, {"X-Nomad-Token": str(uuid.uuid4())}) == (403, "Forbidden")
    assert get_unix(str(sock), path, {"Authorization": "Bearer not-a-token"}) == (403, "Forbidden")
    assert get_unix(str(sock), path, {"Authorization": "Basic abc"}) == (401, "Unauthorized")
    # accepted, then the endpoint's rules: the identity's implicit policy reads no allocation
    assert get_unix(str(sock), path, {"Authorization": f"Bearer {identity}"})[0] == 500
    nomad.attach_read_job("shop")
    for headers in ({"Authorization": f"bearer {identity}"}, {"X-Nomad-Token": f" {identity}\t"}):
        status, body = get_unix(str(sock), path, headers)
        assert status == 200 and json.loads(body)["ID"] == alloc.id
    assert get_unix(str(sock), "/.well-known/jwks.json", {"X-Nomad-Token": identity})[0] == 200
    # the identity of an allocation that is terminal: ACL.WhoAmI refuses it, so does the Task API
    nomad.stop_allocation(alloc.id)
    assert get_unix(str(sock), path, {"X-Nomad-Token": identity}) == (403, "Forbidden")
    assert get_unix(str(sock), path, {"X-Nomad-Token": nomad.management_token})[0] == 200
    assert [r[1] for r in nomad.task_api_requests][:2] == [path, "/.well-known/jwks.json"]
    nomad.stop_task_api(sock)  # the task stopped: Nomad closes the listener and removes the socket
    assert not sock.exists()
