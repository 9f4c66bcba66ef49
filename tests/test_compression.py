"""The memory-aware temporal compression layer: PyTorch reference, Triton kernels, dispatch.

The Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1, set before anything imports
triton), about 5 ms per program instance, so their cases are small but varied.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any import of triton (kernels bind it when defined)

import math
import random

import pytest
import torch

from stages.model import compression as C
from stages.model import compression_triton as CT

TRITON = "triton"
TORCH = "torch"


# --------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------


def clip(event_lengths, P, D, dtype=torch.float32, seed=0):
    """Frames with a temporal structure: a random walk inside each event (similar neighbours,
    varying step sizes so similarities are well separated) and a fresh start at each event."""
    g = torch.Generator().manual_seed(seed)
    frames = []
    for lengths in event_lengths:
        for n in lengths:
            h = torch.randn(P, D, generator=g)
            for _ in range(n):
                frames.append(h)
                step = 0.2 + 2.0 * torch.rand((), generator=g)
                h = h + step * torch.randn(P, D, generator=g)
    return torch.stack(frames).to(dtype)


def groups_of(plan, start, stop):
    """Output frames that original frames start..stop-1 fold into, as sorted distinct indices."""
    return sorted(set(plan.out_index[start:stop].tolist()))


def _event_ranges(events):
    """(start, stop) of every event of every question, in frame order."""
    start = 0
    for q in events:
        for n in q:
            yield start, start + n
            start += n


def naive_compress(frames, event_lengths, rho, target, window=None):
    """Brute force, written independently: a list of (value, first, last); every step recomputes
    every adjacent similarity with an explicit loop over patches; merges by sequential means."""

    def sim(a, b):
        return sum(
            float(torch.dot(a[p], b[p]) / max(float(a[p].norm() * b[p].norm()), C.EPS)) for p in range(a.shape[0])
        ) / a.shape[0]

    def merge(items, keep, window):
        while len(items) > keep:
            sims = [
                sim(items[i][0], items[i + 1][0])
                if window is None or items[i + 1][2] - items[i][1] + 1 <= window
                else -math.inf
                for i in range(len(items) - 1)
            ]
            best = max(sims)
            if best == -math.inf:
                break
            i = sims.index(best)
            (a, first, _), (b, _, last) = items[i], items[i + 1]
            items[i : i + 2] = [((a + b) / 2, first, last)]
        return items

    out, counts, start = [], [], 0
    x = frames.double()
    for lengths in event_lengths:
        n_q = sum(lengths)
        items = [(x[t], t, t) for t in range(start, start + n_q)]
        if n_q > target:
            survivors, pos = [], 0
            for n in lengths:
                survivors += merge(items[pos : pos + n], C.stage1_keep(n, rho), window)
                pos += n
            items = merge(survivors, target, None)
        out += [v for v, _, _ in items]
        counts.append(len(items))
        start += n_q
    return torch.stack(out), counts


# --------------------------------------------------------------------------------------------
# Dispatch.
# --------------------------------------------------------------------------------------------


def test_pick_backend(monkeypatch):
    monkeypatch.delenv(C.BACKEND_ENV, raising=False)
    cpu = torch.device("cpu")
    assert C.pick_backend(cpu, "auto") == TORCH
    assert C.pick_backend(cpu, "torch") == TORCH
    assert C.pick_backend(cpu, "triton") == TRITON  # allowed: TRITON_INTERPRET=1
    monkeypatch.setenv(C.BACKEND_ENV, "triton")
    assert C.pick_backend(cpu, "auto") == TRITON
    assert C.pick_backend(cpu, "torch") == TORCH  # the variable only replaces "auto"
    monkeypatch.setenv(C.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match=C.BACKEND_ENV):
        C.pick_backend(cpu, "auto")
    monkeypatch.delenv(C.BACKEND_ENV)
    with pytest.raises(ValueError):
        C.pick_backend(cpu, "numpy")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        C.pick_backend(cpu, "triton")


def test_invalid_inputs_are_refused():
    x = torch.randn(5, 2, 4)
    with pytest.raises(ValueError, match="sum to 4"):
        C.compress(x, [[2, 2]], 0.5)
    with pytest.raises(ValueError, match="rho"):
        C.compress(x, [[5]], 0.0)
    with pytest.raises(ValueError, match="target_frames"):
        C.compress(x, [[5]], 0.5, target_frames=0)
    with pytest.raises(ValueError, match="window"):
        C.compress(x, [[5]], 0.5, window=0)
    with pytest.raises(ValueError, match="positive"):
        C.compress(x, [[5, 0]], 0.5)
    with pytest.raises(ValueError, match=r"\[T, P, D\]"):
        C.compress(x[0], [[2]], 0.5)


# --------------------------------------------------------------------------------------------
# Similarity: definition, and the Triton kernel against the reference.
# --------------------------------------------------------------------------------------------


def test_similarity_is_mean_patch_cosine():
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    expected = torch.stack(
        [torch.nn.functional.cosine_similarity(x[t], x[t + 1], dim=-1).mean() for t in range(3)]
    )
    torch.testing.assert_close(C.adjacent_similarity(x, TORCH), expected)
    x[1, 2] = 0.0  # an all-zero patch has cosine 0, not NaN
    assert torch.isfinite(C.adjacent_similarity(x, TORCH)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [8, 100, 2048])
@pytest.mark.parametrize("P", [1, 3, 7, 64])
def test_triton_adjacent_similarity_matches_reference(P, D, dtype):
    T = 4 if D == 2048 else 6
    x = clip([[T]], P, D, dtype, seed=P * 1000 + D)
    got = C.adjacent_similarity(x, TRITON)
    want = C.adjacent_similarity(x, TORCH)
    assert got.dtype == torch.float32 and got.shape == (T - 1,)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("block_p, block_d", [(1, 8), (2, 32), (4, 64)])
def test_triton_pair_similarity_ragged_events_and_block_sizes(block_p, block_d):
    """The kernel over a batch of ragged events: pairs inside events, -inf across boundaries;
    block sizes that split P and D unevenly (P=7, D=100)."""
    lengths = [3, 1, 4, 2]
    x = clip([lengths], 7, 100, seed=block_p)
    left, right, start = [], [], 0
    for n in lengths:
        for t in range(start, start + n):
            left.append(t)
            right.append(t + 1 if t + 1 < start + n else -1)
        start += n
    got = CT.pair_similarity(x, torch.tensor(left), torch.tensor(right), block_p, block_d)
    inside = torch.tensor(right) >= 0
    assert torch.isneginf(got[~inside]).all()
    want = C.frame_similarity(x[torch.tensor(left)[inside]], x[torch.tensor(right)[inside]])
    torch.testing.assert_close(got[inside], want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The greedy merge: reference semantics.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_reference_matches_brute_force(seed):
    rnd = random.Random(seed)
    events = [[rnd.randint(1, 7) for _ in range(rnd.randint(1, 4))] for _ in range(3)]
    rho, target = rnd.choice([0.25, 0.5, 0.7]), rnd.choice([1, 2, 3])
    window = rnd.choice([None, 3, 5])
    x = clip(events, 3, 10, torch.float64, seed=seed)
    got, counts = C.compress(x, events, rho, target, window, backend=TORCH)
    want, want_counts = naive_compress(x, events, rho, target, window)
    assert counts == want_counts
    torch.testing.assert_close(got, want)


def test_output_is_target_frames_per_question():
    P, D = 5, 12
    events = [[6, 4, 7], [1, 1, 1, 1], [3], [20], [2]]
    x = clip(events, P, D)
    for target in (1, 2, 3):
        out, counts = C.compress(x, events, rho=0.5, target_frames=target, backend=TORCH)
        for lengths, count in zip(events, counts):
            assert count == min(sum(lengths), target)
        assert out.shape == (sum(counts), P, D)
        assert out.reshape(-1, D).shape[0] == sum(counts) * P  # N_target * P tokens per question
    # a question that already fits the budget passes through unchanged
    out, counts = C.compress(x, events, rho=0.5, target_frames=4, backend=TORCH)
    assert counts[1] == 4 and torch.equal(out[counts[0] : counts[0] + 4], x[17:21])


@pytest.mark.parametrize("rho", [0.1, 0.25, 1 / 3, 0.5, 0.7, 1.0])
def test_stage1_keeps_ceil_rho_n_per_event(rho):
    rnd = random.Random(int(rho * 100))
    events = [[rnd.randint(1, 13) for _ in range(rnd.randint(1, 5))] for _ in range(4)]
    x = clip(events, 4, 16)
    plan = C.plan_compression(x, events, rho, backend=TORCH, stop_after_stage1=True)
    start = 0
    for lengths in events:
        for n in lengths:
            assert len(groups_of(plan, start, start + n)) == math.ceil(rho * n - 1e-9)
            start += n
    assert plan.out_frames == [sum(math.ceil(rho * n - 1e-9) for n in q) for q in events]


def test_stage1_keep_rounding():
    assert C.stage1_keep(10, 0.7) == 7  # 0.7 * 10 = 7.000000000000001 in floating point
    assert C.stage1_keep(3, 0.1) == 1
    assert C.stage1_keep(7, 1.0) == 7
    assert C.stage1_keep(64, 0.0471) == 4


@pytest.mark.parametrize("backend", [TORCH, TRITON])
def test_stage1_never_merges_across_an_event_boundary(backend):
    """a1 and b0 are (nearly) the same frame: the most similar adjacent pair straddles the boundary.
    Stage 1 must merge (a0, a1) and (b0, b1) instead; stage 2 may then join the two events."""
    g = torch.Generator().manual_seed(3)
    a0, a1, b1 = torch.randn(3, 4, 16, generator=g)
    b0 = a1 + 1e-3 * torch.randn(4, 16, generator=g)
    x = torch.stack([a0, a1, b0, b1])
    assert C.adjacent_similarity(x, TORCH).argmax() == 1
    for kwargs in (dict(stop_after_stage1=True), dict(target_frames=2)):
        plan = C.plan_compression(x, [[2, 2]], 0.5, backend=backend, **kwargs)
        assert plan.out_index.tolist() == [0, 0, 1, 1]
    # without the boundary the same frames merge (a1, b0) first
    plan = C.plan_compression(x, [[4]], 0.75, backend=backend)
    assert plan.out_index.tolist() == [0, 0, 0, 0] and plan.depth.tolist()[1:3] == [3, 3]
    plan = C.plan_compression(x, [[4]], 0.75, backend=backend, stop_after_stage1=True)
    assert plan.out_index.tolist() == [0, 1, 1, 2]


@pytest.mark.parametrize("backend", [TORCH, TRITON])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identical_frames_merge_exactly(backend, dtype):
    frame = torch.randn(3, 20).to(dtype)
    x = frame.expand(24, 3, 20).clone()
    out, counts = C.compress(x, [[5, 11, 8]], rho=0.3, target_frames=1, backend=backend)
    assert counts == [1] and torch.equal(out[0], frame)
    out, counts = C.compress(x, [[5, 11, 8]], rho=0.3, target_frames=1, backend=backend, stop_after_stage1=True)
    assert counts == [2 + 4 + 3] and torch.equal(out, frame.expand(9, 3, 20))


@pytest.mark.parametrize("backend", [TORCH, TRITON])
def test_ties_go_to_the_lowest_index(backend):
    x = torch.ones(5, 2, 3)  # every similarity is 1
    plan = C.plan_compression(x, [[5]], 0.4, backend=backend, stop_after_stage1=True)
    # (0,1) first, then the merged frame with 2 (still index 0), then stop at 2 frames
    assert plan.out_index.tolist() == [0, 0, 0, 0, 1]
    assert plan.depth.tolist() == [3, 3, 2, 1, 0]
    assert plan.weight[:4].sum() == 1.0


def test_window_limits_the_span_of_a_merge():
    events = [[9, 6], [7]]
    x = clip(events, 3, 16, seed=5)
    no_window = C.plan_compression(x, events, 0.2, backend=TORCH, stop_after_stage1=True)
    wide = C.plan_compression(x, events, 0.2, window=9, backend=TORCH, stop_after_stage1=True)
    assert torch.equal(no_window.out_index, wide.out_index) and torch.equal(no_window.depth, wide.depth)
    for m in (1, 2, 3, 4):
        plan = C.plan_compression(x, events, 0.2, window=m, backend=TORCH, stop_after_stage1=True)
        spans = torch.bincount(plan.out_index)
        assert spans.max() <= m  # every stage-1 frame merges at most m consecutive original frames
        if m == 1:
            assert plan.out_frames == [15, 7]  # nothing may merge
        if m == 2:  # pairs at most: an event stops, above ceil(0.2 n), once no two singles touch
            assert plan.out_frames[0] >= 5 + 3 and plan.out_frames[1] >= 4
            for lo, hi in _event_ranges(events):
                sizes = torch.bincount(plan.out_index[lo:hi] - plan.out_index[lo]).tolist()
                assert all(a == 2 or b == 2 for a, b in zip(sizes, sizes[1:]))
    # stage 2 ignores the window: the budget is still met
    _, counts = C.compress(x, events, 0.2, target_frames=1, window=2, backend=TORCH)
    assert counts == [1, 1]


def test_incremental_cost_is_linear():
    """An event of n frames costs (n - 1) + 2 * (merges) similarity evaluations, not O(n^2)."""
    for n in (8, 32, 128, 512):
        x = clip([[n]], 2, 8, seed=n)
        plan = C.plan_compression(x, [[n]], 1 / n, backend=TORCH, stop_after_stage1=True)
        assert plan.out_frames == [1]
        assert plan.similarity_evaluations <= (n - 1) + 2 * (n - 1) <= 3 * n
    # two stages: stage 1 per event, then the survivors once more
    events = [[40, 30, 30]]
    plan = C.plan_compression(clip(events, 2, 8), events, 0.5, backend=TORCH)
    assert plan.similarity_evaluations <= 3 * 100 + 3 * 50
    triton_plan = C.plan_compression(clip([[16]], 2, 8), [[16]], 1 / 16, backend=TRITON, stop_after_stage1=True)
    assert triton_plan.similarity_evaluations <= 3 * 16


# --------------------------------------------------------------------------------------------
# Gradients.
# --------------------------------------------------------------------------------------------


def test_gradcheck_float64():
    events = [[3, 2], [4]]
    x = clip(events, 2, 3, torch.float64, seed=11).requires_grad_(True)
    for kwargs in (dict(target_frames=1), dict(target_frames=2, window=2), dict(stop_after_stage1=True)):
        assert torch.autograd.gradcheck(lambda f: C.compress(f, events, 0.5, backend=TORCH, **kwargs)[0], (x,))


@pytest.mark.parametrize("backend", [TORCH, TRITON])
def test_gradient_reaches_every_input_frame(backend):
    events = [[4, 3], [5, 1, 2]]
    x = clip(events, 3, 8, seed=2).requires_grad_(True)
    out, counts = C.compress(x, events, 0.5, target_frames=1, backend=backend)
    out.sum().backward()
    per_frame = x.grad.abs().sum(dim=(1, 2))
    assert (per_frame > 0).all()
    plan = C.plan_compression(x, events, 0.5, backend=backend)  # d out / d frame t = 2 ** -depth[t]
    torch.testing.assert_close(x.grad, plan.weight.float()[:, None, None].expand_as(x))


# --------------------------------------------------------------------------------------------
# The Triton path against the reference.
# --------------------------------------------------------------------------------------------

CASES = [
    # events per question, P, D, dtype, rho, target, window
    ([[3, 5, 2], [4]], 1, 8, torch.float32, 0.5, 1, None),
    ([[7], [2, 2, 2, 3]], 3, 100, torch.float32, 0.34, 2, None),
    ([[6, 1, 5]], 7, 8, torch.bfloat16, 0.5, 1, 3),
    ([[4, 4], [1], [9]], 3, 100, torch.bfloat16, 0.25, 1, None),
    ([[10, 6, 8]], 7, 100, torch.float32, 0.2, 3, 4),
    ([[4], [8, 1, 5]], 1, 8, torch.bfloat16, 0.2, 1, 5),  # merged frames must round like torch
    ([[3, 2]], 64, 2048, torch.float32, 0.5, 1, None),
    ([[2, 3]], 64, 2048, torch.bfloat16, 0.5, 1, 2),
]


@pytest.mark.parametrize("events, P, D, dtype, rho, target, window", CASES)
def test_triton_compress_matches_torch(events, P, D, dtype, rho, target, window):
    x = clip(events, P, D, dtype, seed=P + D + len(events) + 1000 * len(sum(events, [])))
    out_triton, counts = C.compress(x, events, rho, target, window, backend=TRITON)
    out_torch, torch_counts = C.compress(x, events, rho, target, window, backend=TORCH)
    assert counts == torch_counts and out_torch.shape == (sum(counts), P, D)
    assert torch.equal(out_triton, out_torch)  # same merge choices -> the very same output
    if P * D <= 1000:  # the plans themselves, after stage 1 and after stage 2
        for stop in (True, False):
            want = C.plan_compression(x, events, rho, target, window, TORCH, stop_after_stage1=stop)
            got = C.plan_compression(x, events, rho, target, window, TRITON, stop_after_stage1=stop)
            assert got.out_frames == want.out_frames
            assert torch.equal(got.out_index, want.out_index) and torch.equal(got.depth, want.depth)
            assert got.similarity_evaluations <= want.similarity_evaluations


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_kernel_rounds_the_mean_like_torch(dtype):
    """(Ha + Hb) / 2 in fp32, rounded to the buffer dtype to nearest even, bit for bit as torch.
    Half of the pairs are one ulp apart, so their mean is an exact tie."""
    a = torch.randn(1, 5, 64).to(dtype)
    b = torch.randn(1, 5, 64).to(dtype)
    b[:, :, :32] = (a[:, :, :32].view(torch.int16) + 1).view(dtype)[:, :, :32]
    x = torch.cat([a, b])
    _, _, _, state = CT.plan_merges(x, [[2]], [[1]], 1, None, True, return_state=True)
    assert torch.equal(state.work[0], ((a[0].float() + b[0].float()) / 2).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_kernel_updates_frames_and_neighbour_similarities(dtype):
    """After stage 1 the kernels' working frames are the merged means, and every stored
    similarity (computed incrementally by the merge kernel) equals a fresh evaluation."""
    events = [[6, 4, 5], [7]]
    x = clip(events, 7, 100, dtype, seed=9)
    keep = [[C.stage1_keep(n, 0.4) for n in q] for q in events]
    alive, depth, _, state = CT.plan_merges(x, events, keep, 1, None, True, block_p=2, block_d=32, return_state=True)
    plan = C.plan_compression(x, events, 0.4, backend=TORCH, stop_after_stage1=True)
    survivors = alive.nonzero().squeeze(1)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(state.work[survivors].float(), C.apply_plan(x, plan).float(), **tol)
    event_of = torch.repeat_interleave(torch.arange(sum(len(q) for q in events)), torch.tensor(sum(events, [])))
    checked = 0
    for s in survivors.tolist():
        nxt = int(state.next[s])
        if nxt >= 0 and event_of[nxt] == event_of[s]:  # a stage-1 candidate pair
            want = C.frame_similarity(state.work[s], state.work[nxt]).float()
            torch.testing.assert_close(state.sims[s], want, rtol=1e-5, atol=1e-5)
            checked += 1
        else:  # last survivor of its event: never a stage-1 candidate
            assert torch.isneginf(state.sims[s])
    assert checked >= 3




# --------------------------------------------------------------------------------------------
# The interpreter does not compile kernels: compile them for a real GPU target (no GPU needed).
# --------------------------------------------------------------------------------------------

_AOT_SCRIPT = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from stages.model import compression_triton as CT

target = GPUTarget("cuda", 90, 32)  # H100
data = {"P": "i32", "D": "i32", "stride_t": "i32", "stride_p": "i32", "n_pblocks": "i32", "eps": "fp32",
        "BLOCK_P": "constexpr", "BLOCK_D": "constexpr"}
blocks = {"BLOCK_P": 8, "BLOCK_D": 128}
for h in ("*fp32", "*bf16"):
    sig = {"h_ptr": h, "left_ptr": "*i32", "right_ptr": "*i32", "partial_ptr": "*fp32", **data}
    compile(ASTSource(CT._pair_similarity_kernel, sig, blocks), target=target)
    sig = {"h_ptr": h, "chosen_ptr": "*i32", "partial_ptr": "*fp32", **data}
    compile(ASTSource(CT._merge_kernel, sig, blocks), target=target)
ints = ["next_ptr", "prev_ptr", "span_end_ptr", "seg_lo_ptr", "seg_hi_ptr", "remaining_ptr", "pending_ptr",
        "chosen_ptr", "log_ptr"]
sig = {"sims_ptr": "*fp32", **{k: "*i32" for k in ints}, "partial_ptr": "*fp32", "P": "i32",
       "n_pblocks": "i32", "window": "i32", "SELECT": "constexpr", "BLOCK_S": "constexpr", "BLOCK_NPB": "constexpr"}
for select in (True, False):
    k = compile(ASTSource(CT._select_kernel, sig, {"SELECT": select, "BLOCK_S": 64, "BLOCK_NPB": 16}),
                target=target, options={"num_warps": 1})
    assert "cubin" in k.asm
print("compiled")
"""


def test_kernels_compile_for_a_gpu_target(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
