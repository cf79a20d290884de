"""Server settings: one declarative table drives CLI flags, env vars, TOML keys and the README."""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from otabox import delta
from otabox.server.s3 import BucketUrl

ENV_PREFIX = "OTABOX_"


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    type: type
    default: Any
    help: str


# The one table. Flag `--data-dir` = env `OTABOX_DATA_DIR` = TOML key `data_dir`.
SETTINGS: tuple[Setting, ...] = (
    Setting("data_dir", str, "./otabox-data", "Folder for the database, firmware files and keys."),
    Setting(
        "database_url",
        str,
        "",
        "PostgreSQL to keep the database in (postgresql://user:pass@host/db) instead of <data-dir>/otabox.db.",
    ),
    Setting(
        "node_id",
        str,
        "",
        "Name of this node among those sharing a database; default host name and MQTT port.",
    ),
    # A heartbeat is one small write per node; its interval bounds how stale GET /nodes is.
    # The timeout trades false alarms (a node briefly stalled) against how soon a dead node's
    # devices show offline (timeout + one heartbeat of the node that notices).
    Setting(
        "storage_url",
        str,
        "",
        "S3-compatible storage for firmware (s3://bucket/prefix?endpoint=http://host:port; keys in AWS_*)"
        " instead of the data dir (one node) or the database (several).",
    ),
    Setting(
        "storage_presign",
        bool,
        False,
        "With storage_url: fileUrls are presigned URLs of the bucket (devices download from S3, not the node).",
    ),
    Setting("node_heartbeat", float, 3.0, "Seconds between a node's heartbeats (with its connected-device count)."),
    Setting(
        "node_timeout",
        float,
        15.0,
        "Seconds without a heartbeat after which a node is down and its devices shown offline.",
    ),
    Setting("host", str, "0.0.0.0", "Address the MQTT and HTTP listeners bind to."),
    Setting("http_port", int, 8080, "HTTP port (API, downloads, console); 0 binds a free port, -1 turns it off."),
    Setting("mqtt_port", int, 1883, "MQTT port for devices; 0 binds a free port, -1 turns it off."),
    Setting("tls_cert", str, "", "Server certificate (PEM, chain allowed) for MQTT over TLS and HTTPS; with tls_key."),
    Setting("tls_key", str, "", "Private key (PEM) of tls_cert."),
    Setting(
        "tls_self_signed",
        str,
        "",
        "Comma list of host names/IPs: TLS with otabox's own CA (<data-dir>/ca/), made on first start.",
    ),
    Setting("mqtts_port", int, 8883, "MQTT-over-TLS port when TLS is on; 0 binds a free port, -1 turns it off."),
    Setting("https_port", int, 8443, "HTTPS port when TLS is on; 0 binds a free port, -1 turns it off."),
    Setting(
        "public_url",
        str,
        "",
        "Base URL put into firmware fileUrls; default derived from host and the bound HTTP port.",
    ),
    Setting(
        "signing_key",
        str,
        "",
        "Ed25519 private key file (PEM) that signs firmware; created (0600) when missing; empty = no signing.",
    ),
    Setting("max_upload_bytes", int, 1024**3, "Largest firmware upload accepted (bytes); larger gets 413."),
    Setting(
        "download_token_ttl",
        float,
        7 * 24 * 3600.0,
        "Seconds a firmware download token in a fileUrl stays valid.",
    ),
    # A CONNECT must arrive this soon after the TCP accept; amqtt waits forever.
    # Short enough that idle sockets cannot pile up, long enough for slow links.
    Setting(
        "mqtt_max_packet_bytes",
        int,
        1024**2,
        "Largest MQTT packet accepted (bytes); a client announcing a larger one is disconnected.",
    ),
    Setting("connect_timeout", float, 10.0, "Seconds a new MQTT connection has to send CONNECT."),
    # Past it a node refuses connections rather than run out of descriptors for its database,
    # downloads and files (a node at its limit lost its database connections, then its lead).
    # Off by default: devices that retry at once turn refusals into a storm of their own.
    Setting(
        "mqtt_max_connections",
        int,
        0,
        "MQTT connections a node holds at most; more are closed at once (devices retry). 0: no cap.",
    ),
    Setting(
        "login_fail_limit",
        int,
        10,
        "Failed MQTT logins of a device from one address before that address is locked out for it "
        "(an address in all: 10x).",
    ),
    Setting("login_fail_window", float, 60.0, "Seconds over which failed logins are counted (and locked out)."),
    # The job engine's tick trades push latency against idle CPU: each tick runs a few
    # indexed queries, never a scan of the fleet.
    Setting("scheduler_interval", float, 1.0, "Seconds between job engine ticks (timeouts, retries, pushes)."),
    # lastSeen of a device that keeps talking is written at most this often (connect, version
    # reports and disconnect always write it): fresh for people, cheap under a fleet's progress.
    Setting("last_seen_interval", float, 30.0, "Seconds between lastSeen updates of a device that keeps talking."),
    Setting(
        "delta_max_bytes",
        int,
        64 * 1024**2,
        "Largest firmware image otabox makes binary deltas for (bytes); 0 = no deltas.",
    ),
    Setting(
        "delta_algorithm",
        str,
        delta.ALGORITHM,
        "Patch format of the deltas otabox makes: detools-lzma or bsdiff4 (for devices with bspatch).",
    ),
    Setting("delta_timeout", float, 300.0, "Seconds making one delta may take before it is given up."),
    Setting("backup_every", float, 0.0, "Seconds between scheduled backups into backup_dir; 0 = none."),
    Setting("backup_keep", int, 7, "Scheduled backups kept (the oldest are deleted)."),
    Setting("backup_dir", str, "", "Folder of scheduled backups; default <data-dir>/backups."),
    Setting("webhook_timeout", float, 10.0, "Seconds a webhook receiver has to answer a delivery (or it is retried)."),
    Setting("metrics_public", bool, False, "Serve /metrics without a token (for a Prometheus on a trusted network)."),
    Setting("log_level", str, "INFO", "Logging level (DEBUG, INFO, WARNING, ERROR)."),
)

