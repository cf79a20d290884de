"""The CLI's device identity commands against a real server: product secrets (dynamic activation),
device certificates (issue from a CSR or with a key, list, revoke), requireCertificate, `ca show`."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import Server, make_csr
from tests.test_cli import Cli, fields, table


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI reads these; the developer's own shell must not steer the tests.
    for name in ("OTABOX_URL", "OTABOX_TOKEN", "OTABOX_ADMIN_TOKEN", "OTABOX_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def cli(server: Server, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(server, capsys)


def serial_of(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def public_der(key: ec.EllipticCurvePublicKey | object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


async def certificates(server: Server, dk: str, pk: str = "pk1") -> list[dict[str, str]]:
    items: list[dict[str, str]] = (await server.call("GET", f"/products/{pk}/devices/{dk}/certificates", 200))["items"]
    return items


# ---------------------------------------------------------------- product secrets


async def test_product_secret_shown_once_rotated_and_turned_off_and_on(cli: Cli, server: Server) -> None:
    run = await cli("product", "add", "thermo", "--dynamic-activation")
    assert run.rc == 0, run.err
    first = fields(run.out)
    assert first["dynamicActivation"] == "True" and len(first["productSecret"]) >= 16
    assert "productSecret is shown this once" in run.err
    assert "productSecret" not in await server.call("GET", "/products/thermo", 200)

    run = await cli("product", "rotate-secret", "thermo")
    assert run.rc == 0, run.err
    second = fields(run.out)["productSecret"]
    assert second and second != first["productSecret"] and "shown this once" in run.err

    run = await cli("product", "set", "thermo", "--no-dynamic-activation", "--json")
    assert run.rc == 0 and run.json()["dynamicActivation"] is False and "productSecret" not in run.json()
    run = await cli("product", "rotate-secret", "thermo")
    assert run.rc == 1 and "409 no-dynamic-activation" in run.err and run.out == ""
    run = await cli("product", "set", "thermo", "--dynamic-activation")
    assert run.rc == 0, run.err
    third = fields(run.out)["productSecret"]
    assert third not in (first["productSecret"], second)
    run = await cli("product", "set", "thermo")
    assert run.rc == 2 and "--dynamic-activation" in run.err

    # Without the flag a product has none, and says so.
    run = await cli("product", "add", "lamp", "--json")
    assert run.rc == 0 and run.json()["dynamicActivation"] is False and "productSecret" not in run.json()


# ---------------------------------------------------------------- requireCertificate


async def test_require_certificate_on_add_and_switched(cli: Cli, server: Server) -> None:
    await server.product("pk1")
    run = await cli("device", "add", "pk1", "d1", "--require-certificate", "--json")
    assert run.rc == 0, run.err
    assert run.json()["requireCertificate"] is True
    run = await cli("device", "require-cert", "--product", "pk1", "d1", "--off")
    assert run.rc == 0 and fields(run.out)["requireCertificate"] == "False"
    assert (await server.call("GET", "/products/pk1/devices/d1", 200))["requireCertificate"] is False
    run = await cli("device", "require-cert", "--product", "pk1", "d1")
    assert run.rc == 0 and (await server.call("GET", "/products/pk1/devices/d1", 200))["requireCertificate"] is True
    run = await cli("device", "require-cert", "--product", "pk1", "ghost")
    assert run.rc == 1 and run.err.startswith("otabox: 404 not-found: ") and "ghost" in run.err


# ---------------------------------------------------------------- certificates


async def test_issue_with_a_key_made_by_the_server_list_and_revoke(cli: Cli, server: Server, tmp_path: Path) -> None:
    await server.device("d1")
    cert_out, key_out = tmp_path / "d1.pem", tmp_path / "d1.key"
    run = await cli("device", "cert", "issue", "--product", "pk1", "d1", "-o", str(cert_out), "--key-out", str(key_out))
    assert run.rc == 0, run.err
    shown = fields(run.out)
    assert stat.S_IMODE(key_out.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(cert_out.read_bytes())
    key = serialization.load_pem_private_key(key_out.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert public_der(key.public_key()) == public_der(cert.public_key())
    assert shown["serial"] == serial_of(cert)
    assert shown["fingerprint"] == cert.fingerprint(hashes.SHA256()).hex()
    assert shown["certificate"] == f"written to {cert_out}" and shown["privateKey"].startswith(f"written to {key_out}")
    assert "PRIVATE KEY" not in run.out + run.err

    run = await cli("device", "cert", "list", "--product", "pk1", "d1")
    assert run.rc == 0
    rows = table(run.out)
    assert rows[0] == ["serial", "status", "notAfter", "createdAt", "revokedAt"]
    assert rows[1][:2] == [serial_of(cert), "valid"] and rows[1][4] == "-" and rows[-1] == ["(1 of 1)"]

    run = await cli("device", "cert", "revoke", "--product", "pk1", "d1", serial_of(cert))
    assert run.rc == 0 and fields(run.out)["status"] == "revoked"
    listed = await certificates(server, "d1")
    assert [(c["serial"], c["status"]) for c in listed] == [(serial_of(cert), "revoked")]
    assert listed[0]["revokedAt"]
    run = await cli("device", "cert", "list", "--product", "pk1", "d1", "--json")
    assert run.json()["items"][0]["status"] == "revoked"
    run = await cli("device", "cert", "revoke", "--product", "pk1", "d1", "feedface")
    assert run.rc == 1 and "404" in run.err and "feedface" in run.err


async def test_issue_json_names_the_key_file_instead_of_the_key(cli: Cli, server: Server, tmp_path: Path) -> None:
    await server.device("d1")
    key_out = tmp_path / "d1.key"
    run = await cli("device", "cert", "issue", "--product", "pk1", "d1", "--key-out", str(key_out), "--json")
    assert run.rc == 0, run.err
    answer = run.json()
    assert "privateKey" not in answer and answer["privateKeyFile"] == str(key_out)
    assert "PRIVATE KEY" in key_out.read_text() and "PRIVATE KEY" not in run.out
    cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
    assert answer["serial"] == serial_of(cert) and answer["notAfter"].endswith("Z")
    assert [c["serial"] for c in await certificates(server, "d1")] == [answer["serial"]]


async def test_issue_from_a_csr_signs_the_devices_own_key(cli: Cli, server: Server, tmp_path: Path) -> None:
    await server.device("d1")
    device_key, csr = make_csr("d1")
    csr_file = tmp_path / "d1.csr"
    csr_file.write_text(csr)

    # Without -o stdout is the certificate alone (to redirect), the summary on stderr.
    run = await cli(
        "device", "cert", "issue", "--product", "pk1", "d1", "--csr", str(csr_file), "--validity-days", "30"
    )
    assert run.rc == 0, run.err
    assert run.out.startswith("-----BEGIN CERTIFICATE-----") and run.out.rstrip().endswith("-----END CERTIFICATE-----")
    cert = x509.load_pem_x509_certificate(run.out.encode())
    assert public_der(cert.public_key()) == public_der(device_key.public_key())
    assert fields(run.err)["serial"] == serial_of(cert) and "privateKey" not in run.err
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days in (29, 30)
    assert [c["serial"] for c in await certificates(server, "d1")] == [serial_of(cert)]

    # --key-out has nothing to hold when the key stays on the device.
    run = await cli(
        "device", "cert", "issue", "--product", "pk1", "d1", "--csr", str(csr_file), "--key-out", str(tmp_path / "k")
    )
    assert run.rc == 2 and "--key-out" in run.err and not (tmp_path / "k").exists()
    assert len(await certificates(server, "d1")) == 1


async def test_bad_input_is_refused_with_a_message_and_nothing_stored(cli: Cli, server: Server, tmp_path: Path) -> None:
    await server.device("d1")
    key_out = tmp_path / "d1.key"

    # No --csr and no --key-out: the key would be shown once and lost, so nothing is asked.
    run = await cli("device", "cert", "issue", "--product", "pk1", "d1")
    assert run.rc == 2 and "--key-out" in run.err and "nothing was requested" in run.err and run.out == ""

    not_csr = tmp_path / "notes.txt"
    not_csr.write_text("hello, this is not a CSR\n")
    binary = tmp_path / "blob.der"
    binary.write_bytes(b"\x30\x82\xff\xfe" * 64)
    a_key = tmp_path / "own.key"
    a_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    for bad in (not_csr, binary, a_key):
        run = await cli("device", "cert", "issue", "--product", "pk1", "d1", "--csr", str(bad))
        assert run.rc == 1 and f"{bad} is not a PEM certificate signing request" in run.err, run.err
        assert "nothing was sent" in run.err and run.out == ""
    # A CSR whose contents are broken: the server's message.
    broken = tmp_path / "broken.csr"
    broken.write_text("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    run = await cli("device", "cert", "issue", "--product", "pk1", "d1", "--csr", str(broken))
    assert run.rc == 1 and run.err.startswith("otabox: 400 ") and "csr" in run.err
    run = await cli("device", "cert", "issue", "--product", "pk1", "d1", "--csr", str(tmp_path / "missing.csr"))
    assert run.rc == 1 and "missing.csr" in run.err

    # An unknown device: the server's 404, and no empty key file left behind.
    run = await cli("device", "cert", "issue", "--product", "pk1", "ghost", "--key-out", str(key_out))
    assert run.rc == 1 and run.err.startswith("otabox: 404 not-found: ") and "ghost" in run.err
    assert not key_out.exists()
    run = await cli("device", "cert", "list", "--product", "pk1", "ghost")
    assert run.rc == 1 and "404" in run.err
    # validityDays out of range.
    run = await cli(
        "device", "cert", "issue", "--product", "pk1", "d1", "--key-out", str(key_out), "--validity-days", "0"
    )
    assert run.rc == 1 and "400" in run.err and "validityDays" in run.err and not key_out.exists()

    # An existing key file is never overwritten (it may hold the key of a certificate in use).
    key_out.write_text("the key of another certificate\n")
    run = await cli("device", "cert", "issue", "--product", "pk1", "d1", "--key-out", str(key_out))
    assert run.rc == 1 and "exists" in run.err and "nothing was requested" in run.err
    assert key_out.read_text() == "the key of another certificate\n"

    assert await certificates(server, "d1") == []


# ---------------------------------------------------------------- the CA


async def test_ca_show_from_the_server_and_from_the_data_dir(cli: Cli, server: Server, tmp_path: Path) -> None:
    async with server.http.get(server.url + "/ca.pem") as resp:
        assert resp.status == 200
        served = await resp.text()
    run = await cli.raw("ca", "show", "--url", server.url)
    assert run.rc == 0, run.err
    assert run.out == served and x509.load_pem_x509_certificate(run.out.encode())
    run = await cli.raw("ca", "show", "--data-dir", str(server.data_dir))
    assert run.rc == 0 and run.out == served
    run = await cli.raw("ca", "show", "--data-dir", str(server.data_dir), "--json")
    assert json.loads(run.out) == {"certificate": served, "from": str(server.data_dir / "ca" / "ca.pem")}

    # The CA signs what `device cert issue` hands out.
    await server.device("d1")
    run = await cli("device", "cert", "issue", "--product", "pk1", "d1", "--key-out", str(tmp_path / "k"), "--json")
    issued = x509.load_pem_x509_certificate(run.json()["certificate"].encode())
    issued.verify_directly_issued_by(x509.load_pem_x509_certificate(served.encode()))

    run = await cli.raw("ca", "show", "--data-dir", str(tmp_path / "nothing-here"))
    assert run.rc == 1 and "ca.pem" in run.err and "--url" in run.err and run.out == ""
    run = await cli.raw("ca", "show", "--url", "http://127.0.0.1:9")
    assert run.rc == 1 and "cannot reach the server" in run.err
