"""Event (shot) detection for one video: decode once, run a PySceneDetect 0.7.2 detector on the
frames, and return events whose times are the container's presentation timestamps (PTS).

Frame numbering (read this before using the numbers):

* ``DetectedEvent.start_frame`` / ``end_frame`` and ``DetectionResult.cut_frames`` are **decode
  indices**: 0-based positions in the sequence of frames FFmpeg outputs (presentation order, every
  decoded frame once: no VFR padding or dropping). Frame *i*'s time is ``frame_times[i]``, the
  *i*-th PTS in seconds, absolute (a stream that starts at 1.075 s has ``frame_times[0] == 1.075``).
* PySceneDetect's own ``frame_num`` is not a decode index: its PyAV backend derives it from the PTS,
  ``round((pts - stream.start_time) * time_base * guessed_rate)``. It differs from the decode index
  for VFR files (goldeneye-vfr-drop3: decoded 60 -> frame_num 90) and for files whose first PTS is
  not the stream start (Megamind.avi: decoded 98 -> frame_num 99). ``DetectionResult.cut_frame_nums``
  gives that number for each cut, so results compare directly with PySceneDetect goldens.

The detectors see exactly what PySceneDetect's ``SceneManager`` gives them with the PyAV backend:
the same timecodes (``FrameTimecode(Timecode(pts - start_time, time_base), guessed_rate)``, so
``min_scene_len`` in frames means the same thing for VFR and delayed-start files), the same BGR24
frames (FFmpeg's conversion) and the same auto-downscale (``compute_downscale_factor`` of the larger
side, ``cv2.resize`` with ``INTER_LINEAR``), then ``post_process`` with the last frame's position and
the sorted unique cut list. Frames are decoded at native size: downscaling inside FFmpeg would be
faster but samples different pixels and changes some detectors' cuts (HashDetector lost a real cut
on bikes.mp4 in a trial).

Event rules: no cut -> one event for the whole video; an event longer than ``max_event_seconds`` is
split into ``ceil(duration / max_event_seconds)`` windows of equal time, each boundary moved to the
nearest frame (one more window if that pushed a window past the maximum). ``end_time`` of an event
is the PTS of the next event's first frame, or the last frame's PTS plus its duration.

Keyframes come from the same single decode. Every event's ``keyframes_per_event`` targets are the
centres of equal slices of its frames. While an event is still open (its end is unknown) a bounded
reservoir keeps candidate frames: every frame at first, then every 2nd, 4th, ... frame once more
than ``budget`` are held (budget <= 16 x keyframes_per_event and <= 256 MB of frames); the stride
stops growing at a quarter of ``max_event_seconds / keyframes_per_event`` and older candidates are
then held JPEG-encoded. Each target takes the nearest candidate, so keyframes are exact for events
of up to ``budget`` frames and within half a stride (about 1/budget of the event) otherwise.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from stages.segment.decode import FrameReader, StreamInfo, probe_stream

__all__ = [
    "DETECTORS",
    "DetectedEvent",
    "DetectionResult",
    "UndecodableVideo",
    "detect_events",
    "detect_events_multi",
    "split_event",
]

DETECTORS = ("content", "adaptive", "hash", "histogram", "threshold")
_KEYFRAME_MEMORY = 256 << 20  # bytes of raw candidate frames held per open event


class UndecodableVideo(Exception):
    """Not a single frame of the video could be decoded. The message names the file and gives
    FFmpeg's reason."""


@dataclass
class DetectedEvent:
    index: int
    start_frame: int  # decode index of the first frame
    end_frame: int  # decode index after the last frame (exclusive)
    start_time: float  # PTS (s) of the first frame, absolute
    end_time: float  # PTS (s) of the next event's first frame, or last PTS + last frame duration
    frame_count: int


@dataclass
class DetectionResult:
    events: list[DetectedEvent]
    fps: float  # nominal rate (PyAV guessed_rate), the one PySceneDetect's frame_num is based on
    frames_decoded: int
    warnings: list[str]
    cut_frames: list[int]  # decode indices of the first frame of each new event found by the detector
    keyframes: list[list[Path]]  # per event, when keyframe_dir was given
    # Extras (not needed to use the result, useful to check it):
    cut_frame_nums: list[int] = field(default_factory=list)  # PySceneDetect frame_num of each cut
    frame_times: list[float] = field(default_factory=list)  # PTS (s) of every decoded frame
    detector: str = ""
    frame_size: tuple[int, int] = (0, 0)  # (width, height) of decoded frames, after rotation
    processing_size: tuple[int, int] = (0, 0)  # what the detector saw, after auto-downscale
    seconds: float = 0.0  # wall time of the whole call


