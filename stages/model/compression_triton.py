"""Triton kernels of the temporal compression layer, and their launchers.

Same semantics as the PyTorch reference in `compression.py` (read that first). Three kernels:

  _pair_similarity_kernel  sim(H[left[k]], H[right[k]]) for a batch of frame pairs (ragged events
                           are just a pair list). Grid (pairs, patch blocks); each program loops
                           over its BLOCK_P patches and over D in BLOCK_D chunks, fp32
                           accumulation for fp32/bf16/fp16 input, and writes the sum of its
                           patches' cosines; the launcher adds the blocks and divides by P.
  _select_kernel           one program per segment (an event in stage 1, a question in stage 2):
                           finishes the two similarities the previous merge recomputed, takes the
                           argmax (first maximum) of its segment's similarities, and updates the
                           doubly linked list of surviving frames.
  _merge_kernel            grid (segments, patch blocks): writes (Ha + Hb) / 2 over the left frame
                           and computes the merged frame's cosines with its two neighbours (the
                           incremental update), one partial sum per patch block.

State lives on the device, one slot per original frame: the surviving frame of a run of merged
frames sits in the slot of the run's first frame. sims[s] = sim(slot s, next[s]) or -inf when
that pair is not a candidate (different segment, window, dead slot). The host knows the number of
merges of each step in advance, so a stage is a fixed sequence of (select, merge) launches with no
host synchronisation between merges. Deterministic: no atomics, fixed reduction order.
Segments never read each other's frames or similarities; the only shared words are the linked-list
pointers at event boundaries in stage 1 (prev of an event's first slot), which the neighbouring
program may read concurrently but never uses (it lies outside that program's segment).

Import with TRITON_INTERPRET=1 already set to run these on CPU tensors (tests only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

EPS = 1e-8  # same as compression.EPS
NO_WINDOW = 2**30  # window value meaning "no window"


@triton.jit
def _round_fp32_to_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32, so the cast that follows is
    exact. Explicit because the CPU interpreter's fp32 -> bf16 cast truncates, while torch and the
    GPU round to nearest even; the merge choices must not depend on where the kernel runs."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _pair_similarity_kernel(
    h_ptr, left_ptr, right_ptr, partial_ptr,
    P, D, stride_t, stride_p, n_pblocks, eps,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pair = tl.program_id(0)
    pblock = tl.program_id(1)
    a_slot = tl.load(left_ptr + pair)
    b_slot = tl.load(right_ptr + pair)
    valid = (a_slot >= 0) & (b_slot >= 0)
    a_row = h_ptr + tl.maximum(a_slot, 0).to(tl.int64) * stride_t
    b_row = h_ptr + tl.maximum(b_slot, 0).to(tl.int64) * stride_t

    p = pblock * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < tl.where(valid, P, 0)  # (not `& valid`: the interpreter mis-types scalar & vector)
    dot = tl.zeros([BLOCK_P], dtype=tl.float32)
    a_sq = tl.zeros([BLOCK_P], dtype=tl.float32)
    b_sq = tl.zeros([BLOCK_P], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = p_mask[:, None] & (d < D)[None, :]
        offs = p[:, None] * stride_p + d[None, :]
        a = tl.load(a_row + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_row + offs, mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(a * b, axis=1)
        a_sq += tl.sum(a * a, axis=1)
        b_sq += tl.sum(b * b, axis=1)
    cos = dot / tl.maximum(tl.sqrt(a_sq) * tl.sqrt(b_sq), eps)
    total = tl.sum(tl.where(p_mask, cos, 0.0), axis=0)
    total = tl.where(valid, total, float("-inf"))
    tl.store(partial_ptr + pair * n_pblocks + pblock, total)


@triton.jit
def _select_kernel(
    sims_ptr, next_ptr, prev_ptr, span_end_ptr,
    seg_lo_ptr, seg_hi_ptr, remaining_ptr, pending_ptr, partial_ptr, chosen_ptr, log_ptr,
    P, n_pblocks, window,
    SELECT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_NPB: tl.constexpr,
):
    # Every store below depends on values loaded before it and no address is loaded after it is
    # stored, so the program needs no barrier (launched with one warp).
    seg = tl.program_id(0)
    lo = tl.load(seg_lo_ptr + seg)
    hi = tl.load(seg_hi_ptr + seg)

    # 1. The (up to) two similarities the previous merge kernel left as partial sums per block.
    blocks = tl.arange(0, BLOCK_NPB)
    tgt0 = tl.load(pending_ptr + seg * 2 + 0)
    tgt1 = tl.load(pending_ptr + seg * 2 + 1)
    part0 = tl.load(partial_ptr + (seg * 2 + 0) * n_pblocks + blocks, mask=blocks < n_pblocks, other=0.0)
    part1 = tl.load(partial_ptr + (seg * 2 + 1) * n_pblocks + blocks, mask=blocks < n_pblocks, other=0.0)
    val0 = tl.sum(part0, axis=0) / P
    val1 = tl.sum(part1, axis=0) / P

    # 2. The most similar candidate pair of the segment (first maximum wins ties), reading the
    #    two finished similarities from registers.
    rem = tl.load(remaining_ptr + seg)
    left = tl.full([], -1, tl.int32)
    if SELECT:
        best_val = tl.full([], float("-inf"), tl.float32)
        best_idx = tl.full([], -1, tl.int32)
        for start in range(lo, hi, BLOCK_S):
            offs = start + tl.arange(0, BLOCK_S)
            v = tl.load(sims_ptr + offs, mask=offs < hi, other=float("-inf"))
            v = tl.where(offs == tgt0, val0, v)
            v = tl.where(offs == tgt1, val1, v)
            m = tl.max(v, axis=0)
            better = m > best_val
            best_idx = tl.where(better, start + tl.argmax(v, axis=0), best_idx)
            best_val = tl.where(better, m, best_val)
        left = tl.where(rem > 0, best_idx, -1)

    if left >= 0:
        # 3. Merge `right` into `left` in the doubly linked list of survivors.
        right = tl.load(next_ptr + left)
        before = tl.load(prev_ptr + left)
        after = tl.load(next_ptr + right)
        first = left  # a survivor's slot is the first original frame of its run
        last = tl.load(span_end_ptr + right)
        after_last = tl.load(span_end_ptr + tl.maximum(after, 0))
        # Which neighbour pairs stay candidates: same segment, merged span <= window.
        before_in = before >= lo
        before_ok = before_in & (last - before + 1 <= window)
        after_ok = (after >= 0) & (after < hi) & (after_last - first + 1 <= window)
        nb_before = tl.where(before_ok, before, -1)
        nb_after = tl.where(after_ok, after, -1)
        # sims of left, right and (in-segment) before are stale until the merge kernel is done.
        stale0 = (tgt0 == left) | (tgt0 == right) | (before_in & (tgt0 == before))
        stale1 = (tgt1 == left) | (tgt1 == right) | (before_in & (tgt1 == before))
        if tgt0 >= 0:
            tl.store(sims_ptr + tgt0, tl.where(stale0, float("-inf"), val0))
        if tgt1 >= 0:
            tl.store(sims_ptr + tgt1, tl.where(stale1, float("-inf"), val1))
        tl.store(sims_ptr + left, float("-inf"))
        tl.store(sims_ptr + right, float("-inf"))
        if before_in:
            tl.store(sims_ptr + before, float("-inf"))
        tl.store(next_ptr + left, after)
        if after >= 0:
            tl.store(prev_ptr + after, left)
        tl.store(next_ptr + right, -1)
        tl.store(prev_ptr + right, -1)
        tl.store(span_end_ptr + left, last)
        tl.store(span_end_ptr + right, -1)
        tl.store(remaining_ptr + seg, rem - 1)
        tl.store(pending_ptr + seg * 2 + 0, nb_before)
        tl.store(pending_ptr + seg * 2 + 1, tl.where(after_ok, left, -1))
        tl.store(chosen_ptr + seg * 4 + 0, left)
        tl.store(chosen_ptr + seg * 4 + 1, right)
        tl.store(chosen_ptr + seg * 4 + 2, nb_before)
        tl.store(chosen_ptr + seg * 4 + 3, nb_after)
        tl.store(log_ptr + seg * 4 + 0, first)
        tl.store(log_ptr + seg * 4 + 1, last)
        tl.store(log_ptr + seg * 4 + 2, nb_before)
        tl.store(log_ptr + seg * 4 + 3, nb_after)
    else:
        if tgt0 >= 0:
            tl.store(sims_ptr + tgt0, val0)
        if tgt1 >= 0:
            tl.store(sims_ptr + tgt1, val1)
        tl.store(pending_ptr + seg * 2 + 0, -1)
        tl.store(pending_ptr + seg * 2 + 1, -1)
        tl.store(chosen_ptr + seg * 4 + 0, -1)


@triton.jit
def _merge_kernel(
    h_ptr, chosen_ptr, partial_ptr,
    P, D, stride_t, stride_p, n_pblocks, eps,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seg = tl.program_id(0)
    pblock = tl.program_id(1)
    left = tl.load(chosen_ptr + seg * 4 + 0)
    if left >= 0:
        right = tl.load(chosen_ptr + seg * 4 + 1)
        before = tl.load(chosen_ptr + seg * 4 + 2)
        after = tl.load(chosen_ptr + seg * 4 + 3)
        left_row = h_ptr + left.to(tl.int64) * stride_t
        right_row = h_ptr + right.to(tl.int64) * stride_t
        before_row = h_ptr + tl.maximum(before, 0).to(tl.int64) * stride_t
        after_row = h_ptr + tl.maximum(after, 0).to(tl.int64) * stride_t

        p = pblock * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < P
        p_before = p < tl.where(before >= 0, P, 0)
        p_after = p < tl.where(after >= 0, P, 0)
        dot_before = tl.zeros([BLOCK_P], dtype=tl.float32)
        dot_after = tl.zeros([BLOCK_P], dtype=tl.float32)
        m_sq = tl.zeros([BLOCK_P], dtype=tl.float32)
        before_sq = tl.zeros([BLOCK_P], dtype=tl.float32)
        after_sq = tl.zeros([BLOCK_P], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_mask = (d < D)[None, :]
            mask = p_mask[:, None] & d_mask
            offs = p[:, None] * stride_p + d[None, :]
            a = tl.load(left_row + offs, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(right_row + offs, mask=mask, other=0.0).to(tl.float32)
            merged = (a + b) * 0.5
            if h_ptr.dtype.element_ty == tl.bfloat16:
                merged = _round_fp32_to_bf16(merged)
            merged = merged.to(h_ptr.dtype.element_ty)  # rounded as the buffer holds it
            tl.store(left_row + offs, merged, mask=mask)
            m = merged.to(tl.float32)
            x = tl.load(before_row + offs, mask=p_before[:, None] & d_mask, other=0.0).to(tl.float32)
            y = tl.load(after_row + offs, mask=p_after[:, None] & d_mask, other=0.0).to(tl.float32)
            m_sq += tl.sum(m * m, axis=1)
            dot_before += tl.sum(m * x, axis=1)
            before_sq += tl.sum(x * x, axis=1)
            dot_after += tl.sum(m * y, axis=1)
            after_sq += tl.sum(y * y, axis=1)
        m_norm = tl.sqrt(m_sq)
        cos_before = dot_before / tl.maximum(tl.sqrt(before_sq) * m_norm, eps)
        cos_after = dot_after / tl.maximum(m_norm * tl.sqrt(after_sq), eps)
        tl.store(partial_ptr + (seg * 2 + 0) * n_pblocks + pblock, tl.sum(tl.where(p_mask, cos_before, 0.0), axis=0))
        tl.store(partial_ptr + (seg * 2 + 1) * n_pblocks + pblock, tl.sum(tl.where(p_mask, cos_after, 0.0), axis=0))


# --------------------------------------------------------------------------------------------
# Launchers.
# --------------------------------------------------------------------------------------------


def _blocks(P: int, D: int, block_p: int | None, block_d: int | None) -> tuple[int, int]:
    """Tile BLOCK_P x BLOCK_D of about 1024 elements (4 fp32 tiles live in the merge kernel)."""
    block_d = block_d or min(128, triton.next_power_of_2(D))
    block_p = block_p or min(triton.next_power_of_2(P), max(1, 1024 // block_d))
    return block_p, block_d


def pair_similarity(
    frames: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
    block_p: int | None = None, block_d: int | None = None,
) -> torch.Tensor:
    """[T, P, D] frames, [K] left / right frame indices -> [K] float32 sim(frames[left], frames[right]).

    A pair with a negative index is not a candidate: -inf.
    """
    frames = frames.detach().contiguous()
    T, P, D = frames.shape
    left = left.to(device=frames.device, dtype=torch.int32).contiguous()
    right = right.to(device=frames.device, dtype=torch.int32).contiguous()
    n_pairs = left.numel()
    if n_pairs == 0:
        return torch.empty(0, dtype=torch.float32, device=frames.device)
    block_p, block_d = _blocks(P, D, block_p, block_d)
    n_pblocks = triton.cdiv(P, block_p)
    partial = torch.empty((n_pairs, n_pblocks), dtype=torch.float32, device=frames.device)
    _pair_similarity_kernel[(n_pairs, n_pblocks)](
        frames, left, right, partial, P, D, frames.stride(0), frames.stride(1), n_pblocks, EPS,
        BLOCK_P=block_p, BLOCK_D=block_d,
    )
    return partial.sum(dim=1) / P


class _MergeState:
    """Device state of the greedy merge over all questions' frames (one slot per original frame)."""

    def __init__(self, frames: torch.Tensor, frames_per_question: list[int], block_p, block_d):
        self.work = frames.detach().contiguous().clone()  # merged frames are written in place
        T, self.P, self.D = self.work.shape
        dev = self.work.device
        slots = torch.arange(T, dtype=torch.int32, device=dev)
        q_end = torch.tensor(frames_per_question, device=dev).cumsum(0)
        q_start = q_end - torch.tensor(frames_per_question, device=dev)
        self.next = slots + 1
        self.next[q_end - 1] = -1  # a question's last frame has no right neighbour
        self.prev = slots - 1
        self.prev[q_start] = -1
        self.span_end = slots.clone()  # last original frame of the run a survivor holds; -1: dead
        self.sims = torch.full((T,), float("-inf"), dtype=torch.float32, device=dev)
        self.block_p, self.block_d = _blocks(self.P, self.D, block_p, block_d)
        self.n_pblocks = triton.cdiv(self.P, self.block_p)
        self.logs: list[torch.Tensor] = []  # per stage [steps, segments, 4]: first, last, before, after

    def set_similarities(self, right: torch.Tensor) -> int:
        """sims[s] = sim(slot s, right[s]) (-inf where right[s] < 0). Returns the evaluations."""
        slots = torch.arange(self.sims.numel(), device=self.sims.device)
        self.sims = pair_similarity(self.work, slots, right, self.block_p, self.block_d)
        return int((right >= 0).sum())

    def run_stage(self, seg_lo: list[int], seg_hi: list[int], remaining: torch.Tensor, window: int) -> None:
        """Greedy merges inside each segment [seg_lo, seg_hi) until `remaining` merges are done."""
        dev = self.work.device
        n_seg = len(seg_lo)
        n_steps = int(remaining.max()) if n_seg else 0
        if n_steps == 0:
            return
        lo = torch.tensor(seg_lo, dtype=torch.int32, device=dev)
        hi = torch.tensor(seg_hi, dtype=torch.int32, device=dev)
        remaining = remaining.to(device=dev, dtype=torch.int32).contiguous()
        pending = torch.full((n_seg, 2), -1, dtype=torch.int32, device=dev)
        partial = torch.zeros((n_seg, 2, self.n_pblocks), dtype=torch.float32, device=dev)
        chosen = torch.full((n_seg, 4), -1, dtype=torch.int32, device=dev)
        log = torch.full((n_steps, n_seg, 4), -1, dtype=torch.int32, device=dev)
        block_s = min(1024, triton.next_power_of_2(max(h - l for l, h in zip(seg_lo, seg_hi))))
        block_npb = triton.next_power_of_2(self.n_pblocks)

        def select(step_log: torch.Tensor, do_select: bool) -> None:
            _select_kernel[(n_seg,)](
                self.sims, self.next, self.prev, self.span_end, lo, hi, remaining, pending, partial,
                chosen, step_log, self.P, self.n_pblocks, window,
                SELECT=do_select, BLOCK_S=block_s, BLOCK_NPB=block_npb, num_warps=1,
            )

        for step in range(n_steps):
            select(log[step], True)
            _merge_kernel[(n_seg, self.n_pblocks)](
                self.work, chosen, partial, self.P, self.D, self.work.stride(0), self.work.stride(1),
                self.n_pblocks, EPS, BLOCK_P=self.block_p, BLOCK_D=self.block_d,
            )
        select(log[0], False)  # finish the last merge's neighbour similarities
        self.logs.append(log)

    def alive(self) -> torch.Tensor:
        return self.span_end >= 0

    def depth(self) -> torch.Tensor:
        """Merges each original frame's run went through: a merge covering [first, last] adds one."""
        T = self.sims.numel()
        diff = torch.zeros(T + 1, dtype=torch.int64, device=self.work.device)
        for log in self.logs:
            rows = log.reshape(-1, 4).to(torch.int64)
            rows = rows[rows[:, 0] >= 0]
            ones = torch.ones(rows.shape[0], dtype=torch.int64, device=diff.device)
            diff.index_add_(0, rows[:, 0], ones)
            diff.index_add_(0, rows[:, 1] + 1, -ones)
        return diff.cumsum(0)[:T]

    def incremental_evaluations(self) -> int:
        return sum(int((log[..., 2:] >= 0).sum()) for log in self.logs)


