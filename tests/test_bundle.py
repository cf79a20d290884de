"""The signed bundle format (otabox.bundle): written on a vendor's machine, checked on arrival."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from otabox import bundle

FIRMWARE = os.urandom(200_000)


@pytest.fixture
def made(tmp_path: Path) -> tuple[Path, dict[str, Ed25519PublicKey]]:
    private, public = bundle.keygen(tmp_path / "vendor.key")
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    image = tmp_path / "fw.bin"
    image.write_bytes(FIRMWARE)
    other = tmp_path / "other.bin"
    other.write_bytes(FIRMWARE[::-1])
    out = tmp_path / "trip.otb"
    sources = [bundle.Source(image, "thermo", "main", "2.0.0", "notes"), bundle.Source(other, "valve", "main", "1.1")]
    bundle.create(out, bundle.load_private(private), sources)
    return out, {"acme": bundle.load_public(public.read_text())}


def unpack_dir(tmp_path: Path) -> Path:
    d = tmp_path / "unpack"
    d.mkdir(exist_ok=True)
    return d


def test_a_bundle_checks_and_unpacks_exactly(made: tuple[Path, dict[str, Ed25519PublicKey]], tmp_path: Path) -> None:
    path, trusted = made
    with tarfile.open(path) as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert names == ["manifest.json", "firmware.bin", "firmware-2.bin", "manifest.sig"]
    assert {k: manifest[k] for k in ("productKey", "name", "version", "desc", "size")} == {
        "productKey": "thermo", "name": "main", "version": "2.0.0", "desc": "notes", "size": len(FIRMWARE),
    }  # fmt: skip
    checked, files = bundle.check(path, trusted, unpack_dir(tmp_path), max_bytes=10**9)
    assert checked.publisher == "acme" and [e.product_key for e in checked.entries] == ["thermo", "valve"]
    assert files["firmware.bin"].read_bytes() == FIRMWARE and files["firmware-2.bin"].read_bytes() == FIRMWARE[::-1]


def rewrite(path: Path, change: dict[str, bytes | None]) -> None:
    """Rewrite the tar with some members replaced (bytes) or dropped (None)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            if m.name in change:
                new = change[m.name]
                if new is None:
                    continue
                data = new
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def test_any_changed_byte_is_refused(made: tuple[Path, dict[str, Ed25519PublicKey]], tmp_path: Path) -> None:
    path, trusted = made
    raw = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        offsets = {m.name: m.offset_data for m in tar.getmembers()}
    for member, message in (("firmware.bin", "does not match the manifest"), ("manifest.json", "no trusted publisher")):
        bad = bytearray(raw)
        bad[offsets[member] + 10] ^= 0x01
        target = tmp_path / f"bad-{member}.otb"
        target.write_bytes(bytes(bad))
        with pytest.raises(bundle.BundleError, match=message):
            bundle.check(target, trusted, unpack_dir(tmp_path), max_bytes=10**9)
    assert list(unpack_dir(tmp_path).iterdir()) == []  # nothing left half-unpacked


def test_unknown_publisher_truncation_and_odd_members(
    made: tuple[Path, dict[str, Ed25519PublicKey]], tmp_path: Path
) -> None:
    path, trusted = made
    _, stranger = bundle.keygen(tmp_path / "stranger.key")
    with pytest.raises(bundle.UnknownPublisher):
        bundle.check(
            path, {"stranger": bundle.load_public(stranger.read_bytes())}, unpack_dir(tmp_path), max_bytes=10**9
        )
    cut = tmp_path / "cut.otb"
    cut.write_bytes(path.read_bytes()[: len(FIRMWARE) // 2])
    with pytest.raises(bundle.BundleError):
        bundle.check(cut, trusted, unpack_dir(tmp_path), max_bytes=10**9)
    extra = tmp_path / "extra.otb"
    extra.write_bytes(path.read_bytes())
    with tarfile.open(extra, "a") as tar:
        info = tarfile.TarInfo("../evil.sh")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(bundle.BundleError, match="unexpected member"):
        bundle.check(extra, trusted, unpack_dir(tmp_path), max_bytes=10**9)
    missing = tmp_path / "missing.otb"
    missing.write_bytes(path.read_bytes())
    rewrite(missing, {"firmware-2.bin": None})
    with pytest.raises(bundle.BundleError, match=r"firmware-2\.bin .* is missing"):
        bundle.check(missing, trusted, unpack_dir(tmp_path), max_bytes=10**9)
    with pytest.raises(bundle.BundleError, match="larger than the upload limit"):
        bundle.check(path, trusted, unpack_dir(tmp_path), max_bytes=1000)
    assert list(unpack_dir(tmp_path).iterdir()) == []


def test_keys_are_never_overwritten_and_bad_sources_are_refused(tmp_path: Path) -> None:
    bundle.keygen(tmp_path / "k")
    with pytest.raises(FileExistsError):
        bundle.keygen(tmp_path / "k")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(bundle.BundleError, match="empty"):
        bundle.create(tmp_path / "x.otb", bundle.load_private(tmp_path / "k"), [bundle.Source(empty, "pk", "n", "1")])
    assert not (tmp_path / "x.otb").exists()
