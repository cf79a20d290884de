"""Products and devices: registration, bulk import and lookups, shared by the API and the console."""

from __future__ import annotations

import csv
import io
import json
import re
import secrets
import string
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from otabox import protocol
from otabox.errors import BadRequest, Conflict, NotFound
from otabox.models import Device, DeviceCertificate, Product
from otabox.server.keys import Keys
from otabox.server.pki import DEVICE_DAYS, CertificateAuthority, Issued
from otabox.server.store import DuplicateError, Store

DEVICE_AUTH = ("sign", "plain")
DEVICE_FIELDS = ("deviceKey", "deviceSecret", "tags", "auth", "requireCertificate")
MAX_IMPORT_ROWS = 100_000
_SECRET_ALPHABET = string.ascii_letters + string.digits


class Joiner(Protocol):
    """Told about new devices (incremental jobs pick them up)."""

    async def devices_created(self, product_key: str, device_keys: Sequence[str]) -> None: ...


class DeviceSessions(Protocol):
    """Told when a device's credentials change, to keep its live connection true to them."""

    async def forget(self, product_key: str, device_key: str) -> None:
        """Deleted or a new secret: forget what is cached, end its connection."""

    async def require_certificate(self, product_key: str, device_key: str, required: bool) -> None:
        """Read its rules again at the next login; when required, end a connection made without one."""

    async def certificate_revoked(self, product_key: str, device_key: str, serial: str) -> None:
        """End its connection if it logged in with this certificate."""

    async def product_changed(self, product_key: str) -> None:
        """The product's login rules (dynamic activation) changed: read them again at each device's next login."""


def check_key(value: Any, field: str) -> str:
    if not protocol.valid_key(value):
        raise BadRequest(f"{field} must match [A-Za-z0-9_.-]{{1,64}}")
    return str(value)


def check_text(value: Any, field: str, *, required: bool = True, max_len: int = 256) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()) or len(value) > max_len:
        raise BadRequest(f"{field} must be a non-empty string of at most {max_len} characters")
    return value


def check_tags(value: Any, field: str = "tags") -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str | int | float) and not isinstance(v, bool)
        for k, v in value.items()
    ):
        raise BadRequest(f"{field} must be an object of string keys to string values")
    return {k: str(v) for k, v in value.items()}


def new_secret(value: Any = None) -> str:
    if value is None:
        # Letters and digits only: a secret starting with "-" reads as an option on command lines.
        return "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(32))
    if not isinstance(value, str) or not 8 <= len(value) <= 128 or not value.isprintable():
        raise BadRequest("deviceSecret must be 8-128 printable characters")
    return value


def check_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{field} must be true or false")
    return value


def _auth(value: Any) -> str:
    if value not in DEVICE_AUTH:
        raise BadRequest("auth must be 'sign' or 'plain'")
    return str(value)


# Header spellings understood, after lower-casing and dropping spaces, "_" and "-".
_HEADER_NAMES = {"devicekey": "deviceKey", "devicesecret": "deviceSecret", "secret": "deviceSecret", "auth": "auth"}


def _header_name(cell: str) -> str | None:
    return _HEADER_NAMES.get(re.sub(r"[\s_-]+", "", cell).lower())


def _delimiter(first_line: str) -> str:
    # Spreadsheets in many locales save "CSV" with semicolons.
    return ";" if first_line.count(";") > first_line.count(",") else ","


