"""Three otabox nodes on one PostgreSQL and one S3 bucket (SeaweedFS: scripts/s3) behind a TCP
balancer (nginx stream: scripts/balancer).

300 simulated devices (`otabox simulate`, its own process) connect through the balancer and so
spread over all three nodes; a staged push rollout with a concurrency cap and abort rules runs
over them. Mid-rollout a follower node is killed with SIGKILL, then the leader (the node making
the job decisions): another node leads within 15 s, the killed nodes' devices reconnect through
the balancer to the live ones, and the job completes with every count exact, the cap held
cluster-wide, and exactly one push and one result per device in the upgrade log. Then every node
is restarted and the cluster comes back with the same records. The firmware is in the bucket
only (not in the database), and every node served downloads of it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.servers import free_port
from tests.conftest import TOKEN, Device, Server, wait_for
from tests.s3 import S3
from tests.test_restart import procs, spawn  # noqa: F401  (procs: the fixture that kills what is left)
from tests.test_webhooks import Receiver, receiver, subscribe  # noqa: F401  (receiver: the fixture)

ROOT = Path(__file__).resolve().parent.parent
BALANCER = ROOT / "scripts" / "balancer"
NODES = ("a", "b", "c")
DEVICES = 300
FAILING = 10  # devices whose flash fails
CAP = 40
FAST = ("--node-heartbeat", "0.5", "--node-timeout", "3")
LEADER_TAKEOVER = 15.0  # seconds, the contract


async def balancer(*args: str) -> None:
    """scripts/balancer ARGS (its first run on a clean machine installs nginx: minutes)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(BALANCER), *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 600)
    assert proc.returncode == 0, err.decode()


async def nodes(server: Server) -> dict[str, dict[str, Any]]:
    return {n["nodeId"]: n for n in (await server.call("GET", "/nodes", 200))["items"]}


async def leader(server: Server, among: set[str]) -> str | None:
    found = [name for name, n in (await nodes(server)).items() if n["leader"] and n["status"] == "up"]
    return found[0] if found and found[0] in among else None


