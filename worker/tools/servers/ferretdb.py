"""FerretDB 1.24, a MongoDB wire-protocol server on SQLite, built from the Go module proxy."""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from pathlib import Path

from worker.tools.embedded import free_port
from worker.tools.servers.process import ServerProcess
from worker.tools.servers.toolchains import build_go_command

__all__ = ["FERRETDB_VERSION", "FerretDBServer"]

FERRETDB_VERSION = "v1.24.2"
_OP_MSG = 2013


class FerretDBServer(ServerProcess):
    """FerretDB with its SQLite backend in the directory, on a free loopback port."""

    name = "ferretdb"

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.port = free_port()
        self._binary = build_go_command(
            "github.com/FerretDB/FerretDB",
            FERRETDB_VERSION,
            "cmd/ferretdb",
            {"build/version/version.txt": f"{FERRETDB_VERSION}\n"},
        )

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def prepare(self) -> None:
        (self.directory / "sqlite").mkdir(exist_ok=True)

    def command(self) -> Sequence[str]:
        return [
            str(self._binary),
            "--handler=sqlite",
            f"--sqlite-url=file:{self.directory}/sqlite/",
            f"--state-dir={self.directory}",
            f"--listen-addr=127.0.0.1:{self.port}",
            "--debug-addr=-",
            "--telemetry=disable",
            "--log-level=warn",
        ]

    def problem(self) -> str | None:
        """A `ping` in one OP_MSG (a MongoClient would leave its monitor threads behind)."""
        import bson

        body = struct.pack("<IB", 0, 0) + bson.encode({"ping": 1, "$db": "admin"})
        message = struct.pack("<iiii", 16 + len(body), 1, 0, _OP_MSG) + body
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                sock.sendall(message)
                answer = sock.makefile("rb").read(struct.unpack("<i", sock.recv(4, socket.MSG_PEEK))[0])
        except (OSError, struct.error) as exc:
            return str(exc) or type(exc).__name__
        reply = bson.decode(answer[21:]) if len(answer) > 21 else {}
        return None if reply.get("ok") == 1 else f"ping answered {reply or answer.hex()}"
