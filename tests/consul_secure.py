"""A real Consul dev agent the way production runs it: ACLs on with default deny, HTTP API over HTTPS
only, with verification both ways (a throwaway CA made with `cryptography` signs Consul's server
certificate and a client certificate; `verify_incoming_https` is on, so a client without one is
refused). Tokens and policies are made with the `consul` CLI itself, as the README tells operators.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import ssl
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hostmesh.agent.localmesh import ConsulDev, free_port

CERT_DAYS = 2  # throwaway certificates outlive any test run
CLI_TIMEOUT = 30  # a `consul acl …` call against a local agent answers in well under this


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


class TLSFiles:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM files."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hostmesh test Consul CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(ca_key, hashes.SHA256())
        )
        self.ca_file = folder / "consul-ca.pem"
        self.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

        def leaf(name: str, usage: x509.ObjectIdentifier) -> tuple[Path, Path]:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
                .add_extension(
                    x509.SubjectAlternativeName(
                        [
                            x509.DNSName("localhost"),
                            x509.DNSName("server.dc1.consul"),
                            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        ]
                    ),
                    critical=False,
                )
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256())
            )
            cert_path, key_path = folder / f"{name}.pem", folder / f"{name}-key.pem"
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            _write_key(key, key_path)
            return cert_path, key_path

        self.server_cert, self.server_key = leaf("consul-server", ExtendedKeyUsageOID.SERVER_AUTH)
        self.client_cert, self.client_key = leaf("consul-client", ExtendedKeyUsageOID.CLIENT_AUTH)


class SecureConsulDev(ConsulDev):
    """`consul agent -dev` with ACLs (default deny) and the HTTP API on HTTPS only."""

    def __init__(self, log_dir: Path, node: str = "hostmesh-secure") -> None:
        super().__init__(log_dir, node=node)
        self.ports["https"] = free_port()
        self.master_token = str(uuid.uuid4())
        self.tls = TLSFiles(log_dir / "consul-tls")
        self.config_path = log_dir / f"consul-{node}.json"
        self.config_path.write_text(
            json.dumps(
                {
                    "acl": {
                        "enabled": True,
                        "default_policy": "deny",
                        "down_policy": "extend-cache",
                        # The Consul agent's own token (its node registration); the operator's affair.
                        "tokens": {"master": self.master_token, "agent": self.master_token},
                    },
                    "ports": {"http": -1},
                    "ca_file": str(self.tls.ca_file),
                    "cert_file": str(self.tls.server_cert),
                    "key_file": str(self.tls.server_key),
                    "verify_incoming_https": True,
                }
            )
        )

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.ports['https']}"

    def command(self) -> list[str]:
        cmd = super().command()
        i = cmd.index("-http-port")
        del cmd[i : i + 2]  # the config file turns plain HTTP off
        return [*cmd, "-https-port", str(self.ports["https"]), "-config-file", str(self.config_path)]

    def client_env(self, token: str | None = None) -> dict[str, str]:
        """Consul's own variables for a client of this agent (the `consul` CLI, hostmesh)."""
        env = {
            "CONSUL_HTTP_ADDR": self.url,
            "CONSUL_CACERT": str(self.tls.ca_file),
            "CONSUL_CLIENT_CERT": str(self.tls.client_cert),
            "CONSUL_CLIENT_KEY": str(self.tls.client_key),
        }
        if token:
            env["CONSUL_HTTP_TOKEN"] = token
        return env

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.tls.ca_file))
        ctx.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        return ctx

    def serving(self) -> bool:
        try:
            req = urllib.request.Request(
                f"{self.url}/v1/status/leader", headers={"X-Consul-Token": self.master_token}
            )
            with urllib.request.urlopen(req, timeout=1, context=self.ssl_context()) as resp:
                leader = json.loads(resp.read() or b'""')
            return bool(leader)
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def consul_cli(self, *args: str) -> str:
        """Run the `consul` CLI as the management token holder; returns stdout."""
        env = {**os.environ, **self.client_env(self.master_token)}
        done = subprocess.run(
            [self.binary, *args], env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"consul {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def token_for(self, name: str, rules: str) -> str:
        """Create policy `name` from `rules` and a token holding it (the README's two commands)."""
        rules_path = self.log_path.parent / f"policy-{name}.hcl"
        rules_path.write_text(rules)
        self.consul_cli("acl", "policy", "create", "-name", name, "-rules", f"@{rules_path}")
        out = self.consul_cli(
            "acl", "token", "create", "-description", name, "-policy-name", name, "-format", "json"
        )
        return str(json.loads(out)["SecretID"])
