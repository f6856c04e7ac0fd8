"""The docs hold together: every relative link in README.md and docs/*.md names a file
of the repository and, with a `#fragment`, a heading of it (GitHub's anchors); nothing
points outside the repository; LICENSE ships with the package."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `#` there is a shell comment, not a heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown file: lower case, punctuation
    dropped (word characters, spaces and hyphens kept), spaces as hyphens, repeats -1, -2…"""
    seen: dict[str, int] = {}
    result = set()
    for line in _prose(path.read_text(encoding="utf-8")):
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def links(path: Path) -> list[str]:
    return [m.group(1) for line in _prose(path.read_text(encoding="utf-8")) for m in LINK.finditer(line)]


def test_the_anchor_rule_matches_githubs() -> None:
    page = ROOT / "docs" / "operations.md"
    assert "several-processes-in-one-unit-iotflow-run---processes-n" in anchors(page)
    assert "certificates-iotflow-certs" in anchors(page)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(doc: Path) -> None:
    broken = []
    for target in links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: …
            continue
        file_part, _, fragment = target.partition("#")
        dest = (doc.parent / unquote(file_part)).resolve() if file_part else doc
        if not dest.exists() or ROOT.resolve() not in dest.parents:
            broken.append(f"{target}: no such file in the repository")
        elif fragment and (dest.suffix != ".md" or fragment not in anchors(dest)):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, broken


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_reference_to_what_is_not_in_the_repository(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    for pattern in (r"SPEC §", r"shared/", r"\bseeds?\b", r"\bissue \d+"):
        assert not re.search(pattern, text), (doc.name, pattern)


def test_the_code_and_configs_name_no_spec_section_or_seed_path() -> None:
    found = []
    for folder in ("worker", "jobs", "schemas", "tests", "deploy", "systemd", "scripts"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in {".py", ".sql", ".cql", ".toml", ".conf", ".service", ""}:
                text = path.read_text(encoding="utf-8", errors="replace")
                if path != Path(__file__) and re.search(r"SPEC §|shared/seeds", text):
                    found.append(path.relative_to(ROOT).as_posix())
    compose = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    if re.search(r"SPEC §|shared/seeds", compose):
        found.append("docker-compose.yml")
    assert not found, found


def test_the_readme_is_a_front_page() -> None:
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 190


def test_the_license_ships_with_the_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "IoTFlow worker contributors" in text


@pytest.mark.parametrize(
    ("toml", "env"),
    [
        ("[pipeline]\nbatchsize = 5\n", {}),
        ("[pipelin]\nbatch_size = 5\n", {}),
        ('[mqtt]\ntopics = "tele/#"\n', {}),
        ("", {"IOTFLOW_PIPELINE_BATCH_SIZE": "0"}),
        ("", {"IOTFLOW_MQTT_URL": "http://broker"}),
        ("", {"IOTFLOW_JOBS_RETENTION_HOUR": "25"}),
    ],
)
def test_the_configuration_errors_shown_are_the_ones_printed(
    tmp_path: Path, toml: str, env: dict[str, str]
) -> None:
    """docs/configuration.md quotes these messages: each must be what `iotflow` prints."""
    config = tmp_path / "iotflow.toml"
    config.write_text(toml, encoding="utf-8")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IOTFLOW_")} | env
    result = subprocess.run(
        [sys.executable, "-m", "worker", "--config", str(config), "config"],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert line.startswith("iotflow: configuration error: ") and "\n" not in line, line
    assert line in (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")


def _sql_blocks(text: str) -> list[str]:
    return re.findall(r"(?ms)^```sql\n(.*?)^```", text)


def test_the_sql_examples_name_the_schema_of_every_table() -> None:
    """The tables live in `postgres.schema` (iotflow), not in the search path's `public`:
    an example that says `UPDATE datapoints …` fails as pasted."""
    for doc in DOCS:
        for block in _sql_blocks(doc.read_text(encoding="utf-8")):
            for table in re.findall(r"(?i)\b(?:UPDATE|INTO|FROM|JOIN)\s+([\w.]+)", block):
                assert table.startswith("iotflow."), (doc.name, table)


def test_the_redis_keys_in_decoding_md_are_the_ones_the_code_makes() -> None:
    from worker.stores.keys import RedisKeys

    keys = RedisKeys()
    made = {
        keys.device_latest("{}"),  # type: ignore[arg-type]
        keys.device_latest_times("{}"),  # type: ignore[arg-type]
        keys.device_status("{}"),  # type: ignore[arg-type]
        keys.devices_online(),
        keys.alerts("{}"),  # type: ignore[arg-type]
        keys.device_ref("mac", "{}"),
        keys.device_ref("key", "{}"),
        keys.rate_limit("{}", "{}"),  # type: ignore[arg-type]
        keys.telemetry_channel("{}"),  # type: ignore[arg-type]
        keys.user_notifications_channel("{}"),  # type: ignore[arg-type]
        keys.system_alerts_channel(),
    }
    text = (ROOT / "docs" / "decoding.md").read_text(encoding="utf-8")
    named = re.findall(r"`((?:device|devices|alerts|ratelimit|channel):[^`\s]*)`", text)
    assert named
    for key in named:
        assert re.sub(r"\{\w*\}", "{}", key) in made, key
