"""Binary deltas between firmware of one line: made once per (from, to) pair, kept in the content store.

A push or offer to a device whose reported version is stored as firmware of the same product
and name carries `delta` params beside the full image's (docs/protocol.md) once the delta is
ready; until then, and whenever making it failed, the full image alone. Deltas are made one at
a time in a child process (`otabox delta make`), so the event loop never waits on one and a
runaway patch is bounded: killed after `delta_timeout` seconds, its address space capped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import secrets
import sys
import time
from pathlib import Path

from otabox import delta, rollout
from otabox.models import Delta, DeltaStatus, Firmware
from otabox.server.artifacts import Artifacts
from otabox.server.store import Store

log = logging.getLogger(__name__)

# Deltas made when a firmware is uploaded: from this many newest earlier versions of its line.
PREPARE_ON_UPLOAD = 3
# A delta must save at least this share of the full image to be worth a second download path.
MIN_SAVING = 0.1
# Making a patch takes up to 18x the image (bsdiff4; detools-lzma 7.5x, bench/RESULTS.md); the
# child may use this much address space.
MEMORY_PER_IMAGE_BYTE = 24
MEMORY_BASE = 1024**3


def make_command(old: Path, new: Path, out: Path, algorithm: str, max_memory: int) -> list[str]:
    """`otabox delta make` as a child process, from a source install or the one-file binary."""
    head = [sys.executable] if getattr(sys, "frozen", False) else [sys.executable, "-m", "otabox"]
    args = [str(old), str(new), str(out), "--algorithm", algorithm, "--max-memory", str(max_memory), "--json"]
    return [*head, "delta", "make", *args]


class DeltaService:
    """Finds, makes and hands out deltas. `for_device` is the hot path: a dict lookup once known."""

    def __init__(
        self, store: Store, artifacts: Artifacts, max_bytes: int, timeout: float, algorithm: str = delta.ALGORITHM
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.algorithm = algorithm
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._known: dict[tuple[str, str], Delta | None] = {}  # (from, to) -> delta; None: being made
        self._line: dict[tuple[str, str, str], str | None] = {}  # (pk, name, version) -> firmware id
        self._one_at_a_time = asyncio.Semaphore(1)
        self._making: set[asyncio.Task[None]] = set()

    async def stop(self) -> None:
        for task in list(self._making):
            task.cancel()
        await asyncio.gather(*self._making, return_exceptions=True)

    async def for_device(self, fw: Firmware, from_version: str | None) -> Delta | None:
        """The ready delta to `fw` for a device running `from_version`, or None (full image only).

        A pair seen for the first time is looked up and, when both images are stored and no
        delta exists yet, made in the background: a later push or offer carries it.
        """
        if not from_version or from_version == fw.version or self.max_bytes <= 0:
            return None
        source = await self._source(fw, from_version)
        if source is None:
            return None
        key = (source, fw.id)
        if key not in self._known:
            found = await self.store.get_delta(source, fw.id)
            if found is None:
                self._known[key] = None
                task = asyncio.create_task(self._make(source, fw), name=f"otabox-delta-{source}-{fw.id}")
                self._making.add(task)
                task.add_done_callback(self._making.discard)
                return None
            self._known[key] = found
        known = self._known[key]
        if known is None or known.status != DeltaStatus.READY:
            return None
        return known

    async def prepare(self, fw: Firmware, from_versions: set[str]) -> None:
        """Start making the deltas a new job will want, before its first push."""
        for version in sorted(from_versions):
            await self.for_device(fw, version)

    async def uploaded(self, fw: Firmware) -> None:
        """A new firmware arrived: start making deltas from the newest earlier versions of its
        line, so they are usually ready before a job for it starts."""
        self._line[(fw.product_key, fw.name, fw.version)] = fw.id  # it may have been looked for before
        line = await self.store.line_firmware(fw.product_key, fw.name)  # newest upload first
        # Earlier by version, not by upload: a device on a later version is not upgraded to this.
        older = [f for f in line if f.id != fw.id and rollout.is_downgrade(fw.version, f.version)]
        await self.prepare(fw, {f.version for f in older[:PREPARE_ON_UPLOAD]})

    async def idle(self) -> None:
        """Wait until no delta is being made (tests, benchmarks)."""
        while self._making:
            await asyncio.gather(*list(self._making), return_exceptions=True)

    def path_of(self, d: Delta) -> Path:
        return self.artifacts.path_for(d.sha256)

    async def _source(self, fw: Firmware, version: str) -> str | None:
        key = (fw.product_key, fw.name, version)
        if key not in self._line:
            found = await self.store.firmware_of_line(fw.product_key, fw.name, version)
            self._line[key] = None if found is None else found.id
        return self._line[key]

    def forget(self, firmware_id: str) -> None:
        """Drop what is cached about a deleted firmware."""
        self._known = {k: v for k, v in self._known.items() if firmware_id not in k}
        self._line = {k: v for k, v in self._line.items() if v != firmware_id}

    async def _make(self, source_id: str, fw: Firmware) -> None:
        async with self._one_at_a_time:
            source = await self.store.get_firmware(source_id)
            if source is None:
                self._known.pop((source_id, fw.id), None)
                return
            started = time.monotonic()
            try:
                made = await self._run(source, fw)
            except asyncio.CancelledError:
                self._known.pop((source_id, fw.id), None)  # made again after a restart
                raise
            except Exception as exc:  # anything the child or the disk did: record it, push full images
                log.warning("delta %s %s -> %s not made: %s", fw.name, source.version, fw.version, exc)
                made = Delta(source_id, fw.id, source.version, self.algorithm, DeltaStatus.FAILED, error=str(exc)[:500])
            made = dataclasses.replace(made, seconds=round(time.monotonic() - started, 3), created_at=time.time())
            await self.store.put_delta(made)
            self._known[(source_id, fw.id)] = made
            if made.status == DeltaStatus.READY:
                log.info(
                    "delta %s %s -> %s ready: %d of %d bytes (%.1f s)",
                    fw.name, source.version, fw.version, made.size, fw.size, made.seconds,
                )  # fmt: skip

    async def _run(self, source: Firmware, fw: Firmware) -> Delta:
        largest = max(source.size, fw.size)
        if largest > self.max_bytes:
            raise RuntimeError(f"image of {largest} bytes is over delta_max_bytes ({self.max_bytes})")
        out = self.artifacts.tmp / f"delta-{secrets.token_hex(8)}"
        old, new = await self.artifacts.local(source.sha256), await self.artifacts.local(fw.sha256)
        limit = MEMORY_BASE + MEMORY_PER_IMAGE_BYTE * largest
        try:
            proc = await asyncio.create_subprocess_exec(
                *make_command(
                    old,
                    new,
                    out,
                    self.algorithm,
                    limit,
                ),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                async with asyncio.timeout(self.timeout):
                    _, err = await proc.communicate()
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                raise
            if proc.returncode != 0:
                raise RuntimeError(err.decode(errors="replace").strip() or f"exit {proc.returncode}")
            size = out.stat().st_size
            if size > (1 - MIN_SAVING) * fw.size:
                raise RuntimeError(f"no saving: a delta of {size} bytes for an image of {fw.size}")
            md5, sha = await asyncio.to_thread(_digests, out)
            self.artifacts.adopt(out, sha, size, md5)
            await self.artifacts.share(sha)
            ready = DeltaStatus.READY
            return Delta(source.id, fw.id, source.version, self.algorithm, ready, size=size, md5=md5, sha256=sha)
        except TimeoutError as exc:
            raise RuntimeError(f"not made within delta_timeout ({self.timeout:g} s)") from exc
        finally:
            out.unlink(missing_ok=True)


def _digests(path: Path) -> tuple[str, str]:
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()
