"""Hostile HTTP input at the edge: each a 4xx with the error shape and nothing stored, never a 500."""

from __future__ import annotations

import asyncio

from tests.conftest import Server

HEAD = 'Content-Disposition: form-data; name="{}"'


def _form(boundary: str, fields: dict[str, str], file: bytes, *, close: bool) -> bytes:
    out = b""
    for name, value in fields.items():
        out += f"--{boundary}\r\n{HEAD.format(name)}\r\n\r\n{value}\r\n".encode()
    out += f'--{boundary}\r\n{HEAD.format("file")}; filename="fw.bin"\r\n\r\n'.encode() + file
    return out + (f"\r\n--{boundary}--\r\n".encode() if close else b"")


async def _stored_files(server: Server) -> list[str]:
    root = server.data_dir / "firmware"
    return [p.name for p in root.glob("??/*")]


async def test_a_non_ascii_authorization_header_is_a_401(server: Server) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = "GET /api/v1/products HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tökén\r\nConnection: close\r\n\r\n"
    writer.write(request.encode("utf-8"))
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401 ") and b'"error"' in answer


async def test_multipart_without_a_boundary_is_a_400(server: Server) -> None:
    await server.product("pk1")
    headers = {"Content-Type": "multipart/form-data"}
    refused = await server.call("POST", "/products/pk1/firmware", 400, data=b"--x\r\n", headers=headers)
    assert "boundary" in refused["error"]["message"]


async def test_an_upload_cut_off_mid_file_is_a_400_and_nothing_is_stored(server: Server) -> None:
    await server.product("pk1")
    body = _form("b0undary", {"name": "fw", "version": "1.0"}, b"\x01" * 100_000, close=False)
    headers = {"Content-Type": "multipart/form-data; boundary=b0undary"}
    refused = await server.call("POST", "/products/pk1/firmware", 400, data=body, headers=headers)
    assert refused["error"]["code"] == "invalid"
    assert (await server.call("GET", "/products/pk1/firmware", 200))["total"] == 0
    assert await _stored_files(server) == []
    # The same upload, whole, is stored.
    whole = _form("b0undary", {"name": "fw", "version": "1.0"}, b"\x01" * 100_000, close=True)
    await server.call("POST", "/products/pk1/firmware", 201, data=whole, headers=headers)


async def test_a_csv_field_over_the_csv_limit_is_a_400(server: Server) -> None:
    await server.product("pk1")
    body = ("deviceKey,deviceSecret\nd1," + "x" * 200_000 + "\n").encode()
    refused = await server.call(
        "POST", "/products/pk1/devices:import", 400, data=body, headers={"Content-Type": "text/csv"}
    )
    assert "field limit" in refused["error"]["message"]
    assert (await server.call("GET", "/products/pk1/devices", 200))["total"] == 0