_BY_NAME = {s.name: s for s in SETTINGS}


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: str = "./otabox-data"
    database_url: str = ""
    node_id: str = ""
    storage_url: str = ""
    storage_presign: bool = False
    node_heartbeat: float = 3.0
    node_timeout: float = 15.0
    host: str = "0.0.0.0"
    http_port: int = 8080
    mqtt_port: int = 1883
    tls_cert: str = ""
    tls_key: str = ""
    tls_self_signed: str = ""
    mqtts_port: int = 8883
    https_port: int = 8443
    public_url: str = ""
    signing_key: str = ""
    max_upload_bytes: int = 1024**3
    download_token_ttl: float = 7 * 24 * 3600.0
    mqtt_max_packet_bytes: int = 1024**2
    connect_timeout: float = 10.0
    mqtt_max_connections: int = 0
    login_fail_limit: int = 10
    login_fail_window: float = 60.0
    scheduler_interval: float = 1.0
    last_seen_interval: float = 30.0
    delta_max_bytes: int = 64 * 1024**2
    delta_algorithm: str = delta.ALGORITHM
    delta_timeout: float = 300.0
    backup_every: float = 0.0
    backup_keep: int = 7
    backup_dir: str = ""
    webhook_timeout: float = 10.0
    metrics_public: bool = False
    log_level: str = "INFO"

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def tls(self) -> bool:
        """TLS listeners are on (from PEM files or otabox's own CA)."""
        return bool(self.tls_cert or self.tls_self_signed)

    def listens(self, port_setting: str) -> bool:
        """Whether the listener of this port setting runs (-1 = off; the TLS ones only with TLS on)."""
        if port_setting in ("mqtts_port", "https_port") and not self.tls:
            return False
        return bool(getattr(self, port_setting) >= 0)

    def replace(self, **changes: Any) -> Settings:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Settings(**values)


