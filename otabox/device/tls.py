"""TLS for devices: the client-side `ssl.SSLContext` (pinned CA, optional device certificate) and the CA fetch.

Used by the device SDK (`Device(..., tls_context=make_tls_context(...))`), by `otabox simulate
--tls` and by the benchmark. Standard library only (plus aiohttp for `fetch_ca`): a device
needs no certificate library to speak TLS to otabox.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

import aiohttp

__all__ = ["CA_PATH", "fetch_ca", "make_tls_context"]

CA_PATH = "/ca.pem"  # where an otabox server serves its CA certificate (no token needed)

StrPath = str | os.PathLike[str]


def make_tls_context(
    ca_file: StrPath | None = None,
    *,
    ca_pem: str | bytes | None = None,
    cert_file: StrPath | None = None,
    key_file: StrPath | None = None,
    cert_pem: str | bytes | None = None,
    key_pem: str | bytes | None = None,
    key_password: str | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A client context for otabox's TLS listeners (MQTT over TLS, HTTPS): TLS 1.2 or later.

    Trust: `ca_file` (a PEM file, e.g. the server's `/ca.pem` saved at provisioning) and/or
    `ca_pem` (the same as text), and then only those (pinned); with neither, the system's
    trusted CAs (a server with a publicly trusted certificate). The server's certificate is
    always verified, and its name too unless `check_hostname=False` (to connect to an address
    its certificate does not name).

    Identity (two-way TLS, optional): the device certificate and its private key, as files
    (`cert_file`, `key_file`; the key may sit in the certificate file) or as PEM text
    (`cert_pem`, `key_pem`, e.g. the `certificate` and `privateKey` of
    `POST /api/v1/products/{pk}/devices/{dk}/certificates`). PEM text goes through a private
    temporary file that is deleted before this returns (OpenSSL loads keys from files only).

    Raises ValueError for a certificate without its key (or the other way round) and
    ssl.SSLError / OSError for files that are missing or not what they claim to be.
    """
    if cert_file is not None and cert_pem is not None:
        raise ValueError("give the device certificate as a file or as PEM text, not both")
    if (cert_pem is None) != (key_pem is None):
        raise ValueError("cert_pem and key_pem go together")
    if key_file is not None and cert_file is None:
        raise ValueError("key_file needs cert_file")
    # Pinned: with a CA given, only it is trusted; with none, create_default_context() loads the system's CAs.
    cadata = ca_pem.decode() if isinstance(ca_pem, bytes) else ca_pem
    ctx = ssl.create_default_context(cafile=None if ca_file is None else os.fspath(ca_file), cadata=cadata)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    if cert_file is not None:
        ctx.load_cert_chain(cert_file, key_file, password=key_password)
    elif cert_pem is not None and key_pem is not None:
        load_cert_pem(ctx, cert_pem, key_pem, key_password)
    return ctx


def load_cert_pem(
    ctx: ssl.SSLContext, cert_pem: str | bytes, key_pem: str | bytes, password: str | None = None
) -> None:
    """Load a certificate and key given as PEM text into `ctx` (through a 0600 temporary file)."""

    def text(v: str | bytes) -> bytes:
        b = v.encode() if isinstance(v, str) else v
        return b if b.endswith(b"\n") else b + b"\n"

    fd, name = tempfile.mkstemp(prefix="otabox-device-", suffix=".pem")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(text(cert_pem) + text(key_pem))
        ctx.load_cert_chain(name, password=password)
    finally:
        Path(name).unlink(missing_ok=True)


async def fetch_ca(base_url: str, session: aiohttp.ClientSession | None = None) -> str:
    """The CA certificate (PEM) an otabox server serves at `{base_url}/ca.pem` (no token needed).

    Fetch it once, when the device is provisioned, over a network you trust, and keep it: a
    device that fetches the CA before every connection trusts whoever answers. Raises
    aiohttp.ClientError (404: the server has no CA of its own) and ValueError when the answer
    is not a PEM certificate.
    """
    own = session is None
    http = session or aiohttp.ClientSession()
    try:
        async with http.get(base_url.rstrip("/") + CA_PATH, raise_for_status=True) as resp:
            pem = await resp.text()
    finally:
        if own:
            await http.close()
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise ValueError(f"{base_url}{CA_PATH} did not answer with a PEM certificate")
    return pem
