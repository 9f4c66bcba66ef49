"""Stage embed-train: the visual tower, trained into MiniLM's frozen text space (LiT-style).

Pairs come from the TRAIN split of `events.jsonl` (ground-truth events with captions): each
event's frames are paired with its caption and, when the questions table knows them, with the
training questions whose answer lives in that one event (`embed.train_question_families`).
Why the questions: MiniLM ranks "Which shape moves on the red background?" closest to the
right caption only about 55% of the time when another event of the video has a red *shape*
(measured on 48 unseen videos), so a tower that reproduces caption vectors perfectly is capped
there; with the questions as extra positives it learns where questions land.

Loss: symmetric InfoNCE with a learned temperature, multi-positive (an event has several
texts; an identical question text can belong to events of several videos), over all events of
a batch. Deterministic for a seed on a given machine and thread count.

    run(config, ground_truth, videos, questions, workspace) -> TrainResult(checkpoint, metrics, trained)

The checkpoint folder is keyed by a fingerprint of everything that determines it, so an
unchanged rerun returns the existing checkpoint at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from data_contracts.config import PipelineConfig
from stages.common import incremental
from stages.common.frames import decode_frames, uniform_timestamps
from stages.common.workspace import Workspace
from stages.embed.towers import WEIGHTS, TextTower, VisualTower

STAGE = "embed-train"
CODE_VERSION = "1"
MANIFEST = "manifest.json"
POOL_PER_FRAME = 4  # training draws each of the T frames from 4 candidates in its time slice


@dataclass
class TrainResult:
    checkpoint: Path  # folder with visual.pt, tower.json, manifest.json
    metrics: dict  # loss_curve, train_seconds, heldout recall, counts
    trained: bool  # False when an identical checkpoint already existed


@dataclass
class Pairs:
    """Training (or held-out) material: events, texts, and which texts describe which events."""

    events: list[dict]  # video_id, index, start_time, end_time, caption
    texts: list[str]  # unique texts
    positives: np.ndarray  # bool [len(texts), len(events)]


def load_ground_truth(path: Path) -> dict[str, dict]:
    """events.jsonl rows keyed by the video's `path` (= the videos table's video_id)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {row["path"]: row for row in rows}


def match_events(detected: list[tuple[float, float]], truth: list[tuple[float, float]],
                 per: str = "truth") -> list[int | None]:
    """For each span on the `per` side ("truth" or "detected"), the index of the span on the other side
    that overlaps it most in time, or None when nothing overlaps."""
    this, other = (truth, detected) if per == "truth" else (detected, truth)
    out: list[int | None] = []
    for s, e in this:
        overlaps = [min(e, oe) - max(s, os_) for os_, oe in other]
        best = int(np.argmax(overlaps)) if overlaps else None
        out.append(best if best is not None and overlaps[best] > 0 else None)
    return out


def checkpoint_hash(folder: Path) -> str:
    """What the embed stage fingerprints a checkpoint by (also for a CLIP folder: its files' bytes)."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if manifest.is_file():
        return json.loads(manifest.read_text())["weights_sha256"]
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(folder)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:24]


def make_pairs(ground_truth: dict[str, dict], questions: pa.Table | None, split: str,
               families: list[str]) -> Pairs:
    events, index = [], {}
    for vid in sorted(ground_truth):
        row = ground_truth[vid]
        if row.get("split") != split:
            continue
        for e in row["events"]:
            index[(vid, e["index"])] = len(events)
            events.append(dict(video_id=vid, index=e["index"], start_time=float(e["start_time"]),
                               end_time=float(e["end_time"]), caption=e["caption"]))
    links: dict[str, set[int]] = {}
    for i, e in enumerate(events):
        links.setdefault(e["caption"], set()).add(i)
    if questions is not None and families:
        for q in questions.to_pylist():
            k = index.get((q["video_id"], q["answer_event"]))
            if q["split"] == split and q["family"] in families and k is not None:
                links.setdefault(q["problem"], set()).add(k)
    texts = sorted(links)
    positives = np.zeros((len(texts), len(events)), dtype=bool)
    for t, text in enumerate(texts):
        positives[t, sorted(links[text])] = True
    return Pairs(events, texts, positives)


def event_frames(events: list[dict], videos: dict[str, dict], count: int, size: int,
                 cache_dir: Path | None) -> np.ndarray:
    """uint8 [N, count, size, size, 3]: `count` frames at the centres of equal slices of each event."""
    out = np.zeros((len(events), count, size, size, 3), dtype=np.uint8)
    by_video: dict[str, list[int]] = {}
    for i, e in enumerate(events):
        by_video.setdefault(e["video_id"], []).append(i)
    for vid, rows in by_video.items():  # one decode pass per video
        video = videos[vid]
        times = [t for i in rows for t in uniform_timestamps(events[i]["start_time"],
                                                             events[i]["end_time"] - events[i]["start_time"], count)]
        frames = decode_frames(Path(video["path"]), times, size, cache_dir, video["content_sha256"])
        out[rows] = frames.reshape(len(rows), count, size, size, 3)
    return out


def infonce(visual: torch.Tensor, text: torch.Tensor, positives: torch.Tensor,
            logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE: texts->events and events->texts, mean log-prob of positives."""
    logits = logit_scale.exp() * text @ visual.T  # [texts, events]
    pos = positives.float()
    t2e = -(F.log_softmax(logits, dim=1) * pos).sum(1) / pos.sum(1)
    e2t = -(F.log_softmax(logits.T, dim=1) * pos.T).sum(1) / pos.T.sum(1).clamp(min=1)
    return (t2e.mean() + e2t[pos.T.sum(1) > 0].mean()) / 2


