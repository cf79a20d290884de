"""The embedded broker with real MQTT clients: EnOS login, ACL, presence, inform, amqtt defects."""

from __future__ import annotations

import asyncio
import gc
import json
import weakref
from typing import Any

import aiomqtt
import pytest

from otabox import protocol
from tests.conftest import Server, credentials, mqtt_client, next_message, request, wait_for


@pytest.mark.parametrize("method", ["hmacsha256", "hmacsha1", "hmacmd5"])
async def test_login_with_each_sign_method_and_inform(server: Server, method: str) -> None:
    dev = await server.device("d1")
    async with mqtt_client(server, "pk1", "d1", dev["deviceSecret"], method=method) as c:
        reply = await request(c, "pk1", "d1", protocol.INFORM, {"version": "1.0.3"}, msg_id="42")
        assert reply == {"id": "42", "code": 200, "data": {}}
        shown = await server.call("GET", "/products/pk1/devices/d1", 200)
        assert shown["online"] is True and shown["version"] == "1.0.3"
        listed = await server.call("GET", "/products/pk1/devices?online=true", 200)
        assert [d["deviceKey"] for d in listed["items"]] == ["d1"]
    shown = await wait_for(lambda: _offline(server, "d1"))
    assert shown["lastSeen"] is not None


async def _offline(server: Server, dk: str) -> Any:
    d = await server.call("GET", f"/products/pk1/devices/{dk}", 200)
    return d if not d["online"] else None


@pytest.mark.parametrize(
    "change",
    [
        {"password": "0" * 64},  # wrong signature
        {"username": "nobody&pk1"},  # unknown device
        {"identifier": "other|securemode=2,signmethod=hmacsha256,timestamp=1|"},  # client id of another device
        {"identifier": "d1|securemode=2,signmethod=hmacsha512,timestamp=1|"},  # unknown sign method
        {"username": None, "password": None},  # anonymous
    ],
)
async def test_bad_logins_are_refused(server: Server, change: dict[str, Any]) -> None:
    dev = await server.device("d1")
    creds = credentials("pk1", "d1", dev["deviceSecret"])
    creds.update(change)
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", server.mqtt_port, timeout=5, **creds):
            pass
    assert (await server.call("GET", "/products/pk1/devices/d1", 200))["online"] is False


@pytest.fixture
def server_settings() -> dict[str, Any]:
    return {"login_fail_limit": 3, "login_fail_window": 60.0, "connect_timeout": 0.5}


async def test_failed_logins_lock_the_device_key_out(server: Server) -> None:
    dev = await server.device("d1")
    for _ in range(3):
        with pytest.raises(aiomqtt.MqttError):
            async with mqtt_client(server, "pk1", "d1", "wrong-secret"):
                pass
    # Even the right secret is refused while the lockout lasts.
    with pytest.raises(aiomqtt.MqttError):
        async with mqtt_client(server, "pk1", "d1", dev["deviceSecret"]):
            pass


async def test_plain_auth_device(server: Server) -> None:
    await server.device("tiny", auth="plain", deviceSecret="plain-secret-1")
    async with aiomqtt.Client(
        "127.0.0.1", server.mqtt_port, identifier="tiny", username="tiny&pk1", password="plain-secret-1"
    ) as c:
        reply = await request(c, "pk1", "tiny", protocol.INFORM, {"version": "7"})
        assert reply["code"] == 200


async def test_acl_refuses_foreign_subscribe_and_drops_foreign_publish(server: Server) -> None:
    a = await server.device("a")
    await server.device("b")
    async with mqtt_client(server, "pk1", "a", a["deviceSecret"]) as c:
        # paho reports a refused filter as SUBACK reason code 0x80.
        granted = await c.subscribe("/sys/pk1/b/ota/device/upgrade", qos=1)
        assert [int(r.value) for r in granted] == [0x80]  # type: ignore[union-attr]
        granted = await c.subscribe("#", qos=0)
        assert [int(r.value) for r in granted] == [0x80]  # type: ignore[union-attr]
        granted = await c.subscribe("/sys/pk1/a/#", qos=1)
        assert [int(r.value) for r in granted] == [1]  # type: ignore[union-attr]
        # a pretends to be b: the publish is dropped, b's version is untouched.
        await c.publish("/sys/pk1/b/ota/device/inform", json.dumps({"id": "1", "params": {"version": "6.6.6"}}), qos=1)
        reply = await request(c, "pk1", "a", protocol.INFORM, {"version": "1.0"})
        assert reply["code"] == 200
    assert (await server.call("GET", "/products/pk1/devices/b", 200))["version"] is None


