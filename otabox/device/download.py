"""Device-side firmware fetching: upgrade offers, Range-resumable HTTP streaming, size and digest checks.

Shared by the device SDK (`otabox.device`, which writes to a file) and the fleet simulator
(`otabox.cli.simulate`, which only hashes). aiohttp and hashlib only; no MQTT here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "DeltaOffer",
    "DownloadError",
    "Offer",
    "OfferError",
    "VerifyError",
    "check",
    "fetch",
    "new_hasher",
    "to_file",
]

log = logging.getLogger(__name__)

SIGN_METHODS = ("md5", "sha256")
CHUNK_SIZE = 64 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class OfferError(ValueError):
    """An upgrade offer (push params or getversion entry) that cannot be used."""


class DownloadError(Exception):
    """The firmware could not be downloaded. `retryable` is False for answers a retry cannot fix (401/403/404)."""

    def __init__(self, message: str, *, retryable: bool = True, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


class VerifyError(Exception):
    """The downloaded bytes do not match the offer's `fileSize` or `sign`."""


@dataclass(frozen=True, slots=True)
class Offer:
    """One upgrade offer: the `params` of an `ota.device.upgrade` push, or one entry of a getversion reply."""

    version: str
    file_url: str
    file_size: int
    sign: str
    sign_method: str = "sha256"
    firmware_name: str = ""
    desc: str = ""
    job_id: str = ""
    signature: str = ""
    # A binary delta from the version the device runs, when the server offers one (else None).
    delta: DeltaOffer | None = field(default=None, compare=False)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_params(cls, params: Any) -> Offer:
        """Build an offer from wire params. Raises OfferError naming the bad field."""
        if not isinstance(params, dict):
            raise OfferError("offer must be a JSON object")
        version = params.get("version")
        if isinstance(version, int | float) and not isinstance(version, bool):
            version = str(version)
        if not isinstance(version, str) or not version.strip():
            raise OfferError("offer.version must be a non-empty string")
        url = params.get("fileUrl")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise OfferError("offer.fileUrl must be an http(s) URL")
        size = params.get("fileSize")
        if isinstance(size, str) and size.isdigit():
            size = int(size)  # lenient: some servers send it as a string
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OfferError("offer.fileSize must be a non-negative integer")
        method = str(params.get("signMethod") or "sha256").lower()
        if method not in SIGN_METHODS:
            raise OfferError(f"offer.signMethod {method!r} is not md5 or sha256")
        sign = params.get("sign")
        if not isinstance(sign, str) or not sign:
            raise OfferError("offer.sign must be a hex digest")
        return cls(
            version=version,
            file_url=url,
            file_size=size,
            sign=sign.lower(),
            sign_method=method,
            firmware_name=str(params.get("firmwareName") or ""),
            desc=str(params.get("desc") or ""),
            job_id=str(params.get("jobId") or ""),
            signature=str(params.get("signature") or ""),
            delta=DeltaOffer.from_params(params.get("delta"), version),
            raw=dict(params),
        )


@dataclass(frozen=True, slots=True)
class DeltaOffer:
    """The `delta` beside an offer's full image: a patch from version `source` (docs/protocol.md)."""

    source: str
    algorithm: str
    offer: Offer  # the patch file as a download of its own (its size and sign)

    @classmethod
    def from_params(cls, params: Any, version: str) -> DeltaOffer | None:
        """The delta of an offer, or None when there is none or it is unusable: a bad delta must
        never cost the device its upgrade, which the full image still carries."""
        if not isinstance(params, dict):
            return None
        source, algorithm = params.get("from"), params.get("algorithm")
        if not isinstance(source, str) or not isinstance(algorithm, str):
            return None
        try:
            patch = Offer.from_params(
                {k: params.get(k) for k in ("fileUrl", "fileSize", "sign", "signMethod")} | {"version": version}
            )
        except OfferError:
            return None
        return cls(source, algorithm, patch)