def train_tower(pool: np.ndarray, text_vectors: np.ndarray, positives: np.ndarray, cfg, seed: int,
                log_every: int = 10) -> tuple[VisualTower, list[float]]:
    """Train a VisualTower on a frame pool [N, T*POOL_PER_FRAME, H, W, 3]; returns it and the loss curve."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t = cfg.frames_per_event
    tower = VisualTower(frames=t, size=cfg.frame_size, dim=text_vectors.shape[1], width=cfg.tower_width)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    opt = torch.optim.AdamW([*tower.parameters(), logit_scale], lr=cfg.learning_rate, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.learning_rate, total_steps=max(cfg.train_steps, 1),
                                                pct_start=0.1)
    texts = torch.from_numpy(text_vectors)
    pos_all = torch.from_numpy(positives)
    parts = VisualTower.parts(torch.from_numpy(pool))  # [N, pool] each: computed once, no weights
    n = pool.shape[0]
    curve: list[float] = []
    tower.train()
    for step in range(cfg.train_steps):
        batch = np.sort(rng.choice(n, size=min(cfg.batch_size, n), replace=False))
        # One frame from each of the T time slices, so every step sees the event a bit differently.
        picks = torch.from_numpy(np.arange(t) * POOL_PER_FRAME + rng.integers(0, POOL_PER_FRAME, size=(len(batch), t)))
        rows = torch.from_numpy(batch)[:, None]
        visual = tower.embed({k: v[rows, picks] for k, v in parts.items()})
        pos = pos_all[:, batch]
        keep = pos.any(1)
        loss = infonce(visual, texts[keep], pos[keep], logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            logit_scale.clamp_(max=math.log(100.0))
        if step % log_every == 0 or step == cfg.train_steps - 1:
            curve.append(round(loss.item(), 4))
    return tower.eval(), curve


def within_video_recall(vectors: np.ndarray, text_vectors: np.ndarray, pairs: Pairs, k: int = 1) -> float:
    """Share of (text, event) positives where the event ranks in the top k of its video's events."""
    by_video: dict[str, list[int]] = {}
    for i, e in enumerate(pairs.events):
        by_video.setdefault(e["video_id"], []).append(i)
    hits = total = 0
    for t, row in enumerate(pairs.positives):
        for e in np.flatnonzero(row):
            cands = by_video[pairs.events[e]["video_id"]]
            scores = vectors[cands] @ text_vectors[t]
            top = [cands[j] for j in np.argsort(-scores)[:k]]
            hits += int(e in top)
            total += 1
    return hits / total if total else float("nan")


def config_fields(config: PipelineConfig) -> dict:
    e = config.embed
    return dict(text_model=e.text_model, dim=e.dim, frames_per_event=e.frames_per_event, frame_size=e.frame_size,
                train_steps=e.train_steps, batch_size=e.batch_size, learning_rate=e.learning_rate,
                tower_width=e.tower_width, seed=e.seed, train_question_families=e.train_question_families)


def frame_cache(workspace: Workspace) -> Path:
    """Where decoded frames are cached for every stage (keyed by video hash, size, time)."""
    return workspace.home / "cache" / "frames"


