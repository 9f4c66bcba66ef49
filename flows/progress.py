"""Progress of long stages: a Prefect progress artifact, a log line, and a terminal bar."""

from __future__ import annotations

import sys
import time

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact


class StageProgress:
    """Callable `(done, total)` handed to a stage; throttled so a fast stage does not flood the API."""

    def __init__(self, stage: str, unit: str = "items", every_seconds: float = 2.0):
        self.stage, self.unit, self.every = stage, unit, every_seconds
        self.logger = get_run_logger()
        self.artifact_id = create_progress_artifact(progress=0.0, key=f"{stage}-progress",
                                                    description=f"{stage}: {unit} done")
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < self.every:
            return
        self._last = now
        percent = 100.0 * done / total if total else 100.0
        update_progress_artifact(self.artifact_id, percent, description=f"{self.stage}: {done}/{total} {self.unit}")
        self.logger.info("%s: %d/%d %s (%.0f%%)", self.stage, done, total, self.unit, percent)


def terminal_bar(label: str, fraction: float, width: int = 30, stream=sys.stderr) -> None:
    """Redraw one progress line in place (used by `marc run` while it watches a flow run)."""
    filled = int(round(width * max(0.0, min(1.0, fraction))))
    stream.write(f"\r{label:<28} [{'#' * filled}{'.' * (width - filled)}] {100 * fraction:5.1f}%")
    stream.flush()
