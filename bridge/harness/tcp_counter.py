"""A TCP relay in front of a real server that counts the connections open through it."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from bridge.harness.ports import free_port


class ConnectionCounter:
    """Forwards 127.0.0.1:``port`` to ``target``; ``open`` and ``peak`` count the connections.

    A connection counts from the moment the server behind accepted it until either side
    closed it (the server's EOF, or the client's), which is what the server sees.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self._target = (target_host, target_port)
        self.open = 0
        self.peak = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        # Closing the sockets ends every pipe (cancelling a connection callback would make
        # asyncio log the cancellation as an error).
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        self._writers.add(writer)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self._target)
            except OSError:
                writer.close()
                return
            self._writers.add(up_writer)
            self.accepted += 1
            self.open += 1
            self.peak = max(self.peak, self.open)
            ended = asyncio.Event()
            pipes = [
                asyncio.ensure_future(_pipe(reader, up_writer, ended)),
                asyncio.ensure_future(_pipe(up_reader, writer, ended)),
            ]
            await ended.wait()
            self.open -= 1
            await asyncio.gather(*pipes)
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()
                self._writers.discard(w)
        finally:
            self._writers.discard(writer)
            self._pipes.discard(task)


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ended: asyncio.Event
) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        ended.set()
        with contextlib.suppress(Exception):
            writer.write_eof()
