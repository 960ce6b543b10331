"""The CA's data dir: its roots on disk, which one signs, and rotation/retirement.

Layout (the directory is 0700, every file 0600):

    <data_dir>/ca.json            {"trust_domain": …, "active": "<root id>"}
    <data_dir>/roots/<id>.crt     a root certificate (every root here is in the trust bundle)
    <data_dir>/roots/<id>.key     its private key
    <data_dir>/retired/<id>.crt   retired roots, kept for the record (their keys are deleted)
    <data_dir>/signed/<id>        until when the running CA may have signed leaves with that root
                                  (note_signing: a UNIX time, at most SIGNED_AHEAD past a signing)
    <data_dir>/server/            the serving certificate `ca serve` issues itself (see service.py)

`load()` returns one immutable `Authority` snapshot; the service swaps snapshots on reload.
Writers (`rotate`, `activate`, `retire`) write the root files first and `ca.json` last, so a reader that
sees the new `ca.json` always finds the files it names. `rotate` first checks that it can write
both directories, and removes the new root's files when a later write fails: a failed rotation
leaves no extra root behind (which `load` would put in the bundle). A failed `init` likewise
removes what it wrote, so it can simply be run again. Every write failure is a StorageError
naming the path.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec

from hostmesh.ca import pki
from hostmesh.ca.errors import InvalidRequest, StorageError
from hostmesh.registry.files import ForeignOwner, check_owner, make_dirs

META_FILE = "ca.json"
SIGNED_DIR = "signed"
# A leaf signed now makes the signing stamp this far ahead, so the CA writes it at most every half
# of it while it signs: retire's window then counts from at most this after the last leaf.
SIGNED_AHEAD = dt.timedelta(seconds=60)
MAX_ROOTS = 8  # every root is in every agent's trust store; rotation needs two, a few more is a leak


@dataclass(frozen=True, slots=True)
class Root:
    id: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pin(self) -> str:
        return pki.pin_of(self.cert)

    @property
    def pem(self) -> str:
        return pki.cert_pem(self.cert).decode()


@dataclass(frozen=True, slots=True)
class Authority:
    """One consistent view of the CA: its trust domain, every active root, and the signing root."""

    trust_domain: str
    roots: tuple[Root, ...]  # oldest first
    active: Root
    retired: tuple[str, ...] = ()  # ids of the roots in retired/: published, so no backup brings one back

    @property
    def bundle(self) -> list[str]:
        return [r.pem for r in self.roots]

    @property
    def certs(self) -> list[x509.Certificate]:
        return [r.cert for r in self.roots]

    @property
    def fingerprint(self) -> tuple[str, tuple[str, ...]]:
        """Equal for two snapshots with the same roots and signing root (reload change detection)."""
        return self.active.id, tuple(r.id for r in self.roots)

    def bundle_json(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "roots": self.bundle, "trust_domain": self.trust_domain, "active": self.active.id,
        }  # fmt: skip
        if self.retired:  # (absent until a first retire-root: a bundle published before is unchanged)
            doc["retired"] = list(self.retired)
        return doc


def exists(data_dir: Path) -> bool:
    return _exists(data_dir / META_FILE)


def _exists(path: Path) -> bool:
    """Path.exists, but a directory on the way that we may not search is a StorageError, not a traceback."""
    try:
        return path.exists()
    except OSError as exc:
        raise StorageError(f"cannot access {path}: {exc.strerror}") from None


def init(data_dir: Path, trust_domain: str = pki.DEFAULT_TRUST_DOMAIN) -> Authority:
    """Create the data dir and a first root; refuses to touch a data dir that already holds a CA."""
    if not pki.valid_trust_domain(trust_domain):
        raise InvalidRequest(
            f"invalid trust domain {trust_domain!r} (lowercase DNS labels, e.g. hostmesh.local)"
        )
    if exists(data_dir):
        raise StorageError(f"{data_dir} already holds a CA root; refusing to overwrite it")
    if _exists(data_dir / "roots"):
        raise StorageError(_interrupted(data_dir))
    _make_dir(data_dir)
    try:
        root = _new_root(data_dir, trust_domain)
        try:
            _write_meta(data_dir, trust_domain, root.id)
        except StorageError:
            _remove_root(data_dir, root.id)
            raise
    except StorageError as exc:  # leave no roots/ behind, or the next `ca init` would refuse
        with contextlib.suppress(OSError):
            (data_dir / "roots").rmdir()
        raise StorageError(f"{exc}; no CA was created") from None
    return load(data_dir)


def _interrupted(data_dir: Path) -> str:
    """A roots/ folder without ca.json: a `ca init` killed half way (a failed one cleans up)."""
    return (
        f"{data_dir} holds {data_dir / 'roots'} but no {META_FILE}: an interrupted `hostmesh ca init`? "
        f"Remove {data_dir / 'roots'} and run it again"
    )


def load(data_dir: Path) -> Authority:
    meta_path = data_dir / META_FILE
    if not _exists(meta_path):
        if _exists(data_dir / "roots"):
            raise StorageError(_interrupted(data_dir))
        raise StorageError(f"no CA in {data_dir}: run `hostmesh ca init --data-dir {data_dir}` first")
    try:
        meta = json.loads(pki.read_file(meta_path))
        trust_domain, active_id = meta["trust_domain"], str(meta["active"])
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: "[[[…" nested past the limit
        raise StorageError(f"{meta_path} is corrupt (expected trust_domain and active)") from None
    if not isinstance(trust_domain, str) or not pki.valid_trust_domain(trust_domain):
        raise StorageError(
            f"{meta_path} is corrupt: trust_domain {trust_domain!r:.80} is not a valid trust domain "
            "(lowercase DNS labels, e.g. hostmesh.local)"
        )
    for name, path in (
        ("CA data dir", data_dir),
        ("CA roots dir", data_dir / "roots"),
        ("CA metadata", meta_path),
    ):
        _check_owner(path, name)
    roots = [_load_root(crt) for crt in _root_files(data_dir / "roots")]
    roots.sort(key=lambda r: (r.cert.not_valid_before_utc, r.id == active_id))  # ties: the signing root last
    by_id = {r.id: r for r in roots}
    if active_id not in by_id:
        raise StorageError(f"{meta_path} names active root {active_id}, which is not in {data_dir / 'roots'}")
    _check_constraints(meta_path, trust_domain, by_id[active_id])
    return Authority(trust_domain, tuple(roots), by_id[active_id], _retired_ids(data_dir / "retired"))


def _retired_ids(retired_dir: Path) -> tuple[str, ...]:
    """The ids of the roots retire() moved to retired/ (none: no folder); unreadable is an error."""
    try:
        names = [entry.name for entry in os.scandir(retired_dir)]
    except FileNotFoundError:
        return ()
    except OSError as exc:
        raise StorageError(f"cannot read {retired_dir}: {exc.strerror}") from None
    return tuple(sorted(n.removesuffix(".crt") for n in names if n.endswith(".crt")))


def _root_files(roots_dir: Path) -> list[Path]:
    """The root certificates in roots/; an unreadable directory is an error, never "no roots"."""
    try:
        names = [entry.name for entry in os.scandir(roots_dir)]
    except OSError as exc:
        raise StorageError(f"cannot read {roots_dir}: {exc.strerror}") from None
    return sorted(roots_dir / n for n in names if n.endswith(".crt"))  # what glob("*.crt") matched


def _load_root(crt: Path) -> Root:
    """One root from its .crt and .key; every failure is a StorageError naming the file."""
    key_path = crt.with_suffix(".key")
    _check_private(key_path)
    _check_owner(key_path, "root key")
    _check_owner(crt, "root certificate")
    pem = pki.read_file(crt)
    try:
        certs = pki.load_certs(pem) if pem.strip() else []
    except InvalidRequest as exc:
        raise StorageError(f"{crt}: {pki.one_line(str(exc), 300)}") from None
    if len(certs) != 1:
        raise StorageError(f"{crt} must hold exactly one certificate")
    key_pem = pki.read_file(key_path)
    try:
        key = pki.load_key(key_pem)
    except (StorageError, UnsupportedAlgorithm) as exc:
        raise StorageError(f"{key_path}: {pki.one_line(str(exc), 300)}") from None
    root = Root(pki.root_id(certs[0]), certs[0], key)
    if root.key.public_key() != root.cert.public_key():
        raise StorageError(f"{key_path} is not the key of {crt}")
    return root


def _check_constraints(meta_path: Path, trust_domain: str, root: Root) -> None:
    """The trust domain must be one the signing root may sign for: its URI name constraint (every
    root `init` and `rotate` make has one), when it has one."""
    try:
        constraints = root.cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise StorageError(f"root {root.id}: unreadable name constraints") from None
    permitted = _uri_hosts(constraints.permitted_subtrees)
    excluded = _uri_hosts(constraints.excluded_subtrees)
    allowed = not permitted or any(_host_in(trust_domain, c) for c in permitted)
    if not allowed or any(_host_in(trust_domain, c) for c in excluded):
        raise StorageError(
            f"{meta_path} is corrupt: trust_domain {trust_domain!r} is not allowed by the name "
            f"constraints of the active root {root.id} (permitted: {', '.join(permitted) or 'any'})"
        )


def _uri_hosts(subtrees: list[x509.GeneralName] | None) -> list[str]:
    return [str(n.value) for n in subtrees or () if isinstance(n, x509.UniformResourceIdentifier)]


def _host_in(host: str, constraint: str) -> bool:
    """RFC 5280 4.2.1.10, a URI constraint: a host exactly, or with a leading "." any host below it."""
    host, constraint = host.lower(), constraint.lower()
    if constraint.startswith("."):
        return host.endswith(constraint)
    return host == constraint


def rotate(data_dir: Path, *, sign: bool = True) -> tuple[Authority, Root]:
    """Add a new root to the bundle; the old ones stay there until retired. With `sign` it is the
    signing root at once (one step). Without (`ca rotate --stage`) the current root keeps signing
    until `activate`: the running CA publishes the new root first, so every agent can be seen to
    trust it before any leaf it signs exists (an agent not following Consul at a one-step rotation
    refuses every peer that renews)."""
    current = load(data_dir)
    if len(current.roots) >= MAX_ROOTS:
        raise InvalidRequest(f"already {len(current.roots)} roots in the bundle; retire old ones first")
    _check_writable(data_dir / "roots", data_dir)
    root = _new_root(data_dir, current.trust_domain)
    if not sign:
        return load(data_dir), root
    try:
        _write_meta(data_dir, current.trust_domain, root.id)
    except StorageError as exc:
        _remove_root(data_dir, root.id)
        raise StorageError(f"{exc}; no root was added") from None
    return load(data_dir), root


def activate(data_dir: Path, root_ref: str, *, now: dt.datetime | None = None) -> tuple[Authority, Root]:
    """Sign with `root_ref`, a root already in the bundle (one `rotate --stage` added, or an older one
    to go back to). The root that signed until now gets its signing stamp at this time first: retire
    counts its last leaves from the switch, not from when the staged root was made."""
    current = load(data_dir)
    root = find(current, root_ref)
    if root.id == current.active.id:
        raise InvalidRequest(f"root {root.id} is already the signing root")
    t = now or pki.now()
    pki.check_not_expired(root.cert, t)
    _check_constraints(data_dir / META_FILE, current.trust_domain, root)
    note_signing(data_dir, current.active.id, t)
    _write_meta(data_dir, current.trust_domain, root.id)
    return load(data_dir), root


def retire(
    data_dir: Path,
    root_ref: str,
    *,
    leaf_ttl: dt.timedelta = pki.DEFAULT_LEAF_TTL,
    force: bool = False,
    now: dt.datetime | None = None,
) -> tuple[Authority, Root]:
    """Remove a root from the bundle (its key is deleted, its cert moved to retired/). Refused, unless
    `force`, while leaves it signed may still be valid: until `leaf_ttl` (what `ca serve --leaf-ttl`
    issues) after the next root was made, when it stopped signing. Agents holding such a leaf would
    otherwise lose every peer's trust at once, and their renewal with it too."""
    current = load(data_dir)
    root = find(current, root_ref)
    if root.id == current.active.id:
        # a staged root, else a new one (never an older root: an id mistyped for the old one's would
        # be told to undo the rotation)
        newer = [r.id for r in current.roots if staged(data_dir, current, r)]
        first = (
            f"`hostmesh ca rotate --activate {newer[-1]}`"
            if newer
            else "`hostmesh ca rotate --stage`, then `--activate` the root it adds"
        )
        raise InvalidRequest(f"root {root.id} is the active signing root; sign with another first: {first}")
    if staged(data_dir, current, root):  # no leaf to wait for
        return _retire(data_dir, root)
    made = root.cert.not_valid_before_utc
    stamped = signed_until(data_dir, root.id)
    later = [r.cert.not_valid_before_utc for r in current.roots if r.cert.not_valid_before_utc > made]
    # when the next root was made (its not-before is backdated by CLOCK_SKEW): this one signed until then
    superseded = (min(later) if later else current.active.cert.not_valid_before_utc) + pki.CLOCK_SKEW
    # ... unless the running CA went on signing with it: a reload that failed after `rotate` (a root
    # key its user cannot read) keeps the old root signing, for as long as nobody notices
    noted = ""
    if stamped is not None and stamped > superseded:
        superseded = stamped
        noted = f" (the CA noted its last signing with it in {data_dir / SIGNED_DIR / root.id})"
    safe = superseded + leaf_ttl
    if not force and (now or pki.now()) < safe:
        raise InvalidRequest(
            f"root {root.id} signed leaves until {superseded:%Y-%m-%d %H:%M:%S}Z{noted} that stay valid up "
            f"to {leaf_ttl} (--leaf-ttl): retire it after {safe:%Y-%m-%d %H:%M:%S}Z, once agents have "
            "renewed, or now with --force (agents still holding its leaves lose their peers until they renew)"
        )
    return _retire(data_dir, root)