def new_hasher(sign_method: str) -> Any:
    """A fresh hashlib object for `md5` or `sha256`. Raises OfferError for anything else."""
    if sign_method == "md5":
        return hashlib.md5(usedforsecurity=False)
    if sign_method == "sha256":
        return hashlib.sha256()
    raise OfferError(f"unknown sign method {sign_method!r}")


def load_public_key(key: str | bytes) -> Ed25519PublicKey:
    """The server's Ed25519 public key from `GET /api/v1/signing-key`: its `publicKey` (base64 of
    the raw 32 bytes) or its `pem`. Raises ValueError for anything else."""
    text = key.decode() if isinstance(key, bytes) else key
    try:
        if "BEGIN PUBLIC KEY" in text:
            loaded = serialization.load_pem_public_key(text.encode())
            if not isinstance(loaded, Ed25519PublicKey):
                raise ValueError("not an Ed25519 key")
            return loaded
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ValueError(f"not an Ed25519 public key: {exc}") from exc


def verify_signature(public_key: Ed25519PublicKey, path: Path, signature: str) -> None:
    """Check the offer's `signature` (base64 Ed25519 of the whole file) against the file at `path`.

    Raises VerifyError when the offer has no signature, it is not base64, or it does not verify.
    Blocking (reads the file): run it in a thread.
    """
    if not signature:
        raise VerifyError("the offer carries no signature, but this device requires signed firmware")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise VerifyError(f"signature is not base64: {exc}") from exc
    try:
        public_key.verify(raw, path.read_bytes())
    except InvalidSignature as exc:
        raise VerifyError("Ed25519 signature does not match the file") from exc


def check(offer: Offer, size: int, digest: str) -> None:
    """Raise VerifyError unless `size` and the hex `digest` match the offer."""
    if size != offer.file_size:
        raise VerifyError(f"size {size} differs from fileSize {offer.file_size}")
    if digest.lower() != offer.sign:
        raise VerifyError(f"{offer.sign_method} {digest} differs from sign {offer.sign}")


def check_file(offer: Offer, path: Path, public_key: Ed25519PublicKey | None = None) -> None:
    """Raise VerifyError unless the file at `path` is the offer's image (size, sign, signature).

    Blocking (reads the file): run it in a thread.
    """
    hasher = new_hasher(offer.sign_method)
    size = _hash_file(path, hasher)
    check(offer, size, hasher.hexdigest())
    if public_key is not None:
        verify_signature(public_key, path, offer.signature)


