"""Fetching a server by package name: a Java 17–23 runtime, Maven classpaths and Go builds,
cached in `~/.cache/iotflow` (or `$IOTFLOW_CACHE_DIR`) so only the first run downloads."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ServerUnavailable", "build_go_command", "cache_dir", "find_java", "java_major", "maven_classpath"]

# Cassandra 5.0 refuses Java 24 and newer; Kafka 4 needs 17 or newer.
JAVA_MIN, JAVA_MAX = 17, 23


class ServerUnavailable(RuntimeError):
    """A server cannot be had on this machine; the message names what to install."""


def cache_dir() -> Path:
    root = os.environ.get("IOTFLOW_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "iotflow"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One builder per cache entry: two test runs at once wait for each other."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def java_major(java: str) -> int | None:
    """The major version `java -version` reports (8 for "1.8"), None if it does not run."""
    try:
        result = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr)
    if found is None:
        return None
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major


def find_java() -> str:
    """A `java` of major version 17–23: $JAVA_HOME's, the one on PATH, or one under /usr/lib/jvm."""
    candidates = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(os.path.join(os.environ["JAVA_HOME"], "bin", "java"))
    if on_path := shutil.which("java"):
        candidates.append(on_path)
    candidates += sorted(str(p) for p in Path("/usr/lib/jvm").glob("*/bin/java"))
    for java in candidates:
        major = java_major(java)
        if major is not None and JAVA_MIN <= major <= JAVA_MAX:
            return java
    raise ServerUnavailable(
        f"needs a Java {JAVA_MIN}–{JAVA_MAX} runtime (Cassandra 5.0 refuses 24 and newer): "
        "install OpenJDK 17 (apt-get install openjdk-17-jdk-headless) or set JAVA_HOME"
    )


_POM = """\
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.iotflow</groupId>
  <artifactId>{name}</artifactId>
  <version>1</version>
  <dependencies>
{dependencies}
  </dependencies>
</project>
"""

_DEPENDENCY = (
    "    <dependency><groupId>{0}</groupId><artifactId>{1}</artifactId><version>{2}</version></dependency>"
)


def maven_classpath(name: str, artifacts: list[str]) -> str:
    """The classpath of `artifacts` ("group:artifact:version") and their dependencies, resolved
    once through Maven (its jars in ~/.m2, the list cached here)."""
    dependencies = "\n".join(_DEPENDENCY.format(*a.split(":")) for a in artifacts)
    pom = _POM.format(name=name, dependencies=dependencies)
    directory = cache_dir() / "maven" / f"{name}-{hashlib.sha256(pom.encode()).hexdigest()[:12]}"
    listing = directory / "classpath.txt"
    with _locked(directory):
        if listing.exists() and all(Path(jar).exists() for jar in listing.read_text().split(os.pathsep)):
            return listing.read_text()
        mvn = shutil.which("mvn")
        if mvn is None:
            raise ServerUnavailable(f"needs Maven to fetch {name}: install it (apt-get install maven)")
        (directory / "pom.xml").write_text(pom)
        result = subprocess.run(
            [mvn, "-q", "-B", "dependency:build-classpath", f"-Dmdep.outputFile={listing}.new"],
            cwd=directory,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise ServerUnavailable(
                f"Maven could not resolve {', '.join(artifacts)}: {(result.stdout + result.stderr)[-1500:]}"
            )
        os.replace(f"{listing}.new", listing)
        return listing.read_text()


def build_go_command(module: str, version: str, package: str, patch: dict[str, str]) -> Path:
    """The binary of `package` in `module@version`, built once from the Go module proxy.

    The module's source is copied out of the module cache first, so that `patch` (files to
    write, relative to the module) can fill in what its release process generates:
    FerretDB's build/version/version.txt, without which `go install` builds a binary that
    panics at start."""
    binary = cache_dir() / "go" / f"{package.rsplit('/', 1)[-1]}-{version}"
    with _locked(binary.parent):
        if binary.exists():
            return binary
        go = shutil.which("go")
        if go is None:
            raise ServerUnavailable(f"needs Go to build {module}: install it (https://go.dev/dl)")
        download = subprocess.run(
            [go, "mod", "download", "-json", f"{module}@{version}"], capture_output=True, text=True
        )
        if download.returncode != 0:
            raise ServerUnavailable(f"go could not fetch {module}@{version}: {download.stdout[-1500:]}")
        source = binary.parent / f"src-{binary.name}"
        shutil.rmtree(source, ignore_errors=True)
        shutil.copytree(json.loads(download.stdout)["Dir"], source)
        for directory, _, files in os.walk(source):  # the module cache is read-only
            os.chmod(directory, 0o755)
            for file in files:
                os.chmod(os.path.join(directory, file), 0o644)
        for relative, text in patch.items():
            (source / relative).write_text(text)
        build = subprocess.run(
            [go, "build", "-o", f"{binary}.new", f"./{package}"],
            cwd=source,
            capture_output=True,
            text=True,
            env={**os.environ, "GOFLAGS": "-mod=mod"},
        )
        shutil.rmtree(source, ignore_errors=True)
        if build.returncode != 0:
            raise ServerUnavailable(f"go could not build {module}/{package}: {build.stderr[-1500:]}")
        os.replace(f"{binary}.new", binary)
        return binary
