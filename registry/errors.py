"""Errors of the registry layer, grouped by what the caller does next.

Consul, HTTP and socket failures are translated into these at the boundary (registry/http.py and
registry/consul.py); nothing above this layer catches OSError or parses status codes.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base of every hostmesh.registry error; str() is one line fit for a user. `retry_after`: seconds
    before a retry can succeed, when known (the CA answers a refusal carrying one with that Retry-After)."""

    retry_after: float | None = None

    @property
    def reason(self) -> str:
        """What went wrong, for a line that names the peer itself: the whole message, except where an
        error carries the peer's address apart (Unavailable)."""
        return str(self)


class Unavailable(RegistryError):
    """The peer (Consul, the CA, an agent) could not be reached, timed out or answered 5xx: retry later.
    A connection's failure carries the peer's `address` apart from `reason`, what went wrong, so a
    caller that names the peer itself says `reason` alone; str() is "<address>: <reason>", or
    "<peer> at <address>: <reason>" once a client says what the peer is (Consul's)."""

    def __init__(self, reason: str, *, address: str | None = None, peer: str | None = None) -> None:
        where = f"{peer} at {address}" if peer else address
        super().__init__(f"{where}: {reason}" if address else reason)
        self._reason = reason
        self.address = address
        self.peer = peer

    @property
    def reason(self) -> str:
        return self._reason


class UnexpectedAnswer(Unavailable):
    """The peer answered, but not in its API's shape (another service at that address, a proxy's
    page): an Unavailable, so retry loops go on, though the fix is usually the address."""


class AnswerTooLarge(Unavailable):
    """The answer passed the client's size limit (registry/http.py MAX_BODY_BYTES): retrying the same
    read will not help, but reads of other things may go on."""


class CutShort(RegistryError):
    """Consul answered a blocking query before its wait ran out with the very index it was asked to
    wait past, and a plain read of the same answers another: its state was replaced (a snapshot
    restore), and the restored state's index may be lower than the one asked, so asking again with
    it would wait the whole wait before anything restored is seen. Ask again without an index."""


class Conflict(RegistryError):
    """A check-and-set lost against a concurrent writer: re-read, then decide."""


class NotFound(RegistryError):
    """The key, service or document does not exist."""


class PermissionDenied(RegistryError):
    """Consul's ACLs refused the request: fix the token, do not retry. `by_acl` False: a 401 or 403
    whose body is not Consul's ACL refusal (a proxy's page in front of Consul): a refusal all the
    same, but fixing the token's rules will not lift it."""

    def __init__(self, message: str, *, by_acl: bool = True) -> None:
        super().__init__(message)
        self.by_acl = by_acl


class UnknownToken(PermissionDenied):
    """Consul's ACLs do not know the token at all ("ACL not found": mistyped, deleted, another
    datacenter's): no rule of it is at stake, so nothing may be read as what its rules allow."""


# what to do about a refusal that is not Consul's ACLs' (PermissionDenied.by_acl False)
NOT_ACL_FIX = "not Consul's ACLs: see what answers for Consul at that address (a proxy in front of it)"


class InvalidSettings(RegistryError):
    """The Consul client settings cannot work (bad address, unreadable token or TLS file): fix them."""


class InvalidAddress(InvalidSettings, ValueError):
    """An HTTP client's base URL cannot be parsed (an unclosed [IPv6], a bad port); a ValueError too,
    as HTTPClient raised before."""


class Rejected(RegistryError):
    """The peer refused the request as invalid (4xx other than the above)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class InvalidDocument(RegistryError):
    """A config document failed validation; `path` names the field (`routes[1].to[0].weight`)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem
