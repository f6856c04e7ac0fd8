"""One server as a child process: started on the ports it was given, awaited by a real client
handshake, killed (-9, as a crash) and started again with its data kept, stopped at the end."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from worker.tools.embedded import die_with_parent

__all__ = ["ServerProcess"]


class ServerProcess:
    """Subclasses give `name`, `command()` and `problem()` (None once a client is served), and
    may prepare their directory in `prepare()`, run once before the first start."""

    name = "server"
    start_timeout_s = 120.0
    stop_timeout_s = 30.0

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.log_path = directory / f"{self.name}.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._prepared = False

    def prepare(self) -> None:
        """Write configuration, format storage: once, before the first start."""

    def command(self) -> Sequence[str]:
        raise NotImplementedError

    def problem(self) -> str | None:
        """Why a client is not served yet, or None once it is."""
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """Its process is alive (served or not): `start` again only when it is not."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start (again, after `kill` or `stop`, on the same ports and data) and wait until a
        client is served; on failure nothing is left running and the error has the log's end."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self._prepared:
            self.prepare()
            self._prepared = True
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                list(self.command()),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,  # a terminal's Ctrl-C reaches the caller only
                preexec_fn=die_with_parent(signal.SIGKILL),
            )
        try:
            self._wait_served()
        except BaseException:
            self.kill()
            raise

    def _wait_served(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout_s
        while (reason := self.problem()) is not None:
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self._process.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                waited = f"{self.start_timeout_s:g} s"
                tail = self.log_tail()
                raise RuntimeError(f"{self.name} served no client within {waited} ({reason}): {tail}")
            time.sleep(0.2)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL, as a crash or a power cut: what the server had not written is lost."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        if self._process is not None:
            self._process.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after `stop_timeout_s`."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        self.kill()
