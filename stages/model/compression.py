"""Memory-aware temporal compression layer (MARC, arXiv 2510.07915; DESIGN.md sections 1 and 4).

A "frame" is one temporal group of P patch tokens of width D from the vision tower. For one
question the frames H[0..T-1] come in events (lengths n_1..n_E, summing to T).

    sim(a, b) = mean over p of cos(H_a[p], H_b[p])

    Stage 1, inside each event: repeatedly replace the most similar ADJACENT pair by its plain
            mean (H_a + H_b) / 2 until the event holds ceil(rho * n) frames.
    Stage 2, over the concatenated survivors (event boundaries ignored): the same greedy merge
            until N_target frames remain.

Rules fixed here:
  * Ties go to the lowest index (the first maximum).
  * Window m: every current frame is the merge of a contiguous run of original frames (its span).
    In stage 1 the pair (i, i+1) is a candidate only if the merged span is at most m original
    frames long: last(i+1) - first(i) + 1 <= m. m = None: every adjacent pair is a candidate.
    If no candidate is left, the event stops above ceil(rho * n). Stage 2 ignores m, so the
    token budget is always met.
  * A question with T <= N_target frames already fits the budget and is passed through
    unchanged. Otherwise it gets min(S, N_target) frames, S = survivors of stage 1 (S < N_target
    only when rho is so small that stage 1 alone went below the budget).
  * Incremental: after merging (i, i+1) only sim(i-1, merged) and sim(merged, i+2) are
    recomputed, so an event of n frames costs at most (n - 1) + 2 * (merges) < 3n evaluations.

The merge choices are discrete and taken without autograd on a detached working copy (merged
frames are rounded to the input dtype, as a buffer of that dtype holds them). They come out as a
`CompressionPlan`: original frame t folds into output frame `out_index[t]` with weight
2 ** -depth[t] (depth = how many merges its group went through). `apply_plan` then builds the
output as ONE differentiable op (index_add of weighted frames), so gradients reach every input
frame. Same plan, same output, whichever backend decided it.

Backends: "torch" (this file, the reference; reads top to bottom) and "triton"
(`compression_triton.py`: similarity kernel + fused select / merge-update kernels, no host sync
per merge). `pick_backend` chooses.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass

import torch

EPS = 1e-8
"""Cosine denominator floor: cos = a.b / max(|a| |b|, EPS) (an all-zero patch has cosine 0)."""

BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "MARC_COMPRESSION_BACKEND"
"""If set (to triton or torch), it replaces backend="auto"."""

_NO_PAIR = float("-inf")


# --------------------------------------------------------------------------------------------
# The plan: which original frame folds into which output frame, and with what weight.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompressionPlan:
    """Output frame j = sum over {t : out_index[t] == j} of 2 ** -depth[t] * frames[t].

    Output frames are ordered question by question, in time order. Every original frame lands in
    exactly one output frame; the frames of one output frame are a contiguous run, their weights
    sum to 1.
    """

    out_index: torch.Tensor  # [T_total] int64: the output frame original frame t folds into
    depth: torch.Tensor  # [T_total] int64: merges t's group went through; weight = 2 ** -depth
    out_frames: list[int]  # [Q]: output frames per question
    similarity_evaluations: int  # frame-pair similarities computed to decide the plan

    @property
    def weight(self) -> torch.Tensor:  # [T_total] float64
        return torch.exp2(-self.depth.to(torch.float64))


def apply_plan(frames: torch.Tensor, plan: CompressionPlan) -> torch.Tensor:
    """[T_total, P, D] -> [sum(out_frames), P, D]: the plan's weighted sums, differentiable.

    Accumulates in float64 for float32/float64 input (so identical frames merge exactly) and in
    float32 for bf16/fp16, then rounds once to the input dtype.
    """
    acc = torch.float64 if frames.dtype in (torch.float32, torch.float64) else torch.float32
    weight = torch.exp2(-plan.depth.to(device=frames.device, dtype=acc))
    weighted = frames.to(acc) * weight[:, None, None]
    out = weighted.new_zeros((sum(plan.out_frames), *frames.shape[1:]))
    out = out.index_add(0, plan.out_index.to(frames.device), weighted)
    return out.to(frames.dtype)


def _plan_from_survivors(
    alive: torch.Tensor, depth: torch.Tensor, frames_per_question: list[int], evaluations: int
) -> CompressionPlan:
    """alive[t]: original frame t starts a surviving group (the left frame of a merge survives).

    Groups are contiguous runs, so the output frame of t is (number of group starts <= t) - 1.
    """
    alive = alive.to(torch.int64)
    out_index = torch.cumsum(alive, 0) - 1
    out_frames = [int(chunk.sum()) for chunk in torch.split(alive, frames_per_question)]
    return CompressionPlan(out_index, depth.to(torch.int64), out_frames, evaluations)


# --------------------------------------------------------------------------------------------
# Similarity.
# --------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def frame_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[..., P, D] x [..., P, D] -> [...]: mean over patches of the cosine of aligned patches."""
    dtype = _compute_dtype(a.dtype)
    a, b = a.to(dtype), b.to(dtype)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(EPS)
    return cos.mean(-1)


