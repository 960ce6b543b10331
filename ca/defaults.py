"""Defaults of the CA that `hostmesh ca … --help` shows. This module imports nothing, so the help
does not load cryptography and the CA's server to print them (ca/service.py takes them from here)."""

from __future__ import annotations

DEFAULT_HOST = "127.0.0.1"  # loopback unless the operator opens it with --listen: the CA is not for the world
DEFAULT_PORT = 15012
