"""A real S3-compatible server for the tests (a pytest plugin, registered in conftest.py).

`s3_server`, once per session: SeaweedFS as `scripts/s3` starts it (free ports of 127.0.0.1, one
bucket, one access key). `S3.start(tmp)` starts another for one test (one the test may stop).
When it cannot be started the tests that need it fail, loudly: they are never skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "s3"
START_TIMEOUT = 120


@dataclass
class S3:
    url: str  # what --storage-url takes
    endpoint: str
    bucket: str
    prefix: str
    access_key: str
    secret_key: str
    dir: str

    @classmethod
    def start(cls, folder: Path | None = None) -> S3:
        argv = [sys.executable, str(SCRIPT), "start"] + ([str(folder)] if folder else [])
        # --owner-pid: stopped also when this run is killed (pytest-timeout ends it with os._exit).
        argv += ["--owner-pid", str(os.getpid())]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT, check=False)
        if done.returncode:
            pytest.fail(f"the S3 server could not be started (scripts/s3 start):\n{done.stderr}")
        info = json.loads(done.stdout.strip().splitlines()[-1])
        prefix = info["url"].split("?")[0].removeprefix(f"s3://{info['bucket']}/")
        return cls(
            info["url"], info["endpoint"], info["bucket"], prefix, info["access_key"], info["secret_key"], info["dir"]
        )

    def stop(self) -> None:
        subprocess.run([sys.executable, str(SCRIPT), "stop", self.dir], timeout=60, check=False)

    @property
    def env(self) -> dict[str, str]:
        """The variables a server (or `otabox db copy`) reads its S3 keys from."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def client(self) -> Any:
        from minio import Minio

        host = self.endpoint.removeprefix("http://")
        return Minio(host, access_key=self.access_key, secret_key=self.secret_key, secure=False, region="us-east-1")

    def objects(self) -> dict[str, int]:
        """Every object under the prefix: {name: size}."""
        listed = self.client().list_objects(self.bucket, prefix=self.prefix + "/", recursive=True)
        return {o.object_name: o.size for o in listed}

    def sha256_of(self, name: str) -> str:
        resp = self.client().get_object(self.bucket, name)
        try:
            return hashlib.sha256(resp.read()).hexdigest()
        finally:
            resp.close()
            resp.release_conn()

    def key(self, sha256: str, prefix: str | None = None) -> str:
        """The object of `sha256` under `prefix` (default: the server's own)."""
        return f"{prefix or self.prefix}/{sha256[:2]}/{sha256}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3]:
    server = S3.start()
    try:
        yield server
    finally:
        server.stop()
