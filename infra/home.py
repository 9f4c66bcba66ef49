"""Where a run keeps its state: one folder, `MARC_HOME` (default `./.marc` in the checkout)."""

from __future__ import annotations

import hashlib
import os
import re
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


def dataset_home(data_dir: Path) -> Path:
    """MARC_HOME/datasets/<folder name>-<hash of its path>: the tables of a data set that is only
    evaluated (`marc run --stage evaluate --data DIR`), kept apart from the training data's."""
    resolved = Path(data_dir).resolve()
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", resolved.name)[:40] or "data"
    return marc_home() / "datasets" / f"{slug}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"


def _sub(name: str) -> Path:
    path = marc_home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path
