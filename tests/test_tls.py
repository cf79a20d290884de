"""The server's TLS listeners and device identity, against a real otabox with `--tls-self-signed`.

Plain MQTT and HTTP stay on beside MQTT over TLS and HTTPS, so each test can show what the TLS
port refuses that the plain port would take, and what changed (or did not) through the API.
Devices here are otabox's own MQTT client (`MQTTLiteClient`) with hand-made logins; the stock
EnOS SDK does the same in tests/test_enos_sdk_tls.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import logging
import ssl
import tarfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from otabox import protocol
from otabox.device import make_tls_context
from otabox.device.mqtt import MQTTLiteClient
from otabox.server import backup, pki, settings
from otabox.server.app import App
from otabox.server.settings import Settings
from tests.conftest import TOKEN, Server, make_csr, stop_within, wait_for

PK = "pk1"


@dataclass
class TLSServer:
    server: Server
    mqtts: int
    https: int
    ca_pem: str

    def context(self, cert: dict[str, Any] | None = None, *, key_pem: str | None = None) -> ssl.SSLContext:
        """A device's TLS context: otabox's CA pinned, with a certificate (an issue answer) when given."""
        if cert is None:
            return make_tls_context(ca_pem=self.ca_pem)
        return make_tls_context(ca_pem=self.ca_pem, cert_pem=cert["certificate"], key_pem=key_pem or cert["privateKey"])


@pytest.fixture
async def tls(tmp_path: Path) -> AsyncIterator[TLSServer]:
    s = Settings(
        data_dir=str(tmp_path / "data"),
        host="127.0.0.1",
        http_port=0,
        mqtt_port=0,
        mqtts_port=0,
        https_port=0,
        tls_self_signed="127.0.0.1,localhost",
        connect_timeout=2.0,
    )
    app = App(s, env={"OTABOX_ADMIN_TOKEN": TOKEN})
    await app.start()
    try:
        ports = json.loads((tmp_path / "data" / "ports.json").read_text())
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            server = Server(app, http, f"http://127.0.0.1:{ports['http']}", tmp_path / "data")
            async with http.get(server.url + "/ca.pem") as resp:
                ca_pem = await resp.text()
            yield TLSServer(server, int(ports["mqtts"]), int(ports["https"]), ca_pem)
    finally:
        await stop_within(app)


def login(dk: str, secret: str, mode: str = protocol.MODE_DEVICE_SECRET) -> tuple[str, str, str]:
    """(client id, user name, password) of an EnOS login signed with `secret`."""
    ts = str(time.time() * 1000)
    password = protocol.sign(protocol.login_params(dk, PK, ts), secret, "hmacsha256")
    return protocol.client_id_for(dk, "hmacsha256", ts, mode), f"{dk}&{PK}", password


async def connect(
    ts: TLSServer,
    dk: str,
    secret: str,
    ctx: ssl.SSLContext | None,
    *,
    mode: str = protocol.MODE_DEVICE_SECRET,
    client: MQTTLiteClient | None = None,
) -> tuple[int, MQTTLiteClient]:
    """CONNACK code and the client: over TLS with `ctx`, on the plain port without."""
    c = client or MQTTLiteClient(raise_on_refuse=False)
    port = ts.mqtts if ctx is not None else ts.server.mqtt_port
    code = await c.connect("127.0.0.1", port, *login(dk, secret, mode), tls=ctx, timeout=5)
    return code, c


async def online(ts: TLSServer, dk: str) -> bool:
    return bool((await ts.server.call("GET", f"/products/{PK}/devices/{dk}", 200))["online"])


async def issue(ts: TLSServer, dk: str, body: dict[str, Any] | None = None, expect: int = 201) -> dict[str, Any]:
    path = f"/products/{PK}/devices/{dk}/certificates"
    answer: dict[str, Any] = await ts.server.call("POST", path, expect, json=body or {})
    return answer


def foreign_certificate(ca_key: ec.EllipticCurvePrivateKey, issuer: x509.Name, cn: str) -> tuple[str, str]:
    """(certificate, key) PEM signed by `ca_key`: a CA otabox does not know, or its own key behind its back."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


# ---------------------------------------------------------------- listeners


