"""Settings: one table drives flags, env vars, TOML keys and the README."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from otabox.errors import BadRequest, Conflict, NotFound, TooLarge, Unauthorized
from otabox.server import settings

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for line in settings.markdown_table().splitlines():
        assert line in readme, f"README settings table is stale: {line}"


def test_dataclass_defaults_match_the_table() -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(settings.Settings)}
    assert defaults == {s.name: s.default for s in settings.SETTINGS}


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    conf = tmp_path / "otabox.toml"
    conf.write_text('http_port = 7000\nmqtt_port = 7001\nhost = "127.0.0.2"\n')
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    args = parser.parse_args(["--config", str(conf), "--http-port", "7100"])
    env = {"OTABOX_HTTP_PORT": "7200", "OTABOX_MQTT_PORT": "7201"}
    s = settings.load(args, env=env)
    assert (s.http_port, s.mqtt_port, s.host, s.data_dir) == (7100, 7201, "127.0.0.2", "./otabox-data")


@pytest.mark.parametrize(
    "env", [{"OTABOX_HTTP_PORT": "eighty"}, {"OTABOX_MQTT_PORT": "70000"}, {"OTABOX_MAX_UPLOAD_BYTES": "0"}]
)
def test_bad_values_are_named(env: dict[str, str]) -> None:
    with pytest.raises(settings.SettingsError) as err:
        settings.load(None, env=env)
    assert "port" in str(err.value) or "max_upload_bytes" in str(err.value)


def test_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("htp_port = 1\n")
    with pytest.raises(settings.SettingsError, match="htp_port"):
        settings.load(None, env={}, config_path=str(conf))


def test_one_error_shape() -> None:
    for cls, status in [(BadRequest, 400), (Unauthorized, 401), (NotFound, 404), (Conflict, 409), (TooLarge, 413)]:
        body = cls("why").to_json()
        assert cls.status == status
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}


def test_the_database_url_is_a_postgresql_url() -> None:
    url = "postgresql://otabox:secret@db.example:5432/otabox"
    assert settings.load(env={"OTABOX_DATABASE_URL": url}).database_url == url
    assert settings.load(env={}).database_url == ""  # SQLite in the data dir
    with pytest.raises(settings.SettingsError, match="postgresql://"):
        settings.load(env={"OTABOX_DATABASE_URL": "mysql://x@y/z"})
