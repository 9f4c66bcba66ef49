"""Decode one video once with the FFmpeg CLI (through ffmpeg-python) into NumPy BGR frames,
each with its presentation timestamp (PTS) as FFmpeg decoded it.

How the frames and their times come out of one FFmpeg process:

* ``-fps_mode passthrough``: every decoded frame is written once, in presentation order; a
  variable-frame-rate (VFR) file is neither padded nor thinned to a constant rate.
* ``-copyts``: timestamps are kept as the container has them (a stream that starts at 1.075 s
  keeps 1.075 s; FFmpeg would otherwise shift the first frame to 0).
* The ``showinfo`` filter (checksums off) sits right after the decoder (and after the rotation
  FFmpeg applies by default from the display matrix), so it logs, for each frame that reaches the
  pipe, its index, integer PTS, duration and size. A thread reads that log while the main thread
  reads the raw frames; the log line of frame *n* is always written before frame *n*'s bytes, so
  frame *n* gets exactly its own timestamp, even when a corrupt packet made the decoder drop one.
  The filter's time base comes from its ``config in time_base`` line: PTS are exact integers.
* ``-loglevel level+info`` tags every log line with its level, so decoder errors and warnings
  are collected and reported (truncated or corrupt files), never parsed from free text alone.

The binary is imageio-ffmpeg's (no system ffmpeg/ffprobe is needed). PyAV is used only to open the
container (no decoding) for the facts PySceneDetect's PyAV backend uses: the stream's time base,
``start_time`` and ``guessed_rate``, and the declared frame count.
"""

from __future__ import annotations

import fcntl
import functools
import queue
import re
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

_F_SETPIPE_SZ = 1031  # Linux fcntl: grow the pipe so FFmpeg writes a frame in fewer wake-ups
_LEVELS = ("panic", "fatal", "error", "warning", "info", "verbose", "debug", "trace")
_LEVEL_RE = re.compile(r"\[(" + "|".join(_LEVELS) + r")\] ")
_CTX_RE = re.compile(r"\[([^\]@]+?)(?: @ 0x[0-9a-fA-F]+)?\]")
_FRAME_RE = re.compile(
    r"\bn:\s*(\d+)\s+pts:\s*(\S+)\s+pts_time:(\S+)(?:\s+duration:\s*(\S+))?.*?\ss:(\d+)x(\d+)"
)
_CONFIG_RE = re.compile(r"config in time_base:\s*(\d+)/(\d+)(?:,\s*frame_rate:\s*(\d+)/(\d+))?")


