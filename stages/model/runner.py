"""Running the model on teacher and student inputs: visual features, training forward, generate.

The student's hot path, top to bottom (`visual_embeds` then the model):

    patches [sum T*gh*gw, 1176] --vision tower--> features [sum T*P, D]      (P tokens per group)
        -> view [sum T, P, D]: one row per temporal group, all questions concatenated
        -> compress(rows, event_groups, rho, N_target) -> [sum N_target, P, D]   (differentiable)
        -> mm_encoder_outputs={"video": pooler_output=(per question [N_target*P, D], ...)}
        -> Qwen2.5-VL LM with N_target*P placeholders, M-RoPE grid [N_target, gh, gw]

The teacher goes the stock way: `pixel_values_videos` straight into the model's forward (the
vision tower runs inside). With `compression="identity"` the student skips merging and hands all
groups in through `mm_encoder_outputs`: same numbers as the teacher (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast

from stages.model.compression import compress
from stages.model.inputs import TEXT, ModelInputs
from stages.model.qwen import ModelBundle


# --------------------------------------------------------------------------------------------
# Visual features.
# --------------------------------------------------------------------------------------------


def vision_tower(bundle: ModelBundle, inputs: ModelInputs) -> list[torch.Tensor]:
    """Patches -> per question [T_b*P_b, D] merged vision features (stock get_video_features)."""
    out = bundle.model.model.get_video_features(
        inputs.pixel_values_videos, inputs.video_grid_thw, return_dict=True
    )
    return list(out.pooler_output)


def compress_features(bundle: ModelBundle, inputs: ModelInputs, features: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per question [T_b*P, D] -> [N_b*P, D] through the compression layer (one batched call when
    every question has the same P; identity/none pass through)."""
    if inputs.compression in ("none", "identity"):
        return features
    cfg = bundle.config
    P = inputs.tokens_per_group
    batches = [list(range(len(features)))] if len(set(P)) == 1 else [[b] for b in range(len(features))]
    out: list[torch.Tensor | None] = [None] * len(features)
    for idx in batches:
        p = P[idx[0]]
        rows = torch.cat([features[b] for b in idx]).view(-1, p, features[idx[0]].shape[-1])  # [sum T, P, D]
        merged, kept = compress(rows, [inputs.event_groups[b] for b in idx], cfg.compression_ratio,
                                cfg.target_frames, cfg.merge_window, cfg.compression_backend)
        expected = [int(inputs.llm_grid_thw[b, 0]) for b in idx]
        if kept != expected:
            raise RuntimeError(f"compression kept {kept} groups but the prompts hold {expected}; "
                               "a merge window stopped stage 1 early - use merge_window=None")
        for b, chunk in zip(idx, merged.split(kept)):  # [N_b, P, D] each
            out[b] = chunk.reshape(-1, chunk.shape[-1])  # [N_b*P, D]
    return out


def visual_embeds(bundle: ModelBundle, inputs: ModelInputs) -> list[torch.Tensor]:
    """What fills the placeholders: per question [llm_groups_b * P, D]."""
    return compress_features(bundle, inputs, vision_tower(bundle, inputs))


def _encoder_outputs(embeds: list[torch.Tensor]) -> dict:
    return {"video": BaseModelOutputWithPooling(pooler_output=tuple(embeds))}


# --------------------------------------------------------------------------------------------
# Training forward.
# --------------------------------------------------------------------------------------------


def _append_completions(inputs: ModelInputs, completions: list[list[int]], pad_id: int):
    """[pad.. prompt] + [completion ..pad]: ids/mask/types [B, L + Lc] and Lc."""
    B = inputs.batch_size
    Lc = max((len(c) for c in completions), default=0)
    comp = torch.full((B, Lc), pad_id, dtype=torch.long)
    comp_mask = torch.zeros((B, Lc), dtype=torch.long)
    for b, c in enumerate(completions):
        comp[b, :len(c)] = torch.tensor(c, dtype=torch.long)
        comp_mask[b, :len(c)] = 1
    dev = inputs.input_ids.device
    ids = torch.cat([inputs.input_ids, comp.to(dev)], 1)
    mask = torch.cat([inputs.attention_mask, comp_mask.to(dev)], 1)
    types = torch.cat([inputs.mm_token_type_ids, torch.full((B, Lc), TEXT, dtype=torch.int32, device=dev)], 1)
    return ids, mask, types, Lc


