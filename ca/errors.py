"""Errors of the identity layer, grouped by what the caller does next."""

from __future__ import annotations


class CAError(Exception):
    """Base of every hostmesh.ca error; str() is one line fit for a user. `retry_after`: seconds before
    a retry can succeed, when known (a refusal carrying one is answered with that Retry-After).
    An error about one CA instance (the agent's CA client's) carries its `address` apart from
    `reason`, what is said of it ("unreachable: connection refused"), so a caller that names the CA
    itself says `reason` alone; str() is "CA at <address> <reason>"."""

    retry_after: float | None = None

    def __init__(self, reason: str, *, address: str | None = None) -> None:
        super().__init__(f"CA at {address} {reason}" if address else reason)
        self.reason = reason
        self.address = address


class InvalidRequest(CAError):
    """The caller sent something unusable (bad CSR, bad identity): fix the input, do not retry."""


class SlowClient(CAError):
    """The client took too long sending its request (408): nothing was spent, it may retry at once."""


class Unauthorized(CAError):
    """The credential (join token, client cert) is missing, unknown, expired, used or out of scope."""


class TrustError(CAError):
    """A peer or CA could not be trusted (pin mismatch, unknown root): never proceed."""


class NotYetValid(TrustError):
    """A certificate of ours (signed by a trusted root) that is valid only later by this host's clock:
    a clock behind the CA's."""


class SigningRootUntrusted(CAError):
    """The trust bundle the fleet follows (another CA instance's) does not hold this CA's signing root:
    a certificate it signed would be trusted by no agent; another instance must issue."""


class RootExpired(CAError):
    """The signing root has expired: nothing it signs verifies anywhere; an operator must rotate it."""


class CAUnavailable(CAError):
    """The CA could not be reached or answered 5xx or 429: keep current state, retry with backoff, and
    not before `retry_after` seconds when the CA said so (its Retry-After)."""

    def __init__(self, reason: str, retry_after: float | None = None, *, address: str | None = None) -> None:
        super().__init__(reason, address=address)
        self.retry_after = retry_after


class StorageError(CAError):
    """Key or certificate material on disk is missing or unreadable."""


class AuditError(CAError):
    """The audit log cannot be opened or written: nothing may be issued that it does not record."""