# ---------------------------------------------------------------------------------------------
# Detectors
# ---------------------------------------------------------------------------------------------


def _make_detector(name: str, params: dict | None, min_event_seconds: float | None):
    from scenedetect.detector import FlashFilter
    from scenedetect.detectors import (
        AdaptiveDetector,
        ContentDetector,
        HashDetector,
        HistogramDetector,
        ThresholdDetector,
    )

    classes = {
        "content": ContentDetector,
        "adaptive": AdaptiveDetector,
        "hash": HashDetector,
        "histogram": HistogramDetector,
        "threshold": ThresholdDetector,
    }
    key = str(name).lower().removesuffix("detector")
    if key not in classes:
        raise ValueError(f"unknown detector {name!r}; expected one of {', '.join(DETECTORS)}")
    kwargs: dict[str, Any] = dict(params or {})
    # min_event_seconds maps to min_scene_len (as seconds: PTS-based, also right for VFR);
    # an explicit min_scene_len in detector_params (frames as int, or seconds) wins.
    if "min_scene_len" not in kwargs and min_event_seconds is not None:
        kwargs["min_scene_len"] = float(min_event_seconds)
    if key == "threshold" and isinstance(kwargs.get("method"), str):
        kwargs["method"] = ThresholdDetector.Method[kwargs["method"].upper()]
    if key == "content" and isinstance(kwargs.get("filter_mode"), str):
        kwargs["filter_mode"] = FlashFilter.Mode[kwargs["filter_mode"].upper()]
    if key in ("content", "adaptive") and isinstance(kwargs.get("weights"), (dict, list, tuple)):
        w = kwargs["weights"]
        kwargs["weights"] = ContentDetector.Components(**w) if isinstance(w, dict) else ContentDetector.Components(*w)
    return key, classes[key](**kwargs)


def _compute_downscale(width: int, height: int, auto_downscale: bool) -> tuple[int, int] | None:
    """PySceneDetect's auto-downscale: factor = larger side / 256 (no scaling under 256)."""
    if not auto_downscale:
        return None
    from scenedetect.scene_manager import compute_downscale_factor

    factor = compute_downscale_factor(max(width, height))
    if factor <= 1.0:
        return None
    return (max(1, round(width / factor)), max(1, round(height / factor)))


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------


def split_event(
    start: int, end: int, times: Sequence[float], end_time: float, max_seconds: float | None
) -> list[tuple[int, int]]:
    """Split frames [start, end) into ceil(duration / max_seconds) windows of equal time, each
    boundary on the frame whose PTS is nearest. `times[i]` is frame i's PTS; `end_time` is the
    time at which frame end-1 ends (= times[end] when end < len(times))."""

    def t(i: int) -> float:
        return times[i] if i < end else end_time

    duration = t(end) - t(start)
    if not max_seconds or max_seconds <= 0 or duration <= max_seconds + 1e-9 or end - start < 2:
        return [(start, end)]
    k = max(2, math.ceil(duration / max_seconds - 1e-9))
    best: list[tuple[int, int]] = [(start, end)]
    while k <= end - start:
        bounds = [start]
        for j in range(1, k):
            target = t(start) + duration * j / k
            lo = bounds[-1] + 1
            if lo >= end:
                break
            i = bisect.bisect_left(times, target, lo, end)
            if i > lo and (i >= end or target - times[i - 1] <= times[i] - target):
                i -= 1
            bounds.append(min(i, end - 1))
        bounds.append(end)
        windows = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
        best = windows
        if all(t(b) - t(a) <= max_seconds + 1e-6 for a, b in windows):
            return windows
        k += 1
    return best


def _time_base(from_ffmpeg: Fraction | None, from_container: Fraction | None, frame) -> tuple[Fraction, bool]:
    """The time base of FFmpeg's integer PTS: the one its showinfo filter reported, else the
    container's if it agrees with the printed seconds; else microseconds from the printed seconds."""
    if from_ffmpeg:
        return from_ffmpeg, False
    if from_container and frame.pts is not None:
        if frame.pts_time is None or abs(float(frame.pts * from_container) - frame.pts_time) <= 1e-4 * max(1.0, abs(frame.pts_time)):
            return from_container, False
    return Fraction(1, 1_000_000), True


def _nearest_frame(norm_secs: np.ndarray, seconds: float) -> int:
    return int(np.argmin(np.abs(norm_secs - seconds)))


