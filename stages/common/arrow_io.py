"""Arrow IPC files written atomically and read back against their contract.

A write goes to a temp file in the same folder, is fsynced, then renamed over the
target, so a crash never leaves a half-written table: readers see the old file or
the new one, nothing in between.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from data_contracts.validate import validate_table


def write_table(table: pa.Table, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            with ipc.new_file(raw, table.schema) as writer:
                writer.write_table(table)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _remove_stale_temps(path: Path) -> None:
    """Temp files a killed writer left behind; each table has one writer (its stage's commit)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def read_table(path: Path, schema: pa.Schema | None = None) -> pa.Table:
    """Read an Arrow file; with `schema`, validate it (errors name the file, row and column)."""
    path = Path(path)
    with pa.memory_map(str(path)) as source:
        table = ipc.open_file(source).read_all()
    if schema is not None:
        validate_table(table, schema, str(path))
    return table


def read_or_empty(path: Path, schema: pa.Schema) -> pa.Table:
    return read_table(path, schema) if Path(path).is_file() else schema.empty_table()


def write_bytes_atomic(data: bytes, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
