"""`otabox product|device|firmware|ca ...`: the registry, device identity and firmware commands."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from otabox.cli.client import ApiError, Client, data_dir, progress_bar
from otabox.cli.output import show
from otabox.jobspec import parse_tag


def tags_of(values: Sequence[str] | None) -> dict[str, str]:
    """`--tag site=east` flags -> {"site": "east"}; exits with the parser's message on a bad one."""
    try:
        return dict(parse_tag(v) for v in values or [])
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc


def _product_secret_note(args: argparse.Namespace, answer: dict[str, Any]) -> None:
    if "productSecret" in answer and not args.json:
        print(
            "(the productSecret is shown this once: flash it into the product's devices;"
            " `otabox product rotate-secret` makes a new one)",
            file=sys.stderr,
        )


def cmd_product_add(args: argparse.Namespace, c: Client) -> None:
    body: dict[str, Any] = {"productKey": args.product_key, "name": args.name or args.product_key}
    if args.dynamic_activation:
        body["dynamicActivation"] = True
    made = c.post("/products", body)
    show(args, made)
    _product_secret_note(args, made)


def cmd_product_set(args: argparse.Namespace, c: Client) -> int:
    if args.dynamic_activation is None:
        print("otabox: nothing to change: give --dynamic-activation or --no-dynamic-activation", file=sys.stderr)
        return 2
    changed = c.request("PATCH", f"/products/{args.product_key}", {"dynamicActivation": args.dynamic_activation})
    show(args, changed)
    _product_secret_note(args, changed)
    return 0


def cmd_product_rotate(args: argparse.Namespace, c: Client) -> None:
    answer = c.post(f"/products/{args.product_key}:rotate-secret")
    show(args, answer)
    _product_secret_note(args, answer)


def cmd_product_list(args: argparse.Namespace, c: Client) -> None:
    show(args, c.get("/products", limit=args.limit), ["productKey", "name", "devices", "createdAt"])


def cmd_device_add(args: argparse.Namespace, c: Client) -> None:
    body: dict[str, Any] = {"deviceKey": args.device_key, "tags": tags_of(args.tag), "auth": args.auth}
    if args.secret:
        body["deviceSecret"] = args.secret
    if args.require_certificate:
        body["requireCertificate"] = True
    show(args, c.post(f"/products/{args.product}/devices", body))


def cmd_device_import(args: argparse.Namespace, c: Client) -> int:
    """Exit code 1 when any row was rejected (the others are created all the same)."""
    path = Path(args.file)
    ctype = "application/json" if path.suffix == ".json" else "text/csv"
    result = c.request("POST", f"/products/{args.product}/devices:import", raw=path.read_bytes(), content_type=ctype)
    if args.secrets_out:
        # Created 0600 (and narrowed if it existed) before any secret is written to it.
        fd = os.open(args.secrets_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["deviceKey", "deviceSecret"])
            writer.writerows([d["deviceKey"], d["deviceSecret"]] for d in result["devices"])
    failed = 1 if result["rejected"] else 0
    if args.json:
        show(args, result)
        return failed
    columns = result.get("columns", {})
    if columns.get("format") == "csv":
        read = ", ".join(f"{k} from {v!r}" for k, v in columns.get("understood", {}).items()) or "no header"
        tags = ", ".join(columns.get("tags", [])) or "none"
        print(f"columns: {read}; tags: {tags}; separator {columns.get('delimiter')!r}")
    print(f"created {result['created']}, rejected {result['rejected']}")
    for err in result["errors"]:
        print(f"  row {err['row']} ({err.get('deviceKey')}): {err['reason']}")
    if args.secrets_out:
        print(f"secrets of created devices written to {args.secrets_out}")
    return failed


def cmd_device_list(args: argparse.Namespace, c: Client) -> None:
    query: dict[str, Any] = {
        "limit": args.limit,
        "offset": args.offset,
        "version": args.version,
        "tag": [f"{k}:{v}" for k, v in tags_of(args.tag).items()] or None,
    }
    if args.online is not None:
        query["online"] = args.online
    show(
        args,
        c.get(f"/products/{args.product}/devices", **query),
        ["deviceKey", "version", "online", "lastSeen", "tags"],
    )


