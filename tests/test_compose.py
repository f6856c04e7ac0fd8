"""docker-compose.yml: valid for `docker-compose config`, its profiles hold what the docs
say (`edge` is Mosquitto, PostgreSQL, Redis, migrate, worker and jobs, nothing else), and
it is safe by default: the stores on an internal network with no host port, published
ports on 127.0.0.1, passwords only as Docker secrets (files in ./secrets, each service the
ones it needs, none in an environment or a command), exact image tags, a healthcheck on
every long-running service, no anonymous broker."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parent.parent
# No profile: in every profile.
STORES = {"secrets-check", "mosquitto-auth", "mosquitto", "postgres", "redis", "migrate"}
DATA_STORES = {"postgres", "redis", "mongodb", "cassandra", "kafka"}
# The secrets each service mounts: what it logs in with, nothing more.
PG, REDIS, MONGO = "postgres-password", "redis-password", "mongodb-password"
MQTT_WORKER, MQTT_DEVICE = "mqtt-worker-password", "mqtt-device-password"
NEEDS = {
    "secrets-check": set(),
    "mosquitto-auth": {MQTT_WORKER, MQTT_DEVICE},
    "mosquitto": {MQTT_WORKER},  # its healthcheck logs in
    "postgres": {PG},
    "redis": {REDIS},
    "mongodb": {MONGO},
    "cassandra": set(),
    "kafka": set(),
    "migrate": {PG},
    "mongodb-migrate": {PG, MONGO},
    "worker": {MQTT_WORKER, PG, REDIS, MONGO},
    "jobs": {PG, REDIS, MONGO},
    "edge-worker": {MQTT_WORKER, PG, REDIS},
    "edge-jobs": {PG, REDIS},
    "simulator": {MQTT_DEVICE, PG},
    "kafka-migrate": {PG, MONGO},
    "connector": {MQTT_WORKER, PG, REDIS, MONGO},
    "processor": {PG, REDIS, MONGO},
}

pytestmark = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose is not installed (Debian: apt-get install docker-compose)",
)


def _run_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` with these variables and nothing of the caller's .env or
    environment (`--env-file .env.example`, so a developer's .env is not read). It does
    not look for the secret files: secrets-check does, when the stack starts."""
    environ = {k: v for k, v in os.environ.items() if k != "MQTT_BIND"}
    return subprocess.run(
        [
            "docker-compose",
            "-f",
            str(ROOT / "docker-compose.yml"),
            "--env-file",
            str(ROOT / ".env.example"),
            "config",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=environ | (env or {}),
    )


def _config(*args: str, env: dict[str, str] | None = None) -> str:
    result = _run_config(*args, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _parsed(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The normalised config as data, parsed by docker-compose's own Python (which has
    PyYAML; the suite's environment need not)."""
    python = Path(shutil.which("docker-compose") or "").read_text(encoding="utf-8").splitlines()[0]
    assert python.startswith("#!"), python
    result = subprocess.run(
        [
            *python[2:].split(),
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ],
        input=_config(env=env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


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
    """The full stack keeps the readings in PostgreSQL and Cassandra (both mode), so its migrate makes Cassandra's keyspace once Cassandra is healthy."""
    services = _services(_config())
    for name in ("mongodb-migrate", "worker", "jobs"):
        assert "IOTFLOW_TIMESERIES_BACKEND: both" in str(services[name]["text"]), name
    migrate = str(services["mongodb-migrate"]["text"])
    assert re.search(r"cassandra:\n\s+condition: service_healthy", migrate), migrate
    for name in ("migrate", "edge-worker", "connector", "processor"):
        assert "IOTFLOW_TIMESERIES_BACKEND" not in str(services[name]["text"]), name


def _host_ip(port: str) -> str | None:
    """The host address of a published port ("127.0.0.1:8081:8081/tcp"); None when it is
    published on every interface ("8081:8081", "0.0.0.0:…")."""
    parts = port.split(":")
    return parts[0] if len(parts) == 3 and parts[0] not in ("", "0.0.0.0", "::") else None


def test_the_env_example_sets_no_password_and_env_is_not_committed() -> None:
    """Compose reads no password from .env any more: the only variable it reads is
    MQTT_BIND, which .env.example shows commented out."""
    compose = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    assert set(re.findall(r"(?<!\$)\$\{(\w+)", compose)) == {"MQTT_BIND"}
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    assert not re.findall(r"(?m)^\w+=", example)  # nothing set by default
    assert re.findall(r"(?m)^#(\w+)=", example) == ["MQTT_BIND"]
    assert ".env" in (ROOT / ".gitignore").read_text(encoding="utf-8").split()


def _texts(service: dict[str, Any]) -> list[str]:
    """What `docker inspect` shows of a service: its environment, command and healthcheck."""
    texts = [f"{key}={value}" for key, value in (service.get("environment") or {}).items()]
    for part in ("command", "entrypoint"):
        value = service.get(part) or []
        texts += [value] if isinstance(value, str) else value
    texts += (service.get("healthcheck") or {}).get("test") or []
    return texts


def test_no_password_is_in_any_environment_command_or_healthcheck() -> None:
    """Each password is read from /run/secrets where it is used: no URL carries one, no
    variable holds one, and a command or healthcheck that logs in reads the file then."""
    for name, service in _parsed()["services"].items():
        for key in service.get("environment") or {}:
            if re.search(r"PASSWORD|PASS\b|AUTH|SECRET|TOKEN", key):
                assert key.endswith("_FILE") or key == "SECRETS", (name, key)
        for text in _texts(service):
            assert not re.search(r"\w+://[^/@\s]*:[^/@\s]*@", text), (name, text)  # user:password@
            for login in re.findall(r"(?:-P|requirepass|REDISCLI_AUTH=)[ \t]*(.{0,22})", text):
                assert login.startswith(('"$$(cat /run/secrets/', "$$(cat /run/secrets/")), (name, text)
            assert "mosquitto_passwd -b" not in text, (name, text)  # the password as an argument


def test_each_service_mounts_exactly_the_secrets_it_needs() -> None:
    config = _parsed()
    assert set(config["secrets"]) == {PG, REDIS, MONGO, MQTT_WORKER, MQTT_DEVICE}
    for secret, spec in config["secrets"].items():  # files in ./secrets, which git ignores
        assert spec == {"file": str(ROOT / "secrets" / secret)}, (secret, spec)
    services = config["services"]
    assert set(services) == set(NEEDS)
    for name, service in services.items():
        mounted = {entry["source"] for entry in service.get("secrets") or []}
        assert mounted == NEEDS[name], name
        for entry in service.get("secrets") or []:
            assert set(entry) == {"source"}, entry  # at /run/secrets/<name>, the default
        if mounted:  # never started before secrets-check has looked at the files
            assert services[name]["depends_on"]["secrets-check"] == {
                "condition": "service_completed_successfully"
            }, name
        for text in _texts(service):  # whatever a service reads from /run/secrets is mounted
            assert set(re.findall(r"/run/secrets/([\w-]+)", text)) <= mounted, (name, text)
        for secret in mounted:  # and whatever is mounted is read
            assert any(f"/run/secrets/{secret}" in text for text in _texts(service)), (name, secret)


def test_the_workers_file_settings_are_real_settings_and_fill_in_the_urls(tmp_path: Path) -> None:
    """Each iotflow service's environment, with its secrets where it mounts them, loads
    with the worker's own load_settings into URLs that carry the password; the simulator
    logs in as `device`, every other MQTT client as `iotflow`."""
    from worker.config import load_settings

    for secret in (PG, REDIS, MONGO, MQTT_WORKER, MQTT_DEVICE):
        (tmp_path / secret).write_text(f"pw-{secret}\n")
    for name, service in _parsed()["services"].items():
        environment = service.get("environment") or {}
        if "build" not in service:
            continue
        for key in ("POSTGRES", "REDIS", "DOCUMENTS_MONGODB"):
            if f"IOTFLOW_{key}_URL" in environment:
                assert f"IOTFLOW_{key}_PASSWORD_FILE" in environment, (name, key)
        environ = {k: v.replace("/run/secrets/", f"{tmp_path}/") for k, v in environment.items()}
        settings = load_settings(environ=environ)
        assert settings.postgres.url == f"postgresql://iotflow:pw-{PG}@postgres:5432/iotflow", name
        if "IOTFLOW_REDIS_URL" in environment:
            assert settings.redis.url == f"redis://:pw-{REDIS}@redis:6379/0", name
        if "IOTFLOW_DOCUMENTS_MONGODB_URL" in environment:
            assert settings.documents.mongodb_url.startswith(
                f"mongodb://iotflow:pw-{MONGO}@mongodb:27017/"
            ), name
        if "IOTFLOW_MQTT_URL" in environment:
            user, secret = ("device", MQTT_DEVICE) if name == "simulator" else ("iotflow", MQTT_WORKER)
            assert (settings.mqtt.username, settings.mqtt.password) == (user, f"pw-{secret}"), name


def _secrets_check(directory: Path) -> subprocess.CompletedProcess[str]:
    """secrets-check's own script, run here by sh on `directory` in place of ./secrets."""
    service = _parsed()["services"]["secrets-check"]
    assert service["volumes"] == [f"{ROOT / 'secrets'}:/secrets:ro"], service["volumes"]
    assert service["command"][:2] == ["sh", "-c"]
    script = service["command"][2].replace("$$", "$").replace("/secrets/", f"{directory}/")
    return subprocess.run(
        ["sh", "-c", script],
        env={"PATH": os.environ["PATH"], "SECRETS": service["environment"]["SECRETS"]},
        capture_output=True,
        text=True,
        timeout=30,
    )


def _refused(result: subprocess.CompletedProcess[str]) -> set[str]:
    """The secrets secrets-check's one line names ("… for each of: a b (docs/…)")."""
    assert result.returncode == 1 and result.stdout == "", result
    named = re.fullmatch(
        r"secrets-check: [^:]+:((?: [\w-]+)+) \(docs/operations\.md[^\n]*\)\n", result.stderr
    )
    assert named is not None, result.stderr
    return set(named.group(1).split())


def test_secrets_check_stops_compose_with_one_line_while_a_file_is_missing(tmp_path: Path) -> None:
    secrets = set(_parsed()["secrets"])
    assert set(_parsed()["services"]["secrets-check"]["environment"]["SECRETS"].split()) == secrets
    assert _refused(_secrets_check(tmp_path)) == secrets
    for secret in secrets:
        (tmp_path / secret).write_text("0123abcd\n")
        (tmp_path / secret).chmod(0o644)
    assert _secrets_check(tmp_path).returncode == 0
    (tmp_path / PG).write_text("")  # empty
    (tmp_path / MONGO).chmod(0o600)  # unreadable by the stores' and the workers' users
    os.remove(tmp_path / REDIS)
    (tmp_path / REDIS).mkdir()  # what a bind of a missing file leaves behind
    assert _refused(_secrets_check(tmp_path)) == {PG, MONGO, REDIS}


def test_the_secret_files_are_ignored_by_git_and_their_readme_is_not() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, timeout=30).returncode == 0

    for secret in _parsed()["secrets"]:
        assert ignored(f"secrets/{secret}"), secret
    assert ignored("secrets/anything-else")
    assert not ignored("secrets/README.md")
    assert (ROOT / "secrets" / "README.md").is_file()  # so ./secrets exists in a checkout


def test_the_stores_are_on_the_internal_network_only_and_publish_nothing() -> None:
    config = _parsed()
    assert config["networks"]["backend"].get("internal") is True
    services = config["services"]
    for name in DATA_STORES:
        assert set(services[name]["networks"]) == {"backend"}, name
        assert not services[name].get("ports"), name
    for name, service in services.items():  # whoever reaches a store is on backend too
        if "IOTFLOW_POSTGRES_URL" in service.get("environment", {}) or name == "mosquitto":
            assert "backend" in service["networks"], name


def test_published_ports_are_on_127_0_0_1_unless_mqtt_bind_says_otherwise() -> None:
    services = _parsed()["services"]
    published = {name: service["ports"] for name, service in services.items() if service.get("ports")}
    assert set(published) == {"mosquitto", "worker", "edge-worker", "connector"}, published
    for name, ports in published.items():
        for port in ports:
            assert _host_ip(port) == "127.0.0.1", (name, port)
            assert "front" in services[name]["networks"], name  # an internal network cannot publish
    opened = _parsed(env={"MQTT_BIND": "0.0.0.0"})["services"]
    assert [_host_ip(p) for p in opened["mosquitto"]["ports"]] == [None]  # the devices' port only
    assert all(_host_ip(p) == "127.0.0.1" for name in ("worker", "connector") for p in opened[name]["ports"])


def test_every_image_has_an_exact_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    for name, service in _parsed()["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and re.fullmatch(r"\d+\.\d+\.\d+(-[a-z0-9]+)?", tag), (name, image)
        assert "latest" not in tag, (name, image)
        if "build" in service:
            assert tag == version, (name, image)


def test_every_long_running_service_has_a_healthcheck() -> None:
    """A one-shot (restart "no") needs none; a worker running `iotflow run` without one in
    compose has the image's HEALTHCHECK on /healthz."""
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"(?m)^HEALTHCHECK .*\n.*/healthz", dockerfile)
    for name, service in _parsed()["services"].items():
        if service.get("restart") == "no":
            continue
        check = service.get("healthcheck")
        if check is None:
            assert "build" in service and service.get("command") == ["run"], name
            continue
        # (`disable: true` comes out of `docker-compose config` as `test: [NONE]`.)
        assert not check.get("disable") and check.get("test") not in (None, [], ["NONE"]), (name, check)


def test_the_broker_takes_no_anonymous_client() -> None:
    conf = (ROOT / "deploy" / "mosquitto.conf").read_text(encoding="utf-8")
    assert re.search(r"(?m)^allow_anonymous false$", conf)
    passwd = re.search(r"(?m)^password_file (\S+)$", conf)
    assert passwd is not None
    services = _parsed()["services"]
    mosquitto = services["mosquitto"]
    assert any(v.endswith(":/mosquitto/auth:ro") for v in mosquitto["volumes"]), mosquitto["volumes"]
    assert passwd.group(1).startswith("/mosquitto/auth/")
    assert mosquitto["depends_on"]["mosquitto-auth"]["condition"] == "service_completed_successfully"
    for name, service in services.items():  # every MQTT client logs in, with a secret
        environment = service.get("environment", {})
        if "IOTFLOW_MQTT_URL" in environment:
            assert environment["IOTFLOW_MQTT_URL"] == "mqtt://mosquitto:1883", name
            assert environment["IOTFLOW_MQTT_USERNAME"] in ("iotflow", "device"), name
            assert environment["IOTFLOW_MQTT_PASSWORD_FILE"].startswith("/run/secrets/mqtt-"), name


def test_redis_reads_its_secret_as_root_then_runs_as_user_redis() -> None:
    # The image's entrypoint drops to user redis only for a command that starts with
    # redis-server, so the shell that reads the secret hands over to the entrypoint.
    script = _parsed()["services"]["redis"]["command"][-1]
    assert "exec docker-entrypoint.sh redis-server - " in script, script