def forward(bundle: ModelBundle, inputs: ModelInputs, completions: list[list[int]] | None = None,
            logits_to_keep: int = 0, use_cache: bool = False) -> CausalLMOutputWithPast:
    """One forward pass over prompts (+ completions, teacher forcing). Differentiable through the LM,
    the vision tower and (student) the compression. logits_to_keep: last positions to project."""
    if completions is not None:
        ids, mask, types, _ = _append_completions(inputs, completions, bundle.pad_token_id)
    else:
        ids, mask, types = inputs.input_ids, inputs.attention_mask, inputs.mm_token_type_ids
    common = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=types,
                  second_per_grid_ts=inputs.second_per_grid_ts, logits_to_keep=logits_to_keep,
                  use_cache=use_cache)
    if inputs.kind == "teacher":  # stock path: the model runs its vision tower on the pixels
        return bundle.model(pixel_values_videos=inputs.pixel_values_videos,
                            video_grid_thw=inputs.video_grid_thw, **common)
    return bundle.model(mm_encoder_outputs=_encoder_outputs(visual_embeds(bundle, inputs)),
                        video_grid_thw=inputs.llm_grid_thw, **common)


def completion_logprobs(bundle: ModelBundle, inputs: ModelInputs, completions: list[list[int]]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(completion token | prompt, earlier tokens): (logp [B, Lc], mask [B, Lc]).

    Prompts are left-padded to L and completions right-padded to Lc, so completion token j of
    every row sits at column L + j and is predicted by the logits at column L + j - 1: the last
    Lc + 1 positions are the only ones projected onto the vocabulary.
    """
    Lc = max(len(c) for c in completions)
    out = forward(bundle, inputs, completions, logits_to_keep=Lc + 1)
    logits = out.logits[:, :-1].float()  # [B, Lc, V]: predictions of completion tokens 0..Lc-1
    targets = torch.full((inputs.batch_size, Lc), bundle.pad_token_id, dtype=torch.long, device=logits.device)
    mask = torch.zeros((inputs.batch_size, Lc), dtype=torch.bool, device=logits.device)
    for b, c in enumerate(completions):
        targets[b, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[b, :len(c)] = True
    logp = torch.gather(F.log_softmax(logits, -1), 2, targets[..., None])[..., 0]  # [B, Lc]
    return logp.masked_fill(~mask, 0.0), mask


# --------------------------------------------------------------------------------------------
# Generation.
# --------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """Completions of a batch, `num_samples` consecutive rows per question."""

    texts: list[str]  # [B*G] decoded, special tokens dropped (<think>/<answer> kept)
    token_ids: list[list[int]]  # [B*G] completion tokens up to and including <|im_end|>
    num_tokens: list[int]  # [B*G] len(token_ids[i])


def _repeat(t: torch.Tensor, k: int) -> torch.Tensor:
    return t.repeat_interleave(k, dim=0) if k > 1 else t


@torch.no_grad()
def generate(bundle: ModelBundle, inputs: ModelInputs, max_new_tokens: int, temperature: float = 0.0,
             num_samples: int = 1, min_new_tokens: int | None = None,
             embeds: list[torch.Tensor] | None = None) -> Generation:
    """Greedy (temperature 0) or sampled completions for both arms.

    Visual features are computed once per question (vision tower, then compression for the
    student; or taken from `embeds`) and shared by its `num_samples` samples (the GRPO group).
    """
    embeds = visual_embeds(bundle, inputs) if embeds is None else embeds
    embeds = [e for e in embeds for _ in range(num_samples)]
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 \
        else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    ids = _repeat(inputs.input_ids, num_samples)
    out = bundle.model.generate(
        input_ids=ids,
        attention_mask=_repeat(inputs.attention_mask, num_samples),
        mm_token_type_ids=_repeat(inputs.mm_token_type_ids, num_samples),
        video_grid_thw=_repeat(inputs.llm_grid_thw, num_samples),
        second_per_grid_ts=_repeat(inputs.second_per_grid_ts, num_samples),
        mm_encoder_outputs=_encoder_outputs(embeds),
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        eos_token_id=bundle.eos_token_id,
        pad_token_id=bundle.pad_token_id,
        **sampling,
    )
    new = out[:, ids.shape[1]:].tolist()  # [B*G, <= max_new_tokens]
    token_ids = []
    for row in new:
        end = row.index(bundle.eos_token_id) + 1 if bundle.eos_token_id in row else len(row)
        token_ids.append(row[:end])
    texts = bundle.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    return Generation(texts, token_ids, [len(t) for t in token_ids])
