"""Probing media files from their containers' real timestamps (PyAV: no ffprobe needed).

The imageio-ffmpeg wheel ships `ffmpeg` but no `ffprobe`; PyAV carries its own FFmpeg
libraries and gives exact packet timestamps, which is what variable-frame-rate files
and files whose first timestamp is not 0 need.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import av


class ProbeError(Exception):
    """The file cannot be used as a video; the message says why in words a user can act on."""


@dataclass(frozen=True)
class VideoProbe:
    width: int
    height: int
    rotation: int
    fps: float
    frame_count: int
    start_time: float
    duration: float
    variable_frame_rate: bool
    codec: str
    declared_frames: int = 0  # frames the container's index lists (MP4, AVI); 0 where it says none (WebM)

    @property
    def missing_frames(self) -> int:
        """Frames the index lists but the file does not hold: a truncated file (0 when unknown)."""
        return max(0, self.declared_frames - self.frame_count) if self.declared_frames else 0


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def probe_video(path: Path, decode_frames: int = 1) -> VideoProbe:
    """Read stream facts from packet timestamps, then prove `decode_frames` frames decode."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ProbeError("empty file (0 bytes)")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as exc:
        raise ProbeError(f"not a readable media container: {exc}") from exc
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise ProbeError(f"no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        time_base = float(stream.time_base)
        pts: list[int] = []
        last_duration = 0
        try:
            for packet in container.demux(stream):
                if packet.pts is not None and packet.size:
                    pts.append(packet.pts)
                    last_duration = packet.duration or last_duration
        except av.error.FFmpegError:
            pass  # a truncated tail: keep the packets before it; segment reports the decode gap
        if not pts:
            raise ProbeError("video stream has no frames")
        width, height, codec = stream.codec_context.width, stream.codec_context.height, stream.codec_context.name
        declared = int(stream.frames or 0)
    pts.sort()
    start = pts[0] * time_base
    intervals = [b - a for a, b in zip(pts, pts[1:]) if b > a]
    if not last_duration:
        last_duration = sorted(intervals)[len(intervals) // 2] if intervals else 0
    duration = (pts[-1] + last_duration) * time_base - start
    rotation = _first_frame_rotation(path, decode_frames)
    # Millisecond time bases round 24 fps to 41/42 ms: one tick of jitter is not a variable rate.
    vfr = bool(intervals) and (max(intervals) - min(intervals)) > max(1, 0.01 * max(intervals))
    fps = len(pts) / duration if duration > 0 else 0.0
    return VideoProbe(width, height, rotation, fps, len(pts), start, duration, vfr, codec, declared)


def _first_frame_rotation(path: Path, decode_frames: int) -> int:
    decoded, rotation = 0, 0
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                rotation = int(getattr(frame, "rotation", 0) or 0) if decoded == 0 else rotation
                decoded += 1
                if decoded >= decode_frames:
                    break
    except av.error.FFmpegError as exc:
        if not decoded:
            raise ProbeError(f"no decodable frames: {exc}") from exc
    if not decoded:
        raise ProbeError("no decodable frames")
    return rotation


def probe_image(path: Path) -> tuple[int, int]:
    """Width and height of an image, decoded through PyAV's image demuxers."""
    if Path(path).stat().st_size == 0:
        raise ProbeError("empty file (0 bytes)")
    try:
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
            return frame.width, frame.height
    except (av.error.FFmpegError, StopIteration) as exc:
        raise ProbeError(f"not a decodable image: {exc}") from exc