async def test_three_nodes_rollout_survives_kill_9_of_a_follower_and_the_leader(
    tmp_path: Path,
    postgres_url: str,
    s3_server: S3,
    procs: list[Any],  # noqa: F811
) -> None:
    database = {"database_url": postgres_url}
    prefix = f"cluster-{os.getpid()}"
    storage = ("--storage-url", f"s3://{s3_server.bucket}/{prefix}?endpoint={s3_server.endpoint}")
    mqtt_ports = {n: free_port() for n in NODES}
    http_ports = {n: free_port() for n in NODES}
    lb_mqtt, lb_http = free_port(), free_port()
    listens = {lb_mqtt: mqtt_ports.values(), lb_http: http_ports.values()}
    routes = [arg for port, to in listens.items() for arg in ("--listen", f"{port}={','.join(map(str, to))}")]
    await balancer("start", str(tmp_path / "lb"), *routes, "--owner-pid", str(os.getpid()))
    public = f"http://127.0.0.1:{lb_http}"
    running: dict[str, Any] = {}
    sessions: list[aiohttp.ClientSession] = []

    async def start(name: str) -> None:
        proc, _, http = await spawn(
            tmp_path / name,
            database,
            "--node-id",
            name,
            "--mqtt-port",
            str(mqtt_ports[name]),
            "--http-port",
            str(http_ports[name]),
            "--public-url",
            public,
            *storage,
            *FAST,
            log=tmp_path / f"{name}.log",
            env=s3_server.env,
        )
        procs.append(proc)
        sessions.append(http)
        running[name] = proc

    async def kill(name: str) -> None:
        proc = running.pop(name)
        proc.kill()
        assert await proc.wait() == -signal.SIGKILL

    http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"})
    sessions.append(http)
    lb = Server(local_app=None, http=http, url=public, data_dir=tmp_path / "a", mqtt=lb_mqtt)
    sim: asyncio.subprocess.Process | None = None
    try:
        await start("a")  # first: its keys become the cluster's, and it leads
        await start("b")
        await start("c")
        assert await wait_for(lambda: leader(lb, {"a"}), timeout=10)
        up = await wait_for(lambda: _all_up(lb, set(NODES)), timeout=10)
        assert set(up) == set(NODES)

        await lb.product("pk1")
        fw = await lb.firmware("pk1", "2.0.0", os.urandom(256 * 1024))
        sim = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "otabox", "simulate", "pk1", "--url", public, "--token", TOKEN],
            *["--mqtt-host", "127.0.0.1", "--mqtt-port", str(lb_mqtt), "--devices", str(DEVICES)],
            *["--mix", f"success={DEVICES - FAILING},flash-fail={FAILING}", "--seed", "7", "--json"],
            *["--flash-time", "0.1-0.3", "--reboot-time", "0.1-0.3", "--duration", "240"],
            stdout=asyncio.subprocess.PIPE,
            stderr=(tmp_path / "simulate.log").open("wb"),
        )
        # Round robin: every node holds about a third of the fleet.
        spread = await wait_for(lambda: _connected(lb, DEVICES), timeout=60)
        assert all(spread[n] >= DEVICES // 6 for n in NODES), spread
        assert await wait_for(lambda: _all_reported(lb, "1.0.0"), timeout=30)

        body = {
            "firmwareId": fw["id"],
            "name": "cluster rollout",
            "scope": {"versionNumbers": ["1.0.0"]},
            "maxConcurrency": CAP,
            "timeoutSeconds": 20,
            "retry": {"count": 0},
            "waves": [{"percent": 20, "successRatio": 0.8}, {"percent": 100}],
            "abort": {"failureRatio": 0.5, "minFinished": 50},
        }
        job = await lb.call("POST", "/jobs", 201, json=body)
        assert job["total"] == DEVICES

        await wait_for(lambda: _done_at_least(lb, job["id"], 70), timeout=60)
        await kill("b")  # a follower, with its third of the devices
        await wait_for(lambda: _done_at_least(lb, job["id"], 160), timeout=90)
        killed = time.monotonic()
        await kill("a")  # the leader
        new = await wait_for(lambda: leader(lb, {"c"}), timeout=LEADER_TAKEOVER + 5, interval=0.2)
        assert new == "c" and time.monotonic() - killed < LEADER_TAKEOVER

        done = await wait_for(lambda: _finished(lb, job["id"]), timeout=180, interval=0.5)
        assert done["status"] == "completed", done
        counts = {k: v for k, v in done["counts"].items() if v}
        events = await _events(lb, job["id"])
        late = {e["deviceKey"] for e in events if e["status"] == "timeout"}
        story = [(e["deviceKey"], e["ts"][11:23], e["status"], e["desc"]) for e in events if e["deviceKey"] in late]
        assert counts.get("succeeded") == DEVICES - FAILING, (counts, story)
        assert counts.get("failed", 0) + counts.get("timeout", 0) == FAILING, counts
        assert sum(counts.values()) == DEVICES

        out, _ = await asyncio.wait_for(sim.communicate(), 120)
        summary = json.loads(out)
        sim = None
        assert summary["behaviours"]["success"]["outcomes"] == {"succeeded": DEVICES - FAILING}, summary

        _check_log(events, DEVICES, CAP)
        # The image is in the bucket, not in the database; each node had to fetch it to serve it.
        listed = s3_server.client().list_objects(s3_server.bucket, prefix=prefix + "/", recursive=True)
        assert [(o.object_name, o.size) for o in listed] == [
            (f"{prefix}/{fw['sha256'][:2]}/{fw['sha256']}", fw["size"])
        ]
        conn = await asyncpg.connect(postgres_url)
        try:
            assert await conn.fetchval("SELECT COUNT(*) FROM file_chunks") == 0
        finally:
            await conn.close()
        for name in NODES:
            assert (tmp_path / name / "firmware" / fw["sha256"][:2] / fw["sha256"]).is_file(), name

        # Every node again (the killed two, then all three from cold): the same records, one leader.
        await start("a")
        await start("b")
        assert set(await wait_for(lambda: _all_up(lb, set(NODES)), timeout=15)) == set(NODES)
        for name in list(running):
            running.pop(name).send_signal(signal.SIGTERM)
        await asyncio.sleep(0)
        for proc in procs:
            await proc.wait()
        for name in NODES:
            await start(name)
        assert await wait_for(lambda: leader(lb, set(NODES)), timeout=LEADER_TAKEOVER)
        again = await lb.call("GET", f"/jobs/{job['id']}", 200)
        assert again["status"] == "completed" and again["counts"] == done["counts"]
        assert len(await _events(lb, job["id"])) == len(events)
    finally:
        if sim is not None and sim.returncode is None:
            sim.kill()
            await sim.wait()
        for session in sessions:
            await session.close()
        await balancer("stop", str(tmp_path / "lb"))


async def _all_up(lb: Server, names: set[str]) -> dict[str, Any] | None:
    found = await nodes(lb)
    return found if {n for n, v in found.items() if v["status"] == "up"} == names else None


async def _connected(lb: Server, want: int) -> dict[str, int] | None:
    found = {n: v["devicesConnected"] for n, v in (await nodes(lb)).items()}
    return found if sum(found.values()) == want else None


async def _all_reported(lb: Server, version: str) -> bool:
    page = await lb.call("GET", f"/products/pk1/devices?limit={DEVICES}", 200)
    return page["total"] == DEVICES and all(d["version"] == version and d["online"] for d in page["items"])


async def _done_at_least(lb: Server, job_id: str, n: int) -> bool:
    job = await lb.call("GET", f"/jobs/{job_id}", 200)
    c = job["counts"]
    return bool(c["succeeded"] + c["failed"] + c["timeout"] >= n)


async def _finished(lb: Server, job_id: str) -> dict[str, Any] | None:
    job = await lb.call("GET", f"/jobs/{job_id}", 200)
    return job if job["finishedAt"] is not None else None


async def _events(lb: Server, job_id: str) -> list[dict[str, Any]]:
    async with lb.http.get(f"{lb.url}/api/v1/events", params={"jobId": job_id}) as resp:
        assert resp.status == 200
        return [json.loads(line) for line in (await resp.text()).splitlines() if line]


def _check_log(events: list[dict[str, Any]], devices: int, cap: int) -> None:
    """One push and one result per device; never more than `cap` tasks in flight at once."""
    states = [e for e in events if e["kind"] == "state"]
    published = Counter(e["deviceKey"] for e in states if e["status"] == "published")
    ended = Counter(e["deviceKey"] for e in states if e["status"] in ("succeeded", "failed", "timeout"))
    assert len(published) == devices and set(published.values()) == {1}, published.most_common(3)
    assert len(ended) == devices and set(ended.values()) == {1}, ended.most_common(3)
    seqs = [e["seq"] for e in events]
    assert len(seqs) == len(set(seqs))
    # In flight from its push to its result, in the order the log recorded them.
    in_flight, most = 0, 0
    for e in sorted(states, key=lambda e: e["seq"]):
        if e["status"] == "published":
            in_flight += 1
            most = max(most, in_flight)
        elif e["status"] in ("succeeded", "failed", "timeout"):
            in_flight -= 1
    assert most <= cap, most


async def test_two_nodes_request_mode_webhooks_credentials_and_a_frozen_leader(
    tmp_path: Path,
    postgres_url: str,
    procs: list[Any],  # noqa: F811
    receiver: Receiver,  # noqa: F811
) -> None:
    """Devices on the follower ask for offers: the leader's budget holds the cap; a webhook is
    sent once, by the leader; a secret rotated through one node ends the connection held by the
    other; a leader that freezes (SIGSTOP) is unseated within the node timeout and steps down
    when it wakes."""
    database = {"database_url": postgres_url}
    ports = {n: (free_port(), free_port()) for n in ("a", "b")}
    public = f"http://127.0.0.1:{ports['a'][1]}"
    started: dict[str, Any] = {}
    sessions: list[aiohttp.ClientSession] = []
    for name in ("a", "b"):
        mqtt_port, http_port = ports[name]
        proc, server, http = await spawn(
            tmp_path / name,
            database,
            *["--node-id", name, "--mqtt-port", str(mqtt_port), "--http-port", str(http_port)],
            *["--public-url", public, *FAST],
            log=tmp_path / f"{name}.log",
        )
        procs.append(proc)
        sessions.append(http)
        started[name] = (proc, server)
    (proc_a, a), (_, b) = started["a"], started["b"]
    sim: asyncio.subprocess.Process | None = None
    try:
        assert await wait_for(lambda: leader(b, {"a"}), timeout=10)
        await subscribe(b, receiver.url + "/ok", ["job.completed"])
        await a.product("pk1")
        fw = await a.firmware("pk1", "2.0.0", os.urandom(64 * 1024))
        sim = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "otabox", "simulate", "pk1", "--url", a.url, "--token", TOKEN],
            *["--mqtt-host", "127.0.0.1", "--mqtt-port", str(b.mqtt_port), "--devices", "20", "--request"],
            *["--poll", "0.3", "--flash-time", "0.1-0.2", "--reboot-time", "0.1-0.2", "--json", "--duration", "120"],
            stdout=asyncio.subprocess.PIPE,
            stderr=(tmp_path / "simulate.log").open("wb"),
        )
        assert await wait_for(lambda: _connected(b, 20), timeout=30)
        assert (await nodes(b))["b"]["devicesConnected"] == 20
        body = {"firmwareId": fw["id"], "mode": "request", "maxConcurrency": 3, "scope": {"versionNumbers": ["1.0.0"]}}
        job = await b.call("POST", "/jobs", 201, json=body)
        done = await wait_for(lambda: _finished(a, job["id"]), timeout=90, interval=0.3)
        assert done["status"] == "completed" and done["counts"]["succeeded"] == 20, done
        out, _ = await asyncio.wait_for(sim.communicate(), 60)
        sim = None
        assert json.loads(out)["behaviours"]["success"]["outcomes"] == {"succeeded": 20}
        _check_log(await _events(a, job["id"]), 20, 3)
        await asyncio.sleep(1.5)  # time for a second delivery, were there one
        assert receiver.types() == ["job.completed"]

        # A secret rotated through a: b ends the connection it holds with the old one.
        secret = (await a.device("held"))["deviceSecret"]
        held = await Device(b, "pk1", "held", secret).connect("1.0.0")
        assert await wait_for(lambda: _online(a, "held", True))
        await a.call("POST", "/products/pk1/devices/held:rotate-secret", 200)
        assert await wait_for(lambda: _online(a, "held", False), timeout=5)
        await held.close()

        # The leader freezes: its connection stays open (its kernel answers), only its heartbeat stops.
        proc_a.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        assert await wait_for(lambda: leader(b, {"b"}), timeout=LEADER_TAKEOVER, interval=0.2)
        assert time.monotonic() - frozen < LEADER_TAKEOVER
        proc_a.send_signal(signal.SIGCONT)
        # Awake, a learns at its next look that its session was ended, and follows b.
        assert await wait_for(lambda: _log_has(tmp_path / "a.log", "no longer the leader"), timeout=10)
        assert await wait_for(lambda: leader(a, {"b"}), timeout=10)
        assert [n for n, v in (await nodes(a)).items() if v["leader"]] == ["b"]
    finally:
        if proc_a.returncode is None:
            proc_a.send_signal(signal.SIGCONT)
        if sim is not None and sim.returncode is None:
            sim.kill()
            await sim.wait()
        for session in sessions:
            await session.close()


async def _online(server: Server, dk: str, want: bool) -> bool:
    return bool((await server.call("GET", f"/products/pk1/devices/{dk}", 200))["online"] is want)


async def _log_has(path: Path, text: str) -> bool:
    return text in path.read_text(errors="replace")
