"""Firmware files on disk: streamed in with digests computed on the way, stored by content hash."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from otabox.errors import TooLarge


@dataclass(frozen=True, slots=True)
class StoredFile:
    path: Path
    size: int
    md5: str
    sha256: str


class Artifacts:
    """Content-addressed firmware files under `<data-dir>/firmware/`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        # Uploads that died mid-stream leave partial files behind; they are garbage.
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    async def receive(self, chunks: AsyncIterator[bytes], max_bytes: int) -> StoredFile:
        """Stream chunks to disk, hashing as they come. Raises TooLarge past `max_bytes`.

        Nothing is left on disk when this raises.
        """
        md5, sha = hashlib.md5(), hashlib.sha256()
        size = 0
        tmp = self.tmp / f"upload-{secrets.token_hex(8)}"
        try:
            with open(tmp, "wb") as fh:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(f"firmware file is larger than the limit of {max_bytes} bytes")
                    md5.update(chunk)
                    sha.update(chunk)
                    fh.write(chunk)
                fh.flush()
                # Off the event loop: syncing a large upload can take seconds, and the broker
                # and every HTTP request share this loop.
                await asyncio.to_thread(os.fsync, fh.fileno())
            digest = sha.hexdigest()
            final = self.path_for(digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            os.chmod(final, 0o644)
            return StoredFile(final, size, md5.hexdigest(), digest)
        finally:
            tmp.unlink(missing_ok=True)

    def adopt(self, path: Path, sha256: str, size: int, md5: str) -> StoredFile:
        """Move an already checked file (its digests known) into the content store."""
        final = self.path_for(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, final)
        os.chmod(final, 0o644)
        return StoredFile(final, size, md5, sha256)

    def remove(self, sha256: str) -> None:
        self.path_for(sha256).unlink(missing_ok=True)

    def sweep(self, keep: set[str]) -> list[str]:
        """Delete stored files whose digest is not in `keep`; the digests deleted.

        Run at start, before anything is stored: a crash between moving a file into the store
        and committing its row leaves a file nothing refers to.
        """
        gone = []
        for path in self.root.glob("??/*"):
            if path.parent != self.tmp and path.name not in keep:
                path.unlink(missing_ok=True)
                gone.append(path.name)
        return gone
