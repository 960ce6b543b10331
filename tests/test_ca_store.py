"""The CA data dir: init, refusal to overwrite, permissions, rotate, retire (pure filesystem tier)."""

from __future__ import annotations

import datetime as dt
import os
import pwd
import re
from pathlib import Path

import pytest

from hostmesh.ca import pki, store
from hostmesh.ca.errors import InvalidRequest, StorageError
from tests.support import the_service_user


def test_init_creates_private_root_and_refuses_to_overwrite(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    a = store.init(d, "example.internal")
    assert a.trust_domain == "example.internal" and len(a.roots) == 1 and a.active is a.roots[0]
    assert os.stat(d).st_mode & 0o777 == 0o700
    for f in (d / "roots").iterdir():
        assert f.stat().st_mode & 0o777 == 0o600, f
    assert a.active.pin == pki.pin_of(a.active.cert) and a.active.pin.startswith("sha256:")
    with pytest.raises(StorageError, match="already holds a CA root"):
        store.init(d)
    assert store.load(d).active.id == a.active.id  # untouched


def test_init_makes_the_directories_it_needs_0755_under_any_umask(tmp_path: Path) -> None:
    """Under umask 000 the parents `ca init` created were 0777: anyone could swap the CA dir."""
    d = tmp_path / "a" / "b" / "ca"
    old = os.umask(0)
    try:
        store.init(d, "hostmesh.local")
    finally:
        os.umask(old)
    modes = [p.stat().st_mode & 0o777 for p in (tmp_path / "a", tmp_path / "a" / "b", d)]
    assert modes == [0o755, 0o755, 0o700]


def test_init_rejects_bad_trust_domain(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="invalid trust domain"):
        store.init(tmp_path / "ca", "Not A Domain")


def test_load_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="run `hostmesh ca init"):
        store.load(tmp_path / "missing")
    d = tmp_path / "ca"
    store.init(d)
    (d / "ca.json").write_text("{garbage")
    with pytest.raises(StorageError, match="corrupt"):
        store.load(d)


def test_world_readable_root_key_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    a = store.init(d)
    os.chmod(d / "roots" / f"{a.active.id}.key", 0o644)
    with pytest.raises(StorageError, match="chmod 600"):
        store.load(d)


