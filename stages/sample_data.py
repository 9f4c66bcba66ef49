"""EventQA: a deterministic generator of the embedded sample data set.

Each video is 3-6 events separated by hard cuts; each event is a solid background with one
moving filled shape. Videos are rendered with NumPy and encoded to H.264 MP4 through
ffmpeg-python (bundled imageio-ffmpeg binary), with per-event captions (`events.jsonl`) and
Video-R1 style multiple-choice questions (`questions.jsonl`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ffmpeg
import imageio_ffmpeg
import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
    "white": (240, 240, 240),
    "gray": (120, 120, 120),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
FAMILIES = ("shape", "colour", "direction", "after")

LETTERS = ("A", "B", "C", "D")
MANIFEST_NAME = ".eventqa.json"
# Bump when the output for the same arguments changes, so an old folder is regenerated.
FORMAT_VERSION = 1
SHAPE_FRACTION = 0.375  # shape side/diameter as a fraction of the smaller frame side
CRF = 18

_VIDEO_NAME = re.compile(r"^eq\d+_\d{4}\.mp4$")


@dataclass
class SampleDataSummary:
    out_dir: Path
    videos: int
    questions: int
    train_questions: int
    test_questions: int
    events: int


@dataclass(frozen=True)
class Event:
    index: int
    start_frame: int
    end_frame: int  # exclusive
    background: str
    shape: str
    colour: str
    direction: str
    # Shape centre at the first and last frame of the event, in pixels (x, y).
    start_xy: tuple[float, float]
    end_xy: tuple[float, float]

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.direction, self.background)


def caption(colour: str, shape: str, direction: str, background: str) -> str:
    return f"a {colour} {shape} moving {direction} on a {background} background"


def video_id(seed: int, i: int) -> str:
    return f"eq{seed}_{i:04d}"


def shape_size(width: int, height: int) -> int:
    return max(2, int(round(SHAPE_FRACTION * min(width, height))))


# ---------------------------------------------------------------------------------------------
# Planning: what each video contains (pure, depends only on (seed, i) and the frame geometry)
# ---------------------------------------------------------------------------------------------


def plan_video(seed: int, i: int, width: int, height: int, fps: int) -> tuple[list[Event], np.random.Generator]:
    """Events of video `i`, and the per-video generator (its later draws make the questions)."""
    rng = np.random.default_rng([seed, i])
    names = list(PALETTE)
    n_events = int(rng.integers(3, 7))
    backgrounds = [names[k] for k in rng.permutation(len(names))[:n_events]]
    size = shape_size(width, height)
    half = size / 2.0
    used_pairs: set[tuple[str, str]] = set()
    events: list[Event] = []
    start = 0
    for index, bg in enumerate(backgrounds):
        # Pick uniformly among the (colour, shape) pairs still free, so the direction question
        # "Which way does the {colour} {shape} move?" names exactly one event.
        pairs = [(c, s) for c in names if c != bg for s in SHAPES if (c, s) not in used_pairs]
        colour, shape = pairs[int(rng.integers(len(pairs)))]
        used_pairs.add((colour, shape))
        direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
        n_frames = int(rng.integers(2 * fps, 4 * fps + 1))
        # Travel spans the whole frame along the motion axis (1 px margin so the shape stays
        # fully inside); across it the centre stays in the middle band, which keeps the frame
        # corners background-coloured (tests and scene detectors sample them).
        if direction in ("left", "right"):
            lo, hi = half + 1, width - half - 1
            y = _middle_band(rng, height, half)
            a, b = (lo, hi) if direction == "right" else (hi, lo)
            start_xy, end_xy = (a, y), (b, y)
        else:
            lo, hi = half + 1, height - half - 1
            x = _middle_band(rng, width, half)
            a, b = (lo, hi) if direction == "down" else (hi, lo)
            start_xy, end_xy = (x, a), (x, b)
        events.append(
            Event(index, start, start + n_frames, bg, shape, colour, direction, start_xy, end_xy)
        )
        start += n_frames
    return events, rng


def _middle_band(rng: np.random.Generator, length: int, half: float) -> float:
    lo = max(half + 1, 0.35 * length)
    hi = min(length - half - 1, 0.65 * length)
    if hi <= lo:
        return length / 2.0
    return float(rng.uniform(lo, hi))


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def shape_mask(shape: str, cx: float, cy: float, size: int, width: int, height: int) -> np.ndarray:
    """Boolean (height, width) mask of a filled shape of side/diameter `size` centred at (cx, cy)."""
    # Sample at pixel centres so a centre at a half-integer gives a symmetric shape.
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    return shape_mask_at(shape, xs - cx, ys - cy, size)


def shape_mask_at(shape: str, dx: np.ndarray, dy: np.ndarray, size: int) -> np.ndarray:
    """The shape test on pixel offsets (dx, dy) from the shape's centre."""
    h = size / 2.0
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= h
    if shape == "triangle":
        # Apex up, base at the bottom of the size x size box.
        t = (dy + h) / size  # 0 at apex row, 1 at base row
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * h)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_event_frames(event: Event, width: int, height: int) -> np.ndarray:
    """Frames of one event as uint8 array (n, height, width, 3), RGB."""
    n = event.end_frame - event.start_frame
    size = shape_size(width, height)
    bg = np.array(PALETTE[event.background], dtype=np.uint8)
    fg = np.array(PALETTE[event.colour], dtype=np.uint8)
    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    frames[:] = bg
    (x0, y0), (x1, y1) = event.start_xy, event.end_xy
    for k in range(n):
        t = k / (n - 1) if n > 1 else 0.0
        mask = shape_mask(event.shape, x0 + t * (x1 - x0), y0 + t * (y1 - y0), size, width, height)
        frames[k][mask] = fg
    return frames


