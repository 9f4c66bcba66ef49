"""Fingerprints and per-item incremental work, shared by every stage.

An item's fingerprint hashes the stage name, the stage's code version, the config
fields the stage reads, and the fingerprints of the item's inputs (a video's content
hash for segment; segment's fingerprint of the video for embed; ...). A stage output
table stores, in its Arrow schema metadata, the fingerprint of every item it holds —
also items that produced no rows (a video that failed) — so the table and its
bookkeeping are one file, replaced atomically together: a crash can never leave rows
and fingerprints out of step.

    plan = plan_items(current_fps, previous_table, force)
    new_rows = [...compute plan.compute...]
    table = merge(previous_table, plan, new_rows, ...)   # reused rows + new rows
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from stages.common.arrow_io import read_table, write_table

ITEMS_KEY = b"marc.items"


def fingerprint(stage: str, code_version: str, config_fields: dict[str, Any], inputs: Iterable[str]) -> str:
    """Stable hash of what determines an item's output; any change means recompute."""
    payload = json.dumps(
        {"stage": stage, "code": code_version, "config": config_fields, "inputs": list(inputs)},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


@dataclass
class Plan:
    fingerprints: dict[str, str]  # item -> current fingerprint
    compute: list[str] = field(default_factory=list)  # new or changed items (all with force)
    reuse: list[str] = field(default_factory=list)  # unchanged items: rows are kept as they are
    remove: list[str] = field(default_factory=list)  # items gone from the input: rows are dropped
    previous: dict[str, str] = field(default_factory=dict)  # item -> fingerprint the table held

    @property
    def counts(self) -> dict[str, int]:
        return {"computed": len(self.compute), "reused": len(self.reuse), "removed": len(self.remove)}

    @property
    def is_noop(self) -> bool:
        return not self.compute and not self.remove


def stored_items(table: pa.Table) -> dict[str, str]:
    raw = (table.schema.metadata or {}).get(ITEMS_KEY)
    return json.loads(raw) if raw else {}


def plan_items(current: dict[str, str], previous_table: pa.Table, force: bool = False) -> Plan:
    previous = stored_items(previous_table)
    plan = Plan(fingerprints=dict(current), previous=previous)
    for item, fp in sorted(current.items()):
        if not force and previous.get(item) == fp:
            plan.reuse.append(item)
        else:
            plan.compute.append(item)
    plan.remove = sorted(set(previous) - set(current))
    return plan


def load_previous(path: Path, schema: pa.Schema) -> pa.Table:
    return read_table(path, schema) if Path(path).is_file() else schema.empty_table()


def merge(previous_table: pa.Table, plan: Plan, new_rows: pa.Table, key_column: str,
          sort_by: list[tuple[str, str]], schema: pa.Schema) -> pa.Table:
    """Reused rows of the previous table + freshly computed rows, stamped with every item's fingerprint."""
    keep = pc.is_in(previous_table.column(key_column), value_set=pa.array(plan.reuse, pa.string()))
    kept = previous_table.filter(keep).cast(schema)
    combined = pa.concat_tables([kept, new_rows.cast(schema)]).sort_by(sort_by)
    metadata = dict(schema.metadata or {})
    metadata[ITEMS_KEY] = json.dumps(plan.fingerprints, sort_keys=True).encode()
    return combined.replace_schema_metadata(metadata)


def commit(table: pa.Table, path: Path, plan: Plan) -> bool:
    """Write the merged table atomically, unless nothing changed (an unchanged rerun writes nothing)."""
    if plan.is_noop and Path(path).is_file():
        return False
    write_table(table, path)
    return True
