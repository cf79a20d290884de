"""TLS on the device side: the SDK's context builder, the simulator's MQTT client and `otabox simulate --tls`.

The first part runs against a stand-in broker on a local `ssl` listener (certificates made here
with `cryptography`, ECDSA P-256 as otabox's own CA makes them): what the client sends and checks.
The second against a real otabox with `--tls-self-signed` and plain MQTT off: the simulator
(CA pinned, then with device certificates) and the SDK (its certificate) upgrade through push jobs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import ipaddress
import json
import os
import ssl
import struct
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from otabox import cli, protocol
from otabox.device import Device, LoginRefused, Offer, fetch_ca, make_tls_context
from otabox.device.mqtt import MQTTLiteClient
from otabox.server.app import App
from otabox.server.settings import Settings
from tests.conftest import TOKEN, Server, stop_within, wait_for

# ---------------------------------------------------------------- certificates


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@dataclass
class Pki:
    """A CA, a server certificate for 127.0.0.1/localhost and a device certificate, as PEM text and files."""

    folder: Path
    ca_key: ec.EllipticCurvePrivateKey
    ca: x509.Certificate
    files: dict[str, Path] = field(default_factory=dict)
    pems: dict[str, str] = field(default_factory=dict)

    def issue(self, name: str, cn: str, *, server: bool = False, hosts: tuple[str, ...] = ()) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
        )
        if hosts:
            alt: list[x509.GeneralName] = []
            for h in hosts:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    alt.append(x509.DNSName(h))
            b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = b.sign(self.ca_key, hashes.SHA256())
        self.pems[name] = _pem(cert)
        self.pems[name + ".key"] = _key_pem(key)
        for suffix, text in ((".pem", self.pems[name]), (".key", self.pems[name + ".key"])):
            path = self.folder / (name + suffix)
            path.write_text(text)
            self.files[name + suffix] = path


def make_pki(folder: Path, cn: str = "test CA") -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),  # keyCertSign, cRLSign
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    pki = Pki(folder, key, ca)
    (folder / "ca.pem").write_text(_pem(ca))
    pki.files["ca.pem"] = folder / "ca.pem"
    pki.pems["ca"] = _pem(ca)
    pki.issue("server", "otabox test server", server=True, hosts=("127.0.0.1", "localhost"))
    pki.issue("device", "d1&pk1")
    return pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# ---------------------------------------------------------------- a stand-in broker on TLS


@dataclass
class Login:
    client_id: str
    username: str
    peer_cn: str | None
    version: str


class TLSBroker:
    """Accepts TLS (1.2+, client certificate optional but verified), answers CONNECT with CONNACK 0 and
    QoS 1 PUBLISH with PUBACK; records each login and whose certificate came with it."""

    def __init__(self, pki: Pki, require_cert: bool = False) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(pki.files["server.pem"], pki.files["server.key"])
        ctx.load_verify_locations(cafile=str(pki.files["ca.pem"]))
        ctx.verify_mode = ssl.CERT_REQUIRED if require_cert else ssl.CERT_OPTIONAL
        self.ctx = ctx
        self.logins: list[Login] = []
        self.published: list[str] = []
        self.got_publish = asyncio.Event()
        self.handshake_errors = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self) -> TLSBroker:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        for w in self._conns:
            w.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            await self._session(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self._conns.discard(writer)
            writer.transport.abort()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert")
        cn = None
        if peer:
            cn = next(v for rdn in peer["subject"] for k, v in rdn if k == "commonName")
        version = writer.get_extra_info("ssl_object").version()
        while True:
            first, body = await _read_packet(reader)
            kind = first & 0xF0
            if kind == 0x10:  # CONNECT
                pos = 10  # protocol name (6), level (1), flags (1), keepalive (2)
                fields = []
                for _ in range(2):
                    (n,) = struct.unpack_from("!H", body, pos)
                    fields.append(body[pos + 2 : pos + 2 + n].decode())
                    pos += 2 + n
                self.logins.append(Login(fields[0], fields[1], cn, version))
                writer.write(b"\x20\x02\x00\x00")
            elif kind == 0x30:  # PUBLISH
                (tlen,) = struct.unpack_from("!H", body, 0)
                self.published.append(body[2 : 2 + tlen].decode())
                self.got_publish.set()
                if (first >> 1) & 3 == 1:
                    writer.write(b"\x40\x02" + body[2 + tlen : 4 + tlen])
            elif kind == 0xC0:  # PINGREQ
                writer.write(b"\xd0\x00")
            elif kind == 0xE0:  # DISCONNECT
                return
            await writer.drain()


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(2)
    length, shift, b = head[1] & 0x7F, 7, head[1]
    while b & 0x80:
        b = (await reader.readexactly(1))[0]
        length |= (b & 0x7F) << shift
        shift += 7
    return head[0], await reader.readexactly(length) if length else b""


@pytest.fixture
async def broker(pki: Pki) -> AsyncIterator[TLSBroker]:
    b = await TLSBroker(pki).start()
    yield b
    await b.stop()


# ---------------------------------------------------------------- make_tls_context


def test_context_is_tls12_or_later_verifies_and_pins(pki: Pki) -> None:
    ctx = make_tls_context(pki.files["ca.pem"])
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "test CA"),),)]  # only the pinned CA
    assert len(make_tls_context(ca_pem=pki.pems["ca"]).get_ca_certs()) == 1
    assert not make_tls_context(pki.files["ca.pem"], check_hostname=False).check_hostname
    for bad in (
        {"cert_pem": pki.pems["device"]},
        {"key_pem": pki.pems["device.key"]},
        {"key_file": pki.files["device.key"]},
        {"cert_file": pki.files["device.pem"], "cert_pem": pki.pems["device"], "key_pem": pki.pems["device.key"]},
    ):
        with pytest.raises(ValueError):
            make_tls_context(pki.files["ca.pem"], **bad)
    with pytest.raises(ssl.SSLError):  # a key that is not the certificate's
        make_tls_context(cert_file=pki.files["device.pem"], key_file=pki.files["server.key"])


async def test_mqttlite_over_tls_with_pinned_ca_and_client_certificate(pki: Pki, broker: TLSBroker) -> None:
    client = MQTTLiteClient()
    await client.connect("127.0.0.1", broker.port, "c1", "d0&pk1", "pw", tls=make_tls_context(pki.files["ca.pem"]))
    await client.publish("/sys/pk1/d0/x", b"{}", qos=1)
    await client.disconnect()
    # Its certificate, from files or from PEM text (as the certificates API returns it).
    for ctx in (
        make_tls_context(pki.files["ca.pem"], cert_file=pki.files["device.pem"], key_file=pki.files["device.key"]),
        make_tls_context(ca_pem=pki.pems["ca"], cert_pem=pki.pems["device"], key_pem=pki.pems["device.key"]),
    ):
        client = MQTTLiteClient()
        await client.connect("localhost", broker.port, "c2", "d1&pk1", "pw", tls=ctx)
        client.close()
    await asyncio.sleep(0.05)
    assert [(lg.username, lg.peer_cn) for lg in broker.logins] == [("d0&pk1", None), *[("d1&pk1", "d1&pk1")] * 2]
    assert broker.published == ["/sys/pk1/d0/x"]
    assert all(lg.version in ("TLSv1.2", "TLSv1.3") for lg in broker.logins)


async def test_mqttlite_refuses_a_server_it_cannot_verify(pki: Pki, broker: TLSBroker, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other", "someone else's CA")
    for ctx, name in (
        (make_tls_context(other.files["ca.pem"]), "127.0.0.1"),  # not our CA
        (make_tls_context(pki.files["ca.pem"]), "127.0.0.2"),  # an address the certificate does not hold
        (make_tls_context(pki.files["ca.pem"]), "ota.example.com"),  # a name it does not hold
        (make_tls_context(), "127.0.0.1"),  # the system's CAs do not know a private CA
    ):
        client = MQTTLiteClient()
        with pytest.raises(ssl.SSLCertVerificationError):
            await client.connect("127.0.0.1", broker.port, "c", "d&pk", "pw", tls=ctx, server_hostname=name)
        assert not client.connected
    # Turning the name check off still checks the chain.
    client = MQTTLiteClient()
    await client.connect(
        "127.0.0.1", broker.port, "c", "d&pk", "pw", tls=make_tls_context(pki.files["ca.pem"], check_hostname=False),
        server_hostname="not-in-the-cert.example",
    )  # fmt: skip
    client.close()
    assert len(broker.logins) == 1


async def test_server_requiring_a_certificate_refuses_a_client_without_one(pki: Pki) -> None:
    strict = await TLSBroker(pki, require_cert=True).start()
    try:
        client = MQTTLiteClient()
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await client.connect("127.0.0.1", strict.port, "c", "d&pk", "pw", tls=make_tls_context(pki.files["ca.pem"]))
        with_cert = make_tls_context(
            pki.files["ca.pem"], cert_file=pki.files["device.pem"], key_file=pki.files["device.key"]
        )
        await client.connect("127.0.0.1", strict.port, "c", "d1&pk1", "pw", tls=with_cert)
        client.close()
        assert [lg.peer_cn for lg in strict.logins] == ["d1&pk1"]
    finally:
        await strict.stop()


async def test_sdk_device_connects_over_tls_with_its_certificate(pki: Pki, broker: TLSBroker) -> None:
    ctx = make_tls_context(ca_pem=pki.pems["ca"], cert_pem=pki.pems["device"], key_pem=pki.pems["device.key"])
    device = Device("127.0.0.1", broker.port, "pk1", "d1", "secret", version="1.0.0", tls_context=ctx)
    async with device:
        assert device.connected
        # The version report on connect goes out on the TLS connection (the stand-in does not reply).
        await asyncio.wait_for(broker.got_publish.wait(), 10)
    assert broker.published[0] == protocol.topic_for("pk1", "d1", protocol.INFORM)
    assert broker.logins[0].peer_cn == "d1&pk1" and broker.logins[0].username == "d1&pk1"


# ---------------------------------------------------------------- against a real otabox with TLS on

FIRMWARE = os.urandom(150_000)


@dataclass
class TLSServer:
    """A real server with only the TLS listener for MQTT (plain MQTT off), HTTP and HTTPS."""

    server: Server
    mqtts: int
    https: int
    ca_pem: str


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[TLSServer]:
    known = {f.name for f in dataclasses.fields(Settings)}
    if not {"tls_self_signed", "mqtts_port", "https_port"} <= known:
        pytest.skip("this otabox has no TLS listener (--tls-self-signed)")
    overrides: dict[str, Any] = {
        "mqtt_port": -1,  # plain MQTT off: a device that logs in did so over TLS
        "mqtts_port": 0,
        "https_port": 0,
        "tls_self_signed": "127.0.0.1,localhost",
        "scheduler_interval": 0.1,
    }
    settings = Settings(data_dir=str(tmp_path / "data"), host="127.0.0.1", http_port=0, **overrides)
    app = App(settings, env={"OTABOX_ADMIN_TOKEN": TOKEN})
    await app.start()
    try:
        ports = json.loads((tmp_path / "data" / "ports.json").read_text())
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            server = Server(app, http, f"http://127.0.0.1:{ports['http']}", tmp_path / "data")
            async with http.get(server.url + "/ca.pem") as resp:
                assert resp.status == 200
                ca_pem = await resp.text()
            yield TLSServer(server, int(ports["mqtts"]), int(ports["https"]), ca_pem)
    finally:
        await stop_within(app)


async def _push_job(server: Server, version: str = "2.0.0", **scope: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Firmware `version` and a push job for devices on 1.0.0 (incremental: devices may join later)."""
    fw = await server.firmware("pk1", version, FIRMWARE)
    body = {
        "firmwareId": fw["id"],
        "type": "upgrade",
        "name": "over TLS",
        "mode": "push",
        "policy": "incremental",
        "scope": scope or {"versionNumbers": ["1.0.0"]},
        "timeoutSeconds": 30,
    }
    return fw, await server.call("POST", "/jobs", 201, json=body)


