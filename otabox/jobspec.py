"""The job-spec table: every field of a POST /jobs body, defined once.

`JOB_FIELDS` drives the API's validation (`validate`), the console's new-job form (labels,
help, input limits, `body_from_form`), the CLI's `otabox job create` flags (`add_arguments`,
`body_from_args`) and the README's job reference (`reference_markdown`); tests fail when any
of them drifts from the table. Pure: no aiohttp, amqtt or aiosqlite.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from otabox import protocol
from otabox.errors import BadRequest
from otabox.models import DeltaMode, JobMode, JobPolicy, JobSpec, JobType, Schedule, Scope, Wave, parse_iso

MAX_VERIFY_DEVICES = 10
DEFAULT_TIMEOUT = 7200.0
DEFAULT_ROLLBACK_WATCH = 600.0


@dataclass(frozen=True, slots=True)
class JobField:
    """One field of the job body.

    `path` is where it sits in the body ("retry.count"); `kind` says how it is parsed:
    choice, int, number, bool, text, list (comma separated on the CLI), tags, waves, time, window.
    `cli` is the `otabox job create` flag and `form` the console's input name ("" = not offered
    there); `scale` converts the form's unit to the body's (percent -> ratio). `required`: the body
    (or, for a dotted path, its object) must have it; `pattern`: what each item of a list matches.
    """

    path: str
    kind: str
    label: str
    help: str
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    cli: str = ""
    form: str = ""
    scale: float = 1.0
    unit: str = ""
    required: bool = False
    pattern: str = ""

    @property
    def key(self) -> str:
        return self.path.rpartition(".")[2]

    def input_attrs(self) -> str:
        """` min="1" step="1"`: the HTML number-input limits of this field in the form's unit."""
        out = []
        lo, hi = self.minimum, self.maximum
        if lo is not None:
            lo = lo + 1 if self.kind == "int" and self.exclusive_minimum else lo
            out.append(f'min="{lo / self.scale:g}"')
        if hi is not None:
            out.append(f'max="{hi / self.scale:g}"')
        out.append('step="1"' if self.kind == "int" else 'step="any"')
        return " " + " ".join(out)

    def limits(self) -> str:
        """The range as people read it: "> 0", "0-100", ">= 1"."""
        lo, hi = self.minimum, self.maximum
        if lo is None and hi is None:
            return ""
        if hi is None:
            return f"{'>' if self.exclusive_minimum else '>='} {lo:g}"
        return f"{'>' if self.exclusive_minimum else ''}{lo:g}-{hi:g}" if lo is not None else f"<= {hi:g}"


