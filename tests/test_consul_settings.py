"""Consul client settings: the precedence of Consul's own CLI (option, then agent.toml, then the
environment; a token beats a token file at the same level), exhaustively, and the one-line errors
of unusable settings. Pure: no Consul, no network."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from hostmesh.registry.consul_settings import (
    DEFAULT_CONSUL_URL,
    TOKEN_RULE,
    ConsulLayer,
    ConsulSettings,
    normalize_url,
    resolve,
)
from hostmesh.registry.errors import InvalidSettings

LEVELS = ("cli", "file", "env")
# setting -> (ConsulLayer field, environment variable)
PLAIN = {
    "ca_file": "CONSUL_CACERT",
    "cert_file": "CONSUL_CLIENT_CERT",
    "key_file": "CONSUL_CLIENT_KEY",
    "tls_server_name": "CONSUL_TLS_SERVER_NAME",
}


def layers(field: str, env_var: str, present: tuple[bool, bool, bool]) -> dict[str, object]:
    cli = ConsulLayer(**{field: "cli-value"}) if present[0] else ConsulLayer()
    file = ConsulLayer(**{field: "file-value"}) if present[1] else ConsulLayer()
    env = {env_var: "env-value"} if present[2] else {}
    return {"cli": cli, "file": file, "env": env}


@pytest.mark.parametrize("field", sorted(PLAIN))
@pytest.mark.parametrize("present", list(itertools.product((False, True), repeat=3)))
def test_each_setting_comes_from_the_first_level_that_sets_it(field: str, present: tuple[bool, ...]) -> None:
    kw = layers(field, PLAIN[field], present)  # type: ignore[arg-type]
    if field in ("cert_file", "key_file"):  # they come in pairs: give the partner at the lowest level
        partner = "key_file" if field == "cert_file" else "cert_file"
        kw["env"] = {**kw["env"], PLAIN[partner]: "partner"}  # type: ignore[dict-item]
    expected = next((f"{lvl}-value" for lvl, on in zip(LEVELS, present, strict=True) if on), None)
    if field in ("cert_file", "key_file") and expected is None:
        with pytest.raises(InvalidSettings):  # the partner alone is an error, tested below
            resolve(**kw)  # type: ignore[arg-type]
        return
    assert getattr(resolve(**kw), field) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("present", list(itertools.product((False, True), repeat=3)))
def test_address_precedence_and_default(present: tuple[bool, ...]) -> None:
    hosts = {"cli": "http://cli:1", "file": "http://file:2", "env": "http://env:3"}
    cli = ConsulLayer(address=hosts["cli"]) if present[0] else None
    file = ConsulLayer(address=hosts["file"]) if present[1] else None
    env = {"CONSUL_HTTP_ADDR": hosts["env"]} if present[2] else {}
    expected = next((hosts[lvl] for lvl, on in zip(LEVELS, present, strict=True) if on), DEFAULT_CONSUL_URL)
    assert resolve(cli=cli, file=file, env=env).url == expected


# Six places a token can come from: (level, kind), highest precedence first.
TOKEN_SOURCES = [(lvl, kind) for lvl in LEVELS for kind in ("token", "token_file")]


@pytest.mark.parametrize("present", list(itertools.product((False, True), repeat=6)))
def test_token_precedence_over_all_64_combinations(present: tuple[bool, ...]) -> None:
    """Option, then agent.toml, then environment; within one level a token beats a token file."""
    given = {src for src, on in zip(TOKEN_SOURCES, present, strict=True) if on}

    def layer(lvl: str) -> ConsulLayer:
        return ConsulLayer(
            token=f"{lvl}-token" if (lvl, "token") in given else None,
            token_file=f"/{lvl}/token-file" if (lvl, "token_file") in given else None,
        )

    env = {}
    if ("env", "token") in given:
        env["CONSUL_HTTP_TOKEN"] = "env-token"
    if ("env", "token_file") in given:
        env["CONSUL_HTTP_TOKEN_FILE"] = "/env/token-file"
    got = resolve(cli=layer("cli"), file=layer("file"), env=env)
    winner = next((src for src in TOKEN_SOURCES if src in given), None)
    if winner is None:
        assert (got.token, got.token_file) == (None, None)
    elif winner[1] == "token":
        assert (got.token, got.token_file) == (f"{winner[0]}-token", None)
    else:
        assert (got.token, got.token_file) == (None, f"/{winner[0]}/token-file")


def test_empty_values_count_as_unset_as_with_consuls_tools() -> None:
    got = resolve(
        cli=ConsulLayer(token="", address=""),
        env={"CONSUL_HTTP_TOKEN": "", "CONSUL_HTTP_TOKEN_FILE": "/t", "CONSUL_HTTP_ADDR": ""},
    )
    assert (got.token, got.token_file, got.url) == (None, "/t", DEFAULT_CONSUL_URL)


@pytest.mark.parametrize(
    ("address", "ssl_env", "url"),
    [
        ("127.0.0.1:8500", None, "http://127.0.0.1:8500"),
        ("127.0.0.1:8501", "true", "https://127.0.0.1:8501"),
        ("127.0.0.1:8501", "1", "https://127.0.0.1:8501"),
        ("127.0.0.1:8500", "false", "http://127.0.0.1:8500"),
        ("http://127.0.0.1:8500", "true", "http://127.0.0.1:8500"),  # a scheme in the address wins
        ("https://consul.example", None, "https://consul.example:443"),
        ("consul.example", None, "http://consul.example:80"),
        ("http://[::1]:8500", None, "http://[::1]:8500"),
    ],
)
def test_scheme_from_the_address_else_consul_http_ssl(address: str, ssl_env: str | None, url: str) -> None:
    env = {"CONSUL_HTTP_ADDR": address}
    if ssl_env is not None:
        env["CONSUL_HTTP_SSL"] = ssl_env
    assert resolve(env=env).url == url


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CONSUL_HTTP_SSL": "yes"}, "CONSUL_HTTP_SSL='yes': must be true or false"),
        ({"CONSUL_HTTP_ADDR": "unix:///run/consul.sock"}, "the scheme must be http or https"),
        ({"CONSUL_HTTP_ADDR": "http://h:99999"}, "invalid port"),
        ({"CONSUL_HTTP_ADDR": "http://h:8500/v1"}, "expected [http[s]://]host[:port]"),
        ({"CONSUL_CLIENT_CERT": "/c.pem"}, "Consul client certificate given without its key"),
        ({"CONSUL_CLIENT_KEY": "/k.pem"}, "Consul client key given without its certificate"),
    ],
)
def test_unusable_settings_are_one_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidSettings) as err:
        resolve(env=env)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "address",
    [
        "http://ops:s3cret@h:8500",
        "ops:s3cret@h:8500",
        "https://ops@h",
        "http://ops:s3cret@h:99999",
        "ops:s3cret@[::1",
        "http://ops:s3c/ret@h:8500",  # a password with a / (or ? or #) ends the host part early
    ],
)
def test_credentials_in_the_address_are_refused_without_echoing_them(address: str) -> None:
    with pytest.raises(InvalidSettings) as err:
        resolve(env={"CONSUL_HTTP_ADDR": address})
    assert str(err.value).startswith("CONSUL_HTTP_ADDR: Consul address: user:password@ in it is not used")
    assert "s3cret" not in str(err.value) and "ops" not in str(err.value)


def test_cert_from_one_level_and_key_from_another_pair_up() -> None:
    got = resolve(cli=ConsulLayer(cert_file="/cli/c.pem"), env={"CONSUL_CLIENT_KEY": "/env/k.pem"})
    assert (got.cert_file, got.key_file) == ("/cli/c.pem", "/env/k.pem")


def test_a_client_certificate_pair_that_does_not_load_names_the_file_at_fault(tmp_path: Path) -> None:
    """OpenSSL says `[SSL] PEM lib (_ssl.c:3905)` for a file holding no certificate and for one
    holding no key alike: the message named both files and left the operator to guess."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from hostmesh.registry.consul import ssl_context
    from tests.test_e2e_edges import OutsideCA

    cert, key = OutsideCA(tmp_path, "consul-ca").leaf("client.test")

    def problem(cert_file: Path, key_file: Path) -> str:
        env = {"CONSUL_CLIENT_CERT": str(cert_file), "CONSUL_CLIENT_KEY": str(key_file)}
        settings = resolve(env={"CONSUL_HTTP_ADDR": "https://127.0.0.1:8501", **env})
        with pytest.raises(InvalidSettings) as err:
            ssl_context(settings)
        return str(err.value)

    assert problem(key, key) == f"Consul client certificate: {key}: holds no PEM certificate"
    assert (
        problem(cert, cert)
        == f"Consul client certificate: {cert}: holds no PEM private key of a kind TLS can use"
    )
    other, _ = OutsideCA(tmp_path, "other-ca").leaf("other.test")
    assert (
        problem(other, key)
        == f"Consul client certificate: {key} is not the key of the certificate in {other}"
    )
    # a key of another type (RSA for this EC certificate): OpenSSL said NO_CERTIFICATE_ASSIGNED
    rsa_key = tmp_path / "rsa.key"
    rsa_key.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    assert (
        problem(cert, rsa_key)
        == f"Consul client certificate: {rsa_key} is not the key of the certificate in {cert}"
    )
    assert (
        problem(cert, tmp_path / "gone.key")
        == f"Consul client certificate: {tmp_path / 'gone.key'}: No such file or directory"
    )