class SettingsError(ValueError):
    """A setting has an unusable value (the message names it)."""


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _convert(setting: Setting, raw: Any, origin: str) -> Any:
    try:
        if setting.type is bool and not isinstance(raw, bool):
            text = str(raw).strip().lower()
            if text not in _TRUE + _FALSE:
                raise ValueError(text)
            return text in _TRUE
        if setting.type is int and isinstance(raw, str):
            return int(raw, 0)
        return setting.type(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{origin}: {setting.name} must be {setting.type.__name__}, got {raw!r}") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one `--flag` per setting (defaults stay None so precedence can be resolved)."""
    parser.add_argument("--config", help="TOML file with settings (keys as in the settings table).")
    for s in SETTINGS:
        flag = "--" + s.name.replace("_", "-")
        # A yes/no setting is a plain flag (`--metrics-public`), or takes true/false.
        switch: dict[str, Any] = {"nargs": "?", "const": "true"} if s.type is bool else {}
        parser.add_argument(flag, dest=s.name, default=None, help=f"{s.help} [default: {s.default}]", **switch)


def load(
    args: argparse.Namespace | None = None,
    env: dict[str, str] | None = None,
    config_path: str | None = None,
) -> Settings:
    """Resolve settings: flag > environment > TOML file > default. Raises SettingsError."""
    env = dict(os.environ) if env is None else env
    values: dict[str, Any] = {s.name: s.default for s in SETTINGS}
    path = config_path or (getattr(args, "config", None) if args else None) or env.get(ENV_PREFIX + "CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"config file {path}: {exc}") from exc
        table = data.get("otabox", data)
        for key, raw in table.items():
            setting = _BY_NAME.get(key.replace("-", "_"))
            if setting is None:
                raise SettingsError(f"config file {path}: unknown setting {key!r}")
            values[setting.name] = _convert(setting, raw, f"config file {path}")
    for s in SETTINGS:
        raw = env.get(ENV_PREFIX + s.name.upper())
        if raw is not None and raw != "":
            values[s.name] = _convert(s, raw, ENV_PREFIX + s.name.upper())
    if args is not None:
        for s in SETTINGS:
            raw = getattr(args, s.name, None)
            if raw is not None:
                values[s.name] = _convert(s, raw, "--" + s.name.replace("_", "-"))
    for port in PORTS:
        if not -1 <= values[port] <= 65535:
            raise SettingsError(f"{port} must be between 0 and 65535 (or -1: off)")
    _check_tls(values)
    _check_database(values)
    if values["max_upload_bytes"] <= 0:
        raise SettingsError("max_upload_bytes must be positive")
    if values["delta_algorithm"] not in delta.FORMATS:
        raise SettingsError(f"delta_algorithm must be one of {', '.join(delta.FORMATS)}")
    _check_mqtt(values)
    return Settings(**values)


def _check_mqtt(values: dict[str, Any]) -> None:
    if values["mqtt_max_packet_bytes"] < 1024:
        raise SettingsError("mqtt_max_packet_bytes must be at least 1024")
    if values["mqtt_max_connections"] < 0:
        raise SettingsError("mqtt_max_connections must be 0 (no cap) or more")


PORTS = ("http_port", "mqtt_port", "mqtts_port", "https_port")


def _check_tls(values: dict[str, Any]) -> None:
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise SettingsError("tls_cert and tls_key go together: give both files or neither")
    if values["tls_cert"] and values["tls_self_signed"]:
        raise SettingsError("give either tls_cert/tls_key or tls_self_signed, not both")
    tls = bool(values["tls_cert"] or values["tls_self_signed"])
    if tls and values["tls_self_signed"] and not any(h.strip() for h in values["tls_self_signed"].split(",")):
        raise SettingsError("tls_self_signed needs at least one host name or IP")
    mqtt = values["mqtt_port"] >= 0 or (tls and values["mqtts_port"] >= 0)
    http = values["http_port"] >= 0 or (tls and values["https_port"] >= 0)
    if not mqtt:
        raise SettingsError("no MQTT listener left: mqtt_port is -1 and MQTT over TLS is off")
    if not http:
        raise SettingsError("no HTTP listener left: http_port is -1 and HTTPS is off")


def _check_database(values: dict[str, Any]) -> None:
    url = values["database_url"]
    if url and not url.startswith(("postgresql://", "postgres://")):
        raise SettingsError("database_url must be a postgresql:// URL (empty: SQLite in the data dir)")
    if url and values["backup_every"] > 0:
        # The archive is of the data dir's SQLite file; PostgreSQL has its own tools for this.
        raise SettingsError("backup_every backs up the data dir's SQLite database: on PostgreSQL use pg_dump")
    if values["storage_url"]:
        try:
            BucketUrl.parse(values["storage_url"])
        except ValueError as exc:
            raise SettingsError(str(exc)) from exc
    elif values["storage_presign"]:
        raise SettingsError("storage_presign needs storage_url (presigned URLs are of an S3 bucket)")
    if not 0 < values["node_heartbeat"] < values["node_timeout"]:
        raise SettingsError("node_heartbeat must be positive and shorter than node_timeout")


def markdown_table() -> str:
    """The settings table as Markdown, as it appears in the README."""
    lines = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        flag = "--" + s.name.replace("_", "-")
        lines.append(f"| `{flag}` | `{ENV_PREFIX}{s.name.upper()}` | `{s.default}` | {s.help} |")
    return "\n".join(lines)
