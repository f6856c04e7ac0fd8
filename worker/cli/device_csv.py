"""`iotflow devices import FILE.csv`: the CSV file, read into device specs line by line.

The first row names the columns, in any order: `key` (required), `mac`, `name`,
`user`, `datapoints`. An empty cell is "not given". `datapoints` lists
`LABEL[:UNIT[:MIN:MAX]]` entries separated by `;`. Blank rows are skipped. A problem
is reported as `FILE:LINE: what`, the way compilers do, and nothing is imported.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TextIO

from worker.stores.devices import BadSpec, DeviceSpec, device_spec

COLUMNS = ("key", "mac", "name", "user", "datapoints")


class CsvProblem(ValueError):
    def __init__(self, path: Path, line: int | None, problem: object) -> None:
        super().__init__(f"{path}:{line}: {problem}" if line else f"{path}: {problem}")


def read_devices_csv(path: Path) -> list[tuple[int, DeviceSpec]]:
    """(line, spec) for each row of `path`; CsvProblem names the first bad one."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as file:
            return _rows(path, file)
    except OSError as exc:
        raise CsvProblem(path, None, exc.strerror or exc) from None
    except UnicodeDecodeError:
        raise CsvProblem(path, None, "not UTF-8 text") from None


def _rows(path: Path, file: TextIO) -> list[tuple[int, DeviceSpec]]:
    reader = csv.reader(file, skipinitialspace=True)
    try:
        header = [name.strip().lower() for name in next(reader)]
    except StopIteration:
        raise CsvProblem(path, None, "empty: the first row names the columns") from None
    except csv.Error as exc:
        raise CsvProblem(path, reader.line_num, exc) from None
    unknown = [name for name in header if name not in COLUMNS]
    if unknown or "key" not in header or len(set(header)) < len(header):
        raise CsvProblem(
            path, 1, f"the header must name the columns key (required), mac, name, user, datapoints, "
            f"each once; it has {', '.join(header)}"
        )  # fmt: skip
    specs: list[tuple[int, DeviceSpec]] = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return specs
        except csv.Error as exc:
            raise CsvProblem(path, reader.line_num, exc) from None
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) > len(header):
            raise CsvProblem(path, line, f"{len(row)} cells, the header names {len(header)} columns")
        cells = dict(zip(header, [cell.strip() for cell in row], strict=False))
        points = [entry.strip() for entry in cells.get("datapoints", "").split(";") if entry.strip()]
        if not cells.get("key"):
            raise CsvProblem(path, line, "no key")
        try:
            spec = device_spec(cells["key"], cells.get("mac"), cells.get("name"), cells.get("user"), points)
        except BadSpec as exc:
            raise CsvProblem(path, line, exc) from None
        specs.append((line, spec))
