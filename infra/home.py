"""Where a run keeps its state: one folder, `MARC_HOME` (default `./.marc` in the checkout)."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def marc_home() -> Path:
    """The state folder: MARC_HOME if set, else `.marc` next to this checkout's pyproject.toml."""
    home = Path(os.environ.get("MARC_HOME") or PROJECT_ROOT / ".marc").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def tables_dir() -> Path:
    return _sub("tables")


def quarantine_dir() -> Path:
    return _sub("quarantine")


def sample_data_dir() -> Path:
    """Where the embedded EventQA sample set is generated when no data folder is given."""
    return marc_home() / "sample-data"


def _sub(name: str) -> Path:
    path = marc_home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path
