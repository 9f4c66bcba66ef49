"""The SFT loop of the warm-up: plain torch AdamW, one process, deterministic from a seed.

One step, top to bottom:

    for each task of the phase (caption, textqa, qa, story) with weight w > 0:
        examples = stream[task].take(batch)                  # seeded, endless
        inputs, text, completions = build_batch(examples)    # teacher: 64 frames; student: 1 group
        loss_task = mean NLL of the completion tokens        # teacher forcing
        (w * loss_task / sum w).backward()                   # micro-batches accumulate
    clip grad norm 1; AdamW step at lr(step) (linear warm-up, then cosine to min_lr_ratio * peak)

Phases (WarmupConfig):
    teacher  0. `vision_steps` of frames (+ textqa): the vision tower alone learns the attributes
                of single temporal groups through the probe (cheap: no language model)
             1. `caption_steps` of caption + textqa (ground the words, learn the hops in text)
             2a. `clip_steps` of clipqa + caption + textqa: QA on clips of `clip_events` events (or a
                 scene-count curriculum: one stage per entry of `clip_schedule`, each evaluated on
                 held-out clips of its size when `clip_eval_per_family` > 0)
             2. `qa_steps` of qa + caption + textqa (+ story): the real 64-frame QA input
    student  `student_steps` of qa (+ caption) on the 1-group compressed memory, from the teacher

Every `eval_every` steps (and at the end) a held-out set (EventQA videos of a seed used nowhere
else, rendered in memory) is answered greedily; the curves hold loss per task and accuracy per
family against steps and minutes.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from data_contracts.config import WarmupConfig
from stages import sample_data as eq
from stages.model import runner
from stages.model.qwen import ModelBundle, save_model
from stages.model.inputs import patchify
from stages.warmup.data import ExampleStream, VideoItem, build_batch, frame_groups, synthetic_video
from stages.warmup.evaluate import evaluate, evaluate_captions, evaluate_clips, questions_of

HELDOUT_SEED_OFFSET = 1
"""Held-out check videos come from synthetic_seed + 1: planned like the training ones, never trained on."""


@dataclass
class Phase:
    name: str
    steps: int
    weights: dict[str, float]  # task -> loss weight
    clip_events: int | None = None  # clipqa phases: events per clip (None: cfg.clip_events)


def phases_for(cfg: WarmupConfig, mode: str) -> list[Phase]:
    if mode == "student":
        return [Phase("student-qa", cfg.student_steps, {"qa": 1.0, "caption": cfg.qa_caption_weight})]
    clip_weights = {"clipqa": 1.0, "caption": cfg.qa_caption_weight, "textqa": cfg.qa_textqa_weight}
    if cfg.clip_schedule:  # scene-count curriculum: clip_steps split equally, the last stage takes the rest
        n = len(cfg.clip_schedule)
        share = cfg.clip_steps // n
        clips = [Phase(f"clipqa{e}", share if k < n - 1 else cfg.clip_steps - share * (n - 1), clip_weights, e)
                 for k, e in enumerate(cfg.clip_schedule)]
    else:
        clips = [Phase("clipqa", cfg.clip_steps, clip_weights)]
    return [
        Phase("vision", cfg.vision_steps if cfg.probe_weight > 0 else 0,
              {"frames": 1.0, "textqa": cfg.vision_textqa_weight}),
        Phase("caption", cfg.caption_steps, {"caption": 1.0, "textqa": cfg.textqa_weight}),
        *clips,
        Phase("qa", cfg.qa_steps, {"qa": 1.0, "caption": cfg.qa_caption_weight, "textqa": cfg.qa_textqa_weight,
                                   "story": cfg.story_weight}),
    ]


def lr_at(step: int, total: int, cfg: WarmupConfig, peak: float) -> float:
    """Linear warm-up over `lr_warmup_steps`, then cosine from `peak` to `min_lr_ratio * peak` at `total`."""
    warm = max(1, min(cfg.lr_warmup_steps, total))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def text_nll(bundle: ModelBundle, batch: dict, completions: list[list[int]]) -> torch.Tensor:
    """Mean completion-token NLL of a text-only batch (left-padded prompts + right-padded completions)."""
    B, Lc = len(completions), max(len(c) for c in completions)
    comp = torch.full((B, Lc), bundle.pad_token_id, dtype=torch.long)
    cmask = torch.zeros((B, Lc), dtype=torch.long)
    for b, c in enumerate(completions):
        comp[b, :len(c)] = torch.tensor(c)
        cmask[b, :len(c)] = 1
    ids = torch.cat([batch["input_ids"], comp], 1)
    mask = torch.cat([batch["attention_mask"], cmask], 1)
    out = bundle.model(input_ids=ids, attention_mask=mask, mm_token_type_ids=torch.zeros_like(ids, dtype=torch.int32),
                       logits_to_keep=Lc + 1, use_cache=False)
    logits = out.logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), comp.reshape(-1), reduction="none"
                           ).view(B, Lc)[cmask.bool()].mean()


PROBE_CLASSES = {"colour": list(eq.PALETTE), "shape": list(eq.SHAPES), "direction": list(eq.DIRECTIONS),
                 "background": list(eq.PALETTE)}


class Probe(torch.nn.Module):
    """Linear heads on each temporal group's pooled visual tokens -> the event's colour, shape,
    direction and background. Training-only (not saved: the checkpoint stays a stock Qwen2.5-VL).
    It gives the vision tower a dense, direct signal - every group of every clip is labelled.
    Max pooling (default) lets the few tokens that hold the shape carry shape and motion: with the
    mean over the group's 16 tokens shape and direction stayed at chance for 400 steps of 64 groups,
    with the max direction reached 0.98 and shape rose (measured, README)."""

    def __init__(self, hidden: int, pool: str = "max"):
        super().__init__()
        self.pool = pool
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(hidden, len(v)) for k, v in PROBE_CLASSES.items()})

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """[G, P, D] tokens of G temporal groups -> [G, D]."""
        return tokens.amax(1) if self.pool == "max" else tokens.mean(1)

    def loss(self, feats: torch.Tensor, events: list[dict]) -> tuple[torch.Tensor, dict[str, float]]:
        total, accs = feats.new_zeros(()), {}
        for k, head in self.heads.items():
            target = torch.tensor([PROBE_CLASSES[k].index(e[k]) for e in events])
            logits = head(feats)
            total = total + F.cross_entropy(logits, target)
            accs[k] = (logits.argmax(-1) == target).float().mean().item()
        return total / len(self.heads), accs


def task_loss(bundle: ModelBundle, examples, mode: str, top_k: int, fps: float, max_frames: int,
              cache_dir: Path | None, probe: Probe | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(completion NLL, probe loss or None) of one micro-batch (frames: (probe loss, None))."""
    if isinstance(examples, tuple):  # the vision task: (frame pairs, event rows)
        frames, events = examples
        pv, grids = zip(*(patchify(f, bundle.geometry) for f in frames))
        out = bundle.model.model.get_video_features(torch.cat(pv), torch.tensor(grids), return_dict=True)
        tokens = torch.stack(list(out.pooler_output))  # [n, P, D]: one temporal group each
        loss, _ = probe.loss(probe.pooled(tokens), events)
        return loss, None
    inputs, text, completions = build_batch(bundle, examples, mode, top_k, fps, max_frames, cache_dir)
    if inputs is None:
        return text_nll(bundle, text, completions), None
    if probe is None or "group_events" not in text:
        logp, mask = runner.completion_logprobs(bundle, inputs, completions)
        return -logp.sum() / mask.sum(), None
    # Uncompressed input with the probe: run the vision tower here and hand its features in (the
    # identity path: same logits as the stock teacher forward, tested in test_model.py).
    embeds = runner.vision_tower(bundle, inputs)  # per question [T_b * P, D]
    P = inputs.tokens_per_group[0]
    feats = torch.cat([probe.pooled(e.view(-1, P, e.shape[-1])) for e in embeds])  # [sum T, D]
    aux, _ = probe.loss(feats, [ev for groups in text["group_events"] for ev in groups])
    ids, mask, types, Lc = runner._append_completions(inputs, completions, bundle.pad_token_id)
    out = bundle.model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types,
                       second_per_grid_ts=inputs.second_per_grid_ts, video_grid_thw=inputs.llm_grid_thw,
                       mm_encoder_outputs=runner._encoder_outputs(embeds), logits_to_keep=Lc + 1, use_cache=False)
    logits = out.logits[:, :-1].float()
    target = torch.full((len(completions), Lc), -100, dtype=torch.long)
    for b, c in enumerate(completions):
        target[b, :len(c)] = torch.tensor(c)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100), aux


