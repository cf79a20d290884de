"""Firmware files in S3-compatible storage (`--storage-url s3://bucket/prefix?endpoint=...`).

Through the minio SDK (SigV4, multipart uploads, presigned URLs), whose calls block: each runs in
a worker thread. Objects are named by content hash, `{prefix}/{sha256[:2]}/{sha256}`, like the
node's folder, so the same content is stored once whatever firmware records refer to it.
Credentials come from the usual variables: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
AWS_SESSION_TOKEN; the region from `?region=`, AWS_REGION or AWS_DEFAULT_REGION (us-east-1).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

from otabox.errors import StorageUnavailable

T = TypeVar("T")

# Parts of a multipart upload (bytes). S3 allows 10,000 parts of 5 MiB to 5 GiB each: 16 MiB parts
# carry files up to 160 GiB, and a file below one part goes up in a single PUT.
PART_SIZE = 16 * 1024 * 1024
# The longest lifetime SigV4 allows a presigned URL (7 days).
PRESIGN_MAX_SECONDS = 7 * 24 * 3600
TIMEOUT = 30.0  # seconds to connect or to wait for one read from the storage
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
SAFE_NAME = re.compile(r"[A-Za-z0-9._+-]{1,200}")


class StorageConfigError(ValueError):
    """The storage URL or its credentials are unusable (the message says how)."""


@dataclass(frozen=True, slots=True)
class BucketUrl:
    bucket: str
    prefix: str
    endpoint: str  # host[:port], no scheme
    secure: bool
    region: str

    @classmethod
    def parse(cls, url: str, env: Mapping[str, str] = os.environ) -> BucketUrl:
        """`s3://bucket[/prefix][?endpoint=http(s)://host:port][&region=...]`. Raises StorageConfigError."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise StorageConfigError(f"storage URL {url!r}: expected s3://bucket/prefix?endpoint=http://host:port")
        query = parse_qs(parts.query)
        unknown = sorted(set(query) - {"endpoint", "region"})
        if unknown:
            raise StorageConfigError(f"storage URL {url!r}: unknown parameter {unknown[0]!r} (endpoint, region)")
        endpoint = query.get("endpoint", ["https://s3.amazonaws.com"])[-1]
        where = urlsplit(endpoint)
        if where.scheme not in ("http", "https") or not where.netloc or where.path not in ("", "/"):
            raise StorageConfigError(f"storage URL {url!r}: endpoint {endpoint!r} must be http(s)://host[:port]")
        if not BUCKET_NAME.fullmatch(parts.netloc):
            raise StorageConfigError(
                f"storage URL {url!r}: {parts.netloc!r} is not a bucket name (3-63 of a-z 0-9 . -)"
            )
        region = query.get("region", [env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"])[-1]
        return cls(parts.netloc, parts.path.strip("/"), where.netloc, where.scheme == "https", region)

    def key(self, sha256: str) -> str:
        name = f"{sha256[:2]}/{sha256}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def __str__(self) -> str:
        scheme = "https" if self.secure else "http"
        return f"s3://{self.bucket}/{self.prefix} at {scheme}://{self.endpoint}"


class Bucket:
    """The firmware files of every node in one S3 bucket (the shared copy `Artifacts` keeps)."""

    def __init__(self, url: BucketUrl, env: Mapping[str, str] = os.environ) -> None:
        # Imported here: only a server with --storage-url loads the SDK (and urllib3).
        import urllib3
        from minio import Minio

        self.url = url
        self.where = str(url)
        access, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if not access or not secret:
            raise StorageConfigError(
                "--storage-url needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
            )
        timeout = urllib3.Timeout(connect=TIMEOUT, read=TIMEOUT)
        # Few retries: a storage that is down is reported to the caller, not waited on for minutes.
        retries = urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504))
        pool = urllib3.PoolManager(timeout=timeout, retries=retries, maxsize=16)
        self._client = Minio(
            url.endpoint,
            access_key=access,
            secret_key=secret,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            secure=url.secure,
            region=url.region,
            http_client=pool,
        )

    async def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one blocking SDK call in a thread; any failure is StorageUnavailable naming `what`."""
        from minio.error import MinioException
        from urllib3.exceptions import HTTPError

        try:
            return await asyncio.to_thread(fn)
        except (MinioException, HTTPError, ConnectionError, TimeoutError) as exc:
            # Other OSErrors are this node's files (a full disk): they keep their own meaning.
            raise StorageUnavailable(f"firmware storage {self.where}: {what} failed: {_reason(exc)}") from exc

    async def check(self) -> None:
        """That the bucket is there and these credentials may use it. Raises StorageUnavailable."""
        exists = await self._call("checking the bucket", lambda: self._client.bucket_exists(self.url.bucket))
        if not exists:
            raise StorageUnavailable(f"firmware storage {self.where}: the bucket {self.url.bucket!r} does not exist")

    async def has(self, sha256: str) -> bool:
        key = self.url.key(sha256)
        return await self._call(
            f"looking up {sha256[:12]}", lambda: _found(self._client.stat_object, self.url.bucket, key)
        )

    async def put(self, sha256: str, path: Path) -> None:
        """The file at `path` as the object of `sha256`; multipart past one part."""

        def upload() -> None:
            self._client.fput_object(
                self.url.bucket,
                self.url.key(sha256),
                str(path),
                content_type="application/octet-stream",
                part_size=PART_SIZE,
            )

        await self._call(f"storing {sha256[:12]}", upload)

    async def fetch(self, sha256: str, dest: Path) -> bool:
        """The object of `sha256` into the file `dest`; False when there is no such object."""
        key = self.url.key(sha256)
        get = self._client.fget_object
        return await self._call(f"fetching {sha256[:12]}", lambda: _found(get, self.url.bucket, key, str(dest)))

    async def delete(self, sha256: str) -> None:
        await self._call(
            f"deleting {sha256[:12]}", lambda: self._client.remove_object(self.url.bucket, self.url.key(sha256))
        )

    def presign(self, sha256: str, seconds: float, file_name: str) -> str:
        """A GET URL of the object, good for `seconds` (at most 7 days). Computed here, no request:
        the region is known, so the SDK does not ask the storage for it."""
        lifetime = timedelta(seconds=max(1, min(int(seconds), PRESIGN_MAX_SECONDS)))
        # The device sees the firmware's file name, as from the node's own URL.
        headers: dict[str, str | list[str] | tuple[str]] | None
        headers = (
            {"response-content-disposition": f'attachment; filename="{file_name}"'}
            if SAFE_NAME.fullmatch(file_name)
            else None
        )
        return str(
            self._client.presigned_get_object(
                self.url.bucket, self.url.key(sha256), expires=lifetime, response_headers=headers
            )
        )


def _found(call: Callable[..., object], *args: str) -> bool:
    """`call(*args)`; False when the storage answers that there is no such object."""
    from minio.error import S3Error

    try:
        call(*args)
        return True
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
            return False
        raise


def _reason(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None)
    if code and message:
        return f"{code}: {message}"
    return str(exc) or type(exc).__name__
