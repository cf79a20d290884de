"""A small synchronous client for the management API (used by the CLI and scripts)."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import ssl
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any


class ApiError(Exception):
    """A non-2xx answer: `status`, `code` and `message` from the JSON error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def data_dir(value: str | None) -> Path:
    """The data dir a command means: `--data-dir`, else OTABOX_DATA_DIR, else ./otabox-data."""
    return Path(value or os.environ.get("OTABOX_DATA_DIR") or "./otabox-data")


def discover_url(data_dir_arg: str | None) -> str:
    """Base URL from OTABOX_URL, else `<data-dir>/ports.json`, else http://127.0.0.1:8080."""
    if os.environ.get("OTABOX_URL"):
        return os.environ["OTABOX_URL"].rstrip("/")
    ports = data_dir(data_dir_arg) / "ports.json"
    try:
        return f"http://127.0.0.1:{json.loads(ports.read_text())['http']}"
    except (OSError, ValueError, KeyError):
        return "http://127.0.0.1:8080"


class Client:
    """Management API client. Methods raise ApiError for error answers and OSError when unreachable."""

    def __init__(
        self, base_url: str, token: str | None, timeout: float = 30.0, context: ssl.SSLContext | None = None
    ) -> None:
        """`context`: TLS settings for an https URL (e.g. a pinned CA); None: the system's trusted CAs."""
        self.base = urllib.parse.urlsplit(base_url.rstrip("/"))
        self.token = token
        self.timeout = timeout
        self.context = context

    def _conn(self) -> http.client.HTTPConnection:
        host = self.base.hostname or "127.0.0.1"
        port = self.base.port or (443 if self.base.scheme == "https" else 80)
        if self.base.scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self.context)
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update(extra or {})
        return headers

    def _path(self, path: str, query: dict[str, Any] | None = None) -> str:
        full = self.base.path + "/api/v1" + path
        if query:
            pairs = [(k, v) for k, v in query.items() if v is not None]
            full += "?" + urllib.parse.urlencode(pairs, doseq=True)
        return full

    @staticmethod
    def _result(resp: http.client.HTTPResponse) -> Any:
        body = resp.read()
        if resp.status >= 400:
            try:
                err = json.loads(body)["error"]
                raise ApiError(resp.status, err.get("code", "error"), err.get("message", ""))
            except (ValueError, KeyError, TypeError):
                raise ApiError(resp.status, "error", body.decode(errors="replace")[:500]) from None
        if not body:
            return None
        ctype = resp.getheader("Content-Type", "")
        return json.loads(body) if ctype.split(";")[0].strip() == "application/json" else body.decode()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
        raw: bytes | None = None,
        content_type: str | None = None,
    ) -> Any:
        conn = self._conn()
        try:
            data = raw
            headers = self._headers()
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            elif content_type:
                headers["Content-Type"] = content_type
            conn.request(method, self._path(path, query), body=data, headers=headers)
            return self._result(conn.getresponse())
        finally:
            conn.close()

    def download(self, method: str, path: str, out: Path, progress: Callable[[int, int], None] | None = None) -> int:
        """Stream a response body into `out` (via `out.part`, 0600); returns its size. Raises ApiError."""
        conn = self._conn()
        part = out.with_name(out.name + ".part")
        try:
            conn.request(method, self._path(path), body=b"", headers=self._headers())
            resp = conn.getresponse()
            if resp.status >= 400:
                self._result(resp)  # raises ApiError with the server's message
            total, done = int(resp.getheader("Content-Length") or 0), 0
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                while chunk := resp.read(1024 * 1024):
                    fh.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, max(total, done))
            os.replace(part, out)
            return done
        finally:
            part.unlink(missing_ok=True)
            conn.close()

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query)

    def get_public(self, path: str) -> Any:
        """GET a path outside /api/v1 that needs no token (e.g. /ca.pem); none is sent. Raises ApiError."""
        conn = self._conn()
        try:
            conn.request("GET", self.base.path + path, headers={"Accept": "*/*"})
            return self._result(conn.getresponse())
        finally:
            conn.close()

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body=body if body is not None else {})

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def upload_firmware(
        self,
        product_key: str,
        file: Path,
        fields: dict[str, str],
        progress: Callable[[int, int], None] | None = None,
    ) -> Any:
        """Upload a firmware file with its form fields (see `upload_file`)."""
        return self.upload_file(f"/products/{product_key}/firmware", file, fields, progress)

    def upload_file(
        self,
        path: str,
        file: Path,
        fields: dict[str, str],
        progress: Callable[[int, int], None] | None = None,
    ) -> Any:
        """POST a file as the `file` part of multipart/form-data to `path` (never read whole into memory)."""
        boundary = "otabox-" + secrets.token_hex(12)
        head = b""
        for name, value in fields.items():
            head += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n').encode()
        head += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        size = file.stat().st_size
        conn = self._conn()
        try:
            conn.putrequest("POST", self._path(path))
            for k, v in self._headers(
                {
                    "Content-Type": f"multipart/form-data; boundary={boundary}",
                    "Content-Length": str(len(head) + size + len(tail)),
                }
            ).items():
                conn.putheader(k, v)
            conn.endheaders()
            conn.send(head)
            sent = 0
            refused_early = False
            with open(file, "rb") as fh:
                while chunk := fh.read(1024 * 1024):
                    try:
                        conn.send(chunk)
                    except (BrokenPipeError, ConnectionResetError):
                        refused_early = True  # the server refused early (e.g. 413); read its answer
                        break
                    sent += len(chunk)
                    if progress:
                        progress(sent, size)
            if not refused_early:
                conn.send(tail)
            return self._result(conn.getresponse())
        finally:
            conn.close()


def progress_bar(label: str) -> Callable[[int, int], None]:
    """A one-line progress bar on stderr (only when it is a terminal)."""
    tty = sys.stderr.isatty()

    def show(done: int, total: int) -> None:
        if not tty or total <= 0:
            return
        width = 30
        filled = int(width * done / total)
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {100 * done // total:3d}%{end}")
        sys.stderr.flush()

    return show
