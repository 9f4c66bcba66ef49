"""End-to-end latency of answering one question about a video: the 64-frame teacher against MARC.

    .venv/bin/python bench/bench_answer.py [--home MARC_HOME] [--preset cpu-tiny] [--repeat 3] [--new-tokens 32]

Needs a trained pipeline in MARC_HOME (`make demo`): the warmed-up teacher, the last trained C-GRPO
student and the visual tower. A video the pipeline has never seen is generated (EventQA, unseen seed)
and three things are timed, in one run, on the same question set, each decoding exactly
--new-tokens tokens (greedy) so no arm is flattered by a shorter answer:

  teacher (64 frames)         decode 64 uniform frames from the MP4, patchify, vision tower over all
                              of them, LM over 32 temporal groups of tokens
  student, new video          `marc answer`'s path on a fresh answer workspace: probe + hash the file,
                              segment, embed the events into LanceDB, retrieve, decode the memory's
                              frames, vision tower per event, compress, LM over N_target groups
  student, known video        a second question about the same video: memory, frames and per-event
                              features are read back; retrieval, compression and the LM run

Each number is the best (minimum) of --repeat runs; the student-new-video run uses a new answer
workspace (and a new frame cache) every time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from infra.home import marc_home
from infra.presets import load_preset
from stages import answer as answering
from stages import sample_data
from stages.common.workspace import Workspace
from stages.embed.towers import TextTower
from stages.embed.train import latest_checkpoint
from stages.evaluate.stage import Checkpoints, load_weights
from stages.model import runner
from stages.model.inputs import build_teacher_inputs, load_frames, teacher_timestamps
from stages.model.qwen import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=None, help="MARC_HOME of a trained pipeline (default: MARC_HOME)")
    ap.add_argument("--preset", default="cpu-tiny")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    home = (args.home or marc_home()).resolve()
    config = load_preset(args.preset)
    try:
        ckpt = Checkpoints.from_workspace(config, Workspace(home))
        student_dir, tower = Path(ckpt.path("cgrpo")), latest_checkpoint(Workspace(home))
    except FileNotFoundError as exc:
        raise SystemExit(f"bench-answer needs a trained pipeline in {home}: {exc} (run `make demo`)")
    teacher, student = load_weights(ckpt.teacher, config), load_model(student_dir, config.model)
    text = TextTower()

    work = Path(tempfile.mkdtemp(prefix="bench_answer_"))
    sd = config.sample_data
    sample_data.generate(work / "data", videos=1, seed=9090, width=sd.width, height=sd.height, fps=sd.fps,
                         test_fraction=1.0)
    video = next((work / "data" / "videos").glob("*.mp4"))
    questions = [json.loads(line) for line in (work / "data" / "questions.jsonl").read_text().splitlines()]
    first_q, later_q = questions[0], questions[1]
    n = args.new_tokens

    def teacher_answer(q: dict) -> float:
        t = time.perf_counter()
        from stages.common.media import probe_video

        duration = probe_video(video, 0).duration
        stamps = teacher_timestamps(duration, sd.fps, config.model.teacher_frames)
        frames = load_frames(teacher, video, stamps)  # no cache: decoded from the file
        inputs = build_teacher_inputs(teacher, [q], [frames], [stamps])
        runner.generate(teacher, inputs, n, min_new_tokens=n)
        return time.perf_counter() - t

    def student_answer(home_dir: Path, q: dict) -> answering.Answer:
        return answering.answer(config, home_dir, video, q["problem"], q["options"], student_dir, tower,
                                bundle=student, text_tower=text, new_tokens=n)

    with torch.no_grad():
        teacher_answer(first_q)  # one-off costs (allocator, oneDNN) out of the timings
        student_answer(work / "warm", first_q)
        rows: dict[str, list[float]] = {"teacher": [], "student_new": [], "student_known": []}
        parts_new: list[dict] = []
        parts_known: list[dict] = []
        for r in range(args.repeat):
            rows["teacher"].append(teacher_answer(first_q))
            fresh = work / f"home-{r}"
            first = student_answer(fresh, first_q)
            assert first.new_video and first.cached_events == 0
            later = student_answer(fresh, later_q)
            assert not later.new_video
            rows["student_new"].append(first.seconds["total"])
            rows["student_known"].append(later.seconds["total"])
            parts_new.append(first.seconds)
            parts_known.append(later.seconds)
            shutil.rmtree(fresh, ignore_errors=True)
    best = {k: min(v) for k, v in rows.items()}
    fastest = lambda parts: min(parts, key=lambda p: p["total"])  # noqa: E731
    print(f"bench-answer: preset {config.name}, home {home}, video {video.name} ({len(questions)} questions), "
          f"{n} new tokens greedy, best of {args.repeat}, {torch.get_num_threads()} threads")
    print(f"{'':30s} {'seconds':>9s} {'vs teacher':>11s}")
    for key, label in (("teacher", "teacher, 64 frames"), ("student_new", "student, first question (new)"),
                       ("student_known", "student, later question")):
        print(f"{label:30s} {best[key]:9.3f} {best[key] / best['teacher']:10.1%}")
    for label, parts in (("new video", fastest(parts_new)), ("known video", fastest(parts_known))):
        print(f"  student {label:12s} " + ", ".join(f"{k} {v:.3f}s" for k, v in parts.items()))
    print(f"speed-up: later question {best['teacher'] / best['student_known']:.1f}x faster than the teacher; "
          f"first question {best['teacher'] / best['student_new']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"best": best, "runs": rows, "parts_new": parts_new,
                                               "parts_known": parts_known}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