def cmd_device_show(args: argparse.Namespace, c: Client) -> None:
    show(args, c.get(f"/products/{args.product}/devices/{args.device_key}"))


def cmd_device_tag(args: argparse.Namespace, c: Client) -> None:
    show(args, c.request("PATCH", f"/products/{args.product}/devices/{args.device_key}", {"tags": tags_of(args.tag)}))


def cmd_device_delete(args: argparse.Namespace, c: Client) -> None:
    c.delete(f"/products/{args.product}/devices/{args.device_key}")
    show(args, {"deleted": args.device_key})


def cmd_device_rotate(args: argparse.Namespace, c: Client) -> None:
    show(args, c.post(f"/products/{args.product}/devices/{args.device_key}:rotate-secret"))


def cmd_device_require_cert(args: argparse.Namespace, c: Client) -> None:
    path = f"/products/{args.product}/devices/{args.device_key}"
    show(args, c.request("PATCH", path, {"requireCertificate": not args.off}))


# ---------------------------------------------------------------- device certificates and the CA


class _OutFile:
    """A file opened before the request and filled after it, so that a path that cannot be
    written fails before the server issues what it shows only once; removed again when it was
    made here and nothing came to fill it."""

    def __init__(self, path: str, private: bool) -> None:
        self.path = path
        self.made = not os.path.lexists(path)
        # A key file must be new: overwriting one could lose the key of a certificate in use.
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if private else 0)
        fd = os.open(path, flags, 0o600 if private else 0o644)
        if private:
            os.fchmod(fd, 0o600)  # 0600 before a byte of the key is in it, whatever the umask
        self.fh: IO[str] = os.fdopen(fd, "w", encoding="utf-8")
        self.filled = False

    def fill(self, text: str) -> None:
        self.fh.truncate(0)
        self.fh.write(text)
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.filled = True

    def close(self) -> None:
        self.fh.close()
        if self.made and not self.filled:
            os.unlink(self.path)