@dataclass
class TrainOutcome:
    curves: list[dict] = field(default_factory=list)  # one row per logged step: step, minutes, loss/*, lr; evals add acc/*
    evals: list[dict] = field(default_factory=list)  # the eval rows only
    steps: int = 0
    seconds: float = 0.0
    checkpoint_dir: Path | None = None


def heldout_videos(cfg: WarmupConfig, count: int = 12) -> list[VideoItem]:
    return [synthetic_video(cfg.synthetic_seed + HELDOUT_SEED_OFFSET, i) for i in range(count)]


def train(bundle: ModelBundle, cfg: WarmupConfig, dataset: list[VideoItem], mode: str = "teacher",
          checkpoint_dir: Path | None = None, top_k: int = 3, fps: float = 1.0, max_frames: int = 64,
          cache_dir: Path | None = None, heldout: list[VideoItem] | None = None,
          progress: Callable[[int, int], None] | None = None, log: Callable[[str], None] | None = None
          ) -> TrainOutcome:
    """Run the phases of `mode` on `bundle` in place; return the learning curves."""
    if mode not in ("teacher", "student"):
        raise ValueError(f"mode must be 'teacher' or 'student', got {mode!r}")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    phases = [p for p in phases_for(cfg, mode) if p.steps > 0]
    total = sum(p.steps for p in phases)
    peak = cfg.student_learning_rate if mode == "student" else cfg.learning_rate
    model = bundle.model
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    probe = Probe(bundle.model.config.text_config.hidden_size, cfg.probe_pool) \
        if cfg.probe_weight > 0 and mode == "teacher" else None
    extra = list(probe.parameters()) if probe is not None else []
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay + extra, "weight_decay": 0.0}], lr=peak, betas=(0.9, 0.98))
    streams: dict[str, ExampleStream] = {}

    def stream(task: str, clip_events: int | None = None) -> ExampleStream:
        key = task if clip_events is None else f"{task}{clip_events}"
        if key not in streams:  # one seeded stream per task: adding a task leaves the others' data unchanged
            window = (cfg.clip_events if clip_events is None else clip_events) if task == "clipqa" \
                else cfg.textqa_scenes if task == "textqa" else 0
            streams[key] = ExampleStream(task, dataset, cfg.synthetic_seed, cfg.seed * 1000 + len(streams) + 1,
                                         dataset_share=cfg.dataset_share, think=cfg.think_style, window=window)
        return streams[key]

    heldout = heldout_videos(cfg) if heldout is None else heldout
    items = questions_of(heldout, cfg.eval_per_family)
    out = TrainOutcome(checkpoint_dir=checkpoint_dir)
    start = time.perf_counter()
    step = 0
    running: dict[str, list[float]] = {}

    def run_eval() -> None:
        t0 = time.perf_counter()
        res = evaluate(bundle, items, mode, batch_size=cfg.eval_batch_size, max_new_tokens=cfg.eval_max_new_tokens,
                       top_k=top_k, fps=fps, max_frames=max_frames, cache_dir=cache_dir)
        caps = evaluate_captions(bundle, heldout, mode, cfg.eval_captions, cfg.eval_batch_size, cache_dir) \
            if cfg.eval_captions else {}
        row = {"step": step, "minutes": (time.perf_counter() - start) / 60, **res.metrics(), **caps,
               "eval_seconds": time.perf_counter() - t0}
        out.evals.append(row)
        out.curves.append(row)
        if log:
            acc = " ".join(f"{k[4:]}={v:.2f}" for k, v in row.items() if k.startswith("acc/"))
            slots = " ".join(f"{k[5:]}={v:.2f}" for k, v in row.items() if k.startswith("slot/"))
            caps = " ".join(f"{k[8:]}={v:.2f}" for k, v in row.items() if k.startswith("caption/"))
            log(f"[eval step {step} {row['minutes']:.1f} min, {row['eval_seconds']:.0f} s] {acc} format={row['format']:.2f}"
                f" | think slots {slots} | captions {caps} | {res.samples[0]['completion'] if res.samples else ''}")

    def run_clip_eval(events: int) -> None:
        t0 = time.perf_counter()
        res = evaluate_clips(bundle, clip_videos, events, cfg.clip_eval_per_family, cfg.eval_batch_size,
                             cfg.eval_max_new_tokens, seed=cfg.seed, think=cfg.think_style)
        row = {"step": step, "minutes": (time.perf_counter() - start) / 60, "clip_events": events,
               **res.metrics("clip/"), "eval_seconds": time.perf_counter() - t0}
        out.curves.append(row)
        if log:
            acc = " ".join(f"{k[9:]}={v:.2f}" for k, v in row.items() if k.startswith("clip/acc/"))
            log(f"[clip eval, {events}-event clips, step {step} {row['minutes']:.1f} min, {row['eval_seconds']:.0f} s] "
                f"{acc} format={row['clip/format']:.2f} n={res.counts} | "
                f"{res.samples[0]['completion'] if res.samples else ''}")

    clip_videos = heldout_videos(cfg, 24) if cfg.clip_eval_per_family else []
    frame_rng = random.Random(cfg.seed * 1000 + 999)
    vision_steps = sum(p.steps for p in phases if p.name == "vision")
    for phase in phases:
        weights = {t: w for t, w in phase.weights.items() if w > 0}
        norm = sum(weights.values())
        for _ in range(phase.steps):
            if phase.name == "vision":  # its own short warm-up, constant rate: the cosine is the later phases'
                lr = cfg.vision_learning_rate * min(1.0, (step + 1) / max(1, cfg.lr_warmup_steps))
            else:
                lr = lr_at(step - vision_steps, total - vision_steps, cfg, peak)
            for g in opt.param_groups:
                g["lr"] = lr
            for task, w in weights.items():
                if task == "frames":
                    batch = frame_groups(frame_rng, cfg.vision_batch_size, cfg.synthetic_seed,
                                         bundle.config.frame_size, bundle.config.teacher_frames)
                else:
                    batch = stream(task, phase.clip_events if task == "clipqa" else None
                                   ).take(cfg.text_batch_size if task == "textqa" else cfg.batch_size)
                loss, aux = task_loss(bundle, batch, mode, top_k, fps, max_frames, cache_dir, probe)
                total_loss = loss * (w / norm) + (aux * cfg.probe_weight / len(weights) if aux is not None else 0.0)
                total_loss.backward()
                running.setdefault(task, []).append(loss.detach().item())
                if aux is not None:
                    running.setdefault(f"probe_{task}", []).append(aux.detach().item())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % cfg.log_every == 0 or step == total:
                row = {"step": step, "minutes": (time.perf_counter() - start) / 60, "lr": lr, "phase": phase.name,
                       **{f"loss/{t}": sum(v) / len(v) for t, v in running.items()}}
                out.curves.append(row)
                running = {}
                if log:
                    log(f"step {step}/{total} {row['minutes']:.2f} min lr={lr:.2e} " +
                        " ".join(f"{k}={v:.3f}" for k, v in row.items() if k.startswith("loss/")))
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total and phase.name != "vision":
                run_eval()  # none in phase 0: the LM has not seen a video yet
            if progress:
                progress(step, total)
        if phase.name.startswith("clipqa") and cfg.clip_eval_per_family:
            run_clip_eval(phase.clip_events or cfg.clip_events)
    run_eval()
    out.steps = step
    out.seconds = time.perf_counter() - start
    model.eval()
    if checkpoint_dir is not None:
        save_model(bundle, checkpoint_dir)
    return out
