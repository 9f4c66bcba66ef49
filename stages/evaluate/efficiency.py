"""What an arm costs per question: peak forward memory and latency split into its parts.

Measured at batch size 1 on a few questions, every arm on the same questions, one after another in
one process (never two arms at once: on a small machine they would slow each other down):

    end_to_end   decode the frames from the video file (no cache) + patchify + prompt + generation
    vision       vision tower on the arm's frames (+ compression where the arm compresses)
    prefill      LM forward over the prompt with the visual features, building the KV cache
    generation   vision + prefill + decoding a fixed number of new tokens (the same for every arm, so
                 an arm that answers briefly does not look faster than it is)
    peak_forward_bytes  activation memory of one inference forward (vision, compression, prefill)
                 above what existed before it. CUDA: torch.cuda.max_memory_allocated. CPU: the
                 profiler's record of every allocation and free (intra-op temporaries included).

Each latency is the minimum of `repeats` runs (the least-disturbed estimate, as `timeit` advises).
"""

from __future__ import annotations

import statistics
import time

import torch

from stages.evaluate.arms import Arm, TestItem, build_inputs
from stages.model import runner
from stages.model.inputs import ModelInputs
from stages.model.qwen import ModelBundle

LATENCY_PARTS = ("vision", "prefill", "generation", "end_to_end")


def peak_allocated_cpu(fn) -> tuple[int, object]:
    """(peak bytes allocated above the start while fn runs, fn's result), from profiler events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()

    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)

    allocs = sorted((n for n in walk(prof.profiler.kineto_results.experimental_event_tree())
                     if n.tag == _EventType.Allocation), key=lambda n: n.start_time_ns)
    running = peak = 0
    for n in allocs:  # alloc_size < 0 for a free
        running += n.extra_fields.alloc_size
        peak = max(peak, running)
    return peak, result


def peak_allocated(fn, device: torch.device) -> tuple[int, object]:
    if device.type != "cuda":
        return peak_allocated_cpu(fn)
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start, result


def prefill(bundle: ModelBundle, inputs: ModelInputs, embeds: list[torch.Tensor]):
    return bundle.model(
        input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
        mm_token_type_ids=inputs.mm_token_type_ids, video_grid_thw=inputs.llm_grid_thw,
        second_per_grid_ts=inputs.second_per_grid_ts,
        mm_encoder_outputs=runner._encoder_outputs(embeds), use_cache=True, logits_to_keep=1,
    )


def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t, out


@torch.no_grad()
def profile_arm(arm: Arm, bundle: ModelBundle, items: list[TestItem], new_tokens: int, repeats: int = 3) -> dict:
    """Mean over `items` of each latency part (best of `repeats`) and of the peak forward memory."""
    device = bundle.device
    rows: dict[str, list[float]] = {}
    for item in items:
        def build() -> ModelInputs:
            return build_inputs(arm, bundle, [item], cache_dir=None).to(device)

        inputs = build()
        runner.generate(bundle, inputs, new_tokens, min_new_tokens=new_tokens)  # one-off costs (allocator, oneDNN)
        best: dict[str, float] = {}
        for _ in range(repeats):
            t_in, inputs = _timed(build, device)
            t_vis, embeds = _timed(lambda: runner.visual_embeds(bundle, inputs), device)
            t_gen, _ = _timed(lambda: runner.generate(bundle, inputs, new_tokens, min_new_tokens=new_tokens,
                                                      embeds=embeds), device)
            t_pre, _ = _timed(lambda: prefill(bundle, inputs, embeds), device)
            run = {"vision": t_vis, "prefill": t_pre, "generation": t_vis + t_gen, "end_to_end": t_in + t_vis + t_gen}
            best = {k: min(v, best.get(k, v)) for k, v in run.items()}
        peak, _ = peak_allocated(lambda: prefill(bundle, inputs, runner.visual_embeds(bundle, inputs)), device)
        for k, v in {**best, "peak_forward_bytes": float(peak)}.items():
            rows.setdefault(k, []).append(v)
    return {k: statistics.mean(v) for k, v in rows.items()}


def profile_arms(arms: list[Arm], bundles: dict[str, ModelBundle], items: list[TestItem], new_tokens: int,
                 repeats: int = 3) -> dict[str, dict]:
    """arm name -> profile, all arms on the same items, in turn."""
    return {arm.name: profile_arm(arm, bundles[arm.weights], items, new_tokens, repeats) for arm in arms}