def test_an_encrypted_client_key_is_refused_not_asked_for_on_the_terminal(tmp_path: Path) -> None:
    """For an encrypted key OpenSSL asks for its passphrase on the terminal: `hostmesh` run in one
    (a Consul client key passphrase-protected) waited at 'Enter PEM pass phrase:' for good. It says
    the key is encrypted, as it did where there is no terminal (systemd)."""
    import os

    from tests.support import encrypted_copy, on_a_terminal
    from tests.test_e2e_edges import OutsideCA

    cert, key = OutsideCA(tmp_path, "consul-ca").leaf("client.test")
    encrypted = encrypted_copy(key, tmp_path / "encrypted.key")
    env = {**os.environ, "CONSUL_HTTP_ADDR": "https://127.0.0.1:1", "CONSUL_CLIENT_CERT": str(cert),
           "CONSUL_CLIENT_KEY": str(encrypted)}  # fmt: skip
    text, code = on_a_terminal(["services"], env)
    assert code == 1, text
    assert f"Consul client certificate: {encrypted}: the key is encrypted" in text, text


def test_token_file_is_read_and_stripped(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  0b1e5d6a-1111-2222-3333-444455556666\n")
    assert ConsulSettings(token_file=str(path)).load_token() == "0b1e5d6a-1111-2222-3333-444455556666"
    assert ConsulSettings(token="literal").load_token() == "literal"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read: No such file or directory"),
        ("", f"must hold one token ({TOKEN_RULE})"),
        ("a b", f"must hold one token ({TOKEN_RULE})"),
        ("tok\u00e9n", f"must hold one token ({TOKEN_RULE})"),  # would not fit a Latin-1 header
    ],
)
def test_bad_token_file_is_one_line(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InvalidSettings) as err:
        ConsulSettings(token_file=str(path)).load_token()
    assert str(err.value) == f"Consul token file {path}: {message}"


def test_normalize_keeps_an_explicit_port() -> None:
    assert normalize_url("https://127.0.0.1:8501") == "https://127.0.0.1:8501"
