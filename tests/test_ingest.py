"""Stage ingest on a generated EventQA folder spiked with every kind of bad input.

Each bad input must land in the rejects table with a reason that names it, and every
good video and question must still arrive. Inputs are never modified.
"""

import hashlib
import json
import os
import subprocess
from pathlib import Path

import imageio_ffmpeg
import pytest

from data_contracts import schemas
from infra.presets import load_preset
from stages import ingest, sample_data
from stages.common.arrow_io import read_table
from stages.common.workspace import Workspace


def _ffmpeg(*args):
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", *args], check=True)


def _question(qid, path, **over):
    q = {"problem_id": qid, "problem": "Which shape moves on the red background?",
         "options": ["A. circle", "B. square", "C. triangle", "D. diamond"], "solution": "<answer>B</answer>",
         "problem_type": "multiple choice", "data_type": "video", "path": path}
    q.update(over)
    return q


@pytest.fixture(scope="module")
def spiked(tmp_path_factory):
    """A 3-video EventQA folder plus bad files and bad question lines; returns (folder, good, outside)."""
    root = tmp_path_factory.mktemp("ingest")
    data = root / "data"
    summary = sample_data.generate(data, videos=3, seed=7, width=64, height=64, fps=8)
    good_lines = (data / "questions.jsonl").read_bytes().splitlines()

    bad = data / "bad"
    bad.mkdir()
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "notes.mp4").write_text("this is a text file with a video suffix\n")
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", str(bad / "audio.mp4"))
    _ffmpeg("-f", "lavfi", "-i", "color=c=red:s=64x64:r=10", "-frames:v", "0", "-c:v", "libx264", str(bad / "zero.mp4"))
    outside = root / "outside.mp4"
    outside.write_bytes((data / "videos" / "eq7_0000.mp4").read_bytes())
    os.symlink(outside, bad / "escape.mp4")

    extra = [
        json.dumps(_question("b-empty", "bad/empty.mp4")).encode(),
        json.dumps(_question("b-notes", "bad/notes.mp4")).encode(),
        json.dumps(_question("b-audio", "bad/audio.mp4")).encode(),
        json.dumps(_question("b-zero", "bad/zero.mp4")).encode(),
        json.dumps(_question("b-missing", "videos/nope.mp4")).encode(),
        json.dumps(_question("b-dotdot", "../outside.mp4")).encode(),
        json.dumps(_question("b-absolute", str(outside))).encode(),
        json.dumps(_question("b-symlink", "bad/escape.mp4")).encode(),
        json.dumps(_question("../etc/passwd", "videos/eq7_0000.mp4")).encode(),
        json.dumps(_question("b-letter", "videos/eq7_0000.mp4", solution="<answer>E</answer>")).encode(),
        json.dumps(_question("b-options", "videos/eq7_0000.mp4", options=["A. one", "B. two", "D. four"])).encode(),
        json.dumps(_question("b-type", "videos/eq7_0000.mp4", problem_type="essay")).encode(),
        json.dumps(_question("b-twoanswers", "videos/eq7_0000.mp4", solution="<answer>A</answer><answer>B</answer>")).encode(),
        good_lines[0],  # a duplicate problem_id: the first occurrence is kept
        b'{"problem_id": "b-broken", "problem": ',
        b'{"problem_id": "b-latin1", "problem": "caf\xe9"}',
        b"[1, 2, 3]",
    ]
    (data / "questions.jsonl").write_bytes(b"\n".join(good_lines + extra) + b"\n")
    return data, summary, outside


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_bad_inputs_are_rejected_and_good_items_arrive(spiked, tmp_path):
    data, summary, outside = spiked
    before = _hashes(data)
    workspace = Workspace(tmp_path / "home")
    result = ingest.run(load_preset("cpu-tiny"), data, workspace)

    # Every good item arrives.
    assert result.counts["videos"] == summary.videos == 3
    assert result.counts["questions"] == summary.questions
    assert result.counts["train_questions"] + result.counts["test_questions"] == summary.questions
    good_ids = {json.loads(l)["problem_id"] for l in (data / "questions.jsonl").read_bytes().splitlines()[: summary.questions]}
    assert set(result.questions.column("question_id").to_pylist()) == good_ids

    rejects = {(r["item_id"], r["source_row"]): r for r in result.rejects.to_pylist()}
    reasons = " | ".join(r["reason"] for r in rejects.values())
    n = summary.questions
    expected = {
        "bad/empty.mp4": "empty file (0 bytes)",
        "bad/notes.mp4": "not a readable media container",
        "bad/audio.mp4": "no video stream (streams: audio)",
        "bad/zero.mp4": "no video stream",
        "bad/escape.mp4": "outside the data folder",
    }
    for item, reason in expected.items():
        row = next(r for r in result.rejects.to_pylist() if r["item_id"] == item and r["item_kind"] != "question")
        assert reason in row["reason"], (item, row["reason"])
        assert item in row["reason"]
    # Questions: each named by row, with the column at fault.
    by_row = {r["source_row"]: r for r in result.rejects.to_pylist() if r["item_kind"] == "question"}
    checks = {
        n + 1: ("path", "bad/empty.mp4 was rejected"),
        n + 5: ("path", "media file videos/nope.mp4 not found"),
        n + 6: ("path", "leaves the data folder"),
        n + 7: ("path", "is absolute"),
        n + 8: ("path", "outside the data folder"),
        n + 9: ("problem_id", "contains path characters"),
        n + 10: ("solution", "answer 'E' is not one of the option letters"),
        n + 11: ("options", "option letters must run A, B, C"),
        n + 12: ("problem_type", "unknown problem_type 'essay'"),
        n + 13: ("solution", "exactly one <answer>"),
        n + 14: ("problem_id", "duplicate problem_id"),
        n + 15: (None, "is not valid JSON"),
        n + 16: (None, "is not valid UTF-8"),
        n + 17: (None, "expected a JSON object"),
    }
    for row, (column, text) in checks.items():
        assert row in by_row, f"row {row} ({text}) not rejected; rejects: {reasons}"
        assert by_row[row]["column"] == column and text in by_row[row]["reason"], by_row[row]
        assert by_row[row]["source_file"].endswith("questions.jsonl")
    # Bad content is kept for inspection; the inputs themselves are untouched.
    assert (workspace.quarantine / "ingest" / "media" / "bad" / "notes.mp4").read_text().startswith("this is a text")
    assert (workspace.quarantine / "ingest" / "questions" / f"questions.jsonl.line{n + 16}").read_bytes().endswith(b"caf\xe9\"}")
    assert _hashes(data) == before and outside.exists()

    # What was written is what the contracts say, and reads back.
    assert read_table(workspace.table("videos"), schemas.VIDEOS).num_rows == 3
    assert read_table(workspace.rejects("ingest"), schemas.REJECTS).num_rows == result.rejects.num_rows