JOB_FIELDS: tuple[JobField, ...] = (
    JobField(
        "firmwareId",
        "text",
        "Firmware",
        "Id of the firmware to install (or verify).",
        cli="--firmware",
        form="firmwareId",
        required=True,
    ),
    JobField(
        "type",
        "choice",
        "Type",
        "upgrade, or verify: try unverified firmware on a few named devices.",
        default="upgrade",
        choices=tuple(JobType),
        cli="--type",
    ),
    JobField(
        "name",
        "text",
        "Name",
        "Shown in lists; default: '<type> <firmware name> <version>'.",
        maximum=200,
        cli="--name",
        form="name",
    ),
    JobField(
        "scope.versionNumbers",
        "list",
        "Source versions",
        "Only devices reporting one of these versions (a device that never reported one is out).",
        cli="--versions",
        form="versions",
        pattern=protocol.VERSION_RE.pattern,
    ),
    JobField(
        "scope.deviceKeys",
        "list",
        "Device keys",
        "Only these devices.",
        cli="--devices",
        form="deviceKeys",
        pattern=protocol.KEY_RE.pattern,
    ),
    JobField(
        "scope.tags",
        "tags",
        "Tags",
        "Only devices whose tag has one of the values (key=value, repeatable).",
        cli="--tag",
        form="tags",
    ),
    JobField(
        "mode",
        "choice",
        "Mode",
        "push: the server sends the upgrade; request: devices ask (getversion).",
        default="push",
        choices=tuple(JobMode),
        cli="--mode",
        form="mode",
    ),
    JobField(
        "policy",
        "choice",
        "Policy",
        "snapshot: the devices matching now; incremental: later matches join.",
        default="snapshot",
        choices=tuple(JobPolicy),
        cli="--policy",
        form="policy",
    ),
    JobField(
        "maxConcurrency",
        "int",
        "Max concurrency",
        "Tasks published or upgrading at once.",
        minimum=0,
        exclusive_minimum=True,
        cli="--max-concurrency",
        form="maxConcurrency",
    ),
    JobField(
        "ratePerMinute",
        "number",
        "Rate per minute",
        "New pushes or offers per minute.",
        minimum=0,
        exclusive_minimum=True,
        cli="--rate",
        form="ratePerMinute",
    ),
    JobField(
        "timeoutSeconds",
        "number",
        "Timeout",
        "Seconds a published or upgrading task may go without a result.",
        default=DEFAULT_TIMEOUT,
        minimum=0,
        exclusive_minimum=True,
        cli="--timeout",
        form="timeoutSeconds",
        unit="s",
    ),
    JobField(
        "retry.count",
        "int",
        "Retry count",
        "Extra attempts after a device-reported failure.",
        default=0,
        minimum=0,
        maximum=100,
        cli="--retry",
        form="retryCount",
    ),
    JobField(
        "retry.intervalSeconds",
        "number",
        "Retry interval",
        "Seconds between attempts.",
        default=0.0,
        minimum=0,
        cli="--retry-interval",
        form="retryInterval",
        unit="s",
    ),
    JobField(
        "abort.failureRatio",
        "number",
        "Abort threshold",
        "Abort when (failed + timeout) / finished reaches this.",
        minimum=0,
        exclusive_minimum=True,
        maximum=1,
        cli="--abort-ratio",
        form="abortPercent",
        scale=0.01,
        unit="%",
        required=True,
    ),
    JobField(
        "abort.minFinished",
        "int",
        "Abort after finished",
        "Finished tasks before the abort rule applies.",
        default=1,
        minimum=1,
        cli="--abort-min",
        form="abortMinFinished",
    ),
    JobField(
        "waves",
        "waves",
        "Waves",
        "Cumulative percents of devices, each with an optional success ratio to open the next "
        "(CLI: 5:0.95,50:0.95,100).",
        cli="--waves",
    ),
    JobField(
        "schedule.start", "time", "Start", "ISO 8601; nothing is pushed or offered before.", cli="--start", form="start"
    ),
    JobField("schedule.end", "time", "End", "ISO 8601; pending tasks are canceled then.", cli="--end", form="end"),
    JobField(
        "schedule.dailyWindow",
        "window",
        "Daily window",
        'Local ["HH:MM", "HH:MM"] (CLI: 01:00-05:00).',
        cli="--daily-window",
    ),
    JobField(
        "schedule.timezoneOffsetMinutes",
        "int",
        "Time zone offset",
        "Minutes east of UTC of the daily window.",
        default=0,
        minimum=-14 * 60,
        maximum=14 * 60,
        cli="--tz-offset",
        form="tzOffset",
        unit="min",
    ),
    JobField(
        "allowDowngrade",
        "bool",
        "Allow downgrade",
        "Also move devices that report a higher version than the target (else the job is refused).",
        default=False,
        cli="--allow-downgrade",
        form="allowDowngrade",
    ),
    JobField(
        "rollbackWatchSeconds",
        "number",
        "Rollback watch",
        "Seconds after success in which a device reporting its previous version again is rolledBack (0 = off).",
        default=DEFAULT_ROLLBACK_WATCH,
        minimum=0,
        cli="--rollback-watch",
        form="rollbackWatchSeconds",
        unit="s",
    ),
    JobField(
        "delta",
        "choice",
        "Delta updates",
        "auto: a device on a stored older version of the firmware line is also offered a binary delta "
        "(it falls back to the full image); off: the full image only.",
        default="auto",
        choices=tuple(DeltaMode),
        cli="--delta",
        form="delta",
    ),
)
FIELDS: dict[str, JobField] = {f.path: f for f in JOB_FIELDS}
SCOPE_KEYS = ("versionNumbers", "deviceKeys", "tags")
BODY_KEYS = frozenset(f.path.split(".")[0] for f in JOB_FIELDS)
# The fields of each object of `waves` (the table's `waves` row is the list as a whole).
WAVE_FIELDS: tuple[JobField, ...] = (
    JobField(
        "percent",
        "number",
        "Percent",
        "Cumulative percent of the job's devices in this and the earlier waves; the last is 100.",
        minimum=0,
        exclusive_minimum=True,
        maximum=100,
        required=True,
    ),
    JobField(
        "successRatio",
        "number",
        "Success ratio",
        "Share of the wave's finished tasks that must succeed for the next wave to open (else the job pauses).",
        minimum=0,
        maximum=1,
    ),
)


