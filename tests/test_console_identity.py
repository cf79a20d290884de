"""The console's device identity controls over real HTTP against a real server: certificates on
the device page (issue from a CSR or with a key shown once, revoke), requireCertificate, product
secrets (dynamic activation on creation, rotate, on/off); admins only, each form audited."""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import Server, make_csr
from tests.test_console_accounts import Browser, Browsers, add, audit

DEVICE_PAGE = "/ui/devices/pk1/d1"


@pytest.fixture
async def browsers(server: Server) -> AsyncIterator[Browsers]:
    made = Browsers(server)
    assert (await (await made.new()).sign_in()).status == 303
    yield made
    await made.close()


def pem_blocks(page: str, kind: str) -> list[str]:
    text = html.unescape(page)
    return re.findall(rf"-----BEGIN {kind}-----\n.+?\n-----END {kind}-----\n?", text, re.S)


def public_der(key: Any) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


async def certificates(server: Server) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = (await server.call("GET", "/products/pk1/devices/d1/certificates", 200))["items"]
    return items


async def actions(server: Server, prefix: str) -> list[tuple[str, str, int]]:
    return [(e["actor"], e["action"], e["status"]) for e in await audit(server) if e["action"].startswith(prefix)]


async def test_issue_with_a_key_shown_once_then_revoke(server: Server, browsers: Browsers) -> None:
    ui = browsers[0]
    await server.device("d1")
    page = await ui.get(DEVICE_PAGE)
    assert "No certificate issued yet" in page and "Issue a certificate" in page

    page = await ui.form(DEVICE_PAGE + "/certificates", {"csr": "", "validityDays": ""}, expect=200)
    assert "Shown once, now" in page
    [cert_pem] = pem_blocks(page, "CERTIFICATE")
    [key_pem] = pem_blocks(page, "PRIVATE KEY")
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert public_der(key.public_key()) == public_der(cert.public_key())
    serial = format(cert.serial_number, "x")
    assert [(c["serial"], c["status"]) for c in await certificates(server)] == [(serial, "valid")]

    # The device page lists it and never shows the key (or the certificate) again.
    page = await ui.get(DEVICE_PAGE)
    assert serial in page and pem_blocks(page, "PRIVATE KEY") == [] and pem_blocks(page, "CERTIFICATE") == []
    assert key_pem.splitlines()[1] not in page
    assert f'action="{DEVICE_PAGE}/certificates/{serial}/revoke"' in page

    assert await ui.form(f"{DEVICE_PAGE}/certificates/{serial}/revoke") == DEVICE_PAGE
    [listed] = await certificates(server)
    assert listed["status"] == "revoked" and listed["revokedAt"]
    page = await ui.get(DEVICE_PAGE)
    assert f"Revoked certificate {serial}" in page and "badge-canceled" in page
    assert f"{serial}/revoke" not in page  # a revoked certificate has no button
    assert await actions(server, "device.certificate") == [
        ("admin", "device.certificate.issue", 200),
        ("admin", "device.certificate.revoke", 303),
    ]


async def test_issue_from_a_csr_and_a_bad_csr(server: Server, browsers: Browsers) -> None:
    ui = browsers[0]
    await server.device("d1")
    device_key, csr = make_csr("d1")
    page = await ui.form(DEVICE_PAGE + "/certificates", {"csr": csr, "validityDays": "90"}, expect=200)
    [cert_pem] = pem_blocks(page, "CERTIFICATE")
    assert pem_blocks(page, "PRIVATE KEY") == [] and "Private key" not in page
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    assert public_der(cert.public_key()) == public_der(device_key.public_key())
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days in (89, 90)
    assert [c["serial"] for c in await certificates(server)] == [format(cert.serial_number, "x")]

    page = await ui.form(DEVICE_PAGE + "/certificates", {"csr": "not a csr"}, expect=400)
    assert "csr is not a PEM certificate signing request" in html.unescape(page)
    page = await ui.form(DEVICE_PAGE + "/certificates", {"validityDays": "0"}, expect=400)
    assert "validityDays must be" in page
    await ui.form("/ui/devices/pk1/ghost/certificates", {}, expect=404)
    assert len(await certificates(server)) == 1
    assert [s for *_, s in await actions(server, "device.certificate.issue")] == [200, 400, 400, 404]