@functools.lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """Path of the FFmpeg binary shipped by imageio-ffmpeg."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@dataclass(frozen=True)
class StreamInfo:
    """Container facts read by PyAV without decoding (all optional: PyAV may fail to open)."""

    ordinal: int = 0  # which video stream ("0:v:<ordinal>"): the first one that is not cover art
    time_base: Fraction | None = None
    start_pts: int | None = None  # stream start_time, in time_base units (PySceneDetect's origin)
    frame_rate: Fraction | None = None  # PyAV guessed_rate, the rate PySceneDetect's PyAV backend uses
    frame_count: int | None = None  # declared by the container, else duration x rate
    coded_size: tuple[int, int] | None = None  # (width, height) before rotation
    error: str | None = None  # why PyAV could not open it, if it could not


def probe_stream(path: Path) -> StreamInfo:
    """Open the container with PyAV (headers only, no packet is decoded)."""
    import av

    try:
        container = av.open(str(path))
    except Exception as exc:  # av.error.FFmpegError and OSError alike
        return StreamInfo(error=f"{type(exc).__name__}: {exc}")
    try:
        videos = list(container.streams.video)
        if not videos:
            return StreamInfo(error="no video stream")
        ordinal = 0
        for k, s in enumerate(videos):
            disposition = getattr(s, "disposition", 0)
            attached = getattr(getattr(av, "stream", None), "Disposition", None)
            flag = getattr(attached, "attached_pic", None) if attached is not None else None
            if flag is None or not (int(disposition) & int(flag)):
                ordinal = k
                break
        s = videos[ordinal]
        tb = Fraction(s.time_base.numerator, s.time_base.denominator) if s.time_base else None
        rate = s.guessed_rate or s.average_rate
        rate = Fraction(rate.numerator, rate.denominator) if rate else None
        count = int(s.frames or 0) or None
        if count is None and rate:
            seconds = None
            if s.duration and tb:
                seconds = float(s.duration * tb)
            elif container.duration:
                seconds = container.duration / 1_000_000
            if seconds:
                count = round(seconds * rate)
        cc = s.codec_context
        return StreamInfo(
            ordinal=ordinal,
            time_base=tb,
            start_pts=s.start_time,
            frame_rate=rate,
            frame_count=count,
            coded_size=(cc.width, cc.height) if cc.width and cc.height else None,
        )
    except Exception as exc:
        return StreamInfo(error=f"{type(exc).__name__}: {exc}")
    finally:
        container.close()


@dataclass
class LogMessage:
    level: str  # "warning", "error", "fatal", ...
    source: str  # FFmpeg component, e.g. "h264" or "in#0/mov,mp4,m4a,3gp,3g2,mj2"
    text: str

    def __str__(self) -> str:
        return f"{self.source}: {self.text}" if self.source else self.text


@dataclass
class _FrameMeta:
    n: int
    pts: int | None
    pts_time: float | None
    duration: int | None
    width: int
    height: int


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:  # "NOPTS"
        return None


def _float_or_none(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


@dataclass
class DecodedFrame:
    """One frame. `image` is BGR24 (H, W, 3) uint8; with `reuse_buffers` it is only valid until
    the reader has produced `buffers - 1` more frames (copy it to keep it)."""

    index: int  # 0-based, in the order FFmpeg outputs frames (presentation order)
    pts: int | None  # integer PTS in `FrameReader.time_base` units (None: FFmpeg had none)
    pts_time: float | None  # PTS in seconds as FFmpeg printed it (6 significant digits)
    duration: int | None  # frame duration in time-base units, when known
    image: np.ndarray


class FrameReader:
    """Iterate over the decoded frames of one video: ``with FrameReader(p) as r: for f in r: ...``.

    After iteration: `frames_read`, `messages` (FFmpeg warnings and errors), `returncode`,
    `time_base` and `frame_rate` (from the showinfo filter's configuration), `stopped_early`
    (the output ended in the middle of a frame)."""

    def __init__(
        self,
        path: Path | str,
        stream_ordinal: int = 0,
        *,
        reuse_buffers: bool = True,
        buffers: int = 3,
        pipe_size: int = 1 << 20,
        threads: int | None = None,
    ):
        import ffmpeg  # ffmpeg-python

        self.path = Path(path)
        self._reuse = reuse_buffers
        self._nbuf = max(2, buffers)
        in_opts = dict(nostdin=None, hide_banner=None, nostats=None, loglevel="level+info", copyts=None)
        if threads is not None:
            in_opts["threads"] = threads
        graph = (
            ffmpeg.input(str(self.path), **in_opts)[f"v:{stream_ordinal}"]
            .filter("showinfo", checksum=0)
            .output("pipe:", format="rawvideo", pix_fmt="bgr24", fps_mode="passthrough")
        )
        self.args = graph.compile(cmd=ffmpeg_exe())
        self._proc = ffmpeg.run_async(graph, cmd=ffmpeg_exe(), pipe_stdout=True, pipe_stderr=True)
        try:
            fcntl.fcntl(self._proc.stdout.fileno(), _F_SETPIPE_SZ, pipe_size)
        except OSError:
            pass
        self.messages: list[LogMessage] = []
        self.time_base: Fraction | None = None
        self.frame_rate: Fraction | None = None
        self.frames_read = 0
        self.returncode: int | None = None
        self.stopped_early = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._pump_stderr, name="ffmpeg-stderr", daemon=True)
        self._thread.start()
        self._closed = False

    # -- stderr: frame metadata and diagnostics -------------------------------------------------
    def _pump_stderr(self) -> None:
        put = self._queue.put
        try:
            for raw in self._proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if "showinfo" in line:
                    m = _FRAME_RE.search(line)
                    if m:
                        put(
                            _FrameMeta(
                                int(m.group(1)),
                                _int_or_none(m.group(2)),
                                _float_or_none(m.group(3)),
                                _int_or_none(m.group(4)),
                                int(m.group(5)),
                                int(m.group(6)),
                            )
                        )
                        continue
                    c = _CONFIG_RE.search(line)
                    if c:
                        self.time_base = Fraction(int(c.group(1)), int(c.group(2)))
                        if c.group(3) and int(c.group(3)) > 0 and int(c.group(4)) > 0:
                            self.frame_rate = Fraction(int(c.group(3)), int(c.group(4)))
                        continue
                lv = _LEVEL_RE.search(line)
                if not lv or lv.group(1) not in ("panic", "fatal", "error", "warning"):
                    continue
                ctx = [g.strip() for g in _CTX_RE.findall(line[: lv.start()])]
                self.messages.append(LogMessage(lv.group(1), ctx[-1] if ctx else "", line[lv.end() :].strip()))
        except (OSError, ValueError):
            pass
        finally:
            put(None)

    # -- stdout: raw frames ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[DecodedFrame]:
        get = self._queue.get
        readinto = self._proc.stdout.readinto
        bufs: list[np.ndarray] = []
        shape = None
        k = 0
        while True:
            meta = get()
            if meta is None:
                break
            if (meta.height, meta.width, 3) != shape:
                shape = (meta.height, meta.width, 3)
                bufs = [np.empty(shape, np.uint8) for _ in range(self._nbuf)] if self._reuse else []
            if self._reuse:
                img = bufs[k]
                k = (k + 1) % self._nbuf
            else:
                img = np.empty(shape, np.uint8)
            got = readinto(memoryview(img).cast("B"))
            if got != img.nbytes:
                self.stopped_early = got > 0
                break
            index = self.frames_read
            self.frames_read += 1
            yield DecodedFrame(index, meta.pts, meta.pts_time, meta.duration, img)
        self._finish()

    def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._proc.stdout.close()
        except OSError:
            pass
        try:
            self.returncode = self._proc.wait(timeout=30)
        except Exception:
            self._proc.kill()
            self.returncode = self._proc.wait()
        self._thread.join(timeout=10)
        try:
            self._proc.stderr.close()
        except OSError:
            pass

    def close(self) -> None:
        """Stop FFmpeg now (for a consumer that does not read to the end)."""
        if not self._closed and self._proc.poll() is None:
            self._proc.kill()
        self._finish()

    def __enter__(self) -> "FrameReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- summaries ------------------------------------------------------------------------------
    def errors(self) -> list[LogMessage]:
        return [m for m in self.messages if m.level in ("panic", "fatal", "error")]

    def reason(self) -> str:
        """FFmpeg's own words for why decoding failed or stopped (best single message)."""
        errs = self.errors()
        if not errs:
            return f"ffmpeg exited with code {self.returncode}" if self.returncode else "no error reported"
        for key in ("partial file", "moov atom not found", "end of file", "truncat", "Invalid data"):
            for m in errs:
                if key.lower() in m.text.lower():
                    return str(m)
        return str(errs[0])
