"""Server keys kept in the data dir: secrets encrypted at rest, signed download tokens, token hashes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import Protocol

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from otabox.models import Delta, Firmware

KEY_FILE = "server.key"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def write_private(path: Path, data: bytes) -> None:
    """Write a file readable only by the server's user (0600), atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "otb_" + secrets.token_urlsafe(32)


class Keys:
    """The server's master key and what is derived from it (encryption and signing keys)."""

    def __init__(self, master: bytes) -> None:
        self._fernet = Fernet(base64.urlsafe_b64encode(hashlib.sha256(b"secrets|" + master).digest()))
        self._sign_key = hashlib.sha256(b"download-token|" + master).digest()

    @classmethod
    def load_or_create(cls, data_dir: Path) -> Keys:
        """Load `<data_dir>/server.key`, creating it (0600) on first start."""
        path = data_dir / KEY_FILE
        if path.exists():
            master = path.read_bytes()
            if len(master) < 32:
                raise RuntimeError(f"{path} is damaged (too short)")
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
        else:
            master = secrets.token_bytes(32)
            write_private(path, master)
        return cls(master)

    def encrypt(self, text: str) -> str:
        return self._fernet.encrypt(text.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as exc:
            raise ValueError("secret cannot be decrypted with this server key") from exc

    def download_token(self, firmware_id: str, product_key: str, device_key: str, ttl: float) -> str:
        """A token bound to device and firmware that expires after `ttl` seconds."""
        claims = {"f": firmware_id, "p": product_key, "d": device_key, "e": int(time.time() + ttl)}
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        sig = _b64(hmac.new(self._sign_key, body.encode(), hashlib.sha256).digest()[:20])
        return f"{body}.{sig}"

    def check_download_token(self, token: str, firmware_id: str) -> tuple[str, str] | str:
        """(productKey, deviceKey) for a valid token, else the reason it is refused."""
        body, _, sig = token.partition(".")
        if not body or not sig:
            return "malformed token"
        expected = _b64(hmac.new(self._sign_key, body.encode(), hashlib.sha256).digest()[:20])
        # Bytes: compare_digest raises TypeError on str with non-ASCII (a 500 for any URL typo).
        if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "replace")):
            return "bad token signature"
        try:
            claims = json.loads(_unb64(body))
        except (ValueError, json.JSONDecodeError):
            return "malformed token"
        if claims.get("f") != firmware_id:
            return "token is for another firmware"
        if float(claims.get("e", 0)) < time.time():
            return "token expired"
        return str(claims["p"]), str(claims["d"])


class Signer:
    """Signs firmware files with an Ed25519 key (the `signature` of spec 3.2)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_key_b64 = base64.b64encode(raw).decode()
        self.public_key_pem = (
            key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    @classmethod
    def load_or_create(cls, path: Path) -> Signer:
        """Load a PEM Ed25519 private key, creating it (0600) when the file does not exist."""
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} is not an Ed25519 private key")
            return cls(key)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, pem)
        return cls(key)

    def sign_file(self, path: Path) -> str:
        """Base64 Ed25519 signature of the whole file (blocking: run it in a thread).

        The file is mapped, not read: Ed25519 signs the message itself, and a mapping lets the
        kernel page a large image in and out instead of holding a copy in memory.
        """
        import mmap

        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                return base64.b64encode(self._key.sign(b"")).decode()
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return base64.b64encode(self._key.sign(memoryview(data))).decode()


class FileUrls:
    """Device-bound firmware download URLs: `{public_url}/firmware/{id}/{file}?token=...` and
    `{public_url}/firmware/{id}/delta/{from id}?token=...`; or, with `presign` (firmware in S3,
    --storage-presign), URLs of the bucket's objects that are good for as long as a token."""

    def __init__(self, keys: Keys, public_url: str, ttl: float, presign: Presigner | None = None) -> None:
        self.keys = keys
        self.public_url = public_url.rstrip("/")
        self.ttl = ttl
        self.presign = presign

    def file_url(self, fw: Firmware, device_key: str) -> str:
        if self.presign is not None:
            return self.presign(fw.sha256, self.ttl, fw.file_name)
        token = self.keys.download_token(fw.id, fw.product_key, device_key, self.ttl)
        return f"{self.public_url}/firmware/{fw.id}/{fw.file_name}?token={token}"

    def delta_url(self, fw: Firmware, delta: Delta, device_key: str) -> str:
        """The delta from firmware `delta.from_id` to `fw`; the token is the one of `fw`'s full image."""
        if self.presign is not None:
            return self.presign(delta.sha256, self.ttl, f"{fw.file_name}.from-{delta.from_version}.delta")
        token = self.keys.download_token(fw.id, fw.product_key, device_key, self.ttl)
        return f"{self.public_url}/firmware/{fw.id}/delta/{delta.from_id}?token={token}"


class Presigner(Protocol):
    def __call__(self, sha256: str, seconds: float, file_name: str) -> str: ...
