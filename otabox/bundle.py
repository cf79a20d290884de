"""Signed offline bundles: firmware that travels on removable media and is trusted on arrival.

A bundle is a tar archive with `manifest.json` (the firmware's `productKey, name, version, desc,
size, sha256, created` at its top level; its file is the member `firmware.bin`), the file, and
`manifest.sig`: the raw 64-byte Ed25519 signature over the manifest's exact bytes. One trip may
carry more firmware (one per product, say): the manifest then lists the others under `more`, each
with the same fields and its own `member` name. Publishers sign with `otabox keygen` keys; a server
stores a bundle's firmware only when a trusted publisher's key verifies the manifest and every file
matches it. Used by the CLI (on the vendor's machine, no server needed) and by the server's import;
no aiohttp, amqtt or aiosqlite here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from otabox import protocol

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FIRST_MEMBER = "firmware.bin"
FIELDS = ("productKey", "name", "version", "desc", "size", "sha256")
_MEMBER = re.compile(r"^firmware(-\d+)?\.bin$")
_CHUNK = 1024 * 1024


class BundleError(ValueError):
    """The bundle cannot be trusted or used; the message names the problem."""


class UnknownPublisher(BundleError):
    """The manifest's signature verifies with no trusted publisher's key."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One firmware of a bundle, as its manifest describes it."""

    product_key: str
    name: str
    version: str
    desc: str
    size: int
    sha256: str
    member: str


# ---------------------------------------------------------------- keys


def keygen(path: Path) -> tuple[Path, Path]:
    """Write a new publisher key pair: `path` (private, PEM, 0600) and `path.pub` (public, PEM).

    Raises FileExistsError rather than overwrite a key.
    """
    public = path.with_name(path.name + ".pub")
    for p in (path, public):
        if p.exists():
            raise FileExistsError(f"{p} exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public.write_bytes(public_pem(key.public_key()))
    return path, public


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private(path: Path) -> Ed25519PrivateKey:
    """Raises BundleError for a file that is not an Ed25519 private key."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{path} is not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path} is not an Ed25519 key")
    return key


def load_public(text: str | bytes) -> Ed25519PublicKey:
    """A publisher's public key: PEM, or base64 of the raw 32 bytes. Raises BundleError."""
    raw = text.encode() if isinstance(text, str) else text
    try:
        if b"BEGIN PUBLIC KEY" in raw:
            key = serialization.load_pem_public_key(raw)
            if not isinstance(key, Ed25519PublicKey):
                raise BundleError("not an Ed25519 public key")
            return key
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(raw.strip(), validate=True))
    except (ValueError, TypeError, binascii.Error) as exc:
        raise BundleError(f"not an Ed25519 public key (PEM or base64 of 32 bytes): {exc}") from exc