def test_rotate_then_retire(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    first = store.init(d).active
    a, second = store.rotate(d)
    assert [r.id for r in a.roots] == [first.id, second.id] and a.active.id == second.id
    with pytest.raises(InvalidRequest, match="active signing root"):
        store.retire(d, second.id)
    with pytest.raises(InvalidRequest, match="no root matches"):
        store.retire(d, "deadbeefdeadbeef")
    with pytest.raises(InvalidRequest, match="no root matches"):
        store.retire(d, "ab")  # too short a prefix to be unambiguous
    rotated = second.cert.not_valid_before_utc + pki.CLOCK_SKEW  # (the not-before is backdated)
    safe = rotated + pki.DEFAULT_LEAF_TTL
    with pytest.raises(  # to the second: a retry at the minute printed was refused for up to 59 s more
        InvalidRequest,
        match=rf"root {first.id} signed leaves until {rotated:%Y-%m-%d %H:%M:%S}Z .* retire it after "
        rf"{safe:%Y-%m-%d %H:%M:%S}Z",
    ):
        store.retire(d, first.pin)  # just superseded: its leaves are still valid
    after = second.cert.not_valid_before_utc + pki.DEFAULT_LEAF_TTL + pki.CLOCK_SKEW
    half_an_hour_on = second.cert.not_valid_before_utc + dt.timedelta(minutes=30)
    with pytest.raises(InvalidRequest, match="--force"):  # leaves of 1 h: not past them yet
        store.retire(d, first.pin, leaf_ttl=dt.timedelta(hours=1), now=half_an_hour_on)
    a, retired = store.retire(d, first.pin, now=after)  # by full pin, once its last leaves have expired
    assert retired.id == first.id and [r.id for r in a.roots] == [second.id]
    assert (d / "retired" / f"{first.id}.crt").exists() and not (d / "roots" / f"{first.id}.key").exists()


def test_a_signing_stamp_moves_retires_window_and_a_damaged_one_is_named(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    first = store.init(d).active
    _, second = store.rotate(d)
    later = second.cert.not_valid_before_utc + dt.timedelta(hours=3)  # the CA went on signing with it
    assert store.note_signing(d, first.id, later) == later + store.SIGNED_AHEAD
    after_rotation = second.cert.not_valid_before_utc + pki.DEFAULT_LEAF_TTL + pki.CLOCK_SKEW
    noted = f"the CA noted its last signing with it in {d / store.SIGNED_DIR / first.id}"
    with pytest.raises(InvalidRequest, match=f"\\({re.escape(noted)}\\) .*--force"):
        store.retire(d, first.id, now=after_rotation)
    (d / store.SIGNED_DIR / first.id).write_text("soon\n")
    with pytest.raises(StorageError, match=rf"{first.id} does not hold a time \(UNIX seconds\); remove it"):
        store.retire(d, first.id, now=after_rotation)
    store.note_signing(d, first.id, later)
    store.retire(d, first.id, now=later + store.SIGNED_AHEAD + pki.DEFAULT_LEAF_TTL)


def test_a_staged_root_is_trusted_first_and_signs_only_once_activated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ca rotate` signed with its new root at once, so an agent that did not follow Consul at that
    moment refused every peer that renewed. Staged, the new root is in the bundle while the old one
    signs; `activate` switches signing, and retire then counts the old root's last leaves from the
    switch (not from when the staged root was made, hours earlier). A staged root never activated
    signed nothing: it can be retired at once."""
    d = tmp_path / "ca"
    first = store.init(d).active
    later = first.cert.not_valid_before_utc + pki.CLOCK_SKEW + dt.timedelta(minutes=1)
    monkeypatch.setattr(pki, "now", lambda: later)  # (certificates record whole seconds)
    a, staged = store.rotate(d, sign=False)
    assert {r.id for r in a.roots} == {first.id, staged.id} and a.active.id == first.id
    assert a.bundle_json()["active"] == first.id
    a, unwanted = store.rotate(d, sign=False)
    a, gone = store.retire(d, unwanted.id)  # never signed: no window to wait for
    assert gone.id == unwanted.id and {r.id for r in a.roots} == {first.id, staged.id}
    switch = staged.cert.not_valid_before_utc + dt.timedelta(hours=5)  # confirmed on every agent since
    a, signing = store.activate(d, staged.id[:8], now=switch)
    assert signing.id == staged.id and a.active.id == staged.id
    assert store.load(d).active.id == staged.id
    with pytest.raises(InvalidRequest, match="already the signing root"):
        store.activate(d, staged.id)
    after_staging = staged.cert.not_valid_before_utc + pki.DEFAULT_LEAF_TTL + pki.CLOCK_SKEW
    with pytest.raises(InvalidRequest, match="--force"):  # its leaves of the last 5 h are still valid
        store.retire(d, first.id, now=after_staging)
    store.retire(d, first.id, now=switch + store.SIGNED_AHEAD + pki.DEFAULT_LEAF_TTL)


def test_root_count_is_bounded(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    store.init(d)
    for _ in range(store.MAX_ROOTS - 1):
        store.rotate(d)
    with pytest.raises(InvalidRequest, match="retire old ones first"):
        store.rotate(d)


@pytest.mark.skipif(os.geteuid() != 0, reason="root only: files given to the data dir's owner")
def test_a_rotation_run_as_root_leaves_the_new_root_to_the_cas_user(tmp_path: Path) -> None:
    """`sudo hostmesh ca rotate` in the data dir of a CA that runs as its own user: root-owned files
    there are ones the running CA cannot read (its reload failed and it kept the old bundle)."""
    d = tmp_path / "ca"
    first = store.init(d).active
    with the_service_user() as user:  # the CA's, whose files root may work on
        for path in (d, *d.rglob("*")):
            os.chown(path, user, user)
        _, second = store.rotate(d)
        made = [d / "roots" / f"{second.id}.key", d / "roots" / f"{second.id}.crt", d / store.META_FILE]
        assert {(p.stat().st_uid, p.stat().st_gid) for p in made} == {(user, user)}
        store.retire(d, first.id, force=True)
        assert (d / "retired").stat().st_uid == user


@pytest.mark.skipif(os.geteuid() != 0, reason="root only: what root does in the CA user's directory")
def test_root_follows_no_symlink_the_cas_user_put_in_its_data_dir(tmp_path: Path) -> None:
    """The CA's user owns its data dir, so it can put symlinks there for an operator's `sudo hostmesh
    ca rotate` or `retire-root` to follow: root then chowned the target (`retired -> /etc`) or wrote
    through a temporary name into another file."""
    d = tmp_path / "ca"
    first = store.init(d).active
    victim_dir = tmp_path / "etc"  # root's, as /etc
    victim_dir.mkdir(mode=0o755)
    victim = victim_dir / "shadow"
    victim.write_text("root's\n")
    with the_service_user() as user:  # the CA's
        for path in (d, *d.rglob("*")):
            os.chown(path, user, user)
        (d / f".{store.META_FILE}.{os.getpid()}.tmp").symlink_to(victim)  # where root writes the meta next
        (d / "retired").symlink_to(victim_dir)
        store.rotate(d)
        assert victim.read_text() == "root's\n" and victim.stat().st_uid == 0
        with pytest.raises(StorageError, match="is not a directory"):
            store.retire(d, first.id, force=True)
    assert victim_dir.stat().st_uid == 0 and sorted(p.name for p in victim_dir.iterdir()) == ["shadow"]


@pytest.mark.skipif(os.geteuid() != 0, reason="root only: files of another user")
def test_a_ca_data_dir_or_root_key_another_user_owns_is_refused(tmp_path: Path) -> None:
    """A data dir, or a root key, owned by a user who is neither root, the CA's process's user nor
    the service's: that user could put a key of their own in its place, and the CA signed with it
    (`ca serve`, a reload) or wrote a new root into their folder (`sudo hostmesh ca rotate`)."""
    d = tmp_path / "ca"
    first = store.init(d).active
    stranger = pwd.getpwnam("daemon")
    os.chown(d, stranger.pw_uid, -1)
    with pytest.raises(StorageError) as refused:
        store.load(d)
    line = str(refused.value)
    assert line.startswith(
        f"CA data dir {d} is owned by daemon, who could replace what it holds (accepted owners: root"
    )
    assert "; fix: chown -R " in line and "\n" not in line, line
    with pytest.raises(StorageError, match="owned by daemon"):
        store.rotate(d)
    assert len(list((d / "roots").iterdir())) == 2  # the first root, nothing written
    os.chown(d, 0, -1)
    key = d / "roots" / f"{first.id}.key"
    os.chown(key, stranger.pw_uid, -1)
    with pytest.raises(StorageError, match=f"^root key {key} is owned by daemon, who could replace it "):
        store.load(d)
    os.chown(key, 0, -1)
    store.load(d)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    os.chown(fresh, stranger.pw_uid, -1)
    with pytest.raises(StorageError, match="is owned by daemon"):
        store.init(fresh)
    assert list(fresh.iterdir()) == []  # no root key written into their folder