def object_keys(group: str) -> tuple[str, ...]:
    """The keys the table gives an object of the body (`retry` -> count, intervalSeconds)."""
    return tuple(f.key for f in JOB_FIELDS if f.path.startswith(group + "."))


def check_required(body: Mapping[str, Any]) -> None:
    """The job's own required fields (the ones a stored spec does not keep). Raises BadRequest."""
    for f in JOB_FIELDS:
        if f.required and "." not in f.path and not (isinstance(body.get(f.path), str) and body[f.path]):
            raise BadRequest(f"{f.path} is required")


# ---------------------------------------------------------------- the API body -> JobSpec


def _field(path: str) -> JobField:
    return FIELDS[path]


def _number(value: Any, f: JobField, name: str | None = None) -> float | int | None:
    """A numeric field checked against the table. Raises BadRequest naming the field."""
    name = name or f.key
    if value is None:
        return None
    integer = f.kind == "int"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or (integer and value != int(value))
    ):
        raise BadRequest(f"{name} must be a {'whole ' if integer else ''}number")
    lo, hi = f.minimum, f.maximum
    if (lo is not None and (value < lo or (f.exclusive_minimum and value == lo))) or (hi is not None and value > hi):
        raise BadRequest(f"{name} is out of range ({f.limits()})")
    return int(value) if integer else float(value)


def str_list(value: Any, field: str, check: Callable[[Any], bool] | None = None) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{field} must be a non-empty list of strings")
    if check is not None and not all(check(v) for v in value):
        raise BadRequest(f"{field} contains an invalid value")
    return tuple(dict.fromkeys(value))


def _choice(body: Mapping[str, Any], path: str) -> str:
    f = _field(path)
    value = body.get(f.key, f.default)
    if value not in f.choices:
        raise BadRequest(f"{f.key} must be {' or '.join(repr(str(c)) for c in f.choices)}")
    return str(value)


