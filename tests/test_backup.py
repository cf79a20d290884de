"""Backup and restore: taken during a running rollout, restored into a fresh data dir, served again;
damaged archives refused with the target unchanged; scheduled backups kept to their number."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from otabox.cli import main
from otabox.server import backup, settings
from tests.conftest import TOKEN, Device, Server, start_server, stop_within, wait_for

# A backup is of the data dir's SQLite file: on PostgreSQL these tests are the refusal below.
pytestmark = pytest.mark.sqlite_only


@pytest.fixture
def server_settings() -> dict[str, Any]:
    return {"scheduler_interval": 0.1}


async def test_a_backup_taken_mid_rollout_restores_into_a_server_that_carries_on(
    server: Server, tmp_path: Path
) -> None:
    await server.product("pk1")
    content = b"firmware 2.0 " * 4000
    fw = await server.firmware("pk1", "2.0", content)
    secrets = {dk: (await server.device(dk))["deviceSecret"] for dk in ("d1", "d2")}
    d1 = await Device(server, "pk1", "d1", secrets["d1"]).connect("1.0")
    await (await Device(server, "pk1", "d2", secrets["d2"]).connect("1.0")).close()
    job = await server.call("POST", "/jobs", 201, json={"firmwareId": fw["id"]})
    await d1.upgrade()  # d1 done; d2 offline, still pending: the job is running
    await wait_for(lambda: _status(server, job["id"], "d1", "succeeded"))
    archive = tmp_path / "site.tar.gz"
    assert await asyncio.to_thread(main, ["backup", str(archive), "--data-dir", str(server.data_dir)]) == 0
    events_before = (await server.call("GET", f"/events?jobId={job['id']}", 200)).decode()
    await d1.close()
    await server.app.stop()

    restored = tmp_path / "restored" / "data"
    assert await asyncio.to_thread(main, ["restore", str(archive), "--data-dir", str(restored)]) == 0
    again = await start_server(restored.parent, scheduler_interval=0.1)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            new = Server(again, http, f"http://127.0.0.1:{again.http_port}", restored)
            events_after = (await new.call("GET", f"/events?jobId={job['id']}", 200)).decode()
            assert events_after.startswith(events_before.rstrip("\n"))  # the whole log is there
            assert (await new.call("GET", f"/jobs/{job['id']}", 200))["status"] == "running"
            # d2 logs in with its old secret (server.key came back), gets its push, and the job completes.
            d2 = await Device(new, "pk1", "d2", secrets["d2"]).connect("1.0")
            params = await d2.upgrade()
            async with http.get(params["fileUrl"]) as resp:
                assert hashlib.sha256(await resp.read()).hexdigest() == fw["sha256"]

            async def completed() -> bool:
                return bool((await new.call("GET", f"/jobs/{job['id']}", 200))["status"] == "completed")

            assert await wait_for(completed)
            await d2.close()
    finally:
        await again.stop()


async def _status(server: Server, job_id: str, dk: str, status: str) -> bool:
    tasks = (await server.call("GET", f"/jobs/{job_id}/tasks", 200))["items"]
    return any(t["deviceKey"] == dk and t["status"] == status for t in tasks)


async def test_the_api_streams_the_same_backup(server: Server, tmp_path: Path) -> None:
    await server.product("pk1")
    await server.firmware("pk1", "1", b"one")
    via_api = tmp_path / "api.tar.gz"
    args = ["backup", str(via_api), "--url", server.url, "--token", TOKEN, "--json"]
    assert await asyncio.to_thread(main, args) == 0
    local = tmp_path / "local.tar"
    await asyncio.to_thread(backup.write_file, server.data_dir, local)
    with tarfile.open(via_api) as a, tarfile.open(local) as b:
        ma = json.loads(a.extractfile("manifest.json").read())  # type: ignore[union-attr]
        mb = json.loads(b.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert set(ma["files"]) == set(mb["files"])
    assert {k: v for k, v in ma["files"].items() if k != "otabox.db"} == {
        k: v for k, v in mb["files"].items() if k != "otabox.db"
    }
    async with aiohttp.ClientSession() as anon, anon.post(server.url + "/api/v1/backup") as resp:
        assert resp.status == 401


def _rewrite(src: Path, dst: Path, change: dict[str, bytes | None], extra: dict[str, bytes] | None = None) -> None:
    with tarfile.open(src) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(dst, "w") as tar:
        for m, data in members:
            if m.name in change:
                new = change[m.name]
                if new is None:
                    continue
                data = new
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


async def test_damaged_backups_are_refused_and_the_target_stays_as_it_was(server: Server, tmp_path: Path) -> None:
    await server.product("pk1")
    await server.firmware("pk1", "1", b"one")
    good = tmp_path / "good.tar"
    await asyncio.to_thread(backup.write_file, server.data_dir, good)
    with tarfile.open(good) as tar:
        firmware = next(m.name for m in tar.getmembers() if m.name.startswith("firmware/"))
    cases: dict[str, tuple[dict[str, bytes | None] | None, str]] = {
        "truncated": (None, "damaged"),
        "corrupt": ({firmware: b"two"}, "sha256 differs"),
        "no manifest": ({"manifest.json": None}, "manifest.json is not its first member"),
        "missing member": ({firmware: None}, "lacks 1 member"),
    }
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    for name, (change, message) in cases.items():
        bad = tmp_path / f"{name}.tar"
        if change is None:
            bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        else:
            _rewrite(good, bad, change)
        with pytest.raises(backup.BackupError, match=message):
            backup.restore(bad, target, force=True)
        assert [p.name for p in target.iterdir()] == ["keep.txt"], name
    evil = tmp_path / "evil.tar"
    _rewrite(good, evil, {}, {"../escape.txt": b"x"})
    with pytest.raises(backup.BackupError, match="unexpected member"):
        backup.restore(evil, tmp_path / "fresh")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "fresh").exists()
    with pytest.raises(backup.BackupError, match="not empty"):
        backup.restore(good, target)
    with pytest.raises(backup.BackupError, match="in use by a running otabox server"):
        backup.restore(good, server.data_dir, force=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left


async def test_scheduled_backups_keep_their_number(tmp_path: Path) -> None:
    app = await start_server(tmp_path, backup_every=0.2, backup_keep=2, backup_dir=str(tmp_path / "b"))
    try:

        async def made() -> bool:
            return len(list((tmp_path / "b").glob("otabox-backup-*.tar.gz"))) >= 2

        assert await wait_for(made)
        await asyncio.sleep(1.5)  # several more backups, each followed by its pruning
    finally:
        await app.stop()  # lets a backup being written finish
    assert len(list((tmp_path / "b").glob("otabox-backup-*.tar.gz"))) == 2
    assert not list((tmp_path / "b").glob("*.part"))


async def test_a_server_on_postgresql_refuses_backups_plainly(tmp_path: Path, postgres_url: str, capsys: Any) -> None:
    """Over the API, from the data dir, scheduled: each says to use pg_dump, none with a traceback."""
    app = await start_server(tmp_path, database_url=postgres_url)
    try:
        args = ["backup", str(tmp_path / "b.tar.gz"), "--url", f"http://127.0.0.1:{app.http_port}", "--token", TOKEN]
        assert await asyncio.to_thread(main, args) == 1
        err = capsys.readouterr().err
        assert "409 backup-unsupported" in err and "pg_dump" in err and "Traceback" not in err
        args = ["backup", str(tmp_path / "b.tar.gz"), "--data-dir", str(tmp_path / "data")]
        assert await asyncio.to_thread(main, args) == 1
        err = capsys.readouterr().err
        assert "PostgreSQL" in err and "pg_dump" in err and "Traceback" not in err
    finally:
        await stop_within(app)
    assert not (tmp_path / "b.tar.gz").exists()
    with pytest.raises(settings.SettingsError, match="pg_dump"):
        settings.load(env={"OTABOX_DATABASE_URL": postgres_url, "OTABOX_BACKUP_EVERY": "60"})
