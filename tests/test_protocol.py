"""Edge cases of the wire format and download tokens: plain function calls, plus one real device."""

from __future__ import annotations

import pytest

from otabox import protocol
from otabox.server.keys import Keys
from tests.conftest import Server, mqtt_client, request


@pytest.mark.parametrize("key", ["d1\n", "\nd1", "d 1", "a/b", "+", "#", "", "k" * 65, "é", None, 7])
def test_invalid_keys(key: object) -> None:
    assert not protocol.valid_key(key)


@pytest.mark.parametrize("key", ["d1", "A-z_0.9", "k" * 64])
def test_valid_keys(key: str) -> None:
    assert protocol.valid_key(key)


@pytest.mark.parametrize("version", ["1.0\n", "1\n2", "", "   ", "v" * 65, "\ud800", "\x00", "\x7f", "\u0085", 1.0])
def test_invalid_versions(version: object) -> None:
    assert not protocol.valid_version(version)


@pytest.mark.parametrize("version", ["1.0.3", "v2 beta", "2.0-rc.1+build 5", "固件 1", "v" * 64])
def test_valid_versions(version: str) -> None:
    assert protocol.valid_version(version)


def test_username_with_trailing_newline_is_refused() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_login("d1|securemode=2,signmethod=hmacsha256,timestamp=1|", "d1&pk1\n")


@pytest.mark.parametrize(
    "step",
    ["nan", "inf", "-inf", "1e400", float("nan"), float("inf"), "101", "2.5", "x", None, True, -(2**31) - 1, "-1e30"],
)
def test_bad_progress_steps_are_protocol_errors(step: object) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_progress({"step": step})


@pytest.mark.parametrize(("step", "want"), [("35", 35), (100, 100), ("-2", -2), (-7.0, -7), (" 0 ", 0)])
def test_good_progress_steps(step: object, want: int) -> None:
    assert protocol.parse_progress({"step": step, "desc": "d"}) == protocol.Progress(want, "d")


@pytest.mark.parametrize("payload", [b'{"code": 1e400}', b'{"code": NaN}', b'{"code": "ok"}', b'{"code": null}', b"[]"])
def test_bad_upgrade_reply_codes_are_protocol_errors(payload: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.reply_code(payload)


def test_download_token_with_non_ascii_is_refused_not_raised() -> None:
    keys = Keys(b"k" * 32)
    token = keys.download_token("fw-1", "pk1", "d1", ttl=60)
    assert keys.check_download_token(token, "fw-1") == ("pk1", "d1")
    body, _, sig = token.partition(".")
    for bad in (f"{body}.{sig[:-1]}é", "é.é", f"{body}.\udcff"):
        assert keys.check_download_token(bad, "fw-1") == "bad token signature"


async def test_non_finite_progress_step_gets_400_and_the_device_stays_served(server: Server) -> None:
    dev = await server.device("d1")
    async with mqtt_client(server, "pk1", "d1", dev["deviceSecret"]) as c:
        for i, step in enumerate(["nan", "1e400", "-inf"]):
            reply = await request(c, "pk1", "d1", protocol.PROGRESS, {"step": step}, msg_id=f"p{i}")
            assert reply["id"] == f"p{i}" and reply["code"] == 400, reply
        assert (await request(c, "pk1", "d1", protocol.INFORM, {"version": "1.0"}, msg_id="i"))["code"] == 200