def _object(value: Any, name: str, keys: tuple[str, ...]) -> Mapping[str, Any]:
    """An object of the body (null = absent) with only the `keys` the table gives it. Raises BadRequest."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{name} must be an object")
    unknown = set(value) - set(keys)
    if unknown:
        raise BadRequest(f"{name} has unknown field(s) {sorted(unknown)}; it takes {', '.join(keys)}")
    return value


def parse_scope(body: Mapping[str, Any]) -> Scope:
    scope_in = _object(body.get("scope"), "scope", SCOPE_KEYS)
    versions: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    tags: dict[str, tuple[str, ...]] = {}
    if "versionNumbers" in scope_in:
        versions = str_list(scope_in["versionNumbers"], "scope.versionNumbers", protocol.valid_version)
    if "deviceKeys" in scope_in:
        keys = str_list(scope_in["deviceKeys"], "scope.deviceKeys", protocol.valid_key)
    if "tags" in scope_in:
        raw = scope_in["tags"]
        if not isinstance(raw, dict) or not raw:
            raise BadRequest("scope.tags must be an object of tag -> list of values")
        tags = {k: str_list(v if isinstance(v, list) else [v], f"scope.tags.{k}") for k, v in raw.items()}
    return Scope(versions, keys, tags)


def _waves(value: Any) -> tuple[Wave, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value or not all(isinstance(w, dict) for w in value):
        raise BadRequest("waves must be a non-empty list of objects")
    percent, ratio = WAVE_FIELDS
    out: list[Wave] = []
    last = 0.0
    for i, raw in enumerate(value):
        w = _object(raw, f"waves[{i}]", tuple(f.key for f in WAVE_FIELDS))
        pct = _number(w.get("percent"), percent, f"waves[{i}].percent")
        if pct is None or pct <= last:
            raise BadRequest(f"waves[{i}].percent must be cumulative and increasing (0 < percent <= 100)")
        last = float(pct)
        ok = _number(w.get("successRatio"), ratio, f"waves[{i}].successRatio")
        out.append(Wave(float(pct), None if ok is None else float(ok)))
    if last != 100:
        raise BadRequest("the last wave must reach percent 100")
    return tuple(out)


def parse_hhmm(text: str) -> int:
    """'01:30' -> 90. Raises ValueError."""
    hh, _, mm = text.partition(":")
    h, m = int(hh), int(mm)
    if not (0 <= h <= 24 and 0 <= m < 60) or (h == 24 and m):
        raise ValueError(text)
    return h * 60 + m


def _schedule(body: Mapping[str, Any]) -> tuple[Schedule, dict[str, Any]]:
    sched = _object(body.get("schedule"), "schedule", object_keys("schedule"))
    text: dict[str, Any] = {}
    times: dict[str, float] = {}
    for key in ("start", "end"):
        value = sched.get(key)
        if value is not None:
            if not isinstance(value, str) or not value:
                raise BadRequest(f"schedule.{key} must be an ISO 8601 time string")
            try:
                times[key] = parse_iso(value)
            except ValueError as exc:
                raise BadRequest(f"schedule.{key} is not an ISO 8601 time: {value!r}") from exc
            text[key] = value
    if "start" in times and "end" in times and times["end"] <= times["start"]:
        raise BadRequest("schedule.end must be after schedule.start")
    daily: tuple[int, int] | None = None
    # Checked even without a window: a wrong offset is refused, not silently kept unused.
    tz = int(
        _number(
            sched.get("timezoneOffsetMinutes"),
            _field("schedule.timezoneOffsetMinutes"),
            "schedule.timezoneOffsetMinutes",
        )
        or 0
    )
    if sched.get("dailyWindow") is not None:
        window = sched["dailyWindow"]
        try:
            if not isinstance(window, list) or len(window) != 2:
                raise ValueError
            daily = (parse_hhmm(window[0]), parse_hhmm(window[1]))
        except (ValueError, TypeError, AttributeError) as exc:
            raise BadRequest('schedule.dailyWindow must be ["HH:MM", "HH:MM"]') from exc
        if daily[0] == daily[1]:
            raise BadRequest("schedule.dailyWindow must not be empty")
        text["dailyWindow"] = list(window)
        text["timezoneOffsetMinutes"] = tz
    return Schedule(times.get("start"), times.get("end"), daily, tz), text


def validate(body: Mapping[str, Any]) -> JobSpec:
    """A POST /jobs body -> the JobSpec it describes. Raises BadRequest naming the field.

    `firmwareId`, `type` and `name` are the job's own fields, read by the job service.
    """
    unknown = set(body) - BODY_KEYS
    if unknown:
        raise BadRequest(f"unknown job field(s) {sorted(unknown)}")
    jtype = _choice(body, "type")
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > (_field("name").maximum or 0)):
        raise BadRequest(f"name must be a string of at most {_field('name').maximum:g} characters")
    scope = parse_scope(body)
    if jtype == JobType.VERIFY:
        if scope.version_numbers or scope.tags or not scope.device_keys:
            raise BadRequest("a verify job takes scope.deviceKeys only")
        if len(scope.device_keys) > MAX_VERIFY_DEVICES:
            raise BadRequest(f"a verify job takes at most {MAX_VERIFY_DEVICES} devices")
    policy = _choice(body, "policy")
    mode = _choice(body, "mode")
    retry = _object(body.get("retry"), "retry", object_keys("retry"))
    abort = _object(body.get("abort"), "abort", object_keys("abort"))
    needed = [f.key for f in JOB_FIELDS if f.path.startswith("abort.") and f.required]
    if body.get("abort") is not None and any(abort.get(k) is None for k in needed):
        raise BadRequest(f"abort must be an object with {', '.join(needed)}")
    schedule, schedule_text = _schedule(body)
    max_conc = _number(body.get("maxConcurrency"), _field("maxConcurrency"))
    rate = _number(body.get("ratePerMinute"), _field("ratePerMinute"))
    timeout = _number(body.get("timeoutSeconds"), _field("timeoutSeconds")) or DEFAULT_TIMEOUT
    ratio = _number(abort.get("failureRatio"), _field("abort.failureRatio"))
    allow_downgrade = body.get("allowDowngrade", False)
    if not isinstance(allow_downgrade, bool):
        raise BadRequest("allowDowngrade must be true or false")
    watch = _number(body.get("rollbackWatchSeconds"), _field("rollbackWatchSeconds"))
    return JobSpec(
        scope=scope,
        mode=JobMode(mode),
        policy=JobPolicy(policy) if jtype == JobType.UPGRADE else JobPolicy.SNAPSHOT,
        max_concurrency=None if max_conc is None else int(max_conc),
        rate_per_minute=None if rate is None else float(rate),
        timeout_seconds=float(timeout),
        retry_count=int(_number(retry.get("count"), _field("retry.count")) or 0),
        retry_interval=float(_number(retry.get("intervalSeconds"), _field("retry.intervalSeconds")) or 0.0),
        abort_ratio=None if ratio is None else float(ratio),
        abort_min_finished=int(_number(abort.get("minFinished"), _field("abort.minFinished")) or 1),
        waves=_waves(body.get("waves")),
        schedule=schedule,
        schedule_text=schedule_text,
        allow_downgrade=allow_downgrade,
        rollback_watch_seconds=DEFAULT_ROLLBACK_WATCH if watch is None else float(watch),
        delta=DeltaMode(_choice(body, "delta")),
    )


# ---------------------------------------------------------------- JobSpec <-> stored/shown JSON


def to_json(spec: JobSpec) -> dict[str, Any]:
    """The spec in the API's words: what GET /jobs shows and what the store keeps."""
    scope: dict[str, Any] = {}
    if spec.scope.version_numbers:
        scope["versionNumbers"] = list(spec.scope.version_numbers)
    if spec.scope.device_keys:
        scope["deviceKeys"] = list(spec.scope.device_keys)
    if spec.scope.tags:
        scope["tags"] = {k: list(v) for k, v in spec.scope.tags.items()}
    out: dict[str, Any] = {
        "scope": scope,
        "policy": spec.policy.value,
        "mode": spec.mode.value,
        "maxConcurrency": spec.max_concurrency,
        "ratePerMinute": spec.rate_per_minute,
        "timeoutSeconds": spec.timeout_seconds,
        "retry": {"count": spec.retry_count, "intervalSeconds": spec.retry_interval},
        "allowDowngrade": spec.allow_downgrade,
        "rollbackWatchSeconds": spec.rollback_watch_seconds,
        "delta": spec.delta.value,
    }
    if spec.abort_ratio is not None:
        out["abort"] = {"failureRatio": spec.abort_ratio, "minFinished": spec.abort_min_finished}
    if spec.waves:
        out["waves"] = [
            {"percent": w.percent, **({} if w.success_ratio is None else {"successRatio": w.success_ratio})}
            for w in spec.waves
        ]
    if spec.schedule_text:
        out["schedule"] = dict(spec.schedule_text)
    return out


