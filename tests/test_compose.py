"""docker-compose.yml: valid for `docker-compose config`, and its profiles hold what the
docs say: `edge` is Mosquitto, PostgreSQL, Redis, migrate, worker and jobs, nothing else."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
STORES = {"mosquitto", "postgres", "redis", "migrate"}  # no profile: every profile has them

pytestmark = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose is not installed (Debian: apt-get install docker-compose)",
)


def _config(*args: str) -> str:
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _services(config: str) -> dict[str, dict[str, object]]:
    """Each service's profiles, dependencies and text, from the normalised YAML `config`
    prints (docker-compose 1.29 prints every service whatever the profiles, so the profile
    rules are applied here: a service without profiles is in all of them)."""
    block = ("\n" + config).split("\nservices:\n", 1)[1]
    block = re.split(r"\n(?=\S)", block, maxsplit=1)[0]
    services: dict[str, dict[str, object]] = {}
    for chunk in re.split(r"\n(?=  \S)", block):
        name = chunk.strip().split(":", 1)[0]
        profiles = re.search(r"\n    profiles:\n((?:\s*- .*\n?)+)", chunk + "\n")
        depends = re.search(r"\n    depends_on:\n((?:      .*\n?)+)", chunk + "\n")
        services[name] = {
            "profiles": set(re.findall(r"- (\S+)", profiles.group(1))) if profiles else set(),
            "depends_on": set(re.findall(r"^      (\S+):$", depends.group(1), re.M)) if depends else set(),
            "text": chunk,
        }
    return services


def _enabled(services: dict[str, dict[str, object]], *profiles: str) -> set[str]:
    return {
        name
        for name, service in services.items()
        if not service["profiles"] or service["profiles"] & set(profiles)  # type: ignore[operator]
    }


def test_the_file_is_valid_and_has_its_profiles() -> None:
    _config("-q")
    assert set(_config("--profiles").split()) == {"full", "edge", "demo", "kafka"}


def test_the_edge_profile_is_the_lean_set_and_needs_nothing_else() -> None:
    services = _services(_config())
    edge = _enabled(services, "edge")
    assert edge == STORES | {"edge-worker", "edge-jobs"}
    for name in edge:
        assert services[name]["depends_on"] <= edge, name  # type: ignore[operator]
    for name in ("edge-worker", "edge-jobs"):
        text = str(services[name]["text"])
        assert "IOTFLOW_DOCUMENTS_BACKEND: postgres" in text
        # (`docker compose config` writes the build context as an absolute path: the
        # checkout's own directory name, /work/wt-kafka2 say, is no dependency.)
        settings = re.sub(r"(?m)^\s*context: .*$", "", text)
        assert not re.search(r"mongodb|kafka|cassandra", settings), text


@pytest.mark.parametrize("profiles", [("full",), ("full", "demo"), ("edge", "demo"), ("kafka",)])
def test_every_profile_starts_what_its_services_depend_on(profiles: tuple[str, ...]) -> None:
    services = _services(_config())
    enabled = _enabled(services, *profiles)
    for name in enabled:
        assert services[name]["depends_on"] <= enabled, (name, services[name]["depends_on"])
    if "full" in profiles:
        assert {"mongodb", "cassandra", "kafka", "worker", "jobs"} <= enabled


def test_a_migrate_for_mongodb_waits_for_a_healthy_mongodb() -> None:
    """`iotflow migrate` creates MongoDB's indexes when the documents live there, so it
    needs MongoDB up; the migrate of every profile (edge too) reaches PostgreSQL only."""
    services = _services(_config())
    migrates = {name for name, service in services.items() if "- migrate\n" in str(service["text"])}
    assert migrates >= {"migrate", "mongodb-migrate", "kafka-migrate"}
    for name in migrates:
        text = str(services[name]["text"])
        if "IOTFLOW_DOCUMENTS_BACKEND: mongodb" in text:
            assert "mongodb" in services[name]["depends_on"], name  # type: ignore[operator]
            assert re.search(r"mongodb:\n\s+condition: service_healthy", text), name
        else:
            assert "IOTFLOW_DOCUMENTS_BACKEND: postgres" in text, name
    assert "IOTFLOW_DOCUMENTS_BACKEND: postgres" in str(services["migrate"]["text"])
    for name in ("worker", "jobs"):  # full: the documents are in MongoDB
        assert "mongodb-migrate" in services[name]["depends_on"], name  # type: ignore[operator]


def test_the_workers_that_may_run_both_mode_keep_their_data_dir_in_a_named_volume() -> None:
    """storage.data_dir (the image's /var/lib/iotflow) holds the outbox journal in both
    mode: a container restart must not take it along, and no two services share one."""
    services = _services(_config())
    volumes = {}
    for name in ("worker", "connector", "processor"):
        text = str(services[name]["text"])
        assert "IOTFLOW_CASSANDRA_HOSTS" in text, name  # could run both mode
        mount = re.search(r"\n\s+- ([\w-]+):/var/lib/iotflow(?::rw)?\n", text + "\n")  # a named volume
        assert mount is not None, text
        volumes[name] = mount.group(1)
    assert len(set(volumes.values())) == 3, volumes
    top = _config().split("\nvolumes:\n", 1)[1]
    for volume in volumes.values():
        assert re.search(rf"(?m)^  {re.escape(volume)}:", top), volume


def test_the_full_profile_keeps_readings_in_both_stores_and_migrates_cassandra_first() -> None:
    """The full stack lays the stores out as the seeds do: readings in PostgreSQL and
    Cassandra (both mode), so its migrate makes Cassandra's keyspace once Cassandra is healthy."""
    services = _services(_config())
    for name in ("mongodb-migrate", "worker", "jobs"):
        assert "IOTFLOW_TIMESERIES_BACKEND: both" in str(services[name]["text"]), name
    migrate = str(services["mongodb-migrate"]["text"])
    assert re.search(r"cassandra:\n\s+condition: service_healthy", migrate), migrate
    for name in ("migrate", "edge-worker", "connector", "processor"):
        assert "IOTFLOW_TIMESERIES_BACKEND" not in str(services[name]["text"]), name
