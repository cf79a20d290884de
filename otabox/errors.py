"""Exceptions that carry their HTTP status and error slug; one JSON error shape."""

from __future__ import annotations

from typing import Any


class OtaboxError(Exception):
    """Base error: `status` is the HTTP status, `code` the stable slug in the JSON body."""

    status = 500
    code = "internal"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(OtaboxError):
    status = 400
    code = "invalid"


class Unauthorized(OtaboxError):
    status = 401
    code = "unauthorized"


class Forbidden(OtaboxError):
    status = 403
    code = "forbidden"


class NotFound(OtaboxError):
    status = 404
    code = "not-found"


class Conflict(OtaboxError):
    status = 409
    code = "conflict"


class TooLarge(OtaboxError):
    status = 413
    code = "too-large"


class InsufficientStorage(OtaboxError):
    """The data dir's file system (or the database's) is full: nothing of the request was kept."""

    status = 507
    code = "disk-full"


class StorageUnavailable(OtaboxError):
    """The firmware storage (S3) did not answer or refused: nothing of the request was kept."""

    status = 503
    code = "storage-unavailable"
