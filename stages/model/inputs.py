"""Teacher and student inputs: frames -> patches, prompts with video placeholders, batching.

Teacher (the 64-frame arm, DESIGN.md section 1):
    `config.teacher_frames` (64) frames at the centres of equal slices of the whole video; a video
    with fewer frames than that gives all of them; always an even count (Qwen pairs frames into
    temporal groups); uncompressed: T = N/2 temporal groups of P tokens each, all in the prompt.

Student (the compressed arm):
    the question's episodic memory - frame timestamps plus frames per event, as the retrieve stage
    (#4) produces; until it exists `ground_truth_memory` builds one from ground-truth events
    (the answer event and its neighbours, 1 fps) - through the vision tower, the compression layer
    (stage 1 per event, stage 2 across events, N_target groups left), then N_target * P placeholder
    tokens with M-RoPE positions built for a video of N_target temporal groups
    (`llm_grid_thw = [N_target, gh, gw]`). The compressed features enter the model through
    `mm_encoder_outputs` (see runner.py); nothing in transformers is patched.

Event boundaries, frames -> temporal groups (the rule):
    Qwen2.5-VL's vision tower fuses frames 2g and 2g+1 into temporal group g, and the compression
    layer works on temporal groups. So that no group ever straddles two events, every event with an
    odd number of frames gets its last frame repeated once (the same padding Qwen's video processor
    applies at the end of a clip). An event of n frames is then exactly ceil(n / 2) temporal groups,
    and the events' group counts are what `compress` receives. Cost: at most one extra frame per
    event (top_k = 3 -> at most 3 frames); no frame of one event is ever averaged with another's
    before stage 2.

Patchify: `patchify` equals transformers' Qwen2VLImageProcessor(Pil) arithmetic bit for bit
(uint8 -> float64 * 1/255 -> float32, then (x - mean) / std in float32, then the video processor's
patch layout), without torchvision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from stages.common.frames import decode_frames, fps_timestamps, uniform_timestamps
from stages.model.compression import stage1_keep
from stages.model.qwen import FrameGeometry, ModelBundle
from stages.model.tokenizer import chat_messages

TEXT, VIDEO = 0, 2  # mm_token_type_ids values: text token, video placeholder


# --------------------------------------------------------------------------------------------
# Frames -> patches.
# --------------------------------------------------------------------------------------------


def patchify(frames: np.ndarray, geometry: FrameGeometry) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 frames [N, H, W, 3] -> (pixel_values [T*gh*gw, 3*2*14*14] float32, grid (T, gh, gw)).

    N odd: the last frame is repeated (as Qwen's video processor). Row order: temporal group,
    then 2x2 merge blocks in raster order, then the 4 patches of a block; column order:
    channel, frame of the pair, patch row, patch column.
    """
    assert frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8, frames.shape
    tp, p, m = geometry.temporal_patch_size, geometry.patch_size, geometry.merge_size
    if len(frames) % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], tp - len(frames) % tp, axis=0)])
    n, h, w, c = frames.shape
    gh, gw = h // p, w // p
    assert gh * p == h and gw * p == w and gh % m == 0 and gw % m == 0, f"frame {h}x{w} not a multiple of {p * m}"
    x = (frames.astype(np.float64) * (1 / 255)).astype(np.float32)  # HF rescale: float64 then down-cast
    x = (x - np.asarray(geometry.image_mean, np.float32)) / np.asarray(geometry.image_std, np.float32)
    x = x.transpose(0, 3, 1, 2)  # [N, C, H, W]
    x = x.reshape(n // tp, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [T, gh/m, gw/m, m, m, C, tp, p, p]
    x = x.reshape((n // tp) * gh * gw, c * tp * p * p)
    return torch.from_numpy(np.ascontiguousarray(x)), (n // tp, gh, gw)


# --------------------------------------------------------------------------------------------
# Which frames: teacher sampling, memories, the event -> temporal group rule.
# --------------------------------------------------------------------------------------------


def teacher_timestamps(duration: float, video_fps: float, max_frames: int) -> list[float]:
    """min(max_frames, frames in the video) frames, rounded down to even (>= 2), at the centres of
    equal slices of [0, duration)."""
    available = int(duration * video_fps + 1e-6)
    n = max(2, min(max_frames, available) // 2 * 2)
    return uniform_timestamps(0.0, duration, n)


@dataclass(frozen=True)
class Memory:
    """A question's episodic memory (what retrieve produces): frames in time order, grouped by event."""

    timestamps: list[float]  # [N] seconds on the video's clock, chronological
    event_frames: list[int]  # [E] frames of each retrieved event, in order; sum == N

    def __post_init__(self):
        if not self.event_frames or any(n < 1 for n in self.event_frames):
            raise ValueError(f"memory needs >= 1 event of >= 1 frame, got {self.event_frames}")
        if sum(self.event_frames) != len(self.timestamps):
            raise ValueError(f"event_frames sum to {sum(self.event_frames)}, timestamps has {len(self.timestamps)}")


def ground_truth_memory(events: list[dict], answer_event: int, top_k: int = 3, fps: float = 1.0,
                        max_frames: int = 64) -> Memory:
    """Stand-in for retrieval (#4) from ground-truth events: the answer event and its neighbours
    (previous first, then next) up to top_k events, in time order, sampled at `fps` (>= 1 frame per
    event); more than max_frames frames are thinned proportionally per event."""
    chosen = {answer_event}
    for k in range(1, len(events)):
        for j in (answer_event - k, answer_event + k):
            if len(chosen) < top_k and 0 <= j < len(events):
                chosen.add(j)
    spans = [(float(events[j]["start_time"]), float(events[j]["end_time"])) for j in sorted(chosen)]
    counts = [len(fps_timestamps(a, b, fps)) for a, b in spans]
    if sum(counts) > max_frames:
        counts = [max(1, c * max_frames // sum(counts)) for c in counts]
    stamps = [uniform_timestamps(a, b - a, c) for (a, b), c in zip(spans, counts)]
    return Memory([t for s in stamps for t in s], counts)


def pad_events(frames: np.ndarray, event_frames: list[int], temporal_patch_size: int = 2
               ) -> tuple[np.ndarray, list[int]]:
    """Repeat the last frame of every event whose length is not a multiple of the temporal patch:
    [N, H, W, 3] -> ([N', H, W, 3], groups per event). Group g of the result never mixes events."""
    out, groups, start = [], [], 0
    for n in event_frames:
        event = frames[start:start + n]
        pad = -n % temporal_patch_size
        out.append(np.concatenate([event, np.repeat(event[-1:], pad, axis=0)]) if pad else event)
        groups.append((n + pad) // temporal_patch_size)
        start += n
    return np.concatenate(out), groups


def seconds_per_group(timestamps: list[float], temporal_patch_size: int = 2) -> float:
    """Seconds one temporal group spans (M-RoPE's temporal step): tp x the mean frame interval."""
    if len(timestamps) < 2:
        return float(temporal_patch_size)
    return temporal_patch_size * (timestamps[-1] - timestamps[0]) / (len(timestamps) - 1)


def compressed_groups(event_groups: list[int], rho: float, target_frames: int) -> int:
    """Temporal groups `compress` leaves for one question (see compression.py's rules): all of
    them if they fit the budget, else min(stage-1 survivors, N_target). With a merge window,
    stage 1 can stop above ceil(rho n); the runner checks the count it really got."""
    if sum(event_groups) <= target_frames:
        return sum(event_groups)
    return min(sum(stage1_keep(n, rho) for n in event_groups), target_frames)


# --------------------------------------------------------------------------------------------
# Decoding the frames of a question.
# --------------------------------------------------------------------------------------------


def _frame_size(bundle: ModelBundle, path: Path) -> tuple[int, int]:
    """(W, H) frames are decoded at: fixed for the tiny model, smart_resize of the source otherwise."""
    g = bundle.geometry
    if g.frame_size is not None:
        return g.frame_size, g.frame_size
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        h, w = g.frame_hw(stream.height, stream.width)
    return w, h


def load_frames(bundle: ModelBundle, path: str | Path, timestamps: list[float],
                cache_dir: Path | None = None, video_key: str | None = None) -> np.ndarray:
    """uint8 [N, H, W, 3] frames of `path` at `timestamps`, at the model's frame size."""
    return decode_frames(Path(path), timestamps, _frame_size(bundle, Path(path)), cache_dir, video_key)


# --------------------------------------------------------------------------------------------
# Prompts and batches.
# --------------------------------------------------------------------------------------------


@dataclass
class ModelInputs:
    """A batch of B questions for one arm, left-padded, ready for runner.py.

    Vision tower side: `pixel_values_videos` / `video_grid_thw` (what the frames are).
    Language model side: `input_ids` with `llm_grid_thw[b].prod() / 4` video placeholders each, and
    M-RoPE positions built for `llm_grid_thw` (teacher: = video_grid_thw; student: N_target groups).
    """

    kind: str  # "teacher" | "student"
    compression: str  # "none" (teacher) | "memory" (stage 1 + 2) | "identity" (student, no merging)
    input_ids: torch.Tensor  # [B, L] int64, left-padded prompts
    attention_mask: torch.Tensor  # [B, L] int64, 1 = real token
    mm_token_type_ids: torch.Tensor  # [B, L] int32, 0 text / 2 video placeholder
    pixel_values_videos: torch.Tensor  # [sum_b T_b*gh*gw, 3*2*14*14] float32 patches
    video_grid_thw: torch.Tensor  # [B, 3] int64: (T_b, gh, gw) seen by the vision tower
    llm_grid_thw: torch.Tensor  # [B, 3] int64: (groups after compression, gh, gw) seen by the LM
    second_per_grid_ts: torch.Tensor  # [B] float32: seconds per temporal group
    event_groups: list[list[int]] = field(default_factory=list)  # [B][E_b] temporal groups per event

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def visual_tokens(self) -> list[int]:
        """LM placeholder tokens per question."""
        return (self.mm_token_type_ids == VIDEO).sum(-1).tolist()

    @property
    def tokens_per_group(self) -> list[int]:
        """P per question: LM tokens of one temporal group."""
        return (self.video_grid_thw[:, 1] * self.video_grid_thw[:, 2] // 4).tolist()

    def to(self, device: torch.device | str) -> "ModelInputs":
        moved = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return replace(self, **moved)


def prompt_ids(bundle: ModelBundle, question: dict, video_tokens: int) -> list[int]:
    """Chat-templated prompt of one question with its single <|video_pad|> expanded to `video_tokens`."""
    tokenizer = bundle.tokenizer
    messages = chat_messages(question["problem"], question.get("options"),
                             question.get("problem_type", "multiple choice"),
                             style=getattr(bundle.config, "prompt_style", "video-r1"))
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    k = ids.index(bundle.video_token_id)
    return ids[:k] + [bundle.video_token_id] * video_tokens + ids[k + 1:]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B][L_b] -> (ids [B, L], mask [B, L]) padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, width - len(r):] = 1
    return ids, mask


def _assemble(bundle: ModelBundle, kind: str, compression: str, questions: list[dict],
              clips: list[np.ndarray], event_groups: list[list[int]], llm_groups: list[int],
              timestamps: list[list[float]]) -> ModelInputs:
    if not (len(questions) == len(clips) == len(event_groups) == len(timestamps)):
        raise ValueError("questions, frames and timestamps must have one entry per question")
    pixels, grids, rows = [], [], []
    for question, clip, groups, n_llm in zip(questions, clips, event_groups, llm_groups):
        pv, (t, gh, gw) = patchify(clip, bundle.geometry)
        assert t == sum(groups), (t, groups)
        pixels.append(pv)
        grids.append((t, gh, gw))
        rows.append(prompt_ids(bundle, question, n_llm * gh * gw // bundle.geometry.merge_size**2))
    input_ids, attention_mask = left_pad(rows, bundle.pad_token_id)
    mm_types = ((input_ids == bundle.video_token_id) & attention_mask.bool()).to(torch.int32) * VIDEO
    video_grid = torch.tensor(grids, dtype=torch.long)
    llm_grid = video_grid.clone()
    llm_grid[:, 0] = torch.tensor(llm_groups, dtype=torch.long)
    tp = bundle.geometry.temporal_patch_size
    return ModelInputs(
        kind=kind,
        compression=compression,
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_token_type_ids=mm_types,
        pixel_values_videos=torch.cat(pixels),
        video_grid_thw=video_grid,
        llm_grid_thw=llm_grid,
        second_per_grid_ts=torch.tensor([seconds_per_group(ts, tp) for ts in timestamps], dtype=torch.float32),
        event_groups=event_groups,
    )


def build_teacher_inputs(bundle: ModelBundle, questions: list[dict], frames: list[np.ndarray],
                         timestamps: list[list[float]]) -> ModelInputs:
    """Uncompressed arm: every frame of each question's clip (uint8 [N_b, H, W, 3], N_b even)."""
    groups = [math.ceil(len(f) / bundle.geometry.temporal_patch_size) for f in frames]
    return _assemble(bundle, "teacher", "none", questions, list(frames), [[g] for g in groups], groups,
                     timestamps)


def build_student_inputs(bundle: ModelBundle, questions: list[dict], frames: list[np.ndarray],
                         memories: list[Memory], compression: str = "memory") -> ModelInputs:
    """Compressed arm: each question's memory frames (uint8 [N_b, H, W, 3], grouped by
    memories[b].event_frames). compression="memory": N_target groups reach the LM; "identity":
    every temporal group does (no merging; with the teacher's frames it reproduces the teacher)."""
    if compression not in ("memory", "identity"):
        raise ValueError(f"student compression must be 'memory' or 'identity', got {compression!r}")
    cfg = bundle.config
    clips, event_groups, llm_groups = [], [], []
    for clip, memory in zip(frames, memories):
        if len(clip) != len(memory.timestamps):
            raise ValueError(f"memory has {len(memory.timestamps)} timestamps but {len(clip)} frames were given")
        padded, groups = pad_events(clip, memory.event_frames, bundle.geometry.temporal_patch_size)
        clips.append(padded)
        event_groups.append(groups)
        llm_groups.append(sum(groups) if compression == "identity"
                          else compressed_groups(groups, cfg.compression_ratio, cfg.target_frames))
    return _assemble(bundle, "student", compression, questions, clips, event_groups, llm_groups,
                     [m.timestamps for m in memories])