def raw_b64(key: Ed25519PublicKey) -> str:
    """The key as base64 of its raw 32 bytes (how the server stores it)."""
    return base64.b64encode(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


# ---------------------------------------------------------------- writing


@dataclass(frozen=True, slots=True)
class Source:
    """A firmware file to put into a bundle."""

    path: Path
    product_key: str
    name: str
    version: str
    desc: str = ""


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _describe(src: Source, member: str) -> dict[str, Any]:
    if not protocol.valid_key(src.product_key):
        raise BundleError(f"productKey {src.product_key!r} must match [A-Za-z0-9_.-]{{1,64}}")
    for field, value in (("name", src.name), ("version", src.version)):
        if not protocol.valid_version(value):
            raise BundleError(f"{field} must be 1-64 printable characters")
    size = src.path.stat().st_size
    if size == 0:
        raise BundleError(f"{src.path} is empty")
    return {
        "productKey": src.product_key,
        "name": src.name,
        "version": src.version,
        "desc": src.desc,
        "size": size,
        "sha256": _sha256(src.path),
        "member": member,
    }


def create(out: Path, key: Ed25519PrivateKey, sources: Sequence[Source]) -> dict[str, Any]:
    """Write a signed bundle of `sources` (the first one is the manifest's top level) to `out`.

    Written to `out.part` and renamed, so a half-written bundle never lies next to good ones.
    Returns the manifest. Raises BundleError for a source that cannot go into a bundle.
    """
    if not sources:
        raise BundleError("a bundle needs at least one firmware file")
    described = [_describe(s, FIRST_MEMBER if i == 0 else f"firmware-{i + 1}.bin") for i, s in enumerate(sources)]
    first = {k: v for k, v in described[0].items() if k != "member"}
    manifest: dict[str, Any] = {**first, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if len(described) > 1:
        manifest["more"] = described[1:]
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    part = out.with_name(out.name + ".part")
    with tarfile.open(part, "w") as tar:
        _add(tar, MANIFEST, io.BytesIO(body), len(body))
        for src, d in zip(sources, described, strict=True):
            with open(src.path, "rb") as fh:
                _add(tar, d["member"], fh, d["size"])
        sig = key.sign(body)
        _add(tar, SIGNATURE, io.BytesIO(sig), len(sig))
    os.replace(part, out)
    return manifest


def _add(tar: tarfile.TarFile, name: str, data: IO[bytes], size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(time.time()), 0o644
    tar.addfile(info, data)


# ---------------------------------------------------------------- checking


@dataclass(frozen=True, slots=True)
class Checked:
    """A bundle whose manifest verified with `publisher`'s key and whose files match it."""

    publisher: str
    entries: tuple[Entry, ...]
    manifest: dict[str, Any]


def _entries(manifest: Any) -> tuple[Entry, ...]:
    if not isinstance(manifest, dict):
        raise BundleError("manifest.json is not a JSON object")
    items = [{**manifest, "member": FIRST_MEMBER}, *(manifest.get("more") or [])]
    out = []
    for i, item in enumerate(items):
        where = "manifest" if i == 0 else f"manifest more[{i - 1}]"
        if not isinstance(item, dict):
            raise BundleError(f"{where} is not an object")
        missing = [f for f in FIELDS if f not in item]
        if missing:
            raise BundleError(f"{where} lacks {', '.join(missing)}")
        size, digest, member = item["size"], item["sha256"], item.get("member")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise BundleError(f"{where}: size must be a positive integer")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise BundleError(f"{where}: sha256 must be 64 lower-case hex digits")
        if not isinstance(member, str) or not _MEMBER.match(member):
            raise BundleError(f"{where}: member must be firmware.bin or firmware-N.bin")
        texts = {f: item[f] for f in ("productKey", "name", "version", "desc")}
        if not all(isinstance(v, str) for v in texts.values()):
            raise BundleError(f"{where}: productKey, name, version and desc must be strings")
        out.append(Entry(texts["productKey"], texts["name"], texts["version"], texts["desc"], size, digest, member))
    if len({e.member for e in out}) != len(out):
        raise BundleError("manifest names a member twice")
    return tuple(out)


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, limit: int) -> bytes:
    if info.size > limit:
        raise BundleError(f"{info.name} is larger than {limit} bytes")
    f = tar.extractfile(info)
    if f is None:
        raise BundleError(f"{info.name} is not a file")
    return f.read()


def check(
    path: Path, trusted: Mapping[str, Ed25519PublicKey], unpack_to: Path, *, max_bytes: int
) -> tuple[Checked, dict[str, Path]]:
    """Verify the bundle at `path` and unpack its firmware files into `unpack_to`.

    Returns what was checked and member -> unpacked file. Raises UnknownPublisher when no trusted
    key verifies the manifest, BundleError for everything else (truncated or not a tar, missing or
    extra members, unsafe names, a file that differs from the manifest, over `max_bytes`). On
    error, nothing is left in `unpack_to`.
    """
    files: dict[str, Path] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in (MANIFEST, SIGNATURE):
                if name not in members:
                    raise BundleError(f"not an otabox bundle: {name} is missing")
            body = _read_member(tar, members[MANIFEST], 1024 * 1024)
            signature = _read_member(tar, members[SIGNATURE], 1024)
            publisher = _verify(body, signature, trusted)
            try:
                manifest = json.loads(body)
            except ValueError as exc:
                raise BundleError(f"manifest.json is not JSON: {exc}") from exc
            entries = _entries(manifest)
            expected = {MANIFEST, SIGNATURE, *(e.member for e in entries)}
            extra = sorted(set(members) - expected)
            if extra:
                raise BundleError(f"unexpected member(s) in the bundle: {', '.join(extra)}")
            for e in entries:
                info = members.get(e.member)
                if info is None or not info.isfile():
                    raise BundleError(f"{e.member} ({e.product_key} {e.name} {e.version}) is missing")
                if e.size > max_bytes:
                    raise BundleError(f"{e.member} is larger than the upload limit of {max_bytes} bytes")
                files[e.member] = _unpack(tar, info, e, unpack_to)
    except (tarfile.TarError, EOFError, OSError) as exc:
        for p in files.values():
            p.unlink(missing_ok=True)
        raise BundleError(f"the bundle is damaged or truncated: {exc}") from exc
    except BaseException:
        for p in files.values():
            p.unlink(missing_ok=True)
        raise
    return Checked(publisher, entries, manifest), files


def _verify(body: bytes, signature: bytes, trusted: Mapping[str, Ed25519PublicKey]) -> str:
    if len(signature) != 64:
        raise BundleError("manifest.sig is not a 64-byte Ed25519 signature")
    for name, key in trusted.items():
        try:
            key.verify(signature, body)
        except InvalidSignature:
            continue
        return name
    raise UnknownPublisher(
        "the manifest's signature matches no trusted publisher (unknown publisher, or the manifest was changed)"
    )


def _unpack(tar: tarfile.TarFile, info: tarfile.TarInfo, entry: Entry, folder: Path) -> Path:
    src = tar.extractfile(info)
    if src is None:
        raise BundleError(f"{info.name} is not a file")
    target = folder / f"bundle-{os.getpid()}-{time.monotonic_ns()}-{entry.member}"
    h, size = hashlib.sha256(), 0
    with open(target, "wb") as out:
        for chunk in _chunks(src):
            size += len(chunk)
            if size > entry.size:
                break
            h.update(chunk)
            out.write(chunk)
    if size != entry.size or h.hexdigest() != entry.sha256:
        target.unlink(missing_ok=True)
        raise BundleError(
            f"{entry.member} ({entry.product_key} {entry.name} {entry.version}) does not match the manifest"
            " (size or sha256 differs)"
        )
    return target


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(_CHUNK):
        yield chunk
