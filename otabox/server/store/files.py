"""SQL of the files shared through the database: firmware and delta files in chunks, by content hash."""

from __future__ import annotations

from collections.abc import Sequence

from otabox.server.store.base import StoreBase, Tx


class FileSQL(StoreBase):
    async def put_file_chunks(self, sha256: str, first: int, chunks: Sequence[bytes]) -> None:
        """Chunks `first`, `first + 1`, ... of one file, in one transaction."""

        async def op(tx: Tx) -> None:
            await tx.executemany(
                "INSERT INTO file_chunks (sha256, idx, data) VALUES (?, ?, ?)",
                [(sha256, first + i, chunk) for i, chunk in enumerate(chunks)],
            )

        await self.batched(op)

    async def file_chunk_count(self, sha256: str) -> int:
        row = await self._one("SELECT COUNT(*) AS n FROM file_chunks WHERE sha256 = ?", (sha256,))
        return int(row["n"]) if row else 0

    async def file_chunk(self, sha256: str, idx: int) -> bytes | None:
        row = await self._one("SELECT data FROM file_chunks WHERE sha256 = ? AND idx = ?", (sha256, idx))
        return bytes(row["data"]) if row else None

    async def delete_file(self, sha256: str) -> int:
        return await self._write("DELETE FROM file_chunks WHERE sha256 = ?", (sha256,))
