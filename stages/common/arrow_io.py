"""Arrow IPC files written atomically and read back against their contract.

A write goes to a temp file in the same folder, is fsynced, then renamed over the
target, so a crash never leaves a half-written table: readers see the old file or
the new one, nothing in between.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from data_contracts.validate import validate_table


class DiskFullError(OSError):
    """No space (or quota) left under MARC_HOME while writing a table; the previous version is kept."""


def write_table(table: pa.Table, path: Path) -> Path:
    path = Path(path)
    tmp = _stage(table, path)
    os.replace(tmp, path)
    return path


def write_tables(tables: list[tuple[pa.Table, Path]]) -> list[Path]:
    """Several tables as one commit: every new version is written and fsynced before the first
    rename, so a failed write (a full disk) leaves every previous version in place, never a mix."""
    staged: list[tuple[str, Path]] = []
    try:
        for table, path in tables:
            staged.append((_stage(table, Path(path)), Path(path)))
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise
    for tmp, path in staged:
        os.replace(tmp, path)
    return [path for _, path in staged]


def _stage(table: pa.Table, path: Path) -> str:
    """Write `table` to a fsynced temp file beside `path`; returns the temp file's name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        _raise_if_disk_full(exc, path)
        raise
    try:
        with os.fdopen(fd, "wb") as raw:
            with ipc.new_file(raw, table.schema) as writer:
                writer.write_table(table)
            raw.flush()
            os.fsync(raw.fileno())
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        _raise_if_disk_full(exc, path)
        raise
    return tmp


def _raise_if_disk_full(exc: BaseException, path: Path) -> None:
    """Turn ENOSPC/EDQUOT (bare "[Errno 28] No space left on device", no file named) into an
    error that says which table, where, and that nothing was lost."""
    if isinstance(exc, OSError) and (exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc)):
        raise DiskFullError(errno.ENOSPC, f"No space left on device writing {path}: the previous version of "
                                          f"{path.name} is kept unchanged; free space under {path.parent} "
                                          f"(MARC_HOME) and rerun") from exc


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
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        _raise_if_disk_full(exc, path)
        raise
    return path
