"""How hostmesh finds and authenticates to Consul: the same settings and precedence as Consul's CLI.

Three sources, each a `ConsulLayer` (None = not set there):

    command line   --consul --token --token-file --ca-file --client-cert --client-key --tls-server-name
    agent.toml     [consul] address token token_file ca_file cert_file key_file tls_server_name
    environment    CONSUL_HTTP_ADDR CONSUL_HTTP_TOKEN CONSUL_HTTP_TOKEN_FILE CONSUL_CACERT
                   CONSUL_CLIENT_CERT CONSUL_CLIENT_KEY CONSUL_HTTP_SSL CONSUL_TLS_SERVER_NAME

`resolve()` picks each setting from the first source that sets it (command line, then agent.toml,
then the environment). The token is one setting with two spellings: the first source that has a
token or a token file decides, and within one source a token beats a token file. An empty value
counts as not set, as with Consul's tools. `resolve` is pure (it reads no file); the token file is
read by `ConsulSettings.load_token()` when a client is built, so a bad path is one clear error, and
again whenever it changes (registry/consul.py `ConsulClient._current_token`).

A token goes into an HTTP header as is, so it is checked where it is chosen: surrounding whitespace
is stripped (as from a token file: `echo` and here-docs add a newline), and what remains must be
printable ASCII without spaces, else an error naming the source and never the token.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

from hostmesh.registry.addresses import authority
from hostmesh.registry.errors import InvalidSettings
from hostmesh.registry.names import holds_credentials
from hostmesh.registry.records import record

DEFAULT_CONSUL_URL = "http://127.0.0.1:8500"  # Consul's own default (a local agent)
MAX_TOKEN_FILE_BYTES = 4096  # an ACL token is a 36-character UUID; refuse to slurp a wrong file
# Where each setting comes from, for error messages: command line, agent.toml, environment.
ADDRESS_SOURCES = ("--consul", "agent.toml [consul] address", "CONSUL_HTTP_ADDR")
TOKEN_SOURCES = ("--token", "agent.toml [consul] token", "CONSUL_HTTP_TOKEN")
TOKEN_RULE = "printable ASCII, no spaces or control characters"  # what valid_token() accepts
# A host name or IP literal (IPv6 with a zone): anything else (spaces, control characters) would go
# into the Host header.
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:%")

# Go's strconv.ParseBool, which Consul uses for CONSUL_HTTP_SSL.
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


@record
class ConsulLayer:
    """The Consul settings one source gives; None (or "") means this source does not set it."""

    address: str | None = None
    token: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_server_name: str | None = None
    ssl: bool | None = None  # CONSUL_HTTP_SSL: the scheme for an address given without one

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ConsulLayer:
        ssl_raw = env.get("CONSUL_HTTP_SSL", "")
        if ssl_raw and ssl_raw not in _TRUE | _FALSE:
            raise InvalidSettings(f"CONSUL_HTTP_SSL={ssl_raw!r}: must be true or false")
        return cls(
            address=env.get("CONSUL_HTTP_ADDR"),
            token=env.get("CONSUL_HTTP_TOKEN"),
            token_file=env.get("CONSUL_HTTP_TOKEN_FILE"),
            ca_file=env.get("CONSUL_CACERT"),
            cert_file=env.get("CONSUL_CLIENT_CERT"),
            key_file=env.get("CONSUL_CLIENT_KEY"),
            tls_server_name=env.get("CONSUL_TLS_SERVER_NAME"),
            ssl=(ssl_raw in _TRUE) if ssl_raw else None,
        )


@record
class ConsulSettings:
    """The resolved settings: one immutable snapshot that every Consul client of a process uses."""

    url: str = DEFAULT_CONSUL_URL  # scheme://host:port
    token: str | None = None  # a literal token, or …
    token_file: str | None = None  # … the file holding it (at most one of the two is set)
    ca_file: str | None = None  # CA bundle verifying Consul's HTTPS certificate (default: the system's)
    cert_file: str | None = None  # client certificate, when Consul has verify_incoming
    key_file: str | None = None
    tls_server_name: str | None = None  # name checked in Consul's certificate (default: the URL's host)

    @property
    def https(self) -> bool:
        return self.url.startswith("https://")

    def check_secrets_private(self) -> None:
        """For a daemon (the agent, the CA): refuse a token file or client key every user of the
        host can read, where an operator's own tools (the CLI, Consul's) take them as they are.
        Their group may (the service's own, as /etc/hostmesh's root:hostmesh; 640 for a key root
        owns). InvalidSettings, one line with the fix; a file that is not there yet is for its
        reader to report. Whoever holds the key speaks TLS to Consul as this daemon."""
        for what, name in (("Consul token file", self.token_file), ("Consul client key", self.key_file)):
            mode = others_can_read(Path(name)) if name is not None else None
            if mode is not None:
                raise InvalidSettings(
                    f"{what} {name} is readable by every user of this host "
                    f"(mode {mode:04o}); fix: chmod 600 {name} (or 640, its group the daemon's)"
                )

    def load_token(self) -> str | None:
        """The token to send: the literal one, or the token file's content (whitespace stripped)."""
        if self.token_file is None:
            # resolve() checked it already; checked again for settings built by hand
            return clean_token(self.token, "the settings") if self.token else None
        path = Path(self.token_file)
        try:
            with path.open("rb") as fh:
                raw = fh.read(MAX_TOKEN_FILE_BYTES + 1)
        except OSError as exc:
            raise InvalidSettings(f"Consul token file {path}: cannot read: {exc.strerror or exc}") from None
        if len(raw) > MAX_TOKEN_FILE_BYTES:
            raise InvalidSettings(f"Consul token file {path}: larger than {MAX_TOKEN_FILE_BYTES} bytes")
        try:
            token = raw.decode().strip()
        except UnicodeDecodeError:
            raise InvalidSettings(f"Consul token file {path}: not text") from None
        if not valid_token(token):
            raise InvalidSettings(f"Consul token file {path}: must hold one token ({TOKEN_RULE})")
        return token


