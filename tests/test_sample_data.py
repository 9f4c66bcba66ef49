"""Tests of the EventQA sample data generator (stages/sample_data.py). Small and fast."""

from __future__ import annotations

import json
import re
from pathlib import Path

import av
import numpy as np
import pytest

from stages import sample_data as sd

SEED = 3
N_VIDEOS = 4
SIZE = 64
FPS = 10


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("eventqa") / "a"
    calls: list[tuple[int, int]] = []
    summary = sd.generate(out, videos=N_VIDEOS, seed=SEED, width=SIZE, height=SIZE, fps=FPS,
                          progress=lambda d, t: calls.append((d, t)))
    return out, summary, calls


def test_layout_summary_and_progress(dataset):
    out, summary, calls = dataset
    assert calls == [(i + 1, N_VIDEOS) for i in range(N_VIDEOS)]
    assert sorted(p.name for p in (out / "videos").iterdir()) == [f"eq{SEED}_{i:04d}.mp4" for i in range(N_VIDEOS)]
    events = _read_jsonl(out / "events.jsonl")
    questions = _read_jsonl(out / "questions.jsonl")
    assert summary.out_dir == out
    assert summary.videos == len(events) == N_VIDEOS
    assert summary.events == sum(len(v["events"]) for v in events)
    assert summary.questions == len(questions)
    assert summary.train_questions == sum(q["split"] == "train" for q in questions)
    assert summary.test_questions == sum(q["split"] == "test" for q in questions)
    # round(0.25 * 4) = 1 whole video held out; its questions follow it.
    assert [v["split"] for v in events].count("test") == 1
    split_of = {v["path"]: v["split"] for v in events}
    assert all(q["split"] == split_of[q["path"]] for q in questions)
    # No temp files left behind.
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_events_follow_spec(dataset):
    out, _, _ = dataset
    for v in _read_jsonl(out / "events.jsonl"):
        assert re.fullmatch(rf"eq{SEED}_\d{{4}}", v["video_id"])
        assert v["path"] == f"videos/{v['video_id']}.mp4"
        assert (v["fps"], v["width"], v["height"]) == (FPS, SIZE, SIZE)
        evs = v["events"]
        assert 3 <= len(evs) <= 6
        assert [e["index"] for e in evs] == list(range(len(evs)))
        assert evs[0]["start_frame"] == 0 and evs[-1]["end_frame"] == v["frame_count"]
        for a, b in zip(evs, evs[1:]):
            assert a["end_frame"] == b["start_frame"]
        for e in evs:
            assert 2 * FPS <= e["end_frame"] - e["start_frame"] <= 4 * FPS
            assert e["start_time"] == pytest.approx(e["start_frame"] / FPS)
            assert e["end_time"] == pytest.approx(e["end_frame"] / FPS)
            assert e["background"] in sd.PALETTE and e["colour"] in sd.PALETTE
            assert e["shape"] in sd.SHAPES and e["direction"] in sd.DIRECTIONS
            assert e["colour"] != e["background"]
            assert e["caption"] == (
                f"a {e['colour']} {e['shape']} moving {e['direction']} on a {e['background']} background"
            )
        assert len({e["background"] for e in evs}) == len(evs)
        assert len({(e["colour"], e["shape"]) for e in evs}) == len(evs)