async def fetch(
    session: aiohttp.ClientSession,
    url: str,
    offset: int,
    on_chunk: Callable[[bytes], Any],
    *,
    on_start: Callable[[int, int], Any] | None = None,
    limit: int | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[int, int]:
    """GET `url` from byte `offset` (a `Range` request when > 0) and hand each chunk to `on_chunk`.

    `on_start(start, total)` is called once the headers are in, before any chunk: `start` is the
    offset the body really starts at (0 when the server ignored Range, so the caller must discard
    what it had) and `total` the full file size (-1 if unknown). Returns the same `(start, total)`.
    When `limit` is given, stops after that many bytes and drops the connection (used to
    simulate a broken download). `on_chunk` may return an awaitable (e.g. to throttle).
    Raises DownloadError: retryable for network errors and 5xx, not for other 4xx.
    """
    headers = {"Range": f"bytes={offset}-"} if offset > 0 else {}
    try:
        async with session.get(url, headers=headers) as resp:
            if resp.status == 416 and offset > 0:
                # Nothing past `offset`: the file is complete already (or shorter; the check tells).
                total = _total_from_416(resp.headers.get("Content-Range"))
                if on_start is not None:
                    on_start(offset, total)
                return offset, total
            if resp.status >= 400:
                raise DownloadError(
                    f"HTTP {resp.status} for {_safe(url)}", retryable=resp.status >= 500, status=resp.status
                )
            start, total = 0, resp.content_length if resp.content_length is not None else -1
            if resp.status == 206:
                match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                if match is None:
                    raise DownloadError("206 without a usable Content-Range")
                start = int(match.group(1))
                total = int(match.group(3)) if match.group(3) != "*" else -1
            if on_start is not None:
                on_start(start, total)
            received = 0
            async for chunk in resp.content.iter_chunked(chunk_size):
                if limit is not None and received + len(chunk) >= limit:
                    chunk = chunk[: limit - received]
                    result = on_chunk(chunk)
                    if result is not None:
                        await result
                    resp.close()  # drop the TCP connection, like a device losing its link
                    raise DownloadError(f"download interrupted after {limit} bytes (simulated)")
                received += len(chunk)
                result = on_chunk(chunk)
                if result is not None:
                    await result
            return start, total
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise DownloadError(f"download of {_safe(url)} broke: {exc!r}") from exc


async def to_file(
    session: aiohttp.ClientSession,
    offer: Offer,
    path: str | os.PathLike[str],
    *,
    on_percent: Callable[[int], Awaitable[None] | None] | None = None,
    every: int = 10,
    attempts: int = 5,
    retry_delay: float = 0.5,
    public_key: Ed25519PublicKey | None = None,
) -> Path:
    """Download `offer` into `path` via `<path>.part`, resuming with Range; verify; rename into place.

    With `public_key` the file must also carry a valid Ed25519 `signature` (VerifyError otherwise).

    A `.part` file left by an earlier call is resumed (its bytes are hashed first). Retryable
    errors are retried up to `attempts` times in all, each resuming where the last stopped,
    after `retry_delay` x attempt seconds. `on_percent(p)` is called each time another `every`
    percent of the file has arrived (below 100). Returns `path`. Raises DownloadError (the
    `.part` file stays for a later resume) or VerifyError (the `.part` file is deleted).
    """
    target = Path(path)
    part = target.with_name(target.name + ".part")
    hasher = new_hasher(offer.sign_method)
    offset = 0
    if part.exists() and part.stat().st_size <= offer.file_size:
        offset = await asyncio.to_thread(_hash_file, part, hasher)
    else:
        part.unlink(missing_ok=True)
    every = max(1, every)
    last_pct = -every
    failures = 0
    # Plain blocking writes of 64 KiB chunks: cheap next to the network, and no thread per chunk.
    with open(part, "ab") as fh:

        def on_start(start: int, total: int) -> None:
            nonlocal hasher, offset
            if start != offset:  # the server ignored Range and sends the whole file: start over
                fh.seek(0)
                fh.truncate()
                hasher = new_hasher(offer.sign_method)
                offset = 0

        def on_chunk(chunk: bytes) -> Awaitable[None] | None:
            nonlocal last_pct, offset
            fh.write(chunk)
            hasher.update(chunk)
            offset += len(chunk)
            pct = 100 * offset // offer.file_size if offer.file_size else 100
            if on_percent is not None and last_pct + every <= pct < 100:
                last_pct = pct - pct % every
                return on_percent(last_pct)
            return None

        while True:
            try:
                await fetch(session, offer.file_url, offset, on_chunk, on_start=on_start)
                break
            except DownloadError as exc:
                failures += 1
                if not exc.retryable or failures >= attempts:
                    raise
                log.info("download broke at %d bytes (%s); resuming", offset, exc)
                fh.flush()
                await asyncio.sleep(retry_delay * failures)
    try:
        check(offer, offset, hasher.hexdigest())
        if public_key is not None:
            await asyncio.to_thread(verify_signature, public_key, part, offer.signature)
    except VerifyError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, target)
    return target


def _hash_file(path: Path, hasher: Any) -> int:
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            hasher.update(chunk)
            size += len(chunk)
    return size


def _total_from_416(value: str | None) -> int:
    match = re.match(r"bytes \*/(\d+)", value or "")
    return int(match.group(1)) if match else -1


def _safe(url: str) -> str:
    """The URL without its query (the download token stays out of logs and messages)."""
    return url.split("?", 1)[0]