def staged(data_dir: Path, authority: Authority, root: Root) -> bool:
    """`root` is one `rotate --stage` added that never signed: newer than the signing root and
    without a signing stamp (`activate` stamps the root it takes over from)."""
    newer = root.cert.not_valid_before_utc > authority.active.cert.not_valid_before_utc
    return newer and signed_until(data_dir, root.id) is None


def _retire(data_dir: Path, root: Root) -> tuple[Authority, Root]:
    retired = data_dir / "retired"
    src = data_dir / "roots" / f"{root.id}.crt"
    try:
        _own_dir(retired)
        os.replace(src, retired / src.name)
        (data_dir / "roots" / f"{root.id}.key").unlink(missing_ok=True)
        (data_dir / SIGNED_DIR / root.id).unlink(missing_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot retire root {root.id} in {data_dir}: {exc.strerror}") from None
    return load(data_dir), root


def note_signing(data_dir: Path, root_id: str, now: dt.datetime) -> dt.datetime:
    """The CA signs with `root_id` at `now`: stamp that it may sign with it until SIGNED_AHEAD later
    (for retire). Returns that time; StorageError when the stamp cannot be written."""
    until = now + SIGNED_AHEAD
    try:
        _own_dir(data_dir / SIGNED_DIR)
    except OSError as exc:
        raise StorageError(f"cannot create {data_dir / SIGNED_DIR}: {exc.strerror}") from None
    _write(data_dir / SIGNED_DIR / root_id, f"{until.timestamp():.0f}\n".encode())
    return until


def signed_until(data_dir: Path, root_id: str) -> dt.datetime | None:
    """The stamp note_signing left for `root_id`; None when there is none (a CA of an earlier
    release, or one that never signed with it). StorageError when it cannot be read or is not one."""
    path = data_dir / SIGNED_DIR / root_id
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return dt.datetime.fromtimestamp(int(text.strip()), dt.UTC)
    except (ValueError, OverflowError, OSError):
        raise StorageError(f"{path} does not hold a time (UNIX seconds); remove it to retire") from None


def find(authority: Authority, ref: str) -> Root:
    """A root by id, id prefix (at least 8 hex) or full `sha256:` pin."""
    ref = ref.strip().lower()
    if ref.startswith("sha256:"):
        matches = [r for r in authority.roots if r.pin == ref]
    else:
        matches = [r for r in authority.roots if len(ref) >= 8 and r.id.startswith(ref)]
    if len(matches) != 1:
        known = ", ".join(r.id for r in authority.roots)
        what = "no" if not matches else "more than one"
        raise InvalidRequest(f"{what} root matches {ref!r} (roots: {known})")
    return matches[0]


def _new_root(data_dir: Path, trust_domain: str) -> Root:
    key, cert = pki.make_root(trust_domain)
    root = Root(pki.root_id(cert), cert, key)
    roots = data_dir / "roots"
    try:
        _own_dir(roots)
    except OSError as exc:
        raise StorageError(f"cannot create {roots}: {exc.strerror}") from None
    try:
        _write(roots / f"{root.id}.key", pki.key_pem(key))
        _write(roots / f"{root.id}.crt", pki.cert_pem(cert))
    except StorageError:
        _remove_root(data_dir, root.id)
        raise
    return root


def _remove_root(data_dir: Path, root_id: str) -> None:
    """Best effort: the files of a root that never became part of the CA."""
    for suffix in (".crt", ".key"):  # the certificate first: without it, load() ignores a key
        with contextlib.suppress(OSError):
            (data_dir / "roots" / f"{root_id}{suffix}").unlink(missing_ok=True)


def _write_meta(data_dir: Path, trust_domain: str, active: str) -> None:
    body = json.dumps({"trust_domain": trust_domain, "active": active}, indent=2) + "\n"
    _write(data_dir / META_FILE, body.encode())


def _write(path: Path, data: bytes) -> None:
    try:
        pki.write_private(path, data, _service_owner(path.parent))
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror}") from None