def _read_csr(path: str) -> str | None:
    """The CSR file's PEM text, or None after saying why it is not one (printed)."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    # Checked here, not only by the server: a private key passed by mistake must never be sent.
    if "PRIVATE KEY" in text or "CERTIFICATE REQUEST-----" not in text:
        print(
            f"otabox: {path} is not a PEM certificate signing request (-----BEGIN CERTIFICATE REQUEST-----);"
            " nothing was sent",
            file=sys.stderr,
        )
        return None
    return text


def cmd_device_cert_issue(args: argparse.Namespace, c: Client) -> int:
    """Without -o the certificate goes to stdout and the summary to stderr, so it can be redirected."""
    if args.csr is None and args.key_out is None:
        print(
            "otabox: without --csr the server makes the device's private key and shows it only once:"
            " give --key-out FILE to keep it (or --csr FILE to sign the device's own key); nothing was requested",
            file=sys.stderr,
        )
        return 2
    if args.csr is not None and args.key_out is not None:
        print(
            "otabox: --key-out is for a key the server makes; with --csr the key stays on the device", file=sys.stderr
        )
        return 2
    body: dict[str, Any] = {}
    if args.csr is not None:
        csr = _read_csr(args.csr)
        if csr is None:
            return 1
        body["csr"] = csr
    if args.validity_days is not None:
        body["validityDays"] = args.validity_days
    with contextlib.ExitStack() as stack:
        try:
            key_file = _OutFile(args.key_out, private=True) if args.key_out else None
        except FileExistsError:
            print(
                f"otabox: {args.key_out} exists: a key file is never overwritten; nothing was requested",
                file=sys.stderr,
            )
            return 1
        if key_file:
            stack.callback(key_file.close)
        cert_file = _OutFile(args.output, private=False) if args.output else None
        if cert_file:
            stack.callback(cert_file.close)
        issued = c.post(f"/products/{args.product}/devices/{args.device_key}/certificates", body)
        answer = dict(issued)
        if key_file:
            key_file.fill(answer.pop("privateKey"))
            answer["privateKeyFile"] = key_file.path
        if cert_file:
            cert_file.fill(issued["certificate"])
            answer["certificateFile"] = cert_file.path
    if args.json:
        show(args, answer)
        return 0
    summary = {k: answer[k] for k in ("serial", "fingerprint", "notAfter")}
    if cert_file:
        summary["certificate"] = f"written to {cert_file.path}"
    else:
        sys.stdout.write(issued["certificate"])
    if key_file:
        summary["privateKey"] = f"written to {key_file.path} (0600; the server kept no copy)"
    show(args, summary, file=None if cert_file else sys.stderr)
    return 0


def cmd_device_cert_list(args: argparse.Namespace, c: Client) -> None:
    show(
        args,
        c.get(f"/products/{args.product}/devices/{args.device_key}/certificates"),
        ["serial", "status", "notAfter", "createdAt", "revokedAt"],
    )


def cmd_device_cert_revoke(args: argparse.Namespace, c: Client) -> None:
    show(args, c.delete(f"/products/{args.product}/devices/{args.device_key}/certificates/{args.serial}"))


def cmd_ca_show(args: argparse.Namespace) -> int:
    """From the server at --url (or OTABOX_URL); else from the data dir's file, no server needed."""
    url = args.url or os.environ.get("OTABOX_URL")
    if url:
        try:
            pem = Client(url, None).get_public("/ca.pem")
        except ApiError as exc:
            print(f"otabox ca show: {exc.status} {exc.code}: {exc.message}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"otabox ca show: cannot reach the server at {url}: {exc}", file=sys.stderr)
            return 1
        source = url.rstrip("/") + "/ca.pem"
    else:
        from otabox.server import pki

        path = data_dir(args.data_dir) / pki.CA_DIR / pki.CA_CERT
        try:
            pem = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            print(
                f"otabox ca show: cannot read {path} ({exc}); the server makes it on first start,"
                " or ask a running one with --url",
                file=sys.stderr,
            )
            return 1
        source = str(path)
    if args.json:
        print(json.dumps({"certificate": pem, "from": source}))
    else:
        sys.stdout.write(pem)
    return 0


def cmd_firmware_add(args: argparse.Namespace, c: Client) -> None:
    fields = {
        "name": args.name,
        "version": args.version,
        "signMethod": args.sign_method,
        "enableVerification": "true" if args.enable_verification else "false",
    }
    if args.desc:
        fields["desc"] = args.desc
    bar = None if args.json else progress_bar("uploading")
    show(args, c.upload_firmware(args.product, Path(args.file), fields, bar))


def cmd_firmware_list(args: argparse.Namespace, c: Client) -> None:
    show(
        args,
        c.get(f"/products/{args.product}/firmware", limit=args.limit),
        ["id", "name", "version", "size", "status", "signMethod", "sign"],
    )


def cmd_firmware_show(args: argparse.Namespace, c: Client) -> None:
    show(args, c.get(f"/firmware/{args.id}"))


def cmd_firmware_delete(args: argparse.Namespace, c: Client) -> None:
    c.delete(f"/firmware/{args.id}")
    show(args, {"deleted": args.id})


def cmd_firmware_url(args: argparse.Namespace, c: Client) -> None:
    show(args, c.get(f"/firmware/{args.id}/url", deviceKey=args.device_key))


def register(command: Any, group: Any) -> None:
    products = group("product", "manage products")
    p = command(products, "add", cmd_product_add, "create a product")
    p.add_argument("product_key")
    p.add_argument("--name")
    p.add_argument(
        "--dynamic-activation", action="store_true", help="devices fetch their own secret (productSecret shown once)"
    )
    p = command(products, "list", cmd_product_list, "list products")
    p.add_argument("--limit", type=int, default=100)
    p = command(products, "set", cmd_product_set, "change a product (dynamic activation on or off)")
    p.add_argument("product_key")
    p.add_argument(
        "--dynamic-activation",
        action=argparse.BooleanOptionalAction,
        help="on: a first productSecret, shown once; off: the product secret is dropped",
    )
    p = command(products, "rotate-secret", cmd_product_rotate, "a new product secret (shown once)")
    p.add_argument("product_key")

    devices = group("device", "manage devices")
    p = command(devices, "add", cmd_device_add, "register a device (its secret is shown once)")
    p.add_argument("product")
    p.add_argument("device_key")
    p.add_argument("--secret", help="device secret (generated when omitted)")
    p.add_argument("--tag", action="append", help="key=value (repeatable)")
    p.add_argument("--auth", choices=["sign", "plain"], default="sign")
    p.add_argument("--require-certificate", action="store_true", help="log in only with a device certificate")
    p = command(devices, "import", cmd_device_import, "bulk import from CSV or JSON")
    p.add_argument("product")
    p.add_argument("file")
    p.add_argument("--secrets-out", help="write created devices' secrets to this CSV (0600)")
    p = command(devices, "list", cmd_device_list, "list devices")
    p.add_argument("product")
    p.add_argument("--version")
    p.add_argument("--tag", action="append", help="key=value filter (repeatable)")
    p.add_argument("--online", choices=["true", "false"])
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--offset", type=int, default=0)
    p = command(devices, "show", cmd_device_show, "show one device")
    p.add_argument("product")
    p.add_argument("device_key")
    p = command(devices, "tag", cmd_device_tag, "replace a device's tags")
    p.add_argument("product")
    p.add_argument("device_key")
    p.add_argument("--tag", action="append", help="key=value (repeatable; none clears the tags)")
    p = command(devices, "delete", cmd_device_delete, "delete a device (its active task ends canceled)")
    p.add_argument("product")
    p.add_argument("device_key")
    p = command(devices, "rotate-secret", cmd_device_rotate, "give a device a new secret (shown once)")
    p.add_argument("product")
    p.add_argument("device_key")
    p = command(devices, "require-cert", cmd_device_require_cert, "log in only with a device certificate")
    p.add_argument("--product", required=True)
    p.add_argument("device_key")
    p.add_argument("--off", action="store_true", help="a certificate is no longer required")

    certs = devices.add_parser("cert", help="device certificates (two-way TLS)").add_subparsers(
        dest="cert_action", required=True
    )
    p = command(certs, "issue", cmd_device_cert_issue, "issue a certificate from a CSR, or with a key made now")
    p.add_argument("--product", required=True)
    p.add_argument("device_key")
    p.add_argument("--csr", metavar="FILE", help="the device's PEM CSR (its key never leaves the device)")
    p.add_argument("--validity-days", type=int, metavar="N", help="days the certificate is valid [3650]")
    p.add_argument("-o", "--output", metavar="CERT_OUT", help="write the certificate here [stdout]")
    p.add_argument("--key-out", metavar="KEY_OUT", help="new file (0600) for the key made without --csr")
    p = command(certs, "list", cmd_device_cert_list, "list a device's certificates")
    p.add_argument("--product", required=True)
    p.add_argument("device_key")
    p = command(certs, "revoke", cmd_device_cert_revoke, "revoke a certificate (its live connection ends)")
    p.add_argument("--product", required=True)
    p.add_argument("device_key")
    p.add_argument("serial")

    ca = group("ca", "otabox's certificate authority")
    p = ca.add_parser("show", help="print the CA certificate (PEM) devices and browsers pin")
    p.add_argument("--url", help="ask this server (GET /ca.pem) [OTABOX_URL]")
    p.add_argument("--data-dir", help="else read <data-dir>/ca/ca.pem [OTABOX_DATA_DIR, ./otabox-data]")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.set_defaults(run=cmd_ca_show)

    firmware = group("firmware", "manage firmware")
    p = command(firmware, "add", cmd_firmware_add, "upload a firmware file")
    p.add_argument("product")
    p.add_argument("file")
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--desc")
    p.add_argument("--sign-method", choices=["sha256", "md5"], default="sha256")
    p.add_argument("--enable-verification", action="store_true")
    p = command(firmware, "list", cmd_firmware_list, "list a product's firmware")
    p.add_argument("product")
    p.add_argument("--limit", type=int, default=100)
    p = command(firmware, "show", cmd_firmware_show, "show one firmware")
    p.add_argument("id")
    p = command(firmware, "delete", cmd_firmware_delete, "delete a firmware (409 while a job uses it)")
    p.add_argument("id")
    p = command(firmware, "url", cmd_firmware_url, "mint a download URL for one device")
    p.add_argument("id")
    p.add_argument("device_key")
