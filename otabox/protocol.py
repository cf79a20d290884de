"""The device wire format (docs/protocol.md): login signing, topics, envelopes.

Pure functions and small frozen dataclasses only; no aiohttp, amqtt or aiosqlite here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from dataclasses import dataclass
from typing import Any

# Used with fullmatch: `$` would also match before a trailing newline ("dk\n" is no key).
KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Versions are free text: 1-64 printable characters (no control characters, no lone surrogates).
VERSION_RE = re.compile(r"[\x20-\x7e\u00a0-\ud7ff\ue000-\U0010ffff]{1,64}")

SIGN_METHODS = ("hmacsha256", "hmacsha1", "hmacmd5")

# Device -> server OTA topics (suffix after /sys/{pk}/{dk}/) and the methods seen in the wild.
INFORM = "ota/device/inform"
PROGRESS = "ota/device/progress"
GETVERSION = "ota/device/getversion"
REQUEST = "ota/device/request"
UPGRADE = "ota/device/upgrade"
UPGRADE_REPLY = "ota/device/upgrade_reply"

DEVICE_TOPICS = (INFORM, PROGRESS, GETVERSION, REQUEST, UPGRADE_REPLY)

# EnOS dynamic activation (secure mode 3) runs on session topics, not below /sys/: the server
# sends the device its secret on ACTIVATE_INFO and the device answers on ACTIVATE_REPLY.
ACTIVATE_INFO = "thing/activate/info"
ACTIVATE_REPLY = "thing/activate/info_reply"
ACTIVATE_METHOD = "thing.activate.info"

# Secure modes of an EnOS client id: 2 signs with the device secret, 3 with the product secret
# (a registered device not yet activated, which gets its device secret on connect).
MODE_DEVICE_SECRET = "2"
MODE_PRODUCT_SECRET = "3"

CODE_OK = 200
CODE_BAD_REQUEST = 400
CODE_FORBIDDEN = 403
CODE_NOT_FOUND = 404
CODE_CONFLICT = 409
CODE_INTERNAL = 500

# Progress step failure codes (spec 3.3).
STEP_FAILED = -1
STEP_DOWNLOAD_FAILED = -2
STEP_VERIFY_FAILED = -3
STEP_FLASH_FAILED = -4
STEP_DECLINED = -5


class ProtocolError(ValueError):
    """A device message that cannot be understood; answered with code 400."""


def valid_key(key: object) -> bool:
    return isinstance(key, str) and bool(KEY_RE.fullmatch(key))


def valid_version(version: object) -> bool:
    return isinstance(version, str) and bool(VERSION_RE.fullmatch(version)) and version.strip() != ""


# ---------------------------------------------------------------- login


@dataclass(frozen=True, slots=True)
class LoginRequest:
    """What a CONNECT says about who the device claims to be."""

    product_key: str
    device_key: str
    client_device_key: str
    secure_mode: str | None
    sign_method: str | None
    timestamp: str | None


def parse_login(client_id: str | None, username: str | None) -> LoginRequest:
    """Parse the EnOS client id and username. Raises ProtocolError when malformed."""
    if not username or "&" not in username:
        raise ProtocolError("username must be {deviceKey}&{productKey}")
    device_key, _, product_key = username.partition("&")
    if not valid_key(device_key) or not valid_key(product_key):
        raise ProtocolError("bad device or product key in username")
    client_id = client_id or ""
    head, sep, rest = client_id.partition("|")
    params: dict[str, str] = {}
    if sep:
        body = rest[:-1] if rest.endswith("|") else rest
        for item in body.split(","):
            if not item:
                continue
            name, eq, value = item.partition("=")
            if not eq:
                raise ProtocolError(f"bad client id parameter {item!r}")
            params[name.strip().lower()] = value.strip()
    return LoginRequest(
        product_key=product_key,
        device_key=device_key,
        client_device_key=head,
        secure_mode=params.get("securemode"),
        sign_method=params.get("signmethod", "").lower() or None,
        timestamp=params.get("timestamp"),
    )


def sign(params: dict[str, str], secret: str, method: str) -> str:
    """EnOS secure-mode-2 sign: a plain digest of sorted key+value pairs followed by the secret.

    Raises ProtocolError for an unknown method. SHA-1 is upper case, as the EnOS SDKs send it.
    """
    text = "".join(f"{k}{params[k]}" for k in sorted(params)) + secret
    data = text.encode("utf-8")
    if method == "hmacsha256":
        return hashlib.sha256(data).hexdigest()
    if method == "hmacsha1":
        return hashlib.sha1(data).hexdigest().upper()
    if method == "hmacmd5":
        return hashlib.md5(data).hexdigest()
    raise ProtocolError(f"unknown sign method {method!r}")


def login_params(device_key: str, product_key: str, timestamp: str) -> dict[str, str]:
    return {
        "clientId": device_key,
        "deviceKey": device_key,
        "productKey": product_key,
        "timestamp": timestamp,
    }


def check_password(login: LoginRequest, password: str, secret: str, auth: str, mode: str = MODE_DEVICE_SECRET) -> bool:
    """True when the password proves knowledge of `secret`: the device secret (sign or plain auth),
    or with `mode` MODE_PRODUCT_SECRET the product secret (always signed)."""
    if login.client_device_key != login.device_key:
        return False
    if auth == "plain" and mode == MODE_DEVICE_SECRET:
        return hmac.compare_digest(password.encode(), secret.encode())
    if login.secure_mode != mode or login.sign_method not in SIGN_METHODS or login.timestamp is None:
        return False
    expected = sign(login_params(login.device_key, login.product_key, login.timestamp), secret, login.sign_method)
    # Hex digests: compare case-insensitively (SDKs differ in case for SHA-1).
    return hmac.compare_digest(expected.lower().encode(), password.strip().lower().encode())


def client_id_for(device_key: str, sign_method: str, timestamp: str, mode: str = MODE_DEVICE_SECRET) -> str:
    return f"{device_key}|securemode={mode},signmethod={sign_method},timestamp={timestamp}|"


# ---------------------------------------------------------------- topics


def device_prefix(product_key: str, device_key: str) -> str:
    return f"/sys/{product_key}/{device_key}/"


def topic_for(product_key: str, device_key: str, suffix: str) -> str:
    return device_prefix(product_key, device_key) + suffix


def session_topic(product_key: str, device_key: str, suffix: str) -> str:
    return f"/ext/session/{product_key}/{device_key}/{suffix}"


def topic_allowed(topic: str, product_key: str, device_key: str, *, is_filter: bool) -> bool:
    """A device may use only topics below its own /sys/{pk}/{dk}/ (wildcards only after it),
    and publish its activation reply on its own session topic."""
    if not is_filter and topic == session_topic(product_key, device_key, ACTIVATE_REPLY):
        return True
    prefix = device_prefix(product_key, device_key)
    if not topic.startswith(prefix) or len(topic) == len(prefix):
        return False
    rest = topic[len(prefix) :]
    if not is_filter:
        return "+" not in rest and "#" not in rest
    levels = rest.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def device_suffix(topic: str, product_key: str, device_key: str) -> str | None:
    prefix = device_prefix(product_key, device_key)
    return topic[len(prefix) :] if topic.startswith(prefix) else None


def handled_suffix(topic: str, product_key: str, device_key: str) -> str | None:
    """The suffix a device's PUBLISH is handled under (one of DEVICE_TOPICS or ACTIVATE_REPLY),
    or None for a topic of its own that the server does not read."""
    if topic == session_topic(product_key, device_key, ACTIVATE_REPLY):
        return ACTIVATE_REPLY
    suffix = device_suffix(topic, product_key, device_key)
    return suffix if suffix in DEVICE_TOPICS else None


def activation(msg_id: str, product_key: str, device_key: str, device_secret: str) -> bytes:
    """The message that gives a device activated by product secret its own secret."""
    params = {"productKey": product_key, "deviceKey": device_key, "deviceSecret": device_secret}
    return request(msg_id, ACTIVATE_METHOD, params)


# ---------------------------------------------------------------- envelopes


@dataclass(frozen=True, slots=True)
class Request:
    id: str | int | float | None
    method: str
    params: dict[str, Any]


def parse_request(payload: bytes) -> Request:
    """Parse a device request envelope. Raises ProtocolError (the caller answers 400)."""
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"payload is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ProtocolError("payload must be a JSON object")
    msg_id = data.get("id")
    if msg_id is not None and (isinstance(msg_id, bool) or not isinstance(msg_id, str | int | float)):
        raise ProtocolError("id must be a string or number")
    params = data.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ProtocolError("params must be an object")
    method = data.get("method", "")
    return Request(id=msg_id, method=str(method) if method is not None else "", params=params)


def request_id(payload: bytes) -> str | int | float | None:
    """Best-effort id of a malformed request, so the error reply can still echo it."""
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    ident = data.get("id") if isinstance(data, dict) else None
    return ident if isinstance(ident, str | int) else None


# json.dumps with any option builds a new encoder per call; replies and pushes go out per
# message, so one encoder with the same options (the same text) serves them all.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def reply(msg_id: str | int | float | None, code: int, data: Any = None, message: str | None = None) -> bytes:
    body: dict[str, Any] = {"id": msg_id, "code": code, "data": {} if data is None else data}
    if message:
        body["message"] = message
    return _COMPACT.encode(body).encode()


def request(msg_id: str, method: str, params: dict[str, Any]) -> bytes:
    body = {"id": msg_id, "version": "1.0", "method": method, "params": params}
    return _COMPACT.encode(body).encode()


def parse_version(params: dict[str, Any]) -> str:
    version = params.get("version")
    # The EnOS Python SDK's own sample reports `set_version(1.0)`: a JSON number.
    if isinstance(version, int | float) and not isinstance(version, bool):
        version = str(version)
    if not valid_version(version):
        raise ProtocolError("params.version must be a string of 1-64 printable characters")
    assert isinstance(version, str)
    return version


@dataclass(frozen=True, slots=True)
class Progress:
    step: int
    desc: str | None


def parse_progress(params: dict[str, Any]) -> Progress:
    """A progress report: step 0..100 or a negative failure code. Raises ProtocolError."""
    raw = params.get("step")
    if isinstance(raw, bool):
        raise ProtocolError("step must be a number")
    try:
        if isinstance(raw, str):
            step_f = float(raw.strip())
        elif isinstance(raw, int | float):
            step_f = float(raw)
        else:
            raise ProtocolError("step is required")
    except ValueError as exc:
        raise ProtocolError(f"step {raw!r} is not a number") from exc
    # NaN and infinities ("nan", 1e400, JSON NaN) would make int() raise below: a 500, not a 400.
    # A failure code is a small negative number; one past 32 bits is no code (and no database integer).
    if not math.isfinite(step_f) or step_f != int(step_f) or not -(2**31) <= step_f <= 100:
        raise ProtocolError(f"step {raw!r} out of range (0..100, or negative for failure)")
    desc = params.get("desc")
    if desc is not None and not isinstance(desc, str):
        desc = json.dumps(desc)
    return Progress(step=int(step_f), desc=desc[:1000] if desc else None)


def reply_code(payload: bytes) -> tuple[int, str | None]:
    """Code and message of an upgrade_reply. Raises ProtocolError."""
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError("reply is not JSON") from exc
    if not isinstance(data, dict):
        raise ProtocolError("reply must be a JSON object")
    code = data.get("code")
    try:
        code_i = int(code)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError("reply code must be a number") from exc
    message = data.get("message") or data.get("msg")
    return code_i, str(message) if message else None
