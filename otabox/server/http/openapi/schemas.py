"""JSON Schemas of the OpenAPI document, derived from the code's own definitions.

Every record's response schema comes from running its presenter (`present`) over sample records made
from the model's type hints, so a field added to a presenter is in the document at once; the job body
and the job settings come from the job-spec table (`jobspec.JOB_FIELDS`); key and version patterns
from `protocol`.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

from otabox import jobspec, models, protocol
from otabox.jobspec import JOB_FIELDS, WAVE_FIELDS, JobField
from otabox.models import TASK_STATES, JobSpec
from otabox.server import present

JSON = "application/json"
Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def anchored(pattern: str) -> str:
    # JSON Schema patterns search; the server's regexes are used with fullmatch.
    return f"^(?:{pattern})$"


def nullable(schema: Schema) -> Schema:
    """`schema` or null."""
    if not schema:
        return schema
    if isinstance(schema.get("type"), str):
        out = {**schema, "type": [schema["type"], "null"]}
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
        return out
    return {"anyOf": [schema, {"type": "null"}]}


# ---------------------------------------------------------------- records, from their presenters


def _sample(hint: Any, full: bool) -> Any:
    """A value of type `hint`: `full` fills everything (optional values too), else empty and None."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        rest = [a for a in args if a is not type(None)]
        return _sample(rest[0], full) if full or len(rest) == len(args) else None
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return next(iter(hint))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _instance(hint, full, {})
    if origin is dict:
        return {"k": _sample(args[1], full)} if full else {}
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return (_sample(args[0], full),) if full else ()
        return tuple(_sample(a, full) for a in args)
    simple: dict[Any, tuple[Any, Any]] = {bool: (True, False), int: (1, 0), float: (1.5, 0.0), str: ("x", "")}
    return simple[hint][0 if full else 1] if hint in simple else {}


def _instance(cls: Any, full: bool, given: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: given.get(f.name, _sample(hints[f.name], full)) for f in dataclasses.fields(cls)})


def _type_schema(hint: Any) -> Schema:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and args:
        return {"type": "array", "items": _type_schema(args[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1])}
    return {
        bool: {"type": "boolean"},
        int: {"type": "integer"},
        float: {"type": "number"},
        str: {"type": "string"},
    }.get(hint, {})


def _members(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if typing.get_origin(hint) in (types.UnionType, typing.Union) else (hint,)


def _value_schema(value: Any, hint: Any) -> Schema:
    """The schema of a presented value, refined by the type hint of the field it came from."""
    kinds = [h for h in _members(hint) if h is not type(None)]
    if isinstance(value, bool):
        return {"type": "boolean"}
    if isinstance(value, int):
        return {"type": "integer"}
    if isinstance(value, float):
        return {"type": "number"}
    if isinstance(value, str):
        enums = [h for h in kinds if isinstance(h, type) and issubclass(h, enum.Enum)]
        if enums:
            return {"type": "string", "enum": [m.value for m in enums[0]]}
        # Times are epoch floats in the records and ISO strings on the wire (`models.iso`).
        return {"type": "string", "format": "date-time"} if float in kinds else {"type": "string"}
    if isinstance(value, dict | list):
        typed = [_type_schema(h) for h in kinds if typing.get_origin(h) in (dict, tuple)]
        if typed:
            return typed[0]
        return {"type": "object"} if isinstance(value, dict) else {"type": "array"}
    return {}


def _snake(key: str) -> str:
    return re.sub(r"([A-Z])", r"_\1", key).lower()


def record(
    cls: Any,
    show: Callable[[Any], Mapping[str, Any]],
    overrides: Mapping[str, Schema] | None = None,
    given: Mapping[str, Any] | None = None,
) -> Schema:
    """The schema of what `show` makes of a `cls` record: keys from a full and an empty sample
    (required when both have them, nullable when either is null), types from the values and hints."""
    hints = typing.get_type_hints(cls)
    shown = [show(_instance(cls, full, given or {})) for full in (True, False)]
    keys = list(dict.fromkeys([*shown[0], *shown[1]]))
    props: dict[str, Schema] = {}
    for key in keys:
        values = [s[key] for s in shown if key in s]
        known = [v for v in values if v is not None]
        if overrides and key in overrides:
            schema = overrides[key]
        else:
            schema = _value_schema(known[0], hints.get(_snake(key))) if known else {}
        props[key] = nullable(schema) if len(known) < len(values) else schema
    required = [k for k in keys if all(k in s for s in shown)]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def extend(base: Schema, extra: Mapping[str, Schema], required: tuple[str, ...] = ()) -> Schema:
    """`base` with more properties (what a handler adds beside the presented record)."""
    return {
        **base,
        "properties": {**base["properties"], **extra},
        "required": [*base["required"], *required],
    }


# ---------------------------------------------------------------- the job body, from JOB_FIELDS

HHMM = r"^([01]?[0-9]|2[0-4]):[0-5][0-9]$"
# Kinds whose null means "not given" (the default applies), as `jobspec.validate` reads them.
NULL_IS_ABSENT = frozenset({"int", "number", "waves", "time", "window"})


def _bounds(f: JobField) -> Schema:
    out: Schema = {}
    if f.minimum is not None:
        out["exclusiveMinimum" if f.exclusive_minimum else "minimum"] = f.minimum
    if f.maximum is not None:
        out["maximum"] = f.maximum
    return out


def _wave_item() -> Schema:
    return {
        "type": "object",
        "properties": {f.key: {**field_schema(f), "description": f.help} for f in WAVE_FIELDS},
        "required": [f.key for f in WAVE_FIELDS if f.required],
        "additionalProperties": False,
    }


def _item_pattern(pattern: str) -> str:
    return VERSION_PATTERN if pattern == protocol.VERSION_RE.pattern else anchored(pattern)


def field_schema(f: JobField) -> Schema:
    """One table field as JSON Schema (null not included)."""
    by_kind: dict[str, Callable[[], Schema]] = {
        "text": lambda: {"type": "string", **({"maxLength": int(f.maximum)} if f.maximum else {})},
        "choice": lambda: {"type": "string", "enum": [str(c) for c in f.choices]},
        "int": lambda: {"type": "integer", **_bounds(f)},
        "number": lambda: {"type": "number", **_bounds(f)},
        "bool": lambda: {"type": "boolean"},
        "list": lambda: {
            "type": "array",
            "minItems": 1,
            "items": {"type": "string", **({"pattern": _item_pattern(f.pattern)} if f.pattern else {})},
        },
        "tags": lambda: {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {
                "anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}}]
            },
        },
        "waves": lambda: {"type": "array", "minItems": 1, "items": _wave_item()},
        "time": lambda: {"type": "string", "format": "date-time"},
        "window": lambda: {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "string", "pattern": HHMM}},
    }
    schema = by_kind[f.kind]()
    if f.default is not None:
        schema["default"] = f.default
    return schema


