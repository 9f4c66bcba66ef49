"""Time the temporal compression layer: incremental greedy merge vs a naive recompute-all baseline.

    .venv/bin/python bench/bench_compression.py [--repeat 5]

Sizes: the CPU default (64 frames, P=16, D=128, 3 events) and the GPU preset (64 frames =
32 temporal groups, P=128, D=2048, 3 events). Both run on CPU with the torch backend; with CUDA
they also run on the GPU (triton and torch backends, bf16). The naive baseline decides the same
merges but recomputes every adjacent similarity of the segment after each merge (O(n^2)
evaluations); it is checked to give the same output, then timed in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stages.model import compression as C

SIZES = {
    # name: (event lengths of one question, P, D)
    "cpu-default": ([22, 21, 21], 16, 128),
    "gpu-preset": ([11, 11, 10], 128, 2048),
}
RHO, TARGET = 0.5, 1


def clip(lengths, P, D, device, dtype, seed=0):
    """A random walk inside each event, a fresh start per event (similar neighbours)."""
    g = torch.Generator().manual_seed(seed)
    frames = []
    for n in lengths:
        h = torch.randn(P, D, generator=g)
        for _ in range(n):
            frames.append(h)
            h = h + (0.2 + 2.0 * torch.rand((), generator=g)) * torch.randn(P, D, generator=g)
    return torch.stack(frames).to(device=device, dtype=dtype)


def naive_plan(frames, event_lengths, rho, target):
    """The same greedy merges, recomputing every adjacent similarity after each merge."""
    work = frames.detach().clone()
    depth = torch.zeros(frames.shape[0], dtype=torch.int64, device=frames.device)
    alive = torch.zeros(frames.shape[0], dtype=torch.bool, device=frames.device)
    evaluations = 0

    def merge(groups, keep):  # groups: [first, last] runs; work[first] holds the current frame
        nonlocal evaluations
        while len(groups) > keep:
            current = work[[first for first, _ in groups]]
            sims = C.frame_similarity(current[:-1], current[1:])  # all of them, every step
            evaluations += len(groups) - 1
            i = int(sims.argmax())  # first maximum, as the reference
            (a, _), (b, last) = groups[i], groups[i + 1]
            work[a] = ((work[a].float() + work[b].float()) / 2).to(work.dtype)
            depth[a : last + 1] += 1
            groups[i : i + 2] = [(a, last)]
        return groups

    start = 0
    for lengths in event_lengths:
        n_q = sum(lengths)
        groups = [(t, t) for t in range(start, start + n_q)]
        if n_q > target:
            survivors, pos = [], 0
            for n in lengths:
                survivors += merge(groups[pos : pos + n], C.stage1_keep(n, rho))
                pos += n
            groups = merge(survivors, target)
        for first, _ in groups:
            alive[first] = True
        start += n_q
    return C._plan_from_survivors(alive, depth, [sum(q) for q in event_lengths], evaluations)


def timed(fn, device, repeat):
    fn()  # warm-up (Triton JIT compile, allocator)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(name, device, dtype, backend, repeat):
    lengths, P, D = SIZES[name]
    events = [lengths]
    x = clip(lengths, P, D, device, dtype)
    out, _ = C.compress(x, events, RHO, TARGET, backend=backend)
    plan = C.plan_compression(x, events, RHO, TARGET, backend=backend)
    naive = naive_plan(x, events, RHO, TARGET)
    assert torch.equal(C.apply_plan(x, naive), out), "naive baseline disagrees"
    t_inc = timed(lambda: C.compress(x, events, RHO, TARGET, backend=backend), device, repeat)
    t_naive = timed(lambda: C.apply_plan(x, naive_plan(x, events, RHO, TARGET)), device, repeat)
    print(
        f"{name:12s} T={sum(lengths):3d} P={P:4d} D={D:5d} {str(dtype)[6:]:8s} {device.type:4s} {backend:6s} "
        f"| compress {t_inc * 1e3:8.2f} ms ({plan.similarity_evaluations:4d} sims) "
        f"| naive {t_naive * 1e3:8.2f} ms ({naive.similarity_evaluations:4d} sims) "
        f"| naive/compress {t_naive / t_inc:5.2f}x"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, rho={RHO}, N_target={TARGET}")
    cpu = torch.device("cpu")
    for name in SIZES:
        bench(name, cpu, torch.float32, "torch", args.repeat)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        print(f"GPU: {torch.cuda.get_device_name()}")
        for name in SIZES:
            for backend in ("triton", "torch"):
                bench(name, gpu, torch.bfloat16, backend, args.repeat)


if __name__ == "__main__":
    main()