async def test_server_delivers_upgrade_topic_without_subscription(server: Server) -> None:
    dev = await server.device("d1")
    async with mqtt_client(server, "pk1", "d1", dev["deviceSecret"]) as c:
        await wait_for(lambda: _online(server))
        assert server.app.broker is not None
        payload = protocol.request("7", "ota.device.upgrade", {"version": "2.0"})
        assert server.services.outbox.deliver("pk1", "d1", protocol.UPGRADE, payload, qos=1)
        msg = await next_message(c, "/ota/device/upgrade")
        assert msg["id"] == "7" and msg["params"]["version"] == "2.0"
    await wait_for(lambda: _offline(server, "d1"))
    assert not server.services.outbox.deliver("pk1", "d1", protocol.UPGRADE, payload)


async def _online(server: Server) -> bool:
    return server.app.broker is not None and server.services.outbox.is_connected("pk1", "d1")


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1,2]",
        b'{"id":"9","params":{"version":""}}',
        b'{"id":"9","params":[]}',
        b'{"id":"9","params":{"version":"' + b"x" * 65 + b'"}}',
    ],
)
async def test_malformed_inform_gets_400_and_changes_nothing(server: Server, payload: bytes) -> None:
    dev = await server.device("d1")
    async with mqtt_client(server, "pk1", "d1", dev["deviceSecret"]) as c:
        await request(c, "pk1", "d1", protocol.INFORM, {"version": "1.0"})
        await c.publish("/sys/pk1/d1/ota/device/inform", payload, qos=1)
        reply = await next_message(c, "inform_reply")
        assert reply["code"] == 400 and reply["message"]
        # still served afterwards
        assert (await request(c, "pk1", "d1", protocol.INFORM, {"version": "1.1"}))["code"] == 200
    assert (await server.call("GET", "/products/pk1/devices/d1", 200))["version"] == "1.1"


# ---------------------------------------------------------------- amqtt 0.12.1 defects


@pytest.mark.parametrize("clean", [True, False])
async def test_defect_a_wrong_password_cannot_touch_a_live_session(server: Server, clean: bool) -> None:
    dev = await server.device("d1")
    async with mqtt_client(server, "pk1", "d1", dev["deviceSecret"], clean_session=clean) as c:
        await request(c, "pk1", "d1", protocol.INFORM, {"version": "1.0"})
        creds = credentials("pk1", "d1", dev["deviceSecret"])
        creds["password"] = "f" * 64
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", server.mqtt_port, clean_session=clean, **creds):
                pass
        # The live device is still connected and served.
        assert (await request(c, "pk1", "d1", protocol.INFORM, {"version": "1.1"}, msg_id="2"))["code"] == 200
        assert server.app.broker is not None and server.services.outbox.is_connected("pk1", "d1")


async def test_defect_b_retained_messages_do_not_cross_devices(server: Server) -> None:
    a = await server.device("a")
    b = await server.device("b")
    async with mqtt_client(server, "pk1", "a", a["deviceSecret"]) as ca:
        await ca.subscribe("/sys/pk1/a/#", qos=1)
        await ca.publish("/sys/pk1/a/state", b"secret-of-a", qos=1, retain=True)
        await request(ca, "pk1", "a", protocol.INFORM, {"version": "1"})
        async with mqtt_client(server, "pk1", "b", b["deviceSecret"]) as cb:
            await cb.publish("/sys/pk1/b/ota/device/inform", json.dumps({"id": "1", "params": {"version": "1"}}), qos=1)
            # Retained messages are sent before the connection is served: anything of a's
            # would arrive before this reply.
            async with asyncio.timeout(10):
                async for msg in cb.messages:
                    assert not str(msg.topic).startswith("/sys/pk1/a/"), msg.payload
                    if str(msg.topic).endswith("inform_reply"):
                        break
        # Nor does a itself on re-subscribe: nothing is retained at all (devices have no use for it).
        await ca.subscribe("/sys/pk1/a/state", qos=1)
        await ca.publish("/sys/pk1/a/ota/device/inform", json.dumps({"id": "2", "params": {"version": "1"}}), qos=1)
        async with asyncio.timeout(10):
            async for msg in ca.messages:
                assert str(msg.topic) != "/sys/pk1/a/state", msg.payload
                if str(msg.topic).endswith("inform_reply"):
                    break
        assert server.app.broker is not None and not server.app.broker.retained_messages


