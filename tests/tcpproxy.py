"""A TCP forwarder the tests can cut and restore, to take a real store away and back."""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._cut = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._answering = asyncio.Event()  # the server → client direction alone
        self._answering.set()
        self.port = 0
        self.accepted = 0  # connections taken, refused ones aside

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        """Drop every open connection and stop listening: new connections are refused."""
        self._cut = True
        if self._server is not None:
            self._server.close()
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    def freeze(self) -> None:
        """Keep every connection open but pass no bytes: a server that hangs (SIGSTOP)."""
        self._flowing.clear()

    def mute(self) -> None:
        """Pass the client's bytes on but none of the server's: a server that hears, yet never
        answers (so it does not time the client out either)."""
        self._answering.clear()

    def thaw(self) -> None:
        self._flowing.set()
        self._answering.set()

    async def restore(self) -> None:
        """Listen again on the same port."""
        self._cut = False
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._links.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer, self._answering))

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gate: asyncio.Event | None = None
    ) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                if gate is not None:
                    await gate.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._links.discard(writer)
            writer.transport.abort()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