def _service_owner(directory: Path) -> tuple[int, int] | None:
    """Run as root (`sudo hostmesh ca rotate`) in a data dir the CA's user owns: that user, to whom
    what root writes there is given (a root-owned root key is one the running CA cannot read: its
    reload failed and it kept serving the old bundle; systemd's StateDirectory= fixes ownership only
    when the directory itself is not the user's). None otherwise: a first `ca init` run as root
    leaves root's. Only files root has just made are given (fchown on their descriptor, _own_dir):
    never a path the CA's user could have pointed elsewhere."""
    if os.geteuid() != 0:
        return None
    st = os.stat(directory)
    return (st.st_uid, st.st_gid) if st.st_uid != 0 else None


def _own_dir(path: Path) -> None:
    """`path` (0700) as a real directory, given to the data dir's user when root made it for them:
    never a symlink the CA's user put there for root to follow (a write into it, a chown of /etc)."""
    path.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"{path} is not a directory (a symlink?): nothing written there")
    owner = _service_owner(path.parent)
    if owner is not None and st.st_uid == 0:
        os.chown(path, *owner, follow_symlinks=False)


def _check_writable(*dirs: Path) -> None:
    """Create and remove a file in each dir: the only test that holds for root, whom permission bits
    do not stop but a read-only mount or an immutable dir (`chattr +i`) does."""
    for d in dirs:
        try:
            fd, name = tempfile.mkstemp(prefix=".write-check.", dir=d)
            os.close(fd)
            os.unlink(name)
        except OSError as exc:
            raise StorageError(f"cannot write to {d}: {exc.strerror}; nothing was changed") from None


def _make_dir(path: Path) -> None:
    """`path` 0700 (even when it was there), and the directories it needs 0755 (files.make_dirs)."""
    try:
        make_dirs(path)
        _check_owner(path, "CA data dir")  # before a root key goes in
        os.chmod(path, 0o700)
    except OSError as exc:
        raise StorageError(f"cannot create {path}: {exc.strerror}") from None


def _check_owner(path: Path, name: str) -> None:
    """files.check_owner as a StorageError: another user could swap a root key, or what signs."""
    try:
        check_owner(path, name)
    except ForeignOwner as exc:
        raise StorageError(str(exc)) from None
    except OSError as exc:
        raise StorageError(f"cannot access {path}: {exc.strerror}") from None


def _check_private(path: Path) -> None:
    """Like ssh: refuse a root key that others can read, rather than sign with a leaked key."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StorageError(f"{path} is accessible by others (mode {mode & 0o777:04o}); chmod 600 it")