def _simulate(ts: TLSServer, *extra: str) -> list[str]:
    return ["simulate", "pk1", "--url", ts.server.url, "--token", TOKEN, "--json",
            "--flash-time", "0.01-0.05", "--reboot-time", "0.05-0.1", "--data-dir", str(ts.server.data_dir),
            *extra]  # fmt: skip


async def test_simulator_over_tls_with_the_ca_pinned_upgrades_through_a_push_job(
    tls_server: TLSServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = tls_server.server
    await server.product("pk1")
    _, job = await _push_job(server)
    ca = tmp_path / "ca.pem"
    ca.write_text(tls_server.ca_pem)
    argv = _simulate(tls_server, "--devices", "4", "--ca", str(ca), "--job", job["id"], "--duration", "60")
    # main() runs its own event loop: give it a thread so this loop keeps serving it.
    rc = await asyncio.to_thread(cli.main, argv)
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0, summary
    assert summary["outcomes"] == {"succeeded": 4} and summary["connectFailures"] == 0
    assert summary["transport"] == {"tls": True, "ca": str(ca), "clientCertificates": False}
    shown = await server.call("GET", f"/jobs/{job['id']}", 200)
    assert shown["counts"]["succeeded"] == 4
    listed = await server.call("GET", "/products/pk1/devices?version=2.0.0&limit=10", 200)
    assert len(listed["items"]) == 4

    # The wrong CA: one clear error before any device runs.
    other = make_pki(tmp_path / "other", "someone else's CA")
    rc = await asyncio.to_thread(cli.main, _simulate(tls_server, "--devices", "1", "--prefix", "x-",
                                                     "--ca", str(other.files["ca.pem"])))  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "certificate verify failed" in err and "CA" in err


async def test_simulator_with_client_certificates(
    tls_server: TLSServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = tls_server.server
    await server.product("pk1")
    certs = tmp_path / "certs"
    saved = tmp_path / "fleet.csv"
    # First run: no CA given (fetched from the API URL's /ca.pem), certificates issued and kept.
    argv = _simulate(tls_server, "--devices", "3", "--client-certs", str(certs), "--save-csv", str(saved))
    rc = await asyncio.to_thread(cli.main, [*argv, "--duration", "1"])
    first = json.loads(capsys.readouterr().out)
    assert rc == 0 and first["outcomes"] == {"waiting": 3} and first["connectFailures"] == 0
    assert first["transport"] == {
        "tls": True,
        "ca": server.url + "/ca.pem",
        "clientCertificates": True,
        "certificatesIssued": 3,
        "certificatesReused": 0,
    }
    files = sorted(certs.iterdir())
    assert [f.name for f in files] == ["sim-0001.pem", "sim-0002.pem", "sim-0003.pem"]
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    for dk in ("sim-0001", "sim-0002", "sim-0003"):
        listed = await server.call("GET", f"/products/pk1/devices/{dk}/certificates", 200)
        assert len(listed["items"]) == 1
        # From now on the device may log in only with its certificate.
        await server.call("PATCH", f"/products/pk1/devices/{dk}", 200, json={"requireCertificate": True})

    # Without certificates the server refuses them...
    base = _simulate(tls_server, "--csv", str(saved))
    rc = await asyncio.to_thread(cli.main, [*base, "--tls", "--duration", "5"])
    refused = json.loads(capsys.readouterr().out)
    assert rc == 0 and refused["outcomes"] == {"refused": 3}
    # ...with them (reused from the folder) they log in and take a push job over two-way TLS.
    _, job = await _push_job(server, deviceKeys=["sim-0001", "sim-0002", "sim-0003"])
    rc = await asyncio.to_thread(
        cli.main, [*base, "--client-certs", str(certs), "--job", job["id"], "--duration", "60"]
    )
    again = json.loads(capsys.readouterr().out)
    assert rc == 0 and again["outcomes"] == {"succeeded": 3}, again
    assert again["transport"]["certificatesIssued"] == 0 and again["transport"]["certificatesReused"] == 3
    for dk in ("sim-0001", "sim-0002", "sim-0003"):  # nothing new issued
        assert len((await server.call("GET", f"/products/pk1/devices/{dk}/certificates", 200))["items"]) == 1


async def test_sdk_device_over_tls_with_its_certificate_takes_a_push(tls_server: TLSServer, tmp_path: Path) -> None:
    server = tls_server.server
    created = await server.device("d1", requireCertificate=True)
    issued = await server.call("POST", "/products/pk1/devices/d1/certificates", 201, json={})
    assert set(issued) >= {"serial", "certificate", "privateKey", "notAfter"}
    ca_pem = await fetch_ca(server.url)
    assert ca_pem.strip() == tls_server.ca_pem.strip()
    tls = make_tls_context(ca_pem=ca_pem, cert_pem=issued["certificate"], key_pem=issued["privateKey"])
    done: asyncio.Queue[str] = asyncio.Queue()

    async def on_upgrade(offer: Offer) -> None:
        # The same file over HTTPS: the SDK's own session checks the server against the pinned CA.
        url = urllib.parse.urlsplit(offer.file_url)._replace(scheme="https", netloc=f"127.0.0.1:{tls_server.https}")
        image = await device.download(
            dataclasses.replace(offer, file_url=urllib.parse.urlunsplit(url)), tmp_path / "fw"
        )
        assert image.read_bytes() == FIRMWARE
        await device.report_progress(100, "rebooting")
        await device.report_version(offer.version)
        await done.put(offer.version)

    device = Device("127.0.0.1", tls_server.mqtts, "pk1", "d1", created["deviceSecret"], version="1.0.0",
                    on_upgrade=on_upgrade, tls_context=tls, reconnect_min=0.05, reconnect_max=0.2)  # fmt: skip
    async with device:
        await wait_for(lambda: _on_version(server, "d1", "1.0.0"))
        _, job = await _push_job(server, deviceKeys=["d1"])
        assert await asyncio.wait_for(done.get(), 30) == "2.0.0"
        shown = await wait_for(lambda: _job_counts(server, job["id"], "succeeded"))
        assert shown["succeeded"] == 1

    # Without its certificate (the CA pinned all the same) the device is refused...
    device = Device("127.0.0.1", tls_server.mqtts, "pk1", "d1", created["deviceSecret"], version="2.0.0",
                    tls_context=make_tls_context(ca_pem=ca_pem))  # fmt: skip
    with pytest.raises(LoginRefused):
        await device.start(timeout=10)
    # ...and so is another device's certificate.
    await server.device("d2")
    other = await server.call("POST", "/products/pk1/devices/d2/certificates", 201, json={})
    stolen = make_tls_context(ca_pem=ca_pem, cert_pem=other["certificate"], key_pem=other["privateKey"])
    device = Device("127.0.0.1", tls_server.mqtts, "pk1", "d1", created["deviceSecret"], version="2.0.0",
                    tls_context=stolen)  # fmt: skip
    with pytest.raises(LoginRefused):
        await device.start(timeout=10)


async def _on_version(server: Server, dk: str, version: str) -> bool:
    shown = await server.call("GET", f"/products/pk1/devices/{dk}", 200)
    return bool(shown["online"] and shown["version"] == version)


async def _job_counts(server: Server, job_id: str, state: str) -> dict[str, int] | None:
    job = await server.call("GET", f"/jobs/{job_id}", 200)
    counts: dict[str, int] = job["counts"]
    return counts if counts.get(state) else None
