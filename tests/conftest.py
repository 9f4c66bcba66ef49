"""Shared test helpers: where the shared real-video material lives."""

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"
REAL_VIDEOS = SHARED / "data" / "real"


@pytest.fixture(scope="session")
def real_videos() -> Path:
    assert REAL_VIDEOS.is_dir(), f"real test videos expected at {REAL_VIDEOS} (../shared beside the checkout)"
    return REAL_VIDEOS
