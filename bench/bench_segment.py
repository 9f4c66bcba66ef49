"""Benchmark: segmentation throughput vs a plain FFmpeg decode of the same file.

For each video: frames, plain decode fps (the same imageio-ffmpeg binary decoding the first video
stream to raw BGR24 frames at native resolution into a pipe, every byte read and discarded, same
pipe size as the segmenter), segmentation fps (`detect_events`, ContentDetector defaults, everything
included: container probe, decode, detection, events), and their ratio. Each measurement is the best
of `--repeat` runs, alternating the two, so that load from other processes hits both alike.
The PyAV container probe (headers only, no decoding) is timed on its own too.

    python bench/bench_segment.py [--repeat 2] [--detector content] [--generated] [files...]

Exits 0; the last line is `TOTAL decode_fps=... segment_fps=... ratio=...` (frames summed over
files / best times summed).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.segment.decode import ffmpeg_exe, probe_stream  # noqa: E402
from stages.segment.detect import detect_events  # noqa: E402

REAL = Path("/work/shared/data/real")


def plain_decode(path: Path, ordinal: int = 0, pipe_size: int = 1 << 20) -> tuple[int, float]:
    """Frames and seconds for FFmpeg -> rawvideo bgr24 pipe, read and discarded."""
    t0 = time.perf_counter()
    args = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-nostats", "-loglevel", "error", "-i", str(path),
            "-map", f"0:v:{ordinal}", "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "bgr24", "pipe:"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        fcntl.fcntl(proc.stdout.fileno(), 1031, pipe_size)
    except OSError:
        pass
    buf = bytearray(1 << 22)
    mv = memoryview(buf)
    total = 0
    while True:
        k = proc.stdout.readinto(mv)
        if not k:
            break
        total += k
    proc.wait()
    return total, time.perf_counter() - t0


def cpu_now() -> float:
    """CPU seconds of this process (all threads) plus its waited-for children (FFmpeg)."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def real_videos() -> list[Path]:
    manifest = json.loads((REAL / "manifest.json").read_text())
    return [REAL / v["file"] for v in manifest["videos"]]


def generated_videos(tmp: Path) -> list[Path]:
    """Two synthetic clips (1280x720 and 1920x1080 H.264, 10 s, a cut every 2.5 s)."""
    out = []
    for w, h in ((1280, 720), (1920, 1080)):
        path = tmp / f"gen_{w}x{h}.mp4"
        srcs = []
        for k, src in enumerate(("testsrc2", "mandelbrot", "smptehdbars", "rgbtestsrc")):
            srcs += ["-f", "lavfi", "-t", "2.5", "-i", f"{src}=size={w}x{h}:rate=30"]
        filt = "".join(f"[{k}:v]format=yuv420p,setsar=1[v{k}];" for k in range(4))
        filt += "".join(f"[v{k}]" for k in range(4)) + "concat=n=4:v=1:a=0[out]"
        subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", *srcs, "-filter_complex", filt,
                        "-map", "[out]", "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
                        str(path)], check=True)
        out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--detector", default="content")
    ap.add_argument("--generated", action="store_true", help="also two generated 720p/1080p clips")
    args = ap.parse_args(argv)

    files = args.files or real_videos()
    tmpdir = tempfile.TemporaryDirectory()
    if args.generated:
        files = files + generated_videos(Path(tmpdir.name))

    print(f"{'file':44s} {'frames':>6s} {'size':>9s} {'probe_ms':>8s} {'decode_fps':>10s} "
          f"{'segment_fps':>11s} {'ratio':>6s} {'cpu_ratio':>9s} cuts")
    tot_frames = 0
    tot_dec = tot_seg = tot_cdec = tot_cseg = 0.0
    for path in files:
        t0 = time.perf_counter()
        info = probe_stream(path)
        probe_s = time.perf_counter() - t0
        best_dec = best_seg = cpu_dec = cpu_seg = float("inf")
        result = None
        for _ in range(max(1, args.repeat)):
            c0 = cpu_now()
            nbytes, dt = plain_decode(path, info.ordinal)
            cpu_dec = min(cpu_dec, cpu_now() - c0)
            best_dec = min(best_dec, dt)
            c0, t0 = cpu_now(), time.perf_counter()
            result = detect_events(path, detector=args.detector)
            best_seg = min(best_seg, time.perf_counter() - t0)
            cpu_seg = min(cpu_seg, cpu_now() - c0)
        n = result.frames_decoded
        w, h = result.frame_size
        if nbytes != n * w * h * 3:
            print(f"  note: plain decode gave {nbytes / (w * h * 3):.1f} frames, segmenter {n}")
        dec_fps, seg_fps = n / best_dec, n / best_seg
        name = str(path.relative_to(REAL)) if path.is_relative_to(REAL) else path.name
        print(f"{name:44s} {n:6d} {w:4d}x{h:<4d} {probe_s * 1e3:8.1f} {dec_fps:10.1f} {seg_fps:11.1f} "
              f"{seg_fps / dec_fps:6.2f} {cpu_dec / cpu_seg:9.2f} {result.cut_frames}")
        tot_frames += n
        tot_dec += best_dec
        tot_seg += best_seg
        tot_cdec += cpu_dec
        tot_cseg += cpu_seg
    tmpdir.cleanup()
    dec, seg = tot_frames / tot_dec, tot_frames / tot_seg
    print(f"cpu: decode {tot_cdec:.2f} s, segment {tot_cseg:.2f} s, cpu_ratio={tot_cdec / tot_cseg:.3f}")
    print(f"TOTAL frames={tot_frames} decode_s={tot_dec:.2f} segment_s={tot_seg:.2f} "
          f"decode_fps={dec:.1f} segment_fps={seg:.1f} ratio={seg / dec:.3f}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