async def test_defect_c_clean_then_persistent_session_is_persistent(server: Server) -> None:
    dev = await server.device("d1")
    async with mqtt_client(server, "pk1", "d1", dev["deviceSecret"], clean_session=True):
        pass
    # Reconnect at once with clean_session=0: the session must become persistent.
    async with mqtt_client(server, "pk1", "d1", dev["deviceSecret"], clean_session=False) as c:
        await c.subscribe("/sys/pk1/d1/cmd", qos=1)
        await request(c, "pk1", "d1", protocol.INFORM, {"version": "1"})
    broker = server.app.broker
    assert broker is not None
    session, _ = broker.sessions["pk1/d1"]
    assert session.clean_session is False
    # Let the session monitor (1 s period) run: a persistent session survives it.
    await asyncio.sleep(1.5)
    assert "pk1/d1" in broker.sessions
    assert "/sys/pk1/d1/cmd" in broker.subscriptions


async def test_defect_d_idle_socket_without_connect_is_closed(server: Server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.mqtt_port)
    async with asyncio.timeout(5):  # connect_timeout is 0.5 s in this module
        assert await reader.read() == b""
    writer.close()


@pytest.mark.parametrize("topic", ["$SYS/broker/x", "/sys/pk1/d1/+", "/sys/pk1/d1/#"])
async def test_defect_e_bad_publish_topic_keeps_client_served(server: Server, topic: str) -> None:
    dev = await server.device("d1")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.mqtt_port)
    # Raw packets: client libraries refuse to send a wildcard PUBLISH.
    creds = credentials("pk1", "d1", dev["deviceSecret"])
    writer.write(_connect(creds["identifier"], creds["username"], creds["password"]))
    assert (await reader.readexactly(4))[3] == 0
    writer.write(_publish(topic, b"{}"))
    writer.write(_publish("/sys/pk1/d1/ota/device/inform", b'{"id":"5","params":{"version":"3"}}'))
    async with asyncio.timeout(5):
        header = await reader.readexactly(2)
        body = await reader.readexactly(header[1])
    assert b"inform_reply" in body and b'"code":200' in body
    writer.close()
    await writer.wait_closed()
    await wait_for(lambda: _offline(server, "d1"))


