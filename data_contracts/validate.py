"""Validation of tables against their contract, with errors that say where.

Every problem names the file, the 1-based row and the column, so a user can open
the file and find it. `validate_rows` checks Python rows before they become a table;
`validate_table` checks an Arrow table read back from disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from data_contracts.schemas import schema_version


@dataclass(frozen=True)
class Problem:
    file: str
    row: int | None  # 1-based; None for the whole file
    column: str | None
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.row is not None:
            where += f", row {self.row}"
        if self.column is not None:
            where += f", column '{self.column}'"
        return f"{where}: {self.message}"


class ContractError(ValueError):
    """Raised when data does not match its contract; `.problems` lists every finding."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        shown = "\n  ".join(str(p) for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} contract problem(s):\n  {shown}{more}")


def _type_ok(value, typ: pa.DataType) -> bool:
    if pa.types.is_string(typ):
        return isinstance(value, str)
    if pa.types.is_boolean(typ):
        return isinstance(value, bool)
    if pa.types.is_integer(typ):
        return isinstance(value, int) and not isinstance(value, bool)
    if pa.types.is_floating(typ):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if pa.types.is_list(typ):
        return isinstance(value, list) and all(_type_ok(v, typ.value_type) for v in value)
    return True


def problems_in_rows(rows: list[dict], schema: pa.Schema, file: str) -> list[Problem]:
    """Check plain dict rows against a schema: missing, null and mistyped fields."""
    found: list[Problem] = []
    for i, row in enumerate(rows, start=1):
        for field in schema:
            if field.name not in row or row[field.name] is None:
                if not field.nullable:
                    found.append(Problem(file, i, field.name, "required value is missing"))
                continue
            if not _type_ok(row[field.name], field.type):
                found.append(
                    Problem(file, i, field.name, f"expected {field.type}, got {type(row[field.name]).__name__}")
                )
    return found


def validate_rows(rows: list[dict], schema: pa.Schema, file: str) -> pa.Table:
    """Return the rows as a table of `schema`, or raise ContractError naming every bad cell."""
    found = problems_in_rows(rows, schema, file)
    if found:
        raise ContractError(found)
    return pa.Table.from_pylist(rows, schema=schema)


def validate_table(table: pa.Table, schema: pa.Schema, file: str) -> None:
    """Check a table read from `file`: same table name and major version, columns, types, nulls."""
    found: list[Problem] = []
    meta = table.schema.metadata or {}
    want_name = schema.metadata[b"marc.table"]
    got_name = meta.get(b"marc.table")
    if got_name is not None and got_name != want_name:
        found.append(Problem(file, None, None, f"holds table {got_name.decode()!r}, expected {want_name.decode()!r}"))
    got_version = schema_version(table.schema)
    want_version = schema_version(schema)
    if got_version != "?" and got_version.split(".")[0] != want_version.split(".")[0]:
        found.append(Problem(file, None, None, f"schema version {got_version}, this code reads {want_version}"))
    for field in schema:
        if field.name not in table.column_names:
            found.append(Problem(file, None, field.name, "column is missing"))
            continue
        column = table.column(field.name)
        if not column.type.equals(field.type):
            found.append(Problem(file, None, field.name, f"type {column.type}, expected {field.type}"))
            continue
        if not field.nullable and column.null_count:
            nulls = column.is_null().to_pylist()
            for i, is_null in enumerate(nulls, start=1):
                if is_null:
                    found.append(Problem(file, i, field.name, "required value is null"))
    if found:
        raise ContractError(found)