def _described(f: JobField, request: bool) -> Schema:
    schema = field_schema(f)
    text = f.help + (f" ({f.unit})" if f.unit and f.unit != "%" else "")
    if request and f.kind in NULL_IS_ABSENT:
        schema = nullable(schema)
        text += " null: not given."
    if f.kind == "waves":
        text += " Percents increase; the last is 100."
    return {**schema, "description": text}


def _groups(request: bool) -> dict[str, Schema]:
    """The body's top-level fields; dotted paths become objects, in table order."""
    top: dict[str, Schema] = {}
    for f in JOB_FIELDS:
        head, _, rest = f.path.partition(".")
        if not rest:
            top[head] = _described(f, request)
            continue
        group = top.setdefault(
            head, {"type": "object", "properties": {}, "required": [], "additionalProperties": False}
        )
        group["properties"][rest] = _described(f, request)
        if f.required:
            group["required"].append(rest)
    return top


def job_body_schema() -> Schema:
    """The `POST /jobs` body: every field of the table, unknown ones refused."""
    props = _groups(request=True)
    for name, schema in props.items():
        if schema.get("type") == "object" and "properties" in schema:
            props[name] = nullable(schema)  # an object given as null is an empty one
    props["name"] = nullable(props["name"])
    props["name"]["description"] = f"{jobspec.FIELDS['name'].help} null or empty: the default."
    return {
        "type": "object",
        "properties": props,
        "required": [f.path for f in JOB_FIELDS if f.required and "." not in f.path],
        "additionalProperties": False,
    }


def _example_value(f: JobField, index: int) -> Any:
    if f.default is not None:
        return f.default
    by_kind: dict[str, Any] = {
        "text": {"firmwareId": "fw-d990fce2e80548ce"}.get(f.path, "main-fw 2.0, east site"),
        "int": f.maximum if f.maximum is not None else (f.minimum or 0) + 10,
        "number": f.maximum if f.maximum is not None else (f.minimum or 0) + 60,
        "list": ["dev-001", "dev-002"] if f.pattern == protocol.KEY_RE.pattern else ["1.0.0"],
        "tags": {"site": ["east"]},
        "waves": [{"percent": 10, "successRatio": 0.95}, {"percent": 100}],
        "time": f"2030-01-{index:02d}T00:00:00Z",  # the table lists start before end
        "window": ["01:00", "05:00"],
    }
    return by_kind[f.kind]