def _mqtt_str(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def _packet(first: int, body: bytes) -> bytes:
    length, n = b"", len(body)
    while True:
        byte, n = n % 128, n // 128
        length += bytes([byte | (0x80 if n else 0)])
        if not n:
            return bytes([first]) + length + body


def _connect(client_id: str, username: str, password: str, keepalive: int = 60) -> bytes:
    var = _mqtt_str("MQTT") + bytes([4, 0xC2]) + keepalive.to_bytes(2, "big")
    return _packet(0x10, var + _mqtt_str(client_id) + _mqtt_str(username) + _mqtt_str(password))


def _publish(topic: str, payload: bytes) -> bytes:
    return _packet(0x30, _mqtt_str(topic) + payload)


async def test_takeover_keeps_device_online(server: Server) -> None:
    dev = await server.device("d1")
    first = mqtt_client(server, "pk1", "d1", dev["deviceSecret"])
    async with first, mqtt_client(server, "pk1", "d1", dev["deviceSecret"]) as second:
        assert (await request(second, "pk1", "d1", protocol.INFORM, {"version": "2"}))["code"] == 200
        assert (await server.call("GET", "/products/pk1/devices/d1", 200))["online"] is True


async def test_a_takeover_does_not_wait_for_the_old_connections_offline_write(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A device reconnects while commits are slow (a rollout's progress reports ahead in the
    group commit): the new connection is served at once, not after the old connection's
    offline write committed (it waited up to 5 s, with two sockets held), and the writes
    commit in their order: the device ends online."""
    dev = await server.device("d1")
    creds = credentials("pk1", "d1", dev["deviceSecret"])
    login = _connect(creds["identifier"], creds["username"], creds["password"])
    _, first = await asyncio.open_connection("127.0.0.1", server.mqtt_port)
    first.write(login)
    await wait_for(lambda: _online_d1(server))
    backend = server.store.backend
    run_batch = backend.run_batch

    async def slow(ops: list[Any]) -> list[tuple[bool, Any]]:
        await asyncio.sleep(6)  # longer than the take-over's 5 s
        return await run_batch(ops)

    backend.run_batch = slow  # type: ignore[method-assign]
    try:
        reader, second = await asyncio.open_connection("127.0.0.1", server.mqtt_port)
        second.write(login)
        async with asyncio.timeout(3):
            assert (await reader.readexactly(4))[3] == 0  # CONNACK: served, not waiting
    finally:
        backend.run_batch = run_batch  # type: ignore[method-assign]
    await server.store.set_kv("probe", "1")  # the group commit is in order: the writes queued before have committed
    assert await _online_d1(server)
    assert not [r for r in caplog.records if "did not close in time" in r.getMessage()]
    first.close()
    second.close()


async def test_a_takeover_closes_the_old_socket_before_its_last_message_is_handled(server: Server) -> None:
    """The old connection's last message waits for a slow commit when the device reconnects:
    its socket is closed at once (before, it stayed open until that commit, and a reboot wave
    held two descriptors per device), and the message is still stored."""
    await server.product("pk1")
    dev = await server.device("d1")
    creds = credentials("pk1", "d1", dev["deviceSecret"])
    login = _connect(creds["identifier"], creds["username"], creds["password"])
    old_reader, first = await asyncio.open_connection("127.0.0.1", server.mqtt_port)
    first.write(login)
    assert (await old_reader.readexactly(4))[3] == 0
    await wait_for(lambda: _online_d1(server))
    backend = server.store.backend
    run_batch = backend.run_batch
    committing = asyncio.Event()

    async def slow(ops: list[Any]) -> list[tuple[bool, Any]]:
        committing.set()
        await asyncio.sleep(4)
        return await run_batch(ops)

    backend.run_batch = slow  # type: ignore[method-assign]
    try:
        first.write(_publish(protocol.topic_for("pk1", "d1", protocol.INFORM), b'{"id":"1","params":{"version":"7"}}'))
        async with asyncio.timeout(5):
            await committing.wait()  # being handled: its write waits for the slow commit
        _, second = await asyncio.open_connection("127.0.0.1", server.mqtt_port)
        second.write(login)
        async with asyncio.timeout(2):
            assert await old_reader.read() == b""  # closed by the server, the commit still 3 s away
    finally:
        backend.run_batch = run_batch  # type: ignore[method-assign]

    async def stored() -> bool:
        return bool((await server.call("GET", "/products/pk1/devices/d1", 200))["version"] == "7")

    assert await wait_for(stored)
    assert await _online_d1(server)
    first.close()
    second.close()


async def test_silent_client_is_disconnected_after_one_and_a_half_keepalives(server: Server) -> None:
    reader, writer = await _logged_in_raw(server, keepalive=1)
    await wait_for(lambda: _online_d1(server))
    # Silent from now on: stock amqtt would keep this half-open client "online" forever.
    async with asyncio.timeout(10):
        assert await reader.read() == b""
    await wait_for(lambda: _offline(server, "d1"))
    writer.close()


async def test_a_client_that_pings_outlives_its_keepalive(server: Server) -> None:
    # One keep-alive timer per connection moves on with each packet: 4 s of PINGREQs every
    # 0.5 s (the broker allows 1.5 x 1 s of silence) keep the connection open and answered.
    reader, writer = await _logged_in_raw(server, keepalive=1)
    for _ in range(8):
        writer.write(b"\xc0\x00")  # PINGREQ
        async with asyncio.timeout(2):
            assert await reader.readexactly(2) == b"\xd0\x00"  # PINGRESP
        await asyncio.sleep(0.5)
    assert await _online_d1(server)
    writer.close()


async def test_a_packet_stalled_mid_body_counts_as_silence(server: Server) -> None:
    reader, writer = await _logged_in_raw(server, keepalive=1)
    writer.write(_publish(protocol.topic_for("pk1", "d1", protocol.INFORM), b"{}")[:6])  # never finished
    async with asyncio.timeout(10):
        assert await reader.read() == b""
    await wait_for(lambda: _offline(server, "d1"))
    writer.close()


async def _online_d1(server: Server) -> bool:
    online: bool = (await server.call("GET", "/products/pk1/devices/d1", 200))["online"]
    return online


async def _raw_login(server: Server, dk: str, secret: str, source: str) -> int:
    """Log in over a raw connection from `source` (a loopback address); the CONNACK return code."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.mqtt_port, local_addr=(source, 0))
    creds = credentials("pk1", dk, secret)
    writer.write(_connect(creds["identifier"], creds["username"], creds["password"]))
    try:
        async with asyncio.timeout(10):
            return (await reader.readexactly(4))[3]
    finally:
        writer.close()


async def test_a_lockout_cannot_keep_a_device_off_from_another_address(server: Server) -> None:
    dev = await server.device("d1")
    for _ in range(3):  # login_fail_limit is 3 in this module
        assert await _raw_login(server, "d1", "wrong-secret", "127.0.0.2") == 4
    assert await _raw_login(server, "d1", dev["deviceSecret"], "127.0.0.2") == 5  # that address is locked out
    # The device itself, from its own address, is not: knowing its key is no weapon.
    assert await _raw_login(server, "d1", dev["deviceSecret"], "127.0.0.3") == 0


async def test_guesses_from_many_addresses_are_slowed_not_locked_out(server: Server) -> None:
    dev = await server.device("d1")
    for i in range(6):  # over the limit for the device, spread so no address is locked out
        assert await _raw_login(server, "d1", "wrong-secret", f"127.0.1.{i + 1}") == 4
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await _raw_login(server, "d1", "wrong-secret", "127.0.1.9") == 4
    # 4 failures over the limit, 0.1 s each: the wrong answer came late (a lower bound: load
    # can only make it later).
    assert loop.time() - started >= 0.4
    assert await _raw_login(server, "d1", dev["deviceSecret"], "127.0.1.10") == 0  # the device gets in


async def test_a_closed_connection_is_freed_without_a_full_garbage_collection(server: Server) -> None:
    """Its session and transport go when the connection does, by reference counting: in a cycle
    (a session and its states, CPython's transport and its own read callback) they waited for a
    full collection, which the server's GC thresholds make rare (the soak's RSS grew 1.35 GB/h)."""
    secret = (await server.device("d1"))["deviceSecret"]
    broker = server.app.broker
    assert broker is not None
    gc.collect()
    gc.disable()  # only reference counting from here
    try:
        async with mqtt_client(server, "pk1", "d1", secret, clean_session=True):
            entry = await wait_for(lambda: _entry(broker, "pk1/d1"))
            session, handler = entry
            gone = [weakref.ref(session), weakref.ref(handler.writer._writer.transport)]
            del session, handler, entry

        async def freed() -> bool:
            return all(ref() is None for ref in gone)

        assert await wait_for(freed, timeout=5), [ref() for ref in gone]
    finally:
        gc.enable()


async def _entry(broker: Any, key: str) -> Any:
    return broker._sessions.get(key)


async def _logged_in_raw(server: Server, keepalive: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Device d1 registered and logged in over a raw socket (CONNACK 0 read)."""
    dev = await server.device("d1")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.mqtt_port)
    creds = credentials("pk1", "d1", dev["deviceSecret"])
    writer.write(_connect(creds["identifier"], creds["username"], creds["password"], keepalive=keepalive))
    assert (await reader.readexactly(4))[3] == 0
    return reader, writer
