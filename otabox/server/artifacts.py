"""Firmware files on disk: streamed in with digests computed on the way, stored by content hash.

With several nodes (or S3), the node's folder is a cache of a shared copy: the database's chunks
(`DatabaseCopy`) or a bucket (`otabox.server.s3.Bucket`), both behind `SharedCopy`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from otabox.errors import StorageUnavailable, TooLarge
from otabox.server.store.files import FileSQL

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024  # bytes per database chunk
GROUP = 16  # chunks per transaction


def _read_group(fh: BinaryIO) -> list[bytes]:
    group: list[bytes] = []
    while len(group) < GROUP:
        chunk = fh.read(CHUNK)
        if not chunk:
            break
        group.append(chunk)
    return group


def _sha256_of(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass(frozen=True, slots=True)
class StoredFile:
    path: Path
    size: int
    md5: str
    sha256: str


class SharedCopy(Protocol):
    """Where every node finds the files, by content hash."""

    where: str  # for people: "the database", "s3://bucket/prefix at http://host:port"

    async def has(self, sha256: str) -> bool: ...

    async def put(self, sha256: str, path: Path) -> None:
        """Raises with nothing (or only a partial object nobody lists) left behind."""

    async def fetch(self, sha256: str, dest: Path) -> bool:
        """The file into `dest` (created or truncated); False when it is not there."""

    async def delete(self, sha256: str) -> None: ...


class DatabaseCopy:
    """The files in the database's `file_chunks` table, 1 MiB chunks, a group per transaction."""

    where = "the database"

    def __init__(self, sql: FileSQL) -> None:
        self.sql = sql

    async def has(self, sha256: str) -> bool:
        return await self.sql.file_chunk_count(sha256) > 0

    async def put(self, sha256: str, path: Path) -> None:
        index = 0
        try:
            with open(path, "rb") as fh:
                while True:
                    # A group of chunks per transaction: memory stays bounded for any file size.
                    group = await asyncio.to_thread(_read_group, fh)
                    if not group:
                        break
                    await self.sql.put_file_chunks(sha256, index, group)
                    index += len(group)
        except BaseException:
            await self.sql.delete_file(sha256)
            raise

    async def fetch(self, sha256: str, dest: Path) -> bool:
        count = await self.sql.file_chunk_count(sha256)
        if not count:
            return False
        with open(dest, "wb") as fh:
            for index in range(count):
                chunk = await self.sql.file_chunk(sha256, index)
                if chunk is None:
                    raise OSError(f"file {sha256} lost chunk {index} in the database")
                await asyncio.to_thread(fh.write, chunk)
        return True

    async def delete(self, sha256: str) -> None:
        await self.sql.delete_file(sha256)


class Artifacts:
    """Content-addressed firmware files under `<data-dir>/firmware/`.

    With `shared` (several nodes on PostgreSQL, or S3), every file is also in the shared copy
    (`share`, before its record commits), and a node that lacks one fetches it from there into
    its folder the first time it needs it (`local`, checked against its digest).
    """

    def __init__(self, root: Path, shared: SharedCopy | None = None) -> None:
        self.root = root
        self.shared = shared
        self._fetching: dict[str, asyncio.Lock] = {}
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
        """This node's copy only; `unshare` removes the database's."""
        self.path_for(sha256).unlink(missing_ok=True)

    async def share(self, sha256: str) -> None:
        """Put a stored file into the shared copy for the other nodes (nothing without `shared`)."""
        if self.shared is None or await self.shared.has(sha256):
            return  # alone, or the same content is there already
        await self.shared.put(sha256, self.path_for(sha256))

    async def discard(self, sha256: str) -> None:
        """This node's copy and the shared one (no record refers to the file any more). Other
        nodes' copies go at their next start (`sweep`)."""
        self.remove(sha256)
        if self.shared is not None:
            try:
                await self.shared.delete(sha256)
            except StorageUnavailable as exc:
                # The record is gone already (or was never made): an object left in the bucket
                # costs space, not correctness; it is the same content if uploaded again.
                log.warning("%s; the object of %s stays there", exc, sha256)

    async def local(self, sha256: str) -> Path:
        """The file on this node's disk, fetched from the shared copy first if another node stored it.

        Returns the path even when the file is nowhere (callers treat a missing file as such).
        Raises OSError when the shared copy does not match its digest, StorageUnavailable when S3
        does not answer.
        """
        path = self.path_for(sha256)
        if self.shared is None or path.exists():
            return path
        async with self._fetching.setdefault(sha256, asyncio.Lock()):
            if not path.exists():
                await self._fetch(sha256, path)
        self._fetching.pop(sha256, None)
        return path

    async def check_shared(self, sha256: str) -> bool:
        """Whether the shared copy of `sha256` reads back whole (fetched, its digest compared)."""
        assert self.shared is not None
        tmp = self.tmp / f"check-{secrets.token_hex(8)}"
        try:
            return await self.shared.fetch(sha256, tmp) and await asyncio.to_thread(_sha256_of, tmp) == sha256
        finally:
            tmp.unlink(missing_ok=True)

    async def _fetch(self, sha256: str, path: Path) -> None:
        assert self.shared is not None
        tmp = self.tmp / f"fetch-{secrets.token_hex(8)}"
        try:
            if not await self.shared.fetch(sha256, tmp):
                return
            if await asyncio.to_thread(_sha256_of, tmp) != sha256:
                raise OSError(f"file {sha256} is damaged in {self.shared.where} (its digest differs)")
            await asyncio.to_thread(_fsync, tmp)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
            os.chmod(path, 0o644)
        finally:
            tmp.unlink(missing_ok=True)

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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
