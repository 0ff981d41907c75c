"""The dropping TCP proxy itself, in front of a local echo server: it forwards both ways, ``drop()`` breaks live
connections and refuses new ones, and ``restore()`` lets clients in again."""

from __future__ import annotations

import asyncio

import pytest

from tests.chaos.proxy import DroppingProxy


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1024):
        writer.write(data)
        await writer.drain()
    writer.close()


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), 5)
    finally:
        writer.close()


async def test_forwards_drops_and_restores():
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        async with DroppingProxy("127.0.0.1", server.sockets[0].getsockname()[1]) as proxy:
            assert await roundtrip(proxy.port, b"hello" * 1000) == b"hello" * 1000
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
            proxy.drop()
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                writer.write(b"pong")
                await writer.drain()
                await asyncio.wait_for(reader.readexactly(4), 5)
            writer.close()
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await roundtrip(proxy.port, b"refused")
            assert proxy.refused >= 1
            proxy.restore()
            assert await roundtrip(proxy.port, b"back") == b"back"
    finally:
        server.close()
        await server.wait_closed()
