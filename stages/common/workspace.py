"""The layout of the state folder (MARC_HOME) as stages see it: plain paths, no globals.

Flows build a `Workspace` from `infra.home.marc_home()` and hand it to stages, so a
stage never reads the environment to find out where to write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    home: Path

    def __post_init__(self):
        object.__setattr__(self, "home", Path(self.home).resolve())

    @property
    def tables(self) -> Path:
        return self._dir("tables")

    @property
    def quarantine(self) -> Path:
        return self._dir("quarantine")

    @property
    def keyframes(self) -> Path:
        return self._dir("keyframes")

    def table(self, name: str) -> Path:
        """Path of a pipeline table's Arrow file, e.g. `videos` -> tables/videos.arrow."""
        return self.tables / f"{name}.arrow"

    def rejects(self, stage: str) -> Path:
        """Each stage owns its slice of the rejects table, replaced whole on every run of that stage."""
        return self._dir("tables/rejects") / f"{stage}.arrow"

    def _dir(self, name: str) -> Path:
        path = self.home / name
        path.mkdir(parents=True, exist_ok=True)
        return path