def render_video_frames(events: list[Event], width: int, height: int) -> np.ndarray:
    return np.concatenate([render_event_frames(e, width, height) for e in events], axis=0)


def encode_mp4(frames: np.ndarray, path: Path, fps: int) -> None:
    """Encode RGB frames to a bit-exact reproducible H.264 yuv420p MP4 at `path` (atomically)."""
    n, height, width, _ = frames.shape
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
    stream = ffmpeg.output(
        stream,
        str(tmp),
        format="mp4",  # the temp name has no .mp4 extension to infer it from
        vcodec="libx264",
        pix_fmt="yuv420p",
        crf=CRF,
        g=2 * fps,  # a keyframe at least every 2 s (x264 also puts one at each hard cut)
        threads=1,  # multi-threaded x264 is not bit-exact reproducible
        fflags="+bitexact",
        **{"flags:v": "+bitexact", "map_metadata": -1},
    )
    try:
        ffmpeg.run(
            stream,
            cmd=imageio_ffmpeg.get_ffmpeg_exe(),
            input=np.ascontiguousarray(frames).tobytes(),
            capture_stdout=True,
            capture_stderr=True,
            overwrite_output=True,
        )
        os.replace(tmp, path)
    except ffmpeg.Error as exc:
        tmp.unlink(missing_ok=True)
        stderr = (exc.stderr or b"").decode(errors="replace")[-2000:]
        raise RuntimeError(f"ffmpeg failed to encode {path}: {stderr}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------------------------


def _multiple_choice(rng: np.random.Generator, correct: str, distractors: list[str]) -> tuple[list[str], str]:
    texts = [correct] + list(distractors)
    assert len(texts) == 4 and len(set(texts)) == 4, texts
    order = rng.permutation(4)
    shuffled = [texts[k] for k in order]
    letter = LETTERS[shuffled.index(correct)]
    return [f"{LETTERS[k]}. {t}" for k, t in enumerate(shuffled)], letter


def _pick(rng: np.random.Generator, pool: list[str], k: int) -> list[str]:
    return [pool[j] for j in rng.choice(len(pool), size=k, replace=False)] if k else []


def make_questions(events: list[Event], rng: np.random.Generator) -> list[dict]:
    """Questions of one video, in event order, families in FAMILIES order within an event.

    Each item has `problem`, `options`, `solution`, `family`, `answer_event`.
    """
    names = list(PALETTE)
    backgrounds = [e.background for e in events]
    out: list[dict] = []
    for e in events:
        items: list[tuple[str, str, str, list[str], int]] = []
        items.append(
            ("shape", f"Which shape moves on the {e.background} background?", e.shape,
             [s for s in SHAPES if s != e.shape], e.index)
        )
        items.append(
            ("colour", f"What colour is the shape on the {e.background} background?", e.colour,
             _pick(rng, [c for c in names if c != e.colour], 3), e.index)
        )
        items.append(
            ("direction", f"Which way does the {e.colour} {e.shape} move?", e.direction,
             [d for d in DIRECTIONS if d != e.direction], e.index)
        )
        if e.index + 1 < len(events):
            correct = backgrounds[e.index + 1]
            # Distractors: the video's other backgrounds first (they are the plausible mistakes:
            # the previous event, or one further on), then palette colours. The asked background
            # itself is left out: it cannot follow itself (backgrounds are unique per video).
            own = [b for b in backgrounds if b not in (correct, e.background)]
            chosen = _pick(rng, own, min(3, len(own)))
            rest = [c for c in names if c not in chosen and c not in (correct, e.background)]
            chosen += _pick(rng, rest, 3 - len(chosen))
            items.append(
                ("after", f"Which background comes right after the {e.background} background?",
                 correct, chosen, e.index + 1)
            )
        for family, problem, correct, distractors, answer_event in items:
            options, letter = _multiple_choice(rng, correct, distractors)
            out.append(
                {
                    "problem": problem,
                    "options": options,
                    "solution": f"<answer>{letter}</answer>",
                    "family": family,
                    "answer_event": answer_event,
                }
            )
    return out


# ---------------------------------------------------------------------------------------------
# The data set
# ---------------------------------------------------------------------------------------------


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _test_videos(videos: int, seed: int, test_fraction: float) -> set[int]:
    n_test = int(round(test_fraction * videos))
    if videos >= 2 and test_fraction > 0:
        n_test = max(1, n_test)
    n_test = min(n_test, videos)
    rng = np.random.default_rng(seed)
    return {int(k) for k in rng.choice(videos, size=n_test, replace=False)} if n_test else set()


def _validate(videos: int, width: int, height: int, fps: int, test_fraction: float) -> None:
    if videos < 1:
        raise ValueError(f"videos must be >= 1, got {videos}")
    # yuv420p subsamples chroma 2x2, so libx264 refuses odd frame sides.
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise ValueError(f"width and height must be even and >= 16, got {width}x{height}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")


def generate(
    out_dir: Path | str,
    videos: int = 24,
    seed: int = 0,
    width: int = 128,
    height: int = 128,
    fps: int = 10,
    test_fraction: float = 0.25,
    progress: Callable[[int, int], None] | None = None,
) -> SampleDataSummary:
    """Generate the EventQA data set into `out_dir`, or return at once if it is already there.

    Writes `videos/eq{seed}_{i:04d}.mp4`, `events.jsonl`, `questions.jsonl` and the manifest
    `.eventqa.json` (last, so its presence with matching arguments means a complete data set).
    """
    _validate(videos, width, height, fps, test_fraction)
    out = Path(out_dir)
    args = {
        "format_version": FORMAT_VERSION,
        "videos": int(videos),
        "seed": int(seed),
        "width": int(width),
        "height": int(height),
        "fps": int(fps),
        "test_fraction": float(test_fraction),
    }
    manifest_path = out / MANIFEST_NAME
    questions_path = out / "questions.jsonl"
    if questions_path.exists() and manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = {}
        if manifest.get("args") == args and isinstance(manifest.get("summary"), dict):
            s = manifest["summary"]
            return SampleDataSummary(out, s["videos"], s["questions"], s["train_questions"],
                                     s["test_questions"], s["events"])

    video_dir = out / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    # Drop the manifest first: if this run dies half-way, the folder must not pass for the old
    # (or the new) complete data set.
    manifest_path.unlink(missing_ok=True)

    test_ids = _test_videos(videos, seed, test_fraction)
    event_rows: list[dict] = []
    question_rows: list[dict] = []
    n_events = 0
    for i in range(videos):
        vid = video_id(seed, i)
        rel = f"videos/{vid}.mp4"
        split = "test" if i in test_ids else "train"
        events, rng = plan_video(seed, i, width, height, fps)
        encode_mp4(render_video_frames(events, width, height), out / rel, fps)
        n_events += len(events)
        event_rows.append(
            {
                "video_id": vid,
                "path": rel,
                "fps": fps,
                "width": width,
                "height": height,
                "frame_count": events[-1].end_frame,
                "split": split,
                "events": [
                    {
                        "index": e.index,
                        "start_frame": e.start_frame,
                        "end_frame": e.end_frame,
                        "start_time": round(e.start_frame / fps, 6),
                        "end_time": round(e.end_frame / fps, 6),
                        "background": e.background,
                        "shape": e.shape,
                        "colour": e.colour,
                        "direction": e.direction,
                        "caption": e.caption,
                    }
                    for e in events
                ],
            }
        )
        for j, q in enumerate(make_questions(events, rng)):
            question_rows.append(
                {
                    "problem_id": f"{vid}_q{j:02d}",
                    "problem": q["problem"],
                    "options": q["options"],
                    "solution": q["solution"],
                    "problem_type": "multiple choice",
                    "data_type": "video",
                    "path": rel,
                    "split": split,
                    "family": q["family"],
                    "answer_event": q["answer_event"],
                }
            )
        if progress is not None:
            progress(i + 1, videos)

    # Videos left over from an earlier run with more videos (or another seed) would be picked up
    # by anything that lists the folder; only files with this generator's naming are removed.
    keep = {f"{video_id(seed, i)}.mp4" for i in range(videos)}
    for p in video_dir.iterdir():
        if _VIDEO_NAME.match(p.name) and p.name not in keep:
            p.unlink()

    _write_text_atomic(out / "events.jsonl", _jsonl(event_rows))
    _write_text_atomic(questions_path, _jsonl(question_rows))
    train_q = sum(1 for q in question_rows if q["split"] == "train")
    summary = SampleDataSummary(out, videos, len(question_rows), train_q, len(question_rows) - train_q, n_events)
    s = {k: v for k, v in vars(summary).items() if k != "out_dir"}
    _write_text_atomic(manifest_path, json.dumps({"args": args, "summary": s}, indent=2) + "\n")
    return summary
