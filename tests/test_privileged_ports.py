"""A listener the kernel refuses on a port below 1024 says what it needs: the packaged unit grants no
capability (systemd/hostmesh-agent.service), and "Permission denied" alone did not say so."""

from __future__ import annotations

import errno
import os

import pytest

from hostmesh.agent.config import Address
from hostmesh.agent.run import PRIVILEGED_PORT_HINT, _listening


async def _refused(code: int) -> None:
    raise OSError(code, "refused")


@pytest.mark.parametrize(
    ("where", "code", "hinted"),
    [
        (Address("127.128.0.9", 80), errno.EACCES, True),  # an http upstream's bind = "auto"
        ("127.0.0.1:443", errno.EACCES, True),
        (Address("::1", 53), errno.EACCES, True),
        (Address("127.0.0.1", 8080), errno.EACCES, False),  # not a privileged port: another cause
        (Address("127.0.0.1", 80), errno.EADDRINUSE, False),
    ],
)
async def test_a_refused_privileged_port_names_the_capability(where: object, code: int, hinted: bool) -> None:
    with pytest.raises(OSError) as caught:
        await _listening("upstream web->api", where, _refused(code))
    message = str(caught.value.strerror)
    assert message.startswith(f"upstream web->api: cannot listen on {where}: {os.strerror(code)}")
    assert message.endswith(PRIVILEGED_PORT_HINT) == hinted, message
    assert "CAP_NET_BIND_SERVICE" in PRIVILEGED_PORT_HINT
