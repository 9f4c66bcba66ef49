"""The full teacher warm-up on a preset, measured on an EventQA test split from an unseen seed.

    .venv/bin/python bench/warmup_experiment.py [--preset cpu-tiny] [--test-seed 7] [--test-videos 32]
                                                [--student] [--workdir DIR] [--override warmup.qa_steps=800 ...]

1. Generates the preset's EventQA data set (its train split is what the warm-up trains on besides
   the synthetic videos) and a test set from `--test-seed` (a seed the warm-up never sees: not the
   data set's, not warmup.synthetic_seed or synthetic_seed + 1).
2. Runs stage `warmup` (teacher), printing the learning curve as it goes, and times it (wall clock,
   the machine's load average before and after: the machine may be shared).
3. Evaluates the teacher with 64 frames on the unseen-seed test split decoded from the MP4 files
   (what the pipeline sees) and on the same videos rendered in memory (what training saw), per
   family, greedy decoding.
4. With --student: the SFT student baseline (1-group compressed ground-truth memories) from the
   teacher, evaluated the same way.
Writes `warmup_experiment.json` (curves, metrics, settings) into the work dir.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import yaml

from infra.presets import load_preset
from stages import sample_data
from stages.common.workspace import Workspace
from stages.model.qwen import load_model
from stages.warmup import stage
from stages.warmup.data import dataset_videos, synthetic_video
from stages.warmup.evaluate import evaluate, questions_of

BARS = {"colour": 0.90, "shape": 0.90, "direction": 0.80, "after": 0.80}


def _override(config, items: list[str]):
    data = config.model_dump(mode="json")
    for item in items:
        key, value = item.split("=", 1)
        section, field = key.split(".", 1)
        data[section][field] = yaml.safe_load(value)
    return type(config).model_validate(data)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _table(result, label: str) -> dict:
    acc = result.accuracy
    row = {f: acc.get(f) for f in BARS}
    marks = " ".join(f"{f}={acc.get(f, float('nan')):.3f}{'' if acc.get(f, 0) >= BARS[f] else '(<' + str(BARS[f]) + ')'}"
                     for f in BARS)
    print(f"  {label:34s} {marks} | format={result.formatted / max(1, result.total):.3f} n={result.counts}")
    return {"accuracy": row, "format": result.formatted / max(1, result.total), "counts": result.counts,
            "metrics": result.metrics()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-tiny")
    p.add_argument("--test-seed", type=int, default=7)
    p.add_argument("--test-videos", type=int, default=32)
    p.add_argument("--student", action="store_true")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--override", nargs="*", default=[], help="section.field=value (YAML value)")
    p.add_argument("--force", action="store_true", help="retrain even if an identical warm-up is saved")
    args = p.parse_args()

    config = _override(load_preset(args.preset), args.override)
    w = config.warmup
    if args.test_seed in (config.sample_data.seed, w.synthetic_seed, w.synthetic_seed + 1):
        raise SystemExit(f"--test-seed {args.test_seed} is used by the data set or the warm-up")
    torch.set_num_threads(w.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="warmup-exp-"))
    work.mkdir(parents=True, exist_ok=True)
    sd = config.sample_data
    data_dir, test_dir = work / "data", work / f"test-seed{args.test_seed}"
    sample_data.generate(data_dir, sd.videos, sd.seed, sd.width, sd.height, sd.fps, sd.test_fraction)
    sample_data.generate(test_dir, args.test_videos, args.test_seed, sd.width, sd.height, sd.fps, 1.0)
    ws = Workspace(work / "home")
    print(f"preset {config.name}: model {config.model.model_dump(exclude_none=True)}")
    print(f"warmup {w.model_dump()}")
    print(f"work dir {work}; load average before: {_load()}; torch threads {w.threads}", flush=True)

    t0 = time.perf_counter()
    res = stage.run(config, data_dir, ws, "teacher", force=args.force, log=lambda s: print("  " + s, flush=True))
    wall = time.perf_counter() - t0
    print(f"teacher warm-up: {res.metrics.get('steps')} steps, {wall / 60:.2f} min wall "
          f"({res.metrics.get('minutes', 0):.2f} min in the loop{', cached' if res.cached else ''}); "
          f"load average after: {_load()}", flush=True)

    teacher = load_model(res.checkpoint_dir)
    mp4 = dataset_videos(test_dir, "test")
    items = questions_of(mp4)
    rendered = {v.video_id: v for v in (synthetic_video(args.test_seed, i, sd.width, sd.height, sd.fps)
                                        for i in range(args.test_videos))}
    items_mem = [(rendered[v.video_id], q) for v, q in items]
    print(f"unseen-seed test split: seed {args.test_seed}, {len(mp4)} videos, {len(items)} questions")
    t1 = time.perf_counter()
    cache = work / "home" / "cache" / "frames"
    report = {"teacher_mp4": _table(evaluate(teacher, items, "teacher", cache_dir=cache), "teacher, 64 frames, MP4")}
    eval_s = time.perf_counter() - t1
    report["teacher_rendered"] = _table(evaluate(teacher, items_mem, "teacher"), "teacher, 64 frames, rendered")
    if args.student:
        t2 = time.perf_counter()
        sres = stage.run(config, data_dir, ws, "student", force=args.force, log=lambda s: print("  " + s, flush=True))
        report["student_minutes"] = (time.perf_counter() - t2) / 60
        student = load_model(sres.checkpoint_dir)
        report["student_mp4"] = _table(evaluate(student, items, "student", cache_dir=cache),
                                       "SFT student, 1 group, MP4")
        report["teacher_before_sft_as_student"] = _table(evaluate(teacher, items, "student", cache_dir=cache),
                                                         "teacher weights, 1 group (no SFT)")
    ok = all((report["teacher_mp4"]["accuracy"].get(f) or 0) >= b for f, b in BARS.items())
    print(f"bar {'MET' if ok else 'MISSED'}; warm-up wall {wall / 60:.2f} min (bar 15); "
          f"test evaluation {eval_s:.0f} s; load average now {_load()}")
    out = {"preset": config.name, "overrides": args.override, "test_seed": args.test_seed, "wall_minutes": wall / 60,
           "warmup": w.model_dump(), "model": config.model.model_dump(), "metrics": res.metrics,
           "curves": res.curves, "report": report, "bar_met": ok}
    (work / "warmup_experiment.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {work / 'warmup_experiment.json'}")


if __name__ == "__main__":
    main()