def test_questions_follow_spec(dataset):
    out, _, _ = dataset
    videos = {v["path"]: v for v in _read_jsonl(out / "events.jsonl")}
    questions = _read_jsonl(out / "questions.jsonl")
    by_video: dict[str, list[dict]] = {}
    for q in questions:
        by_video.setdefault(q["path"], []).append(q)
    assert set(by_video) == set(videos)
    for path, qs in by_video.items():
        v = videos[path]
        evs = v["events"]
        assert [q["problem_id"] for q in qs] == [f"{v['video_id']}_q{j:02d}" for j in range(len(qs))]
        fams = [q["family"] for q in qs]
        n = len(evs)
        assert (fams.count("shape"), fams.count("colour"), fams.count("direction"), fams.count("after")) == (n, n, n, n - 1)
        for q in qs:
            assert q["problem_type"] == "multiple choice" and q["data_type"] == "video"
            assert len(q["options"]) == 4
            assert [o[:3] for o in q["options"]] == ["A. ", "B. ", "C. ", "D. "]
            texts = [o[3:] for o in q["options"]]
            assert len(set(texts)) == 4
            m = re.fullmatch(r"<answer>([ABCD])</answer>", q["solution"])
            assert m, q["solution"]
            answer = texts["ABCD".index(m.group(1))]
            k = q["answer_event"]
            e = evs[k]
            fam = q["family"]
            if fam == "shape":
                assert q["problem"] == f"Which shape moves on the {e['background']} background?"
                assert sorted(texts) == sorted(sd.SHAPES) and answer == e["shape"]
            elif fam == "colour":
                assert q["problem"] == f"What colour is the shape on the {e['background']} background?"
                assert set(texts) <= set(sd.PALETTE) and answer == e["colour"]
            elif fam == "direction":
                assert q["problem"] == f"Which way does the {e['colour']} {e['shape']} move?"
                assert sorted(texts) == sorted(sd.DIRECTIONS) and answer == e["direction"]
                # The (colour, shape) pair names exactly one event.
                assert sum((x["colour"], x["shape"]) == (e["colour"], e["shape"]) for x in evs) == 1
            else:
                assert fam == "after"
                assert 1 <= k < n  # the answer is the NEXT event, so never asked about the last one
                prev = evs[k - 1]
                assert q["problem"] == f"Which background comes right after the {prev['background']} background?"
                assert set(texts) <= set(sd.PALETTE) and answer == e["background"]
                # Distractors come from the video's own backgrounds before the palette.
                own = {x["background"] for x in evs} - {e["background"], prev["background"]}
                assert len(set(texts) & own) == min(3, len(own))


def test_videos_decode_with_right_frames_and_backgrounds(dataset):
    out, _, _ = dataset
    for v in _read_jsonl(out / "events.jsonl"):
        path = out / v["path"]
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            assert s.codec_context.name == "h264" and s.format.name == "yuv420p"
        frames = _decode(path)
        assert frames.shape == (v["frame_count"], SIZE, SIZE, 3)
        for e in v["events"]:
            for f in (e["start_frame"], e["start_frame"] + 1, e["end_frame"] - 1):
                corner = frames[f, 1, 1].astype(int)
                assert np.abs(corner - np.array(sd.PALETTE[e["background"]])).max() <= 25, (v["video_id"], e, f)


def test_determinism_byte_identical(dataset, tmp_path):
    out, _, _ = dataset
    other = tmp_path / "b"
    sd.generate(other, videos=N_VIDEOS, seed=SEED, width=SIZE, height=SIZE, fps=FPS)
    names = ["events.jsonl", "questions.jsonl", sd.MANIFEST_NAME] + [f"videos/eq{SEED}_{i:04d}.mp4" for i in range(N_VIDEOS)]
    for name in names:
        assert (out / name).read_bytes() == (other / name).read_bytes(), name


def test_video_content_depends_only_on_seed_and_index(dataset, tmp_path):
    out, _, _ = dataset
    small = tmp_path / "small"
    sd.generate(small, videos=2, seed=SEED, width=SIZE, height=SIZE, fps=FPS)
    big = _read_jsonl(out / "events.jsonl")
    for i, v in enumerate(_read_jsonl(small / "events.jsonl")):
        assert v["events"] == big[i]["events"]
        assert (small / v["path"]).read_bytes() == (out / v["path"]).read_bytes()
    strip = lambda q: {k: x for k, x in q.items() if k != "split"}  # noqa: E731 - split is data-set level
    qs_small = [strip(q) for q in _read_jsonl(small / "questions.jsonl")]
    qs_big = [strip(q) for q in _read_jsonl(out / "questions.jsonl")][: len(qs_small)]
    assert qs_small == qs_big