def test_videos_are_probed_from_timestamps(spiked, tmp_path):
    data, summary, _ = spiked
    result = ingest.run(load_preset("cpu-tiny"), data, Workspace(tmp_path / "home"))
    events = {json.loads(l)["path"]: json.loads(l) for l in (data / "events.jsonl").read_text().splitlines()}
    for video in result.videos.to_pylist():
        truth = events[video["video_id"]]
        assert video["frame_count"] == truth["frame_count"]
        assert (video["width"], video["height"]) == (64, 64)
        assert video["fps"] == pytest.approx(8.0, rel=1e-3)
        assert video["duration"] == pytest.approx(truth["frame_count"] / 8.0, rel=1e-3)
        assert video["start_time"] == 0.0 and not video["variable_frame_rate"]


def test_real_video_r1_json_list_loads(tmp_path, real_videos):
    """Video-R1 ships a JSON list with integer ids, './'-prefixed paths and extra fields."""
    data = tmp_path / "r1"
    (data / "LLaVA-Video-178K").mkdir(parents=True)
    real = real_videos / "mmaction2" / "demo.mp4"
    (data / "LLaVA-Video-178K" / "demo.mp4").write_bytes(real.read_bytes())
    records = [
        {"problem_id": 1, "problem": "What is happening?", "data_type": "video", "problem_type": "multiple choice",
         "options": ["A. cooking", "B. dancing", "C. sleeping", "D. swimming"], "process": "<think>...</think>",
         "solution": "<answer>B</answer>", "path": "./LLaVA-Video-178K/demo.mp4", "data_source": "LLaVA-Video-178K"},
        {"problem_id": 2, "problem": "How many people are there?", "data_type": "video", "problem_type": "numerical",
         "options": [], "solution": "<answer>2</answer>", "path": "./LLaVA-Video-178K/demo.mp4"},
        {"problem_id": 3, "problem": "Describe the scene.", "data_type": "video", "problem_type": "free-form",
         "options": [], "solution": "<answer>A person dances.</answer>", "path": "./LLaVA-Video-178K/demo.mp4"},
    ]
    (data / "questions.json").write_text(json.dumps(records))
    result = ingest.run(load_preset("cpu-tiny"), data, Workspace(tmp_path / "home"))
    assert result.rejects.num_rows == 0, result.rejects.to_pylist()
    rows = result.questions.to_pylist()
    assert [r["question_id"] for r in rows] == ["1", "2", "3"]
    assert {r["video_id"] for r in rows} == {"LLaVA-Video-178K/demo.mp4"}
    assert [r["answer"] for r in rows] == ["B", "2", "A person dances."]
    assert all(r["split"] == "train" for r in rows)


def test_missing_or_empty_questions_file_is_a_reject_not_a_crash(tmp_path):
    data = tmp_path / "d"
    sample_data.generate(data, videos=1, seed=3, width=64, height=64, fps=8)
    (data / "questions.jsonl").write_text("")
    result = ingest.run(load_preset("cpu-tiny"), data, Workspace(tmp_path / "home"))
    assert result.counts["videos"] == 1 and result.counts["questions"] == 0
    assert "holds no questions" in result.rejects.column("reason")[0].as_py()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ingest.run(load_preset("cpu-tiny"), tmp_path / "nowhere", Workspace(tmp_path / "home"))