def example_job_body() -> dict[str, Any]:
    """A body with every field of the table (what the document shows; `jobspec.validate` takes it)."""
    body: dict[str, Any] = {}
    for i, f in enumerate(JOB_FIELDS):
        head, _, rest = f.path.partition(".")
        if rest:
            body.setdefault(head, {})[rest] = _example_value(f, i)
        else:
            body[head] = _example_value(f, i)
    body["abort"]["failureRatio"] = 0.2  # the table's maximum (1) would never abort
    return body


def settings_schema() -> dict[str, Schema]:
    """The job's settings as `jobspec.to_json` shows them: the table's fields, filled in."""
    fields = _groups(request=False)
    shown = [jobspec.to_json(jobspec.validate(example_job_body())), jobspec.to_json(JobSpec())]
    out: dict[str, Schema] = {}
    for key in dict.fromkeys([*shown[0], *shown[1]]):
        schema = {k: v for k, v in fields[key].items() if k != "default"}
        out[key] = nullable(schema) if any(s.get(key, 0) is None for s in shown) else schema
    return out


def settings_required() -> list[str]:
    shown = [jobspec.to_json(jobspec.validate(example_job_body())), jobspec.to_json(JobSpec())]
    return [k for k in shown[0] if all(k in s for s in shown)]


# ---------------------------------------------------------------- components

KEY: Schema = {"type": "string", "pattern": anchored(protocol.KEY_RE.pattern)}
# protocol.VERSION_RE's set written as its complement: the same strings, but a fuzzer draws from a
# negated class at once where the spelled-out ranges of all of Unicode take it seconds per value
# (tests/test_openapi.py checks the two agree on every code point).
VERSION_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\ud800-\udfff]{1,64}$"
VERSION: Schema = {"type": "string", "pattern": VERSION_PATTERN}
TIME: Schema = {"type": "string", "format": "date-time"}
ERROR: Schema = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "pattern": "^[a-z][a-z-]*$", "description": "A stable slug."},
                "message": {"type": "string", "description": "For people; names the field at fault."},
            },
            "required": ["code", "message"],
        }
    },
    "required": ["error"],
}


def obj(props: Mapping[str, Schema], required: tuple[str, ...] = (), closed: bool = True) -> Schema:
    out: Schema = {"type": "object", "properties": dict(props), "required": list(required)}
    if closed:
        out["additionalProperties"] = False
    return out


def listing(item: Schema) -> Schema:
    return obj(
        {"items": {"type": "array", "items": item}, "total": {"type": "integer", "minimum": 0}}, ("items", "total")
    )


@cache
def components() -> dict[str, Schema]:
    task = record(models.Task, present.task)
    job_base = record(models.Job, lambda j: present.job(j, {}, 0))
    settings_keys = set(settings_schema())
    job_props = {k: v for k, v in job_base["properties"].items() if k not in settings_keys}
    counts = obj({s.value: {"type": "integer", "minimum": 0} for s in TASK_STATES}, tuple(s.value for s in TASK_STATES))
    waiting = obj({"reason": {"type": "string", "enum": [w.value for w in models.Waiting]}, "until": TIME}, ("reason",))
    job = obj(
        {
            **job_props,
            **settings_schema(),
            "counts": counts,
            "waiting": nullable(waiting),
            "warnings": {"type": "array", "items": {"type": "string"}, "description": "On creation only."},
        },
        (*[k for k in job_base["required"] if k not in settings_keys], *settings_required(), "waiting"),
    )
    device = record(models.Device, present.device)
    product = record(models.Product, present.product)
    secret = {"type": "string", "description": "Shown only in this reply."}
    return {
        "Error": ERROR,
        "Product": product,
        "ProductWithSecret": extend(product, {"productSecret": secret}),
        "Device": device,
        "DeviceWithSecret": extend(device, {"deviceSecret": secret}, ("deviceSecret",)),
        "DeviceWithTask": extend(device, {"currentTask": nullable(ref("Task"))}, ("currentTask",)),
        "Certificate": record(
            models.DeviceCertificate, present.certificate, {"status": {"type": "string", "enum": ["valid", "revoked"]}}
        ),
        "Firmware": record(models.Firmware, present.firmware),
        "Delta": record(models.Delta, present.delta),
        "Publisher": record(models.Publisher, present.publisher),
        "Job": job,
        "JobBody": {**job_body_schema(), "examples": [example_job_body()]},
        "Task": task,
        "Webhook": record(models.Webhook, present.webhook),
        "Delivery": record(
            models.Delivery, present.delivery, {"body": {"description": "The delivery's JSON body."}}, {"body": "{}"}
        ),
        "User": record(models.User, present.user),
        "Token": record(models.ApiToken, present.token),
        "Node": record(models.NodeState, present.node, {"status": {"type": "string", "enum": ["up", "down"]}}),
        "AuditEntry": record(models.AuditEntry, present.audit_entry),
        "Event": record(models.Event, present.event),
    }