async def test_require_certificate_on_and_off(server: Server, browsers: Browsers) -> None:
    ui = browsers[0]
    await server.device("d1")
    assert "Require a certificate" in await ui.get(DEVICE_PAGE)
    assert await ui.form(DEVICE_PAGE + "/require-certificate", {"required": "true"}) == DEVICE_PAGE
    assert (await server.call("GET", "/products/pk1/devices/d1", 200))["requireCertificate"] is True
    page = await ui.get(DEVICE_PAGE)
    assert "yes: it logs in only with a valid certificate" in page and "No longer require a certificate" in page
    await ui.form(DEVICE_PAGE + "/require-certificate", {"required": "false"})
    assert (await server.call("GET", "/products/pk1/devices/d1", 200))["requireCertificate"] is False
    assert await actions(server, "device.update") == [("admin", "device.update", 303)] * 2


def secret_of(page: str) -> str:
    found = re.search(r'<code id="new-product-secret" class="digest">([^<]+)</code>', page)
    assert found, page[:2000]
    return html.unescape(found.group(1))


async def test_product_secret_on_creation_rotate_and_switch(server: Server, browsers: Browsers) -> None:
    ui = browsers[0]
    page = await ui.form("/ui/products", {"productKey": "thermo", "dynamicActivation": "true"}, expect=200)
    assert "shown once, now" in page
    first = secret_of(page)
    assert (await server.call("GET", "/products/thermo", 200))["dynamicActivation"] is True

    page = await ui.get("/ui/devices?product=thermo")
    assert "Dynamic activation: <strong>on</strong>" in page and first not in page
    assert 'action="/ui/products/thermo/rotate-secret"' in page
    second = secret_of(await ui.form("/ui/products/thermo/rotate-secret", expect=200))
    assert second != first

    assert await ui.form("/ui/products/thermo/dynamic-activation", {"on": "false"}) == "/ui/devices?product=thermo"
    assert (await server.call("GET", "/products/thermo", 200))["dynamicActivation"] is False
    page = await ui.get("/ui/devices?product=thermo")
    assert "Dynamic activation: off" in page and "rotate-secret" not in page
    assert "no dynamic activation" in await ui.form("/ui/products/thermo/rotate-secret", expect=409)
    third = secret_of(await ui.form("/ui/products/thermo/dynamic-activation", {"on": "true"}, expect=200))
    assert third not in (first, second)

    # Unticked: a product without one, and no secret page.
    assert await ui.form("/ui/products", {"productKey": "lamp"}) == "/ui/devices?product=lamp"
    assert (await server.call("GET", "/products/lamp", 200))["dynamicActivation"] is False
    assert [(a, s) for _, a, s in await actions(server, "product.")] == [
        ("product.create", 200),
        ("product.rotate-secret", 200),
        ("product.update", 303),
        ("product.rotate-secret", 409),
        ("product.update", 200),
        ("product.create", 303),
    ]


async def test_viewers_and_operators_see_no_controls_and_get_403(server: Server, browsers: Browsers) -> None:
    await server.call("POST", "/products", 201, json={"productKey": "pk1", "dynamicActivation": True})
    server.products.add("pk1")
    await server.device("d1")
    issued = await server.call("POST", "/products/pk1/devices/d1/certificates", 201, json={})
    await add(server, "vera", "viewer")
    await add(server, "otto", "operator")
    for name in ("vera", "otto"):
        b: Browser = await browsers.new()
        await b.sign_in_as(name)
        page = await b.get(DEVICE_PAGE)
        assert issued["serial"] in page  # the list is there to read
        for control in ("/revoke", "Issue a certificate", "/require-certificate"):
            assert control not in page, (name, control)
        page = await b.get("/ui/devices?product=pk1")
        assert "Dynamic activation: <strong>on</strong>" in page
        for control in ("rotate-secret", "/dynamic-activation", "dynamicActivation"):
            assert control not in page, (name, control)
        for path, data in (
            (DEVICE_PAGE + "/certificates", {}),
            (f"{DEVICE_PAGE}/certificates/{issued['serial']}/revoke", {}),
            (DEVICE_PAGE + "/require-certificate", {"required": "true"}),
            ("/ui/products/pk1/rotate-secret", {}),
            ("/ui/products/pk1/dynamic-activation", {"on": "false"}),
        ):
            assert "needs the admin role" in await b.form(path, data, expect=403), (name, path)

    assert [(c["serial"], c["status"]) for c in await certificates(server)] == [(issued["serial"], "valid")]
    device = await server.call("GET", "/products/pk1/devices/d1", 200)
    assert device["requireCertificate"] is False
    assert (await server.call("GET", "/products/pk1", 200))["dynamicActivation"] is True
    refused = sorted((a, n) for n, a, s in await actions(server, "") if s == 403)
    assert refused == sorted(
        (a, n)
        for n in ("vera", "otto")
        for a in (
            "device.certificate.issue",
            "device.certificate.revoke",
            "device.update",
            "product.rotate-secret",
            "product.update",
        )
    )
