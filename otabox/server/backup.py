"""Backups of a data dir and their restore: one tar with `manifest.json` at its root.

The archive holds a consistent snapshot of the database (SQLite's online backup API, safe while the
server writes), every firmware file, the server key that protects device secrets and signs download
tokens, the firmware signing key when there is one, and a manifest with the sha256 of every member.
A restore checks every digest before anything is in place and swaps the restored folder in only
once it is complete, so a refused or failed restore leaves the target as it was. Blocking code:
the server runs it in a thread.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from otabox import __version__

FORMAT = 1
MANIFEST = "manifest.json"
DB = "otabox.db"
SERVER_KEY = "server.key"
SIGNING_KEY = "keys/signing.pem"
CA_DIR = "ca"  # otabox.server.pki.CA_DIR
_CHUNK = 1024 * 1024
Progress = Callable[[int, int], None]


class BackupError(ValueError):
    """The backup cannot be made or restored; the message names the problem."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _snapshot(db: Path, dest: Path) -> None:
    """A consistent copy of a live WAL database through SQLite's online backup (never a file copy)."""
    src = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        out = sqlite3.connect(dest)
        try:
            src.backup(out)
        finally:
            out.close()
    finally:
        src.close()


def write(data_dir: Path, out: IO[bytes], *, signing_key: Path | None = None, gzip: bool = False,
          progress: Progress | None = None) -> dict[str, Any]:  # fmt: skip
    """Write a backup of `data_dir` to the binary stream `out`; returns the manifest.

    Raises BackupError when `data_dir` holds no otabox database.
    """
    if not (data_dir / DB).exists():
        if (data_dir / SERVER_KEY).exists():  # a server ran here, its database elsewhere
            raise BackupError(
                f"no otabox database in {data_dir}: a server on PostgreSQL (--database-url) keeps it there, "
                "back it up with pg_dump and copy the data dir"
            )
        raise BackupError(f"no otabox database in {data_dir}")
    with tempfile.TemporaryDirectory(prefix="otabox-backup-") as tmp:
        snapshot = Path(tmp) / DB
        _snapshot(data_dir / DB, snapshot)
        members: list[tuple[str, Path]] = [(DB, snapshot), (SERVER_KEY, data_dir / SERVER_KEY)]
        if signing_key is not None and signing_key.exists():
            members.append((SIGNING_KEY, signing_key))
        # otabox's CA: the device certificates it issued and the server certificate it made
        # chain to this key; without it every device certificate would have to be issued anew.
        ca = data_dir / CA_DIR
        for path in sorted(ca.iterdir()) if ca.is_dir() else []:
            if path.is_file():
                members.append((f"{CA_DIR}/{path.name}", path))
        firmware = data_dir / "firmware"
        for path in sorted(firmware.glob("??/*")) if firmware.is_dir() else []:
            members.append((f"firmware/{path.parent.name}/{path.name}", path))
        files: dict[str, dict[str, Any]] = {
            name: {"sha256": _sha256(path), "size": path.stat().st_size} for name, path in members
        }
        manifest = {
            "format": FORMAT,
            "otaboxVersion": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files,
        }
        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
        total, done = sum(int(f["size"]) for f in files.values()), 0
        with tarfile.open(fileobj=out, mode="w|gz" if gzip else "w|") as tar:
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mtime, info.mode = len(body), int(time.time()), 0o600
            tar.addfile(info, io.BytesIO(body))
            for name, path in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = int(files[name]["size"]), int(time.time()), 0o600
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
                done += int(files[name]["size"])
                if progress:
                    progress(done, total)
    return manifest


def write_file(data_dir: Path, path: Path, *, signing_key: Path | None = None,
               progress: Progress | None = None) -> dict[str, Any]:  # fmt: skip
    """Write a backup to `path` (gzip for .gz/.tgz), through `path.part` renamed when complete."""
    part = path.with_name(path.name + ".part")
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            manifest = write(data_dir, fh, signing_key=signing_key, gzip=path.suffix in (".gz", ".tgz"),
                             progress=progress)  # fmt: skip
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return manifest


def prune(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` scheduled backups in `folder`; returns what was deleted."""
    backups = sorted(folder.glob("otabox-backup-*.tar.gz"))
    doomed = backups[: max(0, len(backups) - keep)]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


# ---------------------------------------------------------------- restore


def _safe(name: str) -> bool:
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def _in_use(target: Path) -> bool:
    lock = target / "otabox.lock"
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def restore(archive: Path, target: Path, *, force: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Restore a backup into `target`; returns the manifest.

    Raises BackupError (naming the problem, `target` unchanged) for a non-empty target without
    `force`, a target a running server holds, and an archive that is not a backup, is truncated,
    lists a member it lacks, has a member whose digest differs or an unsafe member name.
    """
    if target.exists() and any(target.iterdir()):
        if not force:
            raise BackupError(f"{target} is not empty: restore into an empty folder, or pass --force to replace it")
        if _in_use(target):
            raise BackupError(f"{target} is in use by a running otabox server: stop it first")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.restore-", dir=target.parent))
    try:
        manifest = _unpack(archive, staging, progress)
        os.chmod(staging, 0o700)
        if target.exists():
            old = target.with_name(f".{target.name}.replaced-{int(time.time())}")
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _unpack(archive: Path, staging: Path, progress: Progress | None) -> dict[str, Any]:
    try:
        with tarfile.open(archive, "r:*") as tar:
            first = tar.next()
            if first is None or first.name != MANIFEST:
                raise BackupError("not an otabox backup: manifest.json is not its first member")
            f = tar.extractfile(first)
            try:
                manifest: dict[str, Any] = json.loads(f.read() if f else b"")
                files: dict[str, dict[str, Any]] = manifest["files"]
            except (ValueError, KeyError, TypeError) as exc:
                raise BackupError(f"manifest.json is damaged: {exc}") from exc
            if manifest.get("format") != FORMAT:
                raise BackupError(f"backup format {manifest.get('format')!r} is not one this otabox reads ({FORMAT})")
            total, done, seen = sum(int(x["size"]) for x in files.values()), 0, set()
            while (member := tar.next()) is not None:
                if not member.isfile() or not _safe(member.name) or member.name not in files:
                    raise BackupError(f"unexpected member {member.name!r} in the backup")
                want = files[member.name]
                dest = staging / member.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                h = hashlib.sha256()
                with open(dest, "wb") as out:
                    while src and (chunk := src.read(_CHUNK)):
                        h.update(chunk)
                        out.write(chunk)
                public = member.name.startswith("firmware/") or member.name == f"{CA_DIR}/ca.pem"
                os.chmod(dest, 0o644 if public else 0o600)  # keys stay the server user's alone
                if h.hexdigest() != want["sha256"]:
                    raise BackupError(f"{member.name} is damaged: its sha256 differs from the manifest")
                seen.add(member.name)
                done += int(want["size"])
                if progress:
                    progress(done, total)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BackupError(f"the backup is damaged or truncated: {exc}") from exc
    missing = sorted(set(files) - seen)
    if missing:
        raise BackupError(f"the backup lacks {len(missing)} member(s) its manifest lists, e.g. {missing[0]}")
    signing = staging / SIGNING_KEY
    if signing.exists():
        os.replace(signing, staging / "signing.pem")
        signing.parent.rmdir()
    return manifest