def plan_merges(
    frames: torch.Tensor,
    event_lengths: list[list[int]],
    keep: list[list[int]],
    target_frames: int,
    window: int | None,
    stop_after_stage1: bool,
    block_p: int | None = None,
    block_d: int | None = None,
    return_state: bool = False,
):
    """The greedy merge plan on the device. Returns (alive [T] bool, depth [T] int64, evaluations).

    keep[q][e]: frames event e of question q keeps after stage 1 (ceil(rho * n)). A question with
    at most target_frames frames is not merged (unless stop_after_stage1). return_state also
    returns the _MergeState (tests read its similarities).
    """
    frames_per_question = [sum(q) for q in event_lengths]
    state = _MergeState(frames, frames_per_question, block_p, block_d)
    T = state.sims.numel()
    win = NO_WINDOW if window is None else min(window, NO_WINDOW)

    # Stage 1: one segment per event.
    seg_lo, seg_hi, remaining = [], [], []
    right = torch.full((T,), -1, dtype=torch.int32)
    start = 0
    for lengths, keeps, n_q in zip(event_lengths, keep, frames_per_question):
        merges_here = stop_after_stage1 or n_q > target_frames
        for n, k in zip(lengths, keeps):
            seg_lo.append(start)
            seg_hi.append(start + n)
            remaining.append(n - k if merges_here else 0)
            if merges_here and win >= 2:
                right[start : start + n - 1] = torch.arange(start + 1, start + n, dtype=torch.int32)
            start += n
    evaluations = state.set_similarities(right.to(state.work.device))
    state.run_stage(seg_lo, seg_hi, torch.tensor(remaining, dtype=torch.int32), win)

    # Stage 2: one segment per question, all surviving adjacent pairs, no window.
    if not stop_after_stage1:
        q_hi = torch.tensor(frames_per_question).cumsum(0)
        q_lo = q_hi - torch.tensor(frames_per_question)
        alive_per_q = torch.stack([a.sum() for a in torch.split(state.alive(), frames_per_question)])
        remaining = (alive_per_q.cpu() - target_frames).clamp_min(0)
        if int(remaining.max()) > 0:
            evaluations += state.set_similarities(state.next)
            state.run_stage(q_lo.tolist(), q_hi.tolist(), remaining, NO_WINDOW)

    evaluations += state.incremental_evaluations()
    result = (state.alive(), state.depth(), evaluations)
    return (*result, state) if return_state else result