def import_rows(text: str, content_type: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A CSV or JSON list import body -> (row dicts, the columns understood). Raises BadRequest.

    CSV: a header row names the columns (deviceKey, deviceSecret, auth in any of the usual
    spellings; every other column is a tag, a "tag:" prefix dropped), `,` or `;` separated. Without
    a header the columns are deviceKey, deviceSecret, and the first cell must be a device key. A
    first row that is neither is refused, naming its columns: it is never imported as a device.
    """
    # Spreadsheets save "CSV UTF-8" with a byte order mark; left in, it hides the header.
    text = text.removeprefix("\ufeff")
    if "json" in content_type or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"body is not valid JSON: {exc}") from exc
        if not isinstance(data, list):
            raise BadRequest("JSON import body must be a list of devices")
        return [row if isinstance(row, dict) else {"_invalid": row} for row in data], {"format": "json"}
    delimiter = _delimiter(text.split("\n", 1)[0])
    try:
        rows = [r for r in csv.reader(io.StringIO(text), delimiter=delimiter) if any(cell.strip() for cell in r)]
    except csv.Error as exc:
        raise BadRequest(f"CSV could not be read: {exc}") from exc
    if not rows:
        return [], {"format": "csv", "delimiter": delimiter, "header": False}
    first = [h.strip() for h in rows[0]]
    names = [_header_name(h) for h in first]
    if names[0] == "deviceKey":
        header = [n or h for n, h in zip(names, first, strict=True)]
        rows = rows[1:]
    elif protocol.valid_key(first[0]) and not any(names):
        header = ["deviceKey", "deviceSecret"]
    else:
        raise BadRequest(
            f"the first row is not a header otabox understands (columns {first}): it must start with"
            " deviceKey, then deviceSecret, auth and tag columns, separated by ',' or ';'"
        )
    columns: dict[str, Any] = {"format": "csv", "delimiter": delimiter}
    understood = {n: h for n, h in zip(names, first, strict=False) if n} if names[0] else {}
    tags = [h.removeprefix("tag:") for h in header if h not in ("deviceKey", "deviceSecret", "auth") and h]
    columns.update(header=names[0] == "deviceKey", understood=understood, tags=tags)
    out = []
    for r in rows:
        item: dict[str, Any] = {"tags": {}}
        for name, cell in zip(header, r, strict=False):
            cell = cell.strip()
            if name in ("deviceKey", "deviceSecret", "auth"):
                if cell:
                    item[name] = cell
            elif name and cell:
                item["tags"][name.removeprefix("tag:")] = cell
        out.append(item)
    return out, columns


class Registry:
    def __init__(
        self, store: Store, keys: Keys, joiner: Joiner, sessions: DeviceSessions, ca: CertificateAuthority
    ) -> None:
        self.store = store
        self.keys = keys
        self.joiner = joiner
        self.sessions = sessions
        self.ca = ca

    async def product(self, product_key: str) -> Product:
        """Raises NotFound."""
        product = await self.store.get_product(product_key)
        if product is None:
            raise NotFound(f"product {product_key!r} not found")
        return product

    async def device(self, product_key: str, device_key: str) -> Device:
        """Raises NotFound."""
        device = await self.store.get_device(product_key, device_key)
        if device is None:
            raise NotFound(f"device {device_key!r} not found in {product_key!r}")
        return device

    async def create_product(self, body: Mapping[str, Any]) -> tuple[Product, str | None]:
        """Returns the product with its product secret (shown once) when dynamicActivation is on."""
        unknown = set(body) - {"productKey", "name", "dynamicActivation"}
        if unknown:
            raise BadRequest(f"unknown product field(s) {sorted(unknown)}")
        pk = check_key(body.get("productKey"), "productKey")
        name = check_text(body.get("name", pk), "name")
        secret = new_secret() if check_bool(body.get("dynamicActivation", False), "dynamicActivation") else None
        try:
            product = await self.store.create_product(pk, name, self.keys.encrypt(secret) if secret else None)
        except DuplicateError as exc:
            raise Conflict(f"product {pk!r} already exists", code="duplicate") from exc
        return product, secret

    async def update_product(self, product_key: str, body: Mapping[str, Any]) -> tuple[Product, str | None]:
        """PATCH: `dynamicActivation` on (a new product secret, returned once) or off (the secret is
        dropped; devices keep their own secrets). Raises BadRequest, NotFound."""
        product = await self.product(product_key)
        unknown = set(body) - {"dynamicActivation"}
        if unknown:
            raise BadRequest(f"unknown product field(s) {sorted(unknown)}; a product takes dynamicActivation")
        secret = None
        if "dynamicActivation" in body:
            wanted = check_bool(body["dynamicActivation"], "dynamicActivation")
            if wanted and not product.dynamic_activation:
                secret = new_secret()
                await self.store.set_product_activation(product_key, self.keys.encrypt(secret))
            elif not wanted and product.dynamic_activation:
                await self.store.set_product_activation(product_key, None)
            await self.sessions.product_changed(product_key)
        return await self.product(product_key), secret

    async def rotate_product_secret(self, product_key: str) -> str:
        """A new product secret (returned once); the old one activates no device from now on.
        Raises NotFound, Conflict (the product has no dynamic activation)."""
        product = await self.product(product_key)
        if not product.dynamic_activation:
            raise Conflict(
                f"product {product_key!r} has no dynamic activation: turn it on with"
                ' PATCH {"dynamicActivation": true}, which returns its first product secret',
                code="no-dynamic-activation",
            )
        secret = new_secret()
        await self.store.set_product_activation(product_key, self.keys.encrypt(secret))
        return secret

    async def create_device(self, product_key: str, body: Mapping[str, Any]) -> tuple[Device, str]:
        """Register one device; returns it with its secret (shown once). Raises BadRequest, NotFound, Conflict."""
        await self.product(product_key)
        unknown = set(body) - set(DEVICE_FIELDS)
        if unknown:
            raise BadRequest(f"unknown device field(s) {sorted(unknown)}; a device takes {', '.join(DEVICE_FIELDS)}")
        dk = check_key(body.get("deviceKey"), "deviceKey")
        secret = new_secret(body.get("deviceSecret"))
        tags = check_tags(body.get("tags"))
        auth = _auth(body.get("auth", "sign"))
        require_certificate = check_bool(body.get("requireCertificate", False), "requireCertificate")
        try:
            await self.store.create_devices(product_key, [(dk, self.keys.encrypt(secret), auth, tags)])
        except DuplicateError as exc:
            raise Conflict(f"device {dk!r} already exists in {product_key!r}", code="duplicate") from exc
        if require_certificate:
            await self.store.set_require_certificate(product_key, dk, True)
        await self.joiner.devices_created(product_key, [dk])
        return await self.device(product_key, dk), secret

    async def update_device(self, product_key: str, device_key: str, body: Mapping[str, Any]) -> Device:
        """PATCH: `tags` replaces the device's tags; `requireCertificate` (true: its connection made
        without a certificate ends). Checks everything before changing anything. Raises BadRequest, NotFound."""
        await self.device(product_key, device_key)
        unknown = set(body) - {"tags", "requireCertificate"}
        if unknown:
            raise BadRequest(f"unknown device field(s) {sorted(unknown)}; a device takes tags and requireCertificate")
        tags = check_tags(body["tags"]) if "tags" in body else None
        required = (
            check_bool(body["requireCertificate"], "requireCertificate") if "requireCertificate" in body else None
        )
        if tags is not None:
            await self.store.set_device_tags(product_key, device_key, tags)
        if required is not None:
            await self.store.set_require_certificate(product_key, device_key, required)
            await self.sessions.require_certificate(product_key, device_key, required)
        return await self.device(product_key, device_key)

    # ------------------------------------------------------------ device certificates

    async def issue_certificate(self, product_key: str, device_key: str, body: Mapping[str, Any]) -> Issued:
        """Sign the device's CSR (`csr`), or make its key too (returned once). Raises BadRequest, NotFound."""
        await self.device(product_key, device_key)
        unknown = set(body) - {"csr", "validityDays"}
        if unknown:
            raise BadRequest(f"unknown certificate field(s) {sorted(unknown)}; give csr and/or validityDays")
        csr = body.get("csr")
        if csr is not None and (not isinstance(csr, str) or not csr.strip()):
            raise BadRequest("csr must be a PEM certificate signing request")
        days = body.get("validityDays", DEVICE_DAYS)
        if not isinstance(days, int) or isinstance(days, bool):
            raise BadRequest("validityDays must be a whole number of days")
        issued = self.ca.issue_device(product_key, device_key, csr, days)
        await self.store.add_certificate(
            DeviceCertificate(issued.serial, product_key, device_key, issued.fingerprint, issued.not_after, time.time())
        )
        return issued

    async def certificates(self, product_key: str, device_key: str) -> list[DeviceCertificate]:
        """Raises NotFound."""
        await self.device(product_key, device_key)
        return await self.store.list_certificates(product_key, device_key)

    async def revoke_certificate(self, product_key: str, device_key: str, serial: str) -> DeviceCertificate:
        """Refused from now on; the live connection using it ends. Idempotent. Raises NotFound."""
        await self.device(product_key, device_key)
        if not await self.store.revoke_certificate(product_key, device_key, serial.lower()):
            raise NotFound(f"device {product_key}/{device_key} has no certificate {serial!r}")
        await self.sessions.certificate_revoked(product_key, device_key, serial.lower())
        cert = await self.store.get_certificate(serial.lower())
        assert cert is not None
        return cert

    async def delete_device(self, product_key: str, device_key: str) -> None:
        """Remove a device: its active task ends canceled, its history stays, its connection ends. Raises NotFound."""
        if not await self.store.delete_device(product_key, device_key):
            raise NotFound(f"device {device_key!r} not found in {product_key!r}")
        # Its certificates name its keys: they must not identify a device registered later under them.
        await self.store.revoke_all_certificates(product_key, device_key)
        await self.sessions.forget(product_key, device_key)

    async def rotate_secret(self, product_key: str, device_key: str) -> str:
        """A new generated secret (returned once); the old one logs in no more. Raises NotFound."""
        secret = new_secret()
        if not await self.store.set_device_secret(product_key, device_key, self.keys.encrypt(secret)):
            raise NotFound(f"device {device_key!r} not found in {product_key!r}")
        await self.sessions.forget(product_key, device_key)
        return secret

    async def import_devices(self, product_key: str, text: str, content_type: str) -> dict[str, Any]:
        """Bulk import; valid rows are created even when others are rejected. Per-row results."""
        await self.product(product_key)
        rows, columns = import_rows(text, content_type)
        if len(rows) > MAX_IMPORT_ROWS:
            raise BadRequest(f"at most {MAX_IMPORT_ROWS} devices per import")
        rejected: list[dict[str, Any]] = []
        accepted: list[tuple[int, str, str, str, dict[str, str]]] = []
        seen: set[str] = set()
        for i, row in enumerate(rows, start=1):
            try:
                if "_invalid" in row:
                    raise BadRequest("row must be an object")
                dk = check_key(row.get("deviceKey"), "deviceKey")
                if dk in seen:
                    raise BadRequest("deviceKey appears twice in this import")
                secret = new_secret(row.get("deviceSecret"))
                accepted.append((i, dk, secret, _auth(row.get("auth", "sign")), check_tags(row.get("tags"))))
                seen.add(dk)
            except BadRequest as exc:
                rejected.append({"row": i, "deviceKey": row.get("deviceKey"), "reason": exc.message})
        existing = await self.store.existing_device_keys(product_key, [a[1] for a in accepted])
        to_create = []
        for i, dk, secret, auth, tags in accepted:
            if dk in existing:
                rejected.append({"row": i, "deviceKey": dk, "reason": "device already exists"})
            else:
                to_create.append((i, dk, secret, auth, tags))
        await self.store.create_devices(product_key, [(dk, self.keys.encrypt(s), a, t) for _, dk, s, a, t in to_create])
        await self.joiner.devices_created(product_key, [dk for _, dk, *_rest in to_create])
        rejected.sort(key=lambda r: r["row"])
        return {
            "created": len(to_create),
            "rejected": len(rejected),
            "columns": columns,
            "errors": rejected,
            "devices": [{"deviceKey": dk, "deviceSecret": s} for _, dk, s, _a, _t in to_create],
        }