def others_can_read(path: Path) -> int | None:
    """The mode of `path` when every user of the host can read it (its mode lets others read, and
    every directory above lets them through), else None; None too when it cannot be looked at."""
    try:
        mode = path.stat().st_mode & 0o777
        if not mode & 0o004:
            return None
        if any(not parent.stat().st_mode & 0o001 for parent in path.resolve().parents):
            return None  # a directory on the way keeps them out (/etc/hostmesh is 0750)
    except OSError:
        return None
    return mode


def valid_token(token: str) -> bool:
    """A token an HTTP header can carry as is: visible ASCII only (Consul's tokens are UUIDs), so no
    CR/LF that would end the header line and start another."""
    return bool(token) and all("!" <= c <= "~" for c in token)


def clean_token(raw: str, source: str) -> str:
    """`raw` without surrounding whitespace, as a token file is read; InvalidSettings naming `source`
    (never the token: it is a secret) when what remains is not one token."""
    token = raw.strip()
    if not valid_token(token):
        raise InvalidSettings(f"Consul token from {source}: must be one token ({TOKEN_RULE})")
    return token


def _first(*values: str | None) -> str | None:
    return next((v for v in values if v), None)


def normalize_url(address: str, ssl: bool | None = None) -> str:
    """`host:port`, `http://host:port` or `https://host:port` -> `scheme://host:port`. A scheme in the
    address wins over CONSUL_HTTP_SSL, and a missing port is the scheme's (80/443), as in Consul's API
    client."""
    text = address.strip()
    if holds_credentials(text):  # (named without the address: it would echo a password)
        raise InvalidSettings(
            "Consul address: user:password@ in it is not used: give an ACL token "
            "(CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE or token_file)"
        )
    if "://" not in text:
        text = f"{'https' if ssl else 'http'}://{text}"
    try:
        parsed = urllib.parse.urlsplit(text)
    except ValueError as exc:  # an unclosed or invalid [IPv6] literal
        raise InvalidSettings(f"Consul address {address!r}: not a valid URL ({exc})") from None
    if parsed.scheme not in ("http", "https"):
        raise InvalidSettings(f"Consul address {address!r}: the scheme must be http or https")
    try:
        port = parsed.port
    except ValueError:
        raise InvalidSettings(f"Consul address {address!r}: invalid port") from None
    if not parsed.hostname or parsed.path.strip("/") or parsed.query:
        raise InvalidSettings(f"Consul address {address!r}: expected [http[s]://]host[:port]")
    if not _HOST_CHARS.issuperset(parsed.hostname):
        raise InvalidSettings(f"Consul address {address!r}: the host is not a host name or IP address")
    default_port = 443 if parsed.scheme == "https" else 80
    return f"{parsed.scheme}://{authority(parsed.hostname, port or default_port)}"


def resolve(
    cli: ConsulLayer | None = None, file: ConsulLayer | None = None, env: Mapping[str, str] | None = None
) -> ConsulSettings:
    """Merge the three sources: command line, then agent.toml, then the environment."""
    layers = [
        cli or ConsulLayer(),
        file or ConsulLayer(),
        ConsulLayer.from_env(os.environ if env is None else env),
    ]
    token: str | None = None
    token_file: str | None = None
    for layer, source in zip(layers, TOKEN_SOURCES, strict=True):
        if layer.token:
            token = clean_token(layer.token, source)
            break
        if layer.token_file:
            token_file = layer.token_file
            break
    ssl = next((layer.ssl for layer in layers if layer.ssl is not None), None)
    for layer, source in zip(layers, ADDRESS_SOURCES, strict=True):
        if layer.address:
            try:
                url = normalize_url(layer.address, ssl)
            except InvalidSettings as exc:
                raise InvalidSettings(f"{source}: {exc}") from None
            break
    else:
        url = normalize_url(DEFAULT_CONSUL_URL)
    cert_file = _first(*(layer.cert_file for layer in layers))
    key_file = _first(*(layer.key_file for layer in layers))
    if bool(cert_file) != bool(key_file):
        given, missing = ("certificate", "key") if cert_file else ("key", "certificate")
        raise InvalidSettings(
            f"Consul client {given} given without its {missing} (CONSUL_CLIENT_CERT/CONSUL_CLIENT_KEY, "
            "--client-cert/--client-key, [consul] cert_file/key_file)"
        )
    return ConsulSettings(
        url=url,
        token=token,
        token_file=token_file,
        ca_file=_first(*(layer.ca_file for layer in layers)),
        cert_file=cert_file,
        key_file=key_file,
        tls_server_name=_first(*(layer.tls_server_name for layer in layers)),
    )
