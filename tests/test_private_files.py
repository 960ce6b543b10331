"""ca/files.py's writers on a real filesystem: a key and its certificate are replaced as a pair, so
a failure part way (a full disk, a file that cannot be replaced) leaves the old pair, never a new
key beside the old certificate (a renewal that failed so lost the host's identity for good: the old
key gone, the join token spent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hostmesh.ca.errors import StorageError
from hostmesh.ca.files import finish_pair, write_private_pair


def pair(d: Path) -> tuple[Path, Path]:
    return d / "api.key", d / "api.crt"


def test_a_pair_is_written_whole_with_mode_0600_and_nothing_left_beside_it(tmp_path: Path) -> None:
    key, cert = pair(tmp_path / "certs")
    write_private_pair(key, b"key-1", cert, b"cert-1")  # a first certificate: no key to keep aside
    write_private_pair(key, b"key-2", cert, b"cert-2")
    assert (key.read_bytes(), cert.read_bytes()) == (b"key-2", b"cert-2")
    assert {p.name for p in key.parent.iterdir()} == {"api.key", "api.crt"}
    assert {os.stat(p).st_mode & 0o777 for p in (key, cert)} == {0o600}


def test_a_certificate_that_cannot_replace_its_file_puts_the_old_key_back(tmp_path: Path) -> None:
    key, cert = pair(tmp_path)
    key.write_bytes(b"old-key")
    cert.mkdir()  # what stands where the certificate goes cannot be replaced by a file
    (cert / "x").write_bytes(b"")
    with pytest.raises(StorageError, match=f"^cannot write {cert}: Is a directory$"):
        write_private_pair(key, b"new-key", cert, b"new-cert")
    assert key.read_bytes() == b"old-key"
    assert {p.name for p in tmp_path.iterdir()} == {"api.key", "api.crt"}


def test_a_certificate_that_cannot_be_written_replaces_nothing(tmp_path: Path) -> None:
    key, cert = pair(tmp_path)
    key.write_bytes(b"old-key")
    cert.write_bytes(b"old-cert")
    staged = cert.with_name(f".{cert.name}.{os.getpid()}.new")
    staged.mkdir()  # stands for a full disk: the new certificate cannot be written out
    with pytest.raises(StorageError, match=f"^cannot write {cert}: Is a directory$"):
        write_private_pair(key, b"new-key", cert, b"new-cert")
    staged.rmdir()
    assert (key.read_bytes(), cert.read_bytes()) == (b"old-key", b"old-cert")
    assert {p.name for p in tmp_path.iterdir()} == {"api.key", "api.crt"}


def test_a_write_interrupted_between_its_renames_is_completed(tmp_path: Path) -> None:
    """A crash after the new key went in and before its certificate did: the new certificate waits
    beside it, the old key kept aside; `finish_pair` moves the certificate in and removes the rest."""
    key, cert = pair(tmp_path)
    key.write_bytes(b"new-key")
    cert.write_bytes(b"old-cert")
    (tmp_path / ".api.key.77.kept").write_bytes(b"old-key")
    (tmp_path / ".api.crt.77.new").write_bytes(b"new-cert")
    assert finish_pair(key, cert)
    assert (key.read_bytes(), cert.read_bytes()) == (b"new-key", b"new-cert")
    assert {p.name for p in tmp_path.iterdir()} == {"api.key", "api.crt"}


def test_a_write_interrupted_before_its_renames_leaves_the_old_pair(tmp_path: Path) -> None:
    key, cert = pair(tmp_path)
    key.write_bytes(b"old-key")
    cert.write_bytes(b"old-cert")
    for name, data in (
        (".api.key.77.new", b"new-k"),
        (".api.crt.77.new", b"new-c"),
        (".api.key.77.kept", b"old-key"),
    ):
        (tmp_path / name).write_bytes(data)
    assert not finish_pair(key, cert)
    assert (key.read_bytes(), cert.read_bytes()) == (b"old-key", b"old-cert")
    assert {p.name for p in tmp_path.iterdir()} == {"api.key", "api.crt"}


def test_an_undo_that_fails_leaves_what_completes_the_new_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The certificate cannot go in and the old key cannot go back (every rename after the first
    fails): nothing is deleted, and the next start completes the new pair (the old key was lost)."""
    key, cert = pair(tmp_path)
    key.write_bytes(b"old-key")
    cert.write_bytes(b"old-cert")
    real_replace, calls = os.replace, []

    def replace(src: object, dst: object) -> None:
        calls.append(dst)
        if len(calls) > 1:
            raise PermissionError(1, "Operation not permitted")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(StorageError, match="completed at the next start"):
        write_private_pair(key, b"new-key", cert, b"new-cert")
    monkeypatch.setattr(os, "replace", real_replace)
    assert finish_pair(key, cert)
    assert (key.read_bytes(), cert.read_bytes()) == (b"new-key", b"new-cert")
    assert {p.name for p in tmp_path.iterdir()} == {"api.key", "api.crt"}


def test_a_first_certificate_interrupted_between_its_renames_is_completed(tmp_path: Path) -> None:
    """No old key to keep aside (a first certificate, its join token spent): the new certificate
    beside the new key is still moved in."""
    key, cert = pair(tmp_path)
    key.write_bytes(b"new-key")
    (tmp_path / ".api.crt.77.new").write_bytes(b"new-cert")
    assert finish_pair(key, cert)
    assert (key.read_bytes(), cert.read_bytes()) == (b"new-key", b"new-cert")
    assert {p.name for p in tmp_path.iterdir()} == {"api.key", "api.crt"}


def test_a_pair_that_cannot_be_completed_keeps_what_it_needs(tmp_path: Path) -> None:
    """The certificate cannot go in now either: nothing is deleted (the old key kept aside, the new
    certificate), so a later try can still complete the pair."""
    key, cert = pair(tmp_path)
    key.write_bytes(b"new-key")
    cert.mkdir()  # cannot be replaced by a file
    (cert / "x").write_bytes(b"")
    leftovers = {".api.key.77.kept": b"old-key", ".api.crt.77.new": b"new-cert"}
    for name, data in leftovers.items():
        (tmp_path / name).write_bytes(data)
    assert not finish_pair(key, cert)
    assert {name: (tmp_path / name).read_bytes() for name in leftovers} == leftovers


def test_a_first_certificate_that_cannot_go_in_stays_beside_its_key(tmp_path: Path) -> None:
    key, cert = pair(tmp_path)
    cert.mkdir()
    (cert / "x").write_bytes(b"")
    with pytest.raises(StorageError, match="completed at the next start"):
        write_private_pair(key, b"new-key", cert, b"new-cert")
    (cert / "x").unlink()
    cert.rmdir()
    assert finish_pair(key, cert)
    assert (key.read_bytes(), cert.read_bytes()) == (b"new-key", b"new-cert")