def from_json(data: Mapping[str, Any]) -> JobSpec:
    """A stored spec (as written by `to_json`, or by earlier versions with `...Epoch` keys) -> JobSpec."""
    sched = dict(data.get("schedule") or {})
    for key in list(sched):
        if key.endswith("Epoch"):
            del sched[key]  # older rows kept the parsed times beside the text
    spec = validate({**{k: v for k, v in data.items() if k != "schedule"}, "schedule": sched})
    return spec


# ---------------------------------------------------------------- CLI flags


def add_arguments(parser: Any) -> None:
    """`otabox job create` flags, one per table field."""
    for f in JOB_FIELDS:
        kwargs: dict[str, Any] = {"help": f"{f.help}{' [' + f.limits() + ']' if f.limits() else ''}"}
        if f.kind == "choice":
            kwargs["choices"] = list(f.choices)
        elif f.kind == "int":
            kwargs["type"] = int
        elif f.kind == "number":
            kwargs["type"] = float
        elif f.kind == "tags":
            kwargs["action"] = "append"
        elif f.kind == "bool":
            kwargs["action"] = "store_const"
            kwargs["const"] = True
        parser.add_argument(f.cli, dest=_dest(f), **kwargs)


def _dest(f: JobField) -> str:
    return "job_" + f.path.replace(".", "_")