# ---------------------------------------------------------------------------------------------
# Keyframes (single pass, bounded memory)
# ---------------------------------------------------------------------------------------------


class _Keyframes:
    def __init__(self, k: int, out_dir: Path, prefix: str, frame_bytes: int, stride_cap: int):
        self.k = k
        self.out_dir = out_dir
        self.prefix = prefix
        self.budget = max(2 * k, min(16 * k, _KEYFRAME_MEMORY // max(1, frame_bytes)))
        self.stride_cap = max(1, stride_cap)
        self.start = 0
        self.stride = 1
        self.cands: list[list] = []  # [index, raw ndarray | None, jpeg bytes | None]
        self.nraw = 0
        self.windows: list[tuple[int, int]] = []
        self.paths: list[list[tuple[int, Path]]] = []
        self.failed: list[str] = []

    def offer(self, index: int, image: np.ndarray) -> None:
        if (index - self.start) % self.stride:
            return
        self.cands.append([index, image.copy(), None])
        self.nraw += 1
        if self.nraw > self.budget:
            self._thin()

    def _thin(self) -> None:
        while self.nraw > self.budget:
            if self.stride * 2 <= self.stride_cap:
                self.stride *= 2
                self.cands = [c for c in self.cands if c[1] is None or (c[0] - self.start) % self.stride == 0]
            else:
                for c in self.cands:
                    if c[1] is not None:
                        ok, buf = cv2.imencode(".jpg", c[1])
                        c[1], c[2] = None, (buf.tobytes() if ok else None)
                        break
            self.nraw = sum(1 for c in self.cands if c[1] is not None)

    def cut(self, index: int, times: Sequence[float], max_seconds: float | None) -> bool:
        """A new event starts at `index`. False if it is not after the open event's start."""
        if index <= self.start:
            return False
        self._close(self.start, index, times, times[index], max_seconds)
        self.cands = [c for c in self.cands if c[0] >= index]
        self.nraw = sum(1 for c in self.cands if c[1] is not None)
        self.start, self.stride = index, 1
        return True

    def finish(self, n: int, times: Sequence[float], end_time: float, max_seconds: float | None) -> None:
        if n > self.start:
            self._close(self.start, n, times, end_time, max_seconds)
        self.cands = []

    def _close(self, s: int, e: int, times, end_time: float, max_seconds: float | None) -> None:
        mine = [c for c in self.cands if s <= c[0] < e]
        for a, b in split_event(s, e, times, end_time, max_seconds):
            n = b - a
            targets = sorted({a + (2 * j + 1) * n // (2 * self.k) for j in range(self.k)})
            inside = [c for c in mine if a <= c[0] < b] or mine
            chosen: list[list] = []
            for tgt in targets:
                pool = [c for c in inside if all(c is not d for d in chosen)]
                if not pool:
                    break
                chosen.append(min(pool, key=lambda c: (abs(c[0] - tgt), c[0])))
            chosen.sort(key=lambda c: c[0])
            event_index = len(self.windows)
            written: list[tuple[int, Path]] = []
            for j, c in enumerate(chosen):
                path = self.out_dir / f"{self.prefix}e{event_index:05d}_k{j:02d}_f{c[0]:07d}.jpg"
                ok = False
                if c[1] is not None:
                    ok = bool(cv2.imwrite(str(path), c[1]))
                elif c[2] is not None:
                    path.write_bytes(c[2])
                    ok = True
                if ok:
                    written.append((c[0], path))
                else:
                    self.failed.append(str(path))
            self.windows.append((a, b))
            self.paths.append(written)


# ---------------------------------------------------------------------------------------------
# Main entry points
# ---------------------------------------------------------------------------------------------


class _Run:
    """One detector's state during the single decode pass."""

    def __init__(self, name: str, params: dict | None, min_event_seconds: float | None):
        self.name, self.detector = _make_detector(name, params, min_event_seconds)
        self.raw_cuts: list = []  # FrameTimecodes as returned by the detector
        self.keyframes: _Keyframes | None = None
        self.out_of_order = False


def detect_events(
    path: Path,
    detector: str = "content",
    detector_params: dict | None = None,
    auto_downscale: bool = True,
    min_event_seconds: float = 0.5,
    max_event_seconds: float = 30.0,
    keyframes_per_event: int = 3,
    keyframe_dir: Path | None = None,
) -> DetectionResult:
    """Decode `path` once and detect its events with one PySceneDetect detector.

    detector: "content" (ContentDetector, default), "adaptive", "hash", "histogram" or "threshold";
    `detector_params` go to its constructor unchanged (except that strings name enums, e.g.
    ``{"method": "ceiling"}``). `min_event_seconds` becomes ``min_scene_len`` (in seconds) unless
    `detector_params` names ``min_scene_len`` itself (an int there is frames, as in PySceneDetect).

    Raises UndecodableVideo when no frame decodes and FileNotFoundError when there is no file.
    A truncated or partly corrupt file gives the events of what decoded plus a warning.
    """
    return detect_events_multi(
        path,
        [(detector, detector_params)],
        auto_downscale=auto_downscale,
        min_event_seconds=min_event_seconds,
        max_event_seconds=max_event_seconds,
        keyframes_per_event=keyframes_per_event,
        keyframe_dir=keyframe_dir,
    )[0]


def detect_events_multi(
    path: Path,
    detectors: Sequence[str | tuple[str, dict | None]],
    auto_downscale: bool = True,
    min_event_seconds: float = 0.5,
    max_event_seconds: float = 30.0,
    keyframes_per_event: int = 3,
    keyframe_dir: Path | None = None,
) -> list[DetectionResult]:
    """Like `detect_events`, for several detectors fed from the same single decode (one result per
    detector, in order). With keyframe_dir and several detectors, file names start with the index
    of the detector ("d0_", "d1_", ...)."""
    t_start = time.perf_counter()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise UndecodableVideo(f"{path}: is a directory, not a video file")
    specs = [(d, None) if isinstance(d, str) else (d[0], d[1]) for d in detectors]
    runs = [_Run(name, params, min_event_seconds) for name, params in specs]
    info: StreamInfo = probe_stream(path)

    frame_pts: list[int] = []  # integer PTS (time_base units) per decoded frame
    frame_dur: list[int | None] = []
    norm_secs: list[float] = []  # (pts - stream start) seconds: PySceneDetect's position
    times: list[float] = []  # absolute PTS seconds
    warnings: list[str] = []
    tb: Fraction = Fraction(1, 1_000_000)
    rate: Fraction = Fraction(30)
    use_pts_time = False  # fall back on FFmpeg's printed seconds when no time base is known
    start_pts = 0
    dsize = None
    shape = None
    last_tc = None
    resized_frames = 0
    from scenedetect.common import FrameTimecode, Timecode

    reader = FrameReader(path, info.ordinal)
    with reader:
        for fr in reader:
            img = fr.image
            if shape is None:
                shape = img.shape
                tb, use_pts_time = _time_base(reader.time_base, info.time_base, fr)
                rate = info.frame_rate or reader.frame_rate or Fraction(0)
                if rate <= 0:
                    rate = Fraction(30)
                    warnings.append("frame rate unknown: frame numbers assume 30 fps")
                if info.start_pts is not None and info.time_base:
                    start_pts = round(Fraction(info.start_pts) * info.time_base / tb)
                elif fr.pts is not None and not use_pts_time:
                    start_pts = fr.pts
                elif fr.pts_time is not None:
                    start_pts = round(fr.pts_time / tb)
                h, w = shape[:2]
                dsize = _compute_downscale(w, h, auto_downscale)
                if keyframe_dir is not None and keyframes_per_event > 0:
                    keyframe_dir = Path(keyframe_dir)
                    keyframe_dir.mkdir(parents=True, exist_ok=True)
                    per_max = int(max_event_seconds * float(rate)) if max_event_seconds else 1 << 30
                    cap = per_max // (4 * keyframes_per_event)
                    for k, run in enumerate(runs):
                        # The folder is already unique per video: a short stem keeps names under NAME_MAX.
                        prefix = f"{path.stem[:40]}_" + (f"d{k}_" if len(runs) > 1 else "")
                        run.keyframes = _Keyframes(keyframes_per_event, keyframe_dir, prefix, img.nbytes, cap)
            elif img.shape != shape:
                # PySceneDetect skips frames whose size changed mid-stream; keep them, resized.
                img = cv2.resize(img, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
                resized_frames += 1

            if fr.pts is not None and not use_pts_time:
                pts = fr.pts
            elif fr.pts_time is not None and use_pts_time:
                pts = round(fr.pts_time / tb)
            elif frame_pts:  # no timestamp: the previous one plus its duration
                pts = frame_pts[-1] + (frame_dur[-1] or max(1, round(1 / (rate * tb))))
            else:
                pts = start_pts
            frame_pts.append(pts)
            frame_dur.append(fr.duration if fr.duration and fr.duration > 0 else None)
            norm = pts - start_pts
            norm_secs.append(float(norm * tb))
            times.append(float(pts * tb))

            small = cv2.resize(img, dsize, interpolation=cv2.INTER_LINEAR) if dsize else img
            tc = FrameTimecode(Timecode(pts=norm, time_base=tb), fps=rate)
            last_tc = tc
            for run in runs:
                kf = run.keyframes
                if kf is not None:
                    kf.offer(fr.index, img)
                cuts = run.detector.process_frame(tc, small)
                if cuts:
                    run.raw_cuts.extend(cuts)
                    if kf is not None:
                        arr = np.asarray(norm_secs)
                        for c in cuts:
                            idx = _nearest_frame(arr, c.seconds)
                            if idx < kf.start:
                                run.out_of_order = True
                            elif idx > kf.start:
                                kf.cut(idx, times, max_event_seconds)

    n = reader.frames_read
    if n == 0:
        reason = reader.reason() if reader.errors() or reader.returncode else (info.error or reader.reason())
        raise UndecodableVideo(f"{path}: no decodable video frames: {reason}")

    # The end of the last frame.
    durs = [d for d in frame_dur if d]
    if frame_dur[-1]:
        last_dur = float(frame_dur[-1] * tb)
    elif n > 1:
        diffs = np.diff(np.asarray(times))
        diffs = diffs[diffs > 0]
        last_dur = float(np.median(diffs)) if diffs.size else 1.0 / float(rate)
    else:
        last_dur = float(durs[0] * tb) if durs else 1.0 / float(rate)
    end_time = times[-1] + last_dur

    # Warnings: what FFmpeg reported.
    expected = info.frame_count
    approx = f"~{expected}" if expected else "?"
    errs = reader.errors()
    stop_words = ("partial file", "end of file", "truncat", "moov atom")
    stopped = (
        reader.stopped_early
        or (reader.returncode not in (0, None))
        or any(any(w in m.text.lower() for w in stop_words) for m in errs)
        or (bool(errs) and expected is not None and n < 0.9 * expected)
    )
    if stopped:
        warnings.append(f"decoding stopped at frame {n} of {approx}: {reader.reason()}")
    elif errs:
        warnings.append(f"{len(errs)} decoder error(s), {n} of {approx} frames decoded: {reader.reason()}")
    if resized_frames:
        warnings.append(f"{resized_frames} frame(s) changed size mid-stream and were resized to {shape[1]}x{shape[0]}")

    arr = np.asarray(norm_secs)
    results: list[DetectionResult] = []
    for run in runs:
        run.raw_cuts.extend(run.detector.post_process(last_tc))
        by_index: dict[int, int] = {}
        for c in sorted(run.raw_cuts, key=lambda c: c.seconds):
            idx = _nearest_frame(arr, c.seconds)
            if 0 < idx < n and idx not in by_index:
                by_index[idx] = c.frame_num
        cut_frames = sorted(by_index)
        bounds = [0, *cut_frames, n]
        windows: list[tuple[int, int]] = []
        for s, e in zip(bounds, bounds[1:]):
            # An event ends where the next one starts; only the last one ends at the video's end.
            windows.extend(split_event(s, e, times, times[e] if e < n else end_time, max_event_seconds))
        events = [
            DetectedEvent(
                index=k,
                start_frame=s,
                end_frame=e,
                start_time=times[s],
                end_time=times[e] if e < n else end_time,
                frame_count=e - s,
            )
            for k, (s, e) in enumerate(windows)
        ]
        run_warnings = list(warnings)
        keyframes: list[list[Path]] = []
        kf = run.keyframes
        if kf is not None:
            kf.finish(n, times, end_time, max_event_seconds)
            if kf.windows == windows:
                keyframes = [[p for _, p in group] for group in kf.paths]
            else:  # cuts arrived out of order: regroup what was written by frame index
                written = sorted((i, p) for group in kf.paths for i, p in group)
                keyframes = [[p for i, p in written if s <= i < e] for s, e in windows]
                run_warnings.append("keyframes regrouped by frame: the detector reported cuts out of order")
            if kf.failed:
                run_warnings.append(f"{len(kf.failed)} keyframe(s) could not be written, e.g. {kf.failed[0]}")
        results.append(
            DetectionResult(
                events=events,
                fps=float(rate),
                frames_decoded=n,
                warnings=run_warnings,
                cut_frames=cut_frames,
                keyframes=keyframes,
                cut_frame_nums=[by_index[i] for i in cut_frames],
                frame_times=times,
                detector=run.name,
                frame_size=(shape[1], shape[0]),
                processing_size=dsize or (shape[1], shape[0]),
                seconds=time.perf_counter() - t_start,
            )
        )
    return results