async def test_listeners_ca_and_https(tls: TLSServer) -> None:
    data = tls.server.data_dir
    assert tls.ca_pem == (data / "ca" / "ca.pem").read_text()
    assert (data / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (data / "ca" / "ca.pem").stat().st_mode & 0o777 == 0o644
    ports = json.loads((data / "ports.json").read_text())
    assert set(ports) == {"http", "mqtt", "https", "mqtts"}
    # HTTPS verifies against the CA for the host names given, and serves the same API.
    ctx = make_tls_context(ca_pem=tls.ca_pem)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as https:
        for host in ("127.0.0.1", "localhost"):
            async with https.get(f"https://{host}:{tls.https}/healthz", ssl=ctx) as resp:
                health = await resp.json()
                assert resp.status == 200 and health["httpsPort"] == tls.https and health["mqttsPort"] == tls.mqtts
        async with https.post(
            f"https://127.0.0.1:{tls.https}/api/v1/products", json={"productKey": "viahttps"}, ssl=ctx
        ) as resp:
            assert resp.status == 201
    assert (await tls.server.call("GET", "/products/viahttps", 200))["productKey"] == "viahttps"
    # The CA's certificate needs no token: devices fetch it before they have anything.
    async with aiohttp.ClientSession() as anonymous, anonymous.get(tls.server.url + "/ca.pem") as resp:
        assert resp.status == 200 and (await resp.text()) == tls.ca_pem


async def test_a_plain_client_on_the_tls_port_is_logged_and_changes_nothing(
    tls: TLSServer, caplog: pytest.LogCaptureFixture
) -> None:
    d = await tls.server.device("d1")
    caplog.set_level(logging.INFO, logger="otabox")
    # A plain MQTT client on the TLS port: its CONNECT is not a TLS hello.
    code_or_error: Any
    try:
        code_or_error = await MQTTLiteClient(raise_on_refuse=False).connect(
            "127.0.0.1", tls.mqtts, *login("d1", d["deviceSecret"]), timeout=5
        )
    except Exception as exc:  # any failure will do: a refused handshake, a reset, a timeout
        code_or_error = exc
    assert not isinstance(code_or_error, int) or code_or_error != 0, "a plain login on the TLS port got in"
    # A client that connects and says nothing is dropped after the connect timeout (2 s here).
    _, writer = await asyncio.open_connection("127.0.0.1", tls.mqtts)
    reader_done = asyncio.get_running_loop().time()
    await wait_for(lambda: _closed(writer), timeout=10)
    assert asyncio.get_running_loop().time() - reader_done < 8
    assert tls.server.app.broker is not None
    assert tls.server.app.broker.tls_handshake_failures >= 2
    assert any("TLS handshake" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)
    assert not await online(tls, "d1")
    # The same device over TLS gets in.
    code, c = await connect(tls, "d1", d["deviceSecret"], tls.context())
    assert code == 0 and await wait_for(lambda: online(tls, "d1"))
    await c.disconnect()


async def _closed(writer: asyncio.StreamWriter) -> bool:
    try:
        writer.write(b"\x00")
        await writer.drain()
    except (ConnectionError, OSError):
        return True
    return writer.is_closing() or writer.transport.is_closing()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_old_tls_versions_are_refused(tls: TLSServer) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(cadata=tls.ca_pem)
    try:
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await MQTTLiteClient().connect("127.0.0.1", tls.mqtts, "x", tls=old, timeout=5)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            await http.get(f"https://127.0.0.1:{tls.https}/healthz", ssl=old)


def test_tls_settings_are_checked() -> None:
    cases = [
        ({"OTABOX_TLS_CERT": "c.pem"}, "tls_cert and tls_key go together"),
        ({"OTABOX_TLS_CERT": "c.pem", "OTABOX_TLS_KEY": "k.pem", "OTABOX_TLS_SELF_SIGNED": "a"}, "not both"),
        ({"OTABOX_TLS_SELF_SIGNED": " , "}, "at least one host"),
        ({"OTABOX_MQTT_PORT": "-1"}, "MQTT"),
        ({"OTABOX_TLS_SELF_SIGNED": "localhost", "OTABOX_HTTP_PORT": "-1", "OTABOX_HTTPS_PORT": "-1"}, "HTTP"),
        ({"OTABOX_MQTTS_PORT": "-2"}, "mqtts_port"),
    ]
    for env, words in cases:
        with pytest.raises(settings.SettingsError, match=words):
            settings.load(None, env=env)
    # Plain off, TLS on: fine.
    s = settings.load(
        None, env={"OTABOX_TLS_SELF_SIGNED": "localhost", "OTABOX_MQTT_PORT": "-1", "OTABOX_HTTP_PORT": "-1"}
    )
    assert s.tls and not s.listens("mqtt_port") and s.listens("mqtts_port")


# ---------------------------------------------------------------- device certificates


async def test_a_certificate_logs_in_and_revoking_it_ends_the_connection(tls: TLSServer) -> None:
    d = await tls.server.device("d1")
    cert = await issue(tls, "d1")
    parsed = x509.load_pem_x509_certificate(cert["certificate"].encode())
    assert pki.serial_hex(parsed.serial_number) == cert["serial"]
    ca = x509.load_pem_x509_certificate(tls.ca_pem.encode())
    parsed.verify_directly_issued_by(ca)
    gone = asyncio.Event()
    c = MQTTLiteClient(on_disconnect=lambda exc: gone.set(), raise_on_refuse=False)
    code, _ = await connect(tls, "d1", d["deviceSecret"], tls.context(cert), client=c)
    assert code == 0 and await wait_for(lambda: online(tls, "d1"))

    revoked = await tls.server.call("DELETE", f"/products/{PK}/devices/d1/certificates/{cert['serial']}", 200)
    assert revoked["status"] == "revoked" and revoked["revokedAt"]
    async with asyncio.timeout(10):
        await gone.wait()  # the live connection made with it is closed at once
    code, _ = await connect(tls, "d1", d["deviceSecret"], tls.context(cert))
    assert code == 5
    listed = await tls.server.call("GET", f"/products/{PK}/devices/d1/certificates", 200)
    assert [(i["serial"], i["status"]) for i in listed["items"]] == [(cert["serial"], "revoked")]
    # Revoking again changes nothing; an unknown serial is 404.
    await tls.server.call("DELETE", f"/products/{PK}/devices/d1/certificates/{cert['serial']}", 200)
    await tls.server.call("DELETE", f"/products/{PK}/devices/d1/certificates/00ff", 404)
    # The password is still checked alongside a good certificate.
    fresh = await issue(tls, "d1")
    code, _ = await connect(tls, "d1", "wrong-secret-123", tls.context(fresh))
    assert code == 4


async def test_certificates_that_are_not_the_devices_own_are_refused(tls: TLSServer) -> None:
    d1 = await tls.server.device("d1")
    await tls.server.device("d2")
    ctx_of_d2 = tls.context(await issue(tls, "d2"))
    code, _ = await connect(tls, "d1", d1["deviceSecret"], ctx_of_d2)
    assert code == 5  # another device's certificate

    # Signed by otabox's own CA key but never issued (so never recorded): refused.
    ca_key = serialization.load_pem_private_key((tls.server.data_dir / "ca" / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = x509.load_pem_x509_certificate(tls.ca_pem.encode())
    cert, key = foreign_certificate(ca_key, ca.subject, "d1&pk1")
    code, _ = await connect(
        tls, "d1", d1["deviceSecret"], make_tls_context(ca_pem=tls.ca_pem, cert_pem=cert, key_pem=key)
    )
    assert code == 5

    # From a CA otabox does not know: the handshake itself fails.
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone else's CA")])
    cert, key = foreign_certificate(other_key, other, "d1&pk1")
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        code, _ = await connect(
            tls, "d1", d1["deviceSecret"], make_tls_context(ca_pem=tls.ca_pem, cert_pem=cert, key_pem=key)
        )
        # TLS 1.3 reports the refused certificate after the handshake: the CONNACK never comes.
        assert code != 0
        raise ConnectionError(f"CONNACK {code}")
    assert not await online(tls, "d1")


async def test_require_certificate_ends_a_connection_without_one(tls: TLSServer) -> None:
    d = await tls.server.device("d1")
    await tls.server.device("d2", requireCertificate=True)
    assert (await tls.server.call("GET", f"/products/{PK}/devices/d2", 200))["requireCertificate"] is True
    gone = asyncio.Event()
    c = MQTTLiteClient(on_disconnect=lambda exc: gone.set(), raise_on_refuse=False)
    code, _ = await connect(tls, "d1", d["deviceSecret"], tls.context(), client=c)
    assert code == 0
    patched = await tls.server.call("PATCH", f"/products/{PK}/devices/d1", 200, json={"requireCertificate": True})
    assert patched["requireCertificate"] is True
    async with asyncio.timeout(10):
        await gone.wait()
    for ctx in (tls.context(), None):  # TLS without a certificate, and the plain port
        code, _ = await connect(tls, "d1", d["deviceSecret"], ctx)
        assert code == 5
    code, c = await connect(tls, "d1", d["deviceSecret"], tls.context(await issue(tls, "d1")))
    assert code == 0
    await c.disconnect()
    # Bad input changes nothing.
    await tls.server.call("PATCH", f"/products/{PK}/devices/d1", 400, json={"requireCertificate": "yes"})
    assert (await tls.server.call("GET", f"/products/{PK}/devices/d1", 200))["requireCertificate"] is True


async def test_certificate_requests_are_checked(tls: TLSServer) -> None:
    await tls.server.device("d1")
    key, csr = make_csr("anything")
    signed = await issue(tls, "d1", {"csr": csr, "validityDays": 30})
    assert "privateKey" not in signed  # the device's key never left it
    cert = x509.load_pem_x509_certificate(signed["certificate"].encode())
    assert cert.public_key() == key.public_key()
    assert 29 <= (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).days <= 30
    refused: list[tuple[dict[str, Any], str]] = [
        ({"csr": "not a csr"}, "csr"),
        ({"csr": csr.replace("A", "B", 3)}, "csr"),
        ({"validityDays": 0}, "validityDays"),
        ({"validityDays": "10"}, "validityDays"),
        ({"serial": "1"}, "unknown"),
    ]
    for body, words in refused:
        err = await issue(tls, "d1", body, expect=400)
        assert words in err["error"]["message"]
    await issue(tls, "nope", expect=404)
    listed = await tls.server.call("GET", f"/products/{PK}/devices/d1/certificates", 200)
    assert listed["total"] == 1  # nothing stored by the refused requests


async def test_deleting_a_device_revokes_its_certificates(tls: TLSServer) -> None:
    d = await tls.server.device("d1")
    cert = await issue(tls, "d1")
    await tls.server.call("DELETE", f"/products/{PK}/devices/d1", 204)
    again = await tls.server.device("d1")  # a new device under the same keys
    code, _ = await connect(tls, "d1", again["deviceSecret"], tls.context(cert))
    assert code == 5
    assert d["deviceSecret"] != again["deviceSecret"]


# ---------------------------------------------------------------- dynamic activation


async def test_dynamic_activation_by_product_secret(tls: TLSServer) -> None:
    product = await tls.server.call("POST", "/products", 201, json={"productKey": PK, "dynamicActivation": True})
    tls.server.products.add(PK)
    product_secret = product["productSecret"]
    assert product["dynamicActivation"] is True
    assert "productSecret" not in await tls.server.call("GET", f"/products/{PK}", 200)
    registered = await tls.server.device("d1")

    # An unknown device and a wrong product secret are refused.
    code, _ = await connect(tls, "ghost", product_secret, tls.context(), mode=protocol.MODE_PRODUCT_SECRET)
    assert code == 4
    code, _ = await connect(tls, "d1", "not-the-product-secret", tls.context(), mode=protocol.MODE_PRODUCT_SECRET)
    assert code == 4

    got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    async def on_message(topic: str, payload: bytes) -> None:
        await got.put((topic, payload))

    c = MQTTLiteClient(on_message=on_message, raise_on_refuse=False)
    code, _ = await connect(tls, "d1", product_secret, tls.context(), mode=protocol.MODE_PRODUCT_SECRET, client=c)
    assert code == 0
    async with asyncio.timeout(10):
        topic, payload = await got.get()  # pushed without a subscription, as EnOS does
    assert topic == f"/ext/session/{PK}/d1/thing/activate/info"
    info = json.loads(payload)
    assert info["method"] == "thing.activate.info" and info["version"] == "1.0"
    assert info["params"] == {"productKey": PK, "deviceKey": "d1", "deviceSecret": registered["deviceSecret"]}
    # A provisioning session, not online for upgrades: no push can reach it.
    assert not await online(tls, "d1")
    reply = {"id": info["id"], "code": 200, "data": {}, "message": ""}
    await c.publish(f"/ext/session/{PK}/d1/thing/activate/info_reply", json.dumps(reply), qos=1)

    async def activated() -> bool:
        return (await tls.server.call("GET", f"/products/{PK}/devices/d1", 200))["activatedAt"] is not None

    assert await wait_for(activated)
    await c.disconnect()
    code, _ = await connect(tls, "d1", product_secret, tls.context(), mode=protocol.MODE_PRODUCT_SECRET)
    assert code == 5  # activated: the product secret no longer stands in
    code, c = await connect(tls, "d1", info["params"]["deviceSecret"], tls.context())
    assert code == 0
    await c.disconnect()


async def test_a_device_that_logs_in_with_its_own_secret_is_activated(tls: TLSServer) -> None:
    product = await tls.server.call("POST", "/products", 201, json={"productKey": PK, "dynamicActivation": True})
    tls.server.products.add(PK)
    d = await tls.server.device("d1")
    code, c = await connect(tls, "d1", d["deviceSecret"], None)
    assert code == 0
    await c.disconnect()
    code, _ = await connect(tls, "d1", product["productSecret"], tls.context(), mode=protocol.MODE_PRODUCT_SECRET)
    assert code == 5


async def test_product_secret_rotation_and_switching_activation(tls: TLSServer) -> None:
    await tls.server.product(PK)  # without dynamic activation
    d = await tls.server.device("d1")
    err = await tls.server.call("POST", f"/products/{PK}:rotate-secret", 409)
    assert err["error"]["code"] == "no-dynamic-activation"
    code, _ = await connect(tls, "d1", d["deviceSecret"], tls.context(), mode=protocol.MODE_PRODUCT_SECRET)
    assert code == 5

    for body in ({"dynamicActivation": "on"}, {"name": "renamed"}):
        await tls.server.call("PATCH", f"/products/{PK}", 400, json=body)
    assert (await tls.server.call("GET", f"/products/{PK}", 200))["dynamicActivation"] is False

    on = await tls.server.call("PATCH", f"/products/{PK}", 200, json={"dynamicActivation": True})
    first = on["productSecret"]
    second = (await tls.server.call("POST", f"/products/{PK}:rotate-secret", 200))["productSecret"]
    assert first != second
    code, _ = await connect(tls, "d1", first, tls.context(), mode=protocol.MODE_PRODUCT_SECRET)
    assert code == 4  # the rotated-out secret activates nothing
    code, c = await connect(tls, "d1", second, tls.context(), mode=protocol.MODE_PRODUCT_SECRET)
    assert code == 0
    await c.disconnect()

    off = await tls.server.call("PATCH", f"/products/{PK}", 200, json={"dynamicActivation": False})
    assert off["dynamicActivation"] is False and "productSecret" not in off
    code, _ = await connect(tls, "d1", second, tls.context(), mode=protocol.MODE_PRODUCT_SECRET)
    assert code == 5
    code, c = await connect(tls, "d1", d["deviceSecret"], tls.context())  # its own secret still works
    assert code == 0
    await c.disconnect()
    bad = await tls.server.call("POST", "/products", 400, json={"productKey": "p2", "dynamicActivation": 1})
    assert "dynamicActivation" in bad["error"]["message"]
    await tls.server.call("GET", "/products/p2", 404)


# ---------------------------------------------------------------- backup


async def test_the_ca_is_in_the_backup_and_comes_back(tls: TLSServer, tmp_path: Path) -> None:
    d = await tls.server.device("d1")
    cert = await issue(tls, "d1")
    out = io.BytesIO()
    backup.write(tls.server.data_dir, out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        names = set(tar.getnames())
    assert {"ca/ca.pem", "ca/ca.key"} <= names
    archive = tmp_path / "b.tar"
    archive.write_bytes(out.getvalue())
    restored = tmp_path / "restored"
    backup.restore(archive, restored)
    assert (restored / "ca" / "ca.pem").read_text() == tls.ca_pem
    assert (restored / "ca" / "ca.pem").stat().st_mode & 0o777 == 0o644
    assert (restored / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    # A server on the restored data takes the certificate issued before the backup.
    s = Settings(data_dir=str(restored), host="127.0.0.1", http_port=0, mqtt_port=-1, mqtts_port=0,
                 https_port=-1, tls_self_signed="127.0.0.1,localhost")  # fmt: skip
    app = App(s, env={"OTABOX_ADMIN_TOKEN": TOKEN})
    await app.start()
    try:
        mqtts = json.loads((restored / "ports.json").read_text())["mqtts"]
        c = MQTTLiteClient(raise_on_refuse=False)
        code = await c.connect("127.0.0.1", mqtts, *login("d1", d["deviceSecret"]), tls=tls.context(cert), timeout=5)
        assert code == 0
        await c.disconnect()
    finally:
        await stop_within(app)