def test_idempotent_and_regenerates_on_new_arguments(tmp_path):
    out = tmp_path / "c"
    first = sd.generate(out, videos=3, seed=1, width=SIZE, height=SIZE, fps=FPS)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    calls = []
    again = sd.generate(out, videos=3, seed=1, width=SIZE, height=SIZE, fps=FPS, progress=lambda d, t: calls.append(d))
    assert again == first and calls == []
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    # Other arguments regenerate; stale videos of the earlier run are removed.
    fewer = sd.generate(out, videos=2, seed=1, width=SIZE, height=SIZE, fps=FPS)
    assert fewer.videos == 2
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["eq1_0000.mp4", "eq1_0001.mp4"]
    assert json.loads((out / sd.MANIFEST_NAME).read_text())["args"]["videos"] == 2


def test_other_size_and_fps(tmp_path):
    w, h, fps = 96, 64, 8
    out = tmp_path / "d"
    summary = sd.generate(out, videos=2, seed=7, width=w, height=h, fps=fps, test_fraction=0.5)
    events = _read_jsonl(out / "events.jsonl")
    assert [v["split"] for v in events].count("test") == 1 and summary.test_questions > 0
    for v in events:
        assert (v["width"], v["height"], v["fps"]) == (w, h, fps)
        frames = _decode(out / v["path"])
        assert frames.shape == (v["frame_count"], h, w, 3)
        for e in v["events"]:
            assert 2 * fps <= e["end_frame"] - e["start_frame"] <= 4 * fps
            corner = frames[e["start_frame"], h - 2, w - 2].astype(int)
            assert np.abs(corner - np.array(sd.PALETTE[e["background"]])).max() <= 25


@pytest.mark.parametrize("width,height", [(128, 128), (96, 64), (64, 96)])
def test_rendered_shape_is_large_inside_and_moves(width, height):
    size = sd.shape_size(width, height)
    assert 0.35 <= size / min(width, height) <= 0.40
    for i in range(6):
        events, _ = sd.plan_video(11, i, width, height, 10)
        for e in events:
            frames = sd.render_event_frames(e, width, height)
            assert frames.shape == (e.end_frame - e.start_frame, height, width, 3)
            fg = np.all(frames == np.array(sd.PALETTE[e.colour], np.uint8), axis=-1)
            bg = np.all(frames == np.array(sd.PALETTE[e.background], np.uint8), axis=-1)
            assert np.all(fg | bg)
            # Fully inside: never touching the frame border, and every frame has the full shape.
            assert not fg[:, 0, :].any() and not fg[:, -1, :].any()
            assert not fg[:, :, 0].any() and not fg[:, :, -1].any()
            areas = fg.sum(axis=(1, 2))
            assert areas.min() > 0.4 * size * size and areas.max() - areas.min() <= 0.15 * areas.max()
            ys, xs = np.nonzero(fg[0])
            y0, x0 = ys.mean(), xs.mean()
            ys, xs = np.nonzero(fg[-1])
            y1, x1 = ys.mean(), xs.mean()
            along = {"right": x1 - x0, "left": x0 - x1, "down": y1 - y0, "up": y0 - y1}[e.direction]
            across = abs(y1 - y0) if e.direction in ("left", "right") else abs(x1 - x0)
            span = (width if e.direction in ("left", "right") else height) - size
            assert along >= 0.8 * span and across < 1.0


def test_scene_detector_finds_every_cut(dataset):
    # ContentDetector's default threshold (27) misses cuts between red, orange and yellow
    # backgrounds (their HSV content score is 11-17); threshold 9 sits between the cut scores
    # (>= ~11) and the in-event motion scores (<= ~8).
    from scenedetect import ContentDetector, SceneManager, open_video

    out, _, _ = dataset
    for v in _read_jsonl(out / "events.jsonl"):
        sm = SceneManager()
        sm.add_detector(ContentDetector(threshold=9.0))
        sm.detect_scenes(open_video(str(out / v["path"]), backend="pyav"))
        starts = [s[0].frame_num for s in sm.get_scene_list()]
        assert starts == [e["start_frame"] for e in v["events"]], v["video_id"]


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError):
        sd.generate(tmp_path / "x", videos=1, width=65, height=64)
    with pytest.raises(ValueError):
        sd.generate(tmp_path / "x", videos=0)
    with pytest.raises(ValueError):
        sd.generate(tmp_path / "x", videos=2, test_fraction=1.5)


def test_stage_does_not_import_prefect_or_flows():
    src = Path(sd.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+(prefect|flows)\b", src, re.M)