def _set(body: dict[str, Any], path: str, value: Any) -> None:
    *parents, key = path.split(".")
    node = body
    for p in parents:
        node = node.setdefault(p, {})
    node[key] = value


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cli_value(f: JobField, raw: Any) -> Any:
    """A flag's value in the body's form. Raises ValueError for text that does not parse."""
    if f.kind == "list":
        return _csv(raw)
    if f.kind == "tags":
        tags: dict[str, list[str]] = {}
        for item in raw:
            k, v = parse_tag(item)
            tags.setdefault(k, []).extend(_csv(v))
        return tags
    if f.kind == "waves":
        waves = []
        for item in _csv(raw):
            pct, _, ratio = item.partition(":")
            waves.append({"percent": float(pct), **({"successRatio": float(ratio)} if ratio else {})})
        return waves
    if f.kind == "window":
        lo, sep, hi = raw.partition("-")
        if not sep:
            raise ValueError(f"{f.cli} must be HH:MM-HH:MM")
        return [lo, hi]
    return raw


def body_from_args(args: Any, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A POST /jobs body from `otabox job create` flags over `base` (a JSON file's body)."""
    body: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (base or {}).items()}
    for f in JOB_FIELDS:
        raw = getattr(args, _dest(f), None)
        if raw is not None:
            _set(body, f.path, cli_value(f, raw))
    return body


# ---------------------------------------------------------------- console form


def form_fields(*paths: str) -> list[JobField]:
    return [FIELDS[p] for p in paths]


def form_value(f: JobField, text: str) -> Any:
    """A console form input in the body's form. Raises BadRequest naming the field's label."""
    text = text.strip()
    if not text:
        return None
    if f.kind == "bool":
        return text.lower() in ("on", "true", "1", "yes")
    if f.kind in ("int", "number"):
        try:
            value = float(text)
        except ValueError as exc:
            raise BadRequest(f"{f.label} must be a number") from exc
        if f.kind == "int":
            if value != int(value):
                raise BadRequest(f"{f.label} must be a whole number")
            return int(value)
        return value * f.scale
    if f.kind == "list":
        return [x for x in re.split(r"[\s,;]+", text) if x]
    if f.kind == "tags":
        tags: dict[str, list[str]] = {}
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                key, values = parse_tag(line)
            except ValueError as exc:
                raise BadRequest(f"tags: write one tag per line as key=value[,value…] (got {line.strip()!r})") from exc
            tags.setdefault(key, []).extend(v.strip() for v in values.split(",") if v.strip())
        return tags
    return text


def body_from_form(form: Mapping[str, str]) -> dict[str, Any]:
    """The body fields the console form gives by table (`form` names), with the table's conversions."""
    body: dict[str, Any] = {}
    for f in JOB_FIELDS:
        if f.form and f.kind not in ("choice",):
            value = form_value(f, form.get(f.form, ""))
            if value is not None:
                _set(body, f.path, value)
        elif f.form:
            value = form.get(f.form, "").strip() or f.default
            _set(body, f.path, value)
    return body


# ---------------------------------------------------------------- tags


def parse_tag(text: str) -> tuple[str, str]:
    """`site=east` (or `site:east`, the API's query form) -> ("site", "east"). Raises ValueError.

    The one tag syntax of otabox: the CLI, the console and the API's `tag=` filter all read it here.
    """
    eq, colon = text.find("="), text.find(":")
    cut = min(i for i in (eq, colon) if i >= 0) if eq >= 0 or colon >= 0 else -1
    key, value = (text[:cut].strip(), text[cut + 1 :].strip()) if cut >= 0 else ("", "")
    if not key or cut < 0:
        raise ValueError(f"tag must be key=value, got {text!r}")
    return key, value


# ---------------------------------------------------------------- docs


def reference_markdown() -> str:
    """The README's job reference table, generated from JOB_FIELDS (a test compares them)."""
    lines = ["| body field | CLI flag | default | range | meaning |", "|---|---|---|---|---|"]
    for f in JOB_FIELDS:
        default = "" if f.default is None else f"`{f.default:g}`" if isinstance(f.default, float) else f"`{f.default}`"
        choices = f" ({' / '.join(f.choices)})" if f.choices else ""
        lines.append(f"| `{f.path}` | `{f.cli}` | {default} | {f.limits()}{choices} | {f.help} |")
    return "\n".join(lines)