def run(config: PipelineConfig, ground_truth: Path, videos: pa.Table, questions: pa.Table | None,
        workspace: Workspace, force: bool = False, threads: int | None = None) -> TrainResult:
    """Train (or reuse) the visual tower; returns the checkpoint folder and its metrics.

    `ground_truth` is events.jsonl; `videos` (ingest) gives paths and content hashes; `questions`
    (ingest, may be None) adds the training questions as positives. `threads` sets torch's threads.
    """
    cfg = config.embed
    if cfg.clip_checkpoint:  # both towers come from the checkpoint: nothing to train
        return TrainResult(Path(cfg.clip_checkpoint), {"skipped": "clip_checkpoint"}, trained=False)
    video_rows = {v["video_id"]: v for v in videos.to_pylist()}
    truth = {vid: row for vid, row in load_ground_truth(ground_truth).items() if vid in video_rows}
    families = list(cfg.train_question_families)
    train = make_pairs(truth, questions, "train", families)
    if not train.events:
        raise ValueError(f"{ground_truth}: no events of the train split among the ingested videos")
    inputs = [json.dumps([e["video_id"], e["start_time"], e["end_time"], video_rows[e["video_id"]]["content_sha256"]])
              for e in train.events] + train.texts
    fp = incremental.fingerprint(STAGE, CODE_VERSION, config_fields(config), inputs)
    folder = workspace.home / "checkpoints" / "embed" / fp
    if (folder / MANIFEST).is_file() and not force:
        return TrainResult(folder, json.loads((folder / MANIFEST).read_text())["metrics"], trained=False)

    if threads:
        torch.set_num_threads(threads)
    text = TextTower()
    t0 = time.perf_counter()
    pool = event_frames(train.events, video_rows, cfg.frames_per_event * POOL_PER_FRAME, cfg.frame_size,
                        frame_cache(workspace))
    text_vectors = text.encode_text(train.texts)
    t1 = time.perf_counter()
    tower, curve = train_tower(pool, text_vectors, train.positives, cfg, cfg.seed)
    t2 = time.perf_counter()
    metrics = {"loss_curve": curve, "loss_every": 10, "final_loss": curve[-1] if curve else None,
               "train_seconds": round(t2 - t1, 2), "prepare_seconds": round(t1 - t0, 2),
               "train_events": len(train.events), "train_texts": len(train.texts), "steps": cfg.train_steps}
    metrics.update(_recall(tower, text, train, text_vectors, video_rows, cfg, workspace, "train"))
    # Held out: the test split's events with their captions and questions, reported only, never
    # used for training or for choosing anything.
    held = make_pairs(truth, questions, "test", families)
    if held.events:
        metrics.update(_recall(tower, text, held, text.encode_text(held.texts), video_rows, cfg, workspace, "heldout"))
    return TrainResult(_save(tower, folder, fp, metrics), metrics, trained=True)


def latest_checkpoint(workspace: Workspace) -> Path | None:
    """The most recently trained visual tower of this workspace (for data evaluated without retraining)."""
    done = [p.parent for p in (workspace.home / "checkpoints" / "embed").glob(f"*/{MANIFEST}")]
    return max(done, key=lambda p: (p / MANIFEST).stat().st_mtime) if done else None


def _recall(tower, text, pairs: Pairs, text_vectors, video_rows, cfg, workspace, name: str) -> dict:
    """Within-video recall@1/@3 of every (text, event) positive, frames picked as stage embed picks them."""
    vectors = tower.encode_events(event_frames(pairs.events, video_rows, cfg.frames_per_event, cfg.frame_size,
                                               frame_cache(workspace)))
    return {f"{name}_recall@1": round(within_video_recall(vectors, text_vectors, pairs, 1), 4),
            f"{name}_recall@3": round(within_video_recall(vectors, text_vectors, pairs, 3), 4),
            f"{name}_events": len(pairs.events)}


def _save(tower: VisualTower, folder: Path, fp: str, metrics: dict) -> Path:
    """Write the checkpoint into a temp folder, then rename it into place (atomic)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{fp}.", dir=folder.parent))
    try:
        tower.save(tmp)
        weights = hashlib.sha256((tmp / WEIGHTS).read_bytes()).hexdigest()[:24]
        manifest = {"stage": STAGE, "fingerprint": fp, "weights_sha256": weights, "metrics": metrics}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if folder.exists():  # force: replace the old one
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
