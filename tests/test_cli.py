"""The `marc` command line without servers: sample-data, show, and clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MARC = str(Path(sys.executable).parent / "marc")


def _marc(*args, home: Path, check=True):
    env = {**os.environ, "MARC_HOME": str(home)}
    proc = subprocess.run([MARC, *args], env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_sample_data_then_show_tables(tmp_path):
    home = tmp_path / "home"
    out = _marc("sample-data", str(tmp_path / "eq"), "--videos", "2", "--seed", "4", "--width", "64", "--height", "64",
                home=home)
    assert "2 videos" in out.stdout
    # No tables yet: a clear message, non-zero exit.
    missing = _marc("show", "videos", home=home, check=False)
    assert missing.returncode == 2 and "no videos table yet" in missing.stderr

    from infra.presets import load_preset
    from stages import ingest
    from stages.common.workspace import Workspace

    ingest.run(load_preset("cpu-tiny"), tmp_path / "eq", Workspace(home))
    rows = [json.loads(l) for l in _marc("show", "questions", "--format", "jsonl", home=home).stdout.splitlines()]
    assert rows and set(rows[0]) >= {"question_id", "video_id", "problem", "options", "answer", "split"}
    shape = _marc("show", "questions", "--format", "jsonl", "--where", "family=shape", home=home).stdout.splitlines()
    assert shape and all(json.loads(l)["family"] == "shape" for l in shape)
    table = _marc("show", "videos", home=home).stdout
    assert table.splitlines()[0].split()[:2] == ["video_id", "path"] and "(2 rows)" in table
    assert "(0 rows)" in _marc("show", "rejects", home=home).stdout
    bad = _marc("show", "videos", "--where", "nope=1", home=home, check=False)
    assert bad.returncode == 2 and "no column 'nope'" in bad.stderr


def test_unknown_preset_is_a_clear_error(tmp_path):
    proc = _marc("sample-data", str(tmp_path / "x"), "--preset", "no-such", home=tmp_path, check=False)
    assert proc.returncode == 2 and "no preset 'no-such'" in proc.stderr
