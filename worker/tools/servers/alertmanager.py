"""Prometheus Alertmanager (the Debian package `prometheus-alertmanager`), alone, no cluster."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from worker.tools.embedded import free_port
from worker.tools.servers.process import ServerProcess
from worker.tools.servers.toolchains import ServerUnavailable

__all__ = ["AlertmanagerServer"]

# One receiver that sends nothing: the tests read what Alertmanager holds through its API.
CONFIG = """\
route:
  receiver: blackhole
  group_wait: 1s
  group_interval: 1s
receivers:
  - name: blackhole
"""


def _binary() -> str:
    for name in ("prometheus-alertmanager", "alertmanager"):
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None)
        if found:
            return found
    raise ServerUnavailable("no alertmanager on PATH (apt-get install prometheus-alertmanager)")


class AlertmanagerServer(ServerProcess):
    """Alertmanager on a free loopback port, its data in the directory; ready at /-/ready."""

    name = "alertmanager"
    start_timeout_s = 60.0

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self._binary = _binary()
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def prepare(self) -> None:
        (self.directory / "alertmanager.yml").write_text(CONFIG)

    def command(self) -> Sequence[str]:
        return [
            self._binary,
            f"--config.file={self.directory / 'alertmanager.yml'}",
            f"--storage.path={self.directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",  # no gossip: one instance
        ]

    def problem(self) -> str | None:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                return None if answer.status == 200 else f"/-/ready answered {answer.status}"
        except (urllib.error.URLError, OSError) as exc:
            return str(exc)