def adjacent_similarity(frames: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """[T, P, D] -> [T-1] float32 (float64 for float64 input): sim(frame t, frame t+1)."""
    _check_frames(frames)
    if pick_backend(frames.device, backend) == "triton":
        from stages.model import compression_triton

        t = torch.arange(max(frames.shape[0] - 1, 0), device=frames.device)
        return compression_triton.pair_similarity(frames, t, t + 1)
    return frame_similarity(frames[:-1], frames[1:])


# --------------------------------------------------------------------------------------------
# The reference greedy merge.
# --------------------------------------------------------------------------------------------


@dataclass
class _Group:
    """A current frame: the merge of original frames first..last; work[first] holds its value."""

    first: int
    last: int


def _greedy_merge(
    work: torch.Tensor,
    depth: torch.Tensor,
    groups: list[_Group],
    keep: int,
    window: int | None,
    counter: list[int],
) -> list[_Group]:
    """Merge the most similar adjacent pair of `groups` until `keep` remain or no pair may merge.

    Updates `work` (current frame values) and `depth` (per original frame) in place;
    counter[0] counts similarity evaluations.
    """

    def is_candidate(g: _Group, h: _Group) -> bool:
        return window is None or h.last - g.first + 1 <= window

    def pair_similarity(i: int) -> float:  # groups[i] with groups[i + 1]
        g, h = groups[i], groups[i + 1]
        if not is_candidate(g, h):
            return _NO_PAIR
        counter[0] += 1
        return frame_similarity(work[g.first], work[h.first]).item()

    # All adjacent similarities once, in one vectorised call: sims[i] = sim(groups[i], groups[i+1]).
    current = work[[g.first for g in groups]]
    sims = frame_similarity(current[:-1], current[1:]).tolist()
    counter[0] += len(sims)
    sims = [s if is_candidate(g, h) else _NO_PAIR for s, g, h in zip(sims, groups, groups[1:])]

    while len(groups) > keep:
        i = max(range(len(sims)), key=sims.__getitem__)  # first maximum: ties -> lowest index
        if sims[i] == _NO_PAIR:
            break  # the window forbids every remaining pair
        g, h = groups[i], groups[i + 1]
        acc = _compute_dtype(work.dtype)  # the mean in fp32, rounded to the buffer's dtype
        work[g.first] = ((work[g.first].to(acc) + work[h.first].to(acc)) / 2).to(work.dtype)
        depth[g.first : h.last + 1] += 1
        groups[i : i + 2] = [_Group(g.first, h.last)]
        del sims[i]
        # Only the two similarities that touch the merged frame changed.
        if i > 0:
            sims[i - 1] = pair_similarity(i - 1)
        if i < len(groups) - 1:
            sims[i] = pair_similarity(i)
    return groups


def stage1_keep(n: int, rho: float) -> int:
    """Frames an event of n frames keeps after stage 1: ceil(rho * n), at least 1.

    rho * n is rounded to 9 decimals first so that e.g. 0.7 * 10 = 7.000000000000001 keeps 7.
    """
    return max(1, math.ceil(round(rho * n, 9)))


def _plan_torch(
    frames: torch.Tensor,
    event_lengths: list[list[int]],
    rho: float,
    target_frames: int,
    window: int | None,
    stop_after_stage1: bool,
) -> CompressionPlan:
    work = frames.detach().clone()  # current frame values, never part of the autograd graph
    depth = torch.zeros(frames.shape[0], dtype=torch.int64, device=frames.device)
    alive = torch.zeros(frames.shape[0], dtype=torch.bool, device=frames.device)
    counter = [0]
    start = 0
    for lengths in event_lengths:
        n_question = sum(lengths)
        if n_question <= target_frames and not stop_after_stage1:
            groups = [_Group(t, t) for t in range(start, start + n_question)]  # fits the budget
        else:
            groups = []
            event_start = start
            for n in lengths:  # stage 1: inside each event
                event = [_Group(t, t) for t in range(event_start, event_start + n)]
                groups += _greedy_merge(work, depth, event, stage1_keep(n, rho), window, counter)
                event_start += n
            if not stop_after_stage1:  # stage 2: across events, no window
                groups = _greedy_merge(work, depth, groups, target_frames, None, counter)
        for g in groups:
            alive[g.first] = True
        start += n_question
    return _plan_from_survivors(alive, depth, [sum(q) for q in event_lengths], counter[0])


# --------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def pick_backend(device: torch.device | str, backend: str = "auto") -> str:
    """The backend ("triton" or "torch") that runs for tensors on `device`.

    auto: MARC_COMPRESSION_BACKEND if set, else triton on CUDA when triton is importable, else
    torch. triton (forced): needs triton, and a CUDA device or TRITON_INTERPRET=1 (the CPU
    interpreter, for tests). torch: always torch.
    """
    if backend not in BACKENDS:
        raise ValueError(f"compression backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_importable() else "torch"
    if backend == "triton":
        if not _triton_importable():
            raise RuntimeError("compression backend 'triton' requested but triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"compression backend 'triton' needs CUDA tensors (got {device}); on CPU set "
                "TRITON_INTERPRET=1 before importing triton (tests only: slow) or use 'torch'"
            )
    return backend


def _check_frames(frames: torch.Tensor) -> None:
    if frames.dim() != 3:
        raise ValueError(f"frames must be [T, P, D], got shape {tuple(frames.shape)}")


def _check_inputs(
    frames: torch.Tensor, event_lengths: list[list[int]], rho: float, target_frames: int,
    window: int | None,
) -> None:
    _check_frames(frames)
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    if target_frames < 1:
        raise ValueError(f"target_frames must be >= 1, got {target_frames}")
    if window is not None and window < 1:
        raise ValueError(f"window must be None or >= 1, got {window}")
    for q, lengths in enumerate(event_lengths):
        if not lengths or any(int(n) < 1 for n in lengths):
            raise ValueError(f"question {q}: event lengths must be a non-empty list of positive ints, got {lengths}")
    total = sum(sum(q) for q in event_lengths)
    if total != frames.shape[0]:
        raise ValueError(f"event lengths sum to {total} frames but frames has {frames.shape[0]}")


def plan_compression(
    frames: torch.Tensor,
    event_lengths: list[list[int]],
    rho: float,
    target_frames: int = 1,
    window: int | None = None,
    backend: str = "auto",
    stop_after_stage1: bool = False,
) -> CompressionPlan:
    """Decide the greedy merges (no autograd). stop_after_stage1: skip stage 2 (and the budget)."""
    _check_inputs(frames, event_lengths, rho, target_frames, window)
    if frames.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=frames.device)
        return CompressionPlan(empty, empty, [0] * len(event_lengths), 0)
    with torch.no_grad():
        if pick_backend(frames.device, backend) == "triton":
            from stages.model import compression_triton

            alive, depth, evaluations = compression_triton.plan_merges(
                frames, event_lengths, [[stage1_keep(n, rho) for n in q] for q in event_lengths],
                target_frames, window, stop_after_stage1,
            )
            return _plan_from_survivors(alive, depth, [sum(q) for q in event_lengths], evaluations)
        return _plan_torch(frames, event_lengths, rho, target_frames, window, stop_after_stage1)


def compress(
    frames: torch.Tensor,
    event_lengths: list[list[int]],
    rho: float,
    target_frames: int = 1,
    window: int | None = None,
    backend: str = "auto",
    stop_after_stage1: bool = False,
) -> tuple[torch.Tensor, list[int]]:
    """Compress every question's frames to target_frames frames (see the module docstring).

    frames: [T_total, P, D], all questions concatenated; question q owns sum(event_lengths[q])
    frames, its events in order. Returns (compressed [sum(out_frames), P, D], out_frames per
    question). Differentiable in `frames`.
    """
    plan = plan_compression(frames, event_lengths, rho, target_frames, window, backend, stop_after_stage1)
    return apply_plan(frames, plan), plan.out_frames
