"""Decoding frames at given timestamps, resized, with a per-frame cache on disk.

Model stages (embed, retrieve, rollout, train, evaluate, answer) all need "the frames of
video V at times t1..tn at size S". Decoding is the slow part, so each decoded frame is
kept as a small .npy file keyed by (video content hash, size, timestamp in ms): a later
stage or a later question about the same video reads it back instead of decoding again.

Timestamps are presentation times in seconds on the container's clock (a video whose
first PTS is 1.075 s has no frame at t = 0). A request picks the frame being shown at t:
the last frame whose PTS <= t (the first frame for t before it).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import av
import numpy as np


def uniform_timestamps(start: float, duration: float, count: int) -> list[float]:
    """`count` times at the centres of equal slices of [start, start + duration)."""
    if count <= 0 or duration <= 0:
        return [start] * max(count, 0)
    step = duration / count
    return [start + (i + 0.5) * step for i in range(count)]


def fps_timestamps(start: float, end: float, fps: float) -> list[float]:
    """Times at `fps` over [start, end), at slice centres; at least one frame per span."""
    count = max(1, int(round((end - start) * fps)))
    return uniform_timestamps(start, end - start, count)


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _cache_path(cache_dir: Path, video_key: str, size: tuple[int, int], t: float) -> Path:
    return cache_dir / video_key[:32] / f"{size[0]}x{size[1]}" / f"{int(round(t * 1000)):010d}.npy"


def decode_frames(path: Path, timestamps: list[float], size: int | tuple[int, int],
                  cache_dir: Path | None = None, video_key: str | None = None) -> np.ndarray:
    """Frames shown at `timestamps`, as uint8 RGB [N, H, W, 3] resized to size (W, H).

    With `cache_dir` and `video_key` (the video's content hash), cached frames are read back
    and missing ones decoded in one pass and stored.
    """
    width, height = _size(size)
    out = np.zeros((len(timestamps), height, width, 3), dtype=np.uint8)
    missing: list[int] = []
    for i, t in enumerate(timestamps):
        cached = _cache_path(cache_dir, video_key, (width, height), t) if cache_dir and video_key else None
        if cached is not None and cached.is_file():
            out[i] = np.load(cached)
        else:
            missing.append(i)
    if not missing:
        return out
    decoded = _decode_at(Path(path), [timestamps[i] for i in missing], width, height)
    for i, frame in zip(missing, decoded):
        out[i] = frame
        if cache_dir and video_key:
            _save_atomic(_cache_path(cache_dir, video_key, (width, height), timestamps[i]), frame)
    return out


def _decode_at(path: Path, wanted: list[float], width: int, height: int) -> list[np.ndarray]:
    """One sequential decode; for each wanted time the frame shown then (last PTS <= t).

    Only frames that are actually picked are converted to RGB (the conversion costs more
    than the decode at small sizes).
    """
    order = sorted(range(len(wanted)), key=lambda i: wanted[i])
    result: list[np.ndarray | None] = [None] * len(wanted)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        time_base = float(stream.time_base)
        k, shown, shown_rgb = 0, None, None
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = frame.pts * time_base
            while k < len(order) and wanted[order[k]] < t:
                if shown is None:  # before the first frame: show the first frame
                    shown = frame
                if shown_rgb is None:
                    shown_rgb = _rgb(shown, width, height)
                result[order[k]] = shown_rgb
                k += 1
            if k == len(order):
                break
            shown, shown_rgb = frame, None
        while k < len(order):  # at or past the last frame: keep showing it
            if shown is None:
                raise ValueError(f"{path}: no decodable frames")
            shown_rgb = shown_rgb if shown_rgb is not None else _rgb(shown, width, height)
            result[order[k]] = shown_rgb
            k += 1
    return result  # type: ignore[return-value]


def _rgb(frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
    return frame.to_ndarray(format="rgb24", width=width, height=height)


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".frame.", suffix=".npy", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)
