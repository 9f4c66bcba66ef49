"""Contracts: schemas carry name and version; validation names file, row and column."""

import pyarrow as pa
import pytest

from data_contracts import schemas
from data_contracts.validate import ContractError, validate_rows, validate_table
from stages.common.arrow_io import read_table, write_table


def test_every_schema_is_named_and_versioned():
    for name, schema in schemas.ALL.items():
        assert schema.metadata[b"marc.table"].decode() == name
        assert schemas.schema_version(schema).count(".") == 1


def _reject(**over):
    row = dict(stage="ingest", severity="error", item_kind="video", item_id="a.mp4", source_file="x",
               source_row=None, column=None, reason="bad", quarantine_path=None)
    row.update(over)
    return row


def test_validate_rows_names_row_and_column():
    rows = [_reject(), _reject(reason=None), _reject(source_row="three")]
    with pytest.raises(ContractError) as err:
        validate_rows(rows, schemas.REJECTS, "rejects.jsonl")
    text = str(err.value)
    assert "rejects.jsonl, row 2, column 'reason': required value is missing" in text
    assert "rejects.jsonl, row 3, column 'source_row': expected int64, got str" in text
    assert len(err.value.problems) == 2


def test_round_trip_and_table_checks(tmp_path):
    table = validate_rows([_reject(), _reject(item_id=None)], schemas.REJECTS, "mem")
    path = write_table(table, tmp_path / "rejects.arrow")
    back = read_table(path, schemas.REJECTS)
    assert back.equals(table) and back.schema.metadata == schemas.REJECTS.metadata
    # A file of another table, and a file missing a column, are refused with the file named.
    with pytest.raises(ContractError, match="holds table 'rejects', expected 'videos'"):
        validate_table(back, schemas.VIDEOS, str(path))
    with pytest.raises(ContractError, match=r"rejects.arrow, column 'reason': column is missing"):
        validate_table(back.drop_columns(["reason"]), schemas.REJECTS, str(path))
    nulls = pa.Table.from_pylist([_reject(), _reject(reason=None)],
                                 schema=schemas.REJECTS.set(schemas.REJECTS.get_field_index("reason"),
                                                            pa.field("reason", pa.string())))
    with pytest.raises(ContractError, match="row 2, column 'reason': required value is null"):
        validate_table(nulls, schemas.REJECTS, "f.arrow")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "t.arrow"
    write_table(validate_rows([_reject()], schemas.REJECTS, "m"), path)
    before = path.read_bytes()

    with pytest.raises(Exception):
        write_table("not a table", path)  # fails mid-write
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.arrow"]  # no temp file left behind
