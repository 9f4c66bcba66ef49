"""`marc answer` (issue #7): memory built once per video, features cached per event, the same answer as
the uncached student path, and clear errors for a missing file, a non-video and an untrained model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_contracts import schemas
from stages import answer as answering
from stages.common.arrow_io import read_table
from stages.embed import train as embed_train
from stages.model import runner
from stages.model.inputs import build_student_inputs, load_frames
from stages.model.qwen import load_model
from tiny_marc import format_teacher, tiny_config, tiny_workspace

torch.set_num_threads(1)
BIN = Path(sys.executable).parent
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def _config():
    config = tiny_config()
    return config.model_copy(update={"embed": config.embed.model_copy(update={"train_steps": 40}),
                                     "evaluate": config.evaluate.model_copy(update={"max_new_tokens": 16})})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A MARC_HOME with a trained visual tower and a (format-taught) student; and the sample data."""
    root = tmp_path_factory.mktemp("answer")
    ws, data = tiny_workspace(root)
    config = _config()
    tower = embed_train.run(config, data / "events.jsonl", read_table(ws.table("videos"), schemas.VIDEOS),
                            None, ws).checkpoint
    student = format_teacher(config, ws, ws.home / "student")
    return ws.home, data, student, tower


def test_second_question_reuses_memory_and_features_and_matches_the_uncached_student(trained):
    home, data, student, tower = trained
    config = _config()
    video = sorted((data / "videos").glob("*.mp4"))[0]
    options = ["A. red", "B. green", "C. blue", "D. white"]
    first = answering.answer(config, home, video, "What colour is the shape on the blue background?", options,
                             student, tower)
    assert first.new_video and first.cached_events == 0 and first.events
    assert all(e["end_time"] > e["start_time"] >= 0 for e in first.events)
    assert first.visual_tokens == config.model.target_frames * 4  # 56 px: 4 LM tokens per temporal group
    ws = answering.answer_workspace(home)
    events_before = read_table(ws.table("events")).num_rows
    feature_files = set((ws.home / "features").rglob("*.pt"))
    assert len(feature_files) == len(first.events)

    second = answering.answer(config, home, video, "Which shape moves on the blue background?",
                              ["A. circle", "B. square", "C. triangle", "D. diamond"], student, tower)
    assert not second.new_video and read_table(ws.table("events")).num_rows == events_before
    assert second.cached_events == len(second.events)  # same retrieved events: every feature read back
    assert set((ws.home / "features").rglob("*.pt")) == feature_files
    assert "remember" in second.seconds and second.seconds["remember"] < first.seconds["remember"]

    # Per-event cached features give the student's own answer on the whole memory, computed afresh.
    bundle = load_model(student, config.model)
    memory, _ = answering.retrieve(config, ws, read_table(ws.table("videos")).to_pylist()[0],
                                   "Which shape moves on the blue background?", None, _text_tower())
    q = {"question_id": "x", "problem": "Which shape moves on the blue background?",
         "options": ["A. circle", "B. square", "C. triangle", "D. diamond"], "problem_type": "multiple choice"}
    frames = load_frames(bundle, video, memory.timestamps)
    direct = runner.generate(bundle, build_student_inputs(bundle, [q], [frames], [memory]), 16).texts[0]
    assert second.completion == direct


def _text_tower():
    from stages.embed.towers import TextTower

    return TextTower()


def _marc(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env.update(MARC_HOME=str(home), MARC_MLFLOW_PORT="1")  # no tracking server: port 1 refuses at once
    return subprocess.run([str(BIN / "marc"), "answer", *args], env=env, capture_output=True, text=True, timeout=600)


def test_cli_errors_name_the_problem(trained, tmp_path):
    home, data, student, tower = trained
    missing = _marc(home, str(tmp_path / "nope.mp4"), "What?", "--model", str(student))
    assert missing.returncode == 2 and "no such video file" in missing.stderr and "nope.mp4" in missing.stderr
    fake = tmp_path / "notes.mp4"
    fake.write_text("not a video at all")
    bad = _marc(home, str(fake), "What?", "--model", str(student))
    assert bad.returncode == 2 and "is not a readable video" in bad.stderr and "notes.mp4" in bad.stderr
    video = sorted((data / "videos").glob("*.mp4"))[0]
    untrained = _marc(tmp_path / "empty-home", str(video), "What?")
    assert untrained.returncode == 2 and "no trained student" in untrained.stderr, untrained.stderr
    wrong = _marc(home, str(video), "What?", "--options", "red", "--model", str(student))
    assert wrong.returncode == 2 and "does not start with a letter" in wrong.stderr


@pytest.mark.skipif(not REAL.is_dir(), reason=f"the shared real videos are not at {REAL}")
def test_cli_answers_a_real_video_multiple_choice(trained):
    home, data, student, tower = trained
    video = REAL / "pyscenedetect" / "goldeneye-vfr-drop3.mp4"
    if not video.is_file():  # the file set may change; any real clip will do
        video = min((p for p in REAL.rglob("*.mp4")), key=lambda p: p.stat().st_size)
    out = _marc(home, str(video), "What happens in the video?", "--options", "A. a car chase", "B. a dance",
                "C. a cooking show", "D. a tennis match", "--model", str(student))
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("answer:") and f"student: {student} (--model)" in out.stdout
    assert "retrieved events (memory built now" in out.stdout and "visual tokens:" in out.stdout
    assert any(line.strip().startswith("event ") and "s - " in line for line in lines)
    again = _marc(home, str(video), "Is there a vehicle?", "--options", "A. yes", "B. no", "--model", str(student))
    assert again.returncode == 0 and "memory reused" in again.stdout, again.stdout + again.stderr
