"""Training examples of the warm-up curriculum (teacher and SFT student).

Where the videos come from
    * the data set's training split (`events.jsonl` + `questions.jsonl` + the MP4 files, decoded
      through `stages/common/frames.py`), and
    * EventQA videos planned from fresh seeds (`WarmupConfig.synthetic_seed`, never the data set's
      or an evaluation's seed) and rendered in memory at the sampled timestamps only; the tiny
      teacher's warm-up stands in for a real model's pre-training, and 18 training videos
      (~80 events) are far too few for a random-init model to generalise from.
    In-memory frames are drawn with the generator's own geometry and area-resized to the model's
    frame size; H.264 and 4:2:0 chroma loss are not modelled (the bench compares accuracy on the
    decoded MP4 test split with accuracy on the same videos rendered in memory).

The tasks (one micro-batch each per step; `train.py` weighs their losses)
    caption    one event's frames (the frames the 64-frame teacher sees of it), a short prompt,
               target `<think>{caption}</think>`: every content word is grounded in those frames.
    textqa     no video: the event captions in order as text, then the real QA prompt, target
               `<think>{caption of the answer event}</think><answer>{letter}</answer>`: the LM
               learns the hops (find the event, read the slot, map the word to its letter) on cheap
               short sequences.
    qa         the real input (teacher: 64 frames; student: its compressed memory) with the real
               Video-R1 prompt and the same target as textqa. This is what evaluation measures.
    clipqa     qa on a clip of a few consecutive events (`WarmupConfig.clip_events`; the teacher's own
               frames of them, so the same frame spacing): a curriculum step - choosing among 2-3
               scenes gives the attention a far stronger signal than among 3-6, at a third of the cost.
    story      the whole 64-frame video, short prompt, target `<think>{caption 1}. {caption 2}. ...</think>`:
               dense supervision on event order (helps `after`).
    frames     no language model: single temporal groups (two consecutive frames of the teacher's
               64, inside one event) through the vision tower only, labelled with the event's
               colour, shape, direction and background for the training-only probe (train.py). By
               far the cheapest step: it teaches the random vision tower what the later tasks read.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stages import sample_data as eq
from stages.common.frames import decode_frames
from stages.model.inputs import (
    VIDEO,
    Memory,
    ModelInputs,
    ground_truth_memory,
    left_pad,
    pad_events,
    patchify,
    prompt_ids,
    seconds_per_group,
    teacher_timestamps,
)
from stages.model.qwen import ModelBundle

CAPTION_PROMPT = "Describe the video."
STORY_PROMPT = "Describe every scene in order."
TASKS = ("frames", "caption", "textqa", "qa", "story")


def qa_target(caption: str, letter: str) -> str:
    """The Video-R1 format target: the answer event's caption as the reasoning, then the letter."""
    return f"<think>{caption}</think><answer>{letter}</answer>"


THINK_STYLES = ("caption", "keyed")


def question_key(question: dict, events: list[dict]) -> str:
    """The words of the question that pick the answer event: its background (shape, colour), the
    shape's colour and name (direction), or the scene before it (after)."""
    fam, e = question.get("family"), events[question["answer_event"]]
    if fam == "direction":
        return f"the {e['colour']} {e['shape']}"
    if fam == "after" and question["answer_event"] > 0:
        return f"after the {events[question['answer_event'] - 1]['background']} background"
    return f"on the {e['background']} background"


def option_word(question: dict, letter: str) -> str:
    """The text of option `letter` ("C. triangle" -> "triangle")."""
    for op in question.get("options") or []:
        if op.startswith(f"{letter}."):
            return op[len(letter) + 1:].strip()
    return ""


def think_text(question: dict, events: list[dict], style: str = "caption") -> str:
    """The reasoning of a QA target. caption: the answer event's caption. keyed: the question's key
    first (copied from the question), then the caption, then the answer word:
    "on the purple background: a yellow triangle moving right on a purple background, then triangle"
    (the key opens with a fixed word so that its colour/shape words are the same tokens as in the
    question: BPE splits a word with no space before it differently). Each hop
    is then one next-token step with its cue right before it: copy the key, read the event the key
    names, copy the slot the question asks for, and (the letter) find that word among the options."""
    caption = events[question["answer_event"]]["caption"]
    if style == "caption":
        return caption
    if style != "keyed":
        raise ValueError(f"think style must be one of {THINK_STYLES}, got {style!r}")
    letter = answer_letter(question)
    return f"{question_key(question, events)}: {caption}, then {option_word(question, letter)}"


def answer_letter(question: dict) -> str:
    sol = question["solution"]
    return sol[sol.index("<answer>") + len("<answer>"):sol.index("</answer>")].strip()


# --------------------------------------------------------------------------------------------
# Videos: from the data set, or planned and rendered in memory.
# --------------------------------------------------------------------------------------------


@dataclass
class VideoItem:
    """One video with its events (ground truth) and questions, able to produce frames at times."""

    video_id: str
    fps: float
    frame_count: int
    width: int  # source frame size
    height: int
    events: list[dict]  # events.jsonl rows: start/end time, background, shape, colour, direction, caption
    questions: list[dict]  # questions.jsonl rows (problem, options, solution, family, answer_event)
    path: Path | None = None  # MP4 (data set) or None (rendered in memory from `plan`)
    plan: list[eq.Event] | None = None
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def duration(self) -> float:
        return self.frame_count / self.fps

    def teacher_stamps(self, max_frames: int) -> list[float]:
        return teacher_timestamps(self.duration, self.fps, max_frames)

    def frames(self, timestamps: list[float], size: int, cache_dir: Path | None = None) -> np.ndarray:
        """uint8 [N, size, size, 3] frames shown at `timestamps` (last frame with PTS <= t)."""
        key = (tuple(round(t, 6) for t in timestamps), size)
        if key in self.cache:
            return self.cache[key]
        if self.plan is not None:
            out = render_at(self.plan, timestamps, self.fps, self.width, self.height, size)
        else:
            out = decode_frames(self.path, timestamps, (size, size), cache_dir,
                                self.video_id if cache_dir else None)
        if len(self.cache) >= 8:  # a few clips per video: the full 64-frame clip is what repeats
            self.cache.pop(next(iter(self.cache)))
        self.cache[key] = out
        return out


def _area_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] weights of an area (box) resize: each output pixel averages the source span it covers."""
    m = np.zeros((dst, src), dtype=np.float32)
    scale = src / dst
    for o in range(dst):
        a, b = o * scale, (o + 1) * scale
        for i in range(int(math.floor(a)), min(src, int(math.ceil(b)))):
            m[o, i] = min(b, i + 1) - max(a, i)
    return m / m.sum(1, keepdims=True)


def render_at(plan: list[eq.Event], timestamps: list[float], fps: float, width: int, height: int,
              size: int) -> np.ndarray:
    """uint8 [N, size, size, 3]: the frames an MP4 of `plan` shows at `timestamps`, rendered directly.

    Shapes are drawn at the source size with `sample_data`'s geometry (same masks), then
    area-resized to `size` (the decoder's swscale resize is close to it; H.264 and 4:2:0 chroma
    loss are not modelled - the MP4 check in the bench measures the difference).
    """
    total = plan[-1].end_frame
    side = eq.shape_size(width, height)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    masks = np.empty((len(timestamps), height, width), dtype=np.float32)
    colours = np.empty((len(timestamps), 2, 3), dtype=np.float32)  # background, shape
    for i, t in enumerate(timestamps):
        k = min(max(int(math.floor(t * fps + 1e-6)), 0), total - 1)
        e = next(ev for ev in plan if ev.start_frame <= k < ev.end_frame)
        n = e.end_frame - e.start_frame
        a = (k - e.start_frame) / (n - 1) if n > 1 else 0.0
        (x0, y0), (x1, y1) = e.start_xy, e.end_xy
        masks[i] = eq.shape_mask_at(e.shape, xs - np.float32(x0 + a * (x1 - x0)), ys - np.float32(y0 + a * (y1 - y0)), side)
        colours[i] = (eq.PALETTE[e.background], eq.PALETTE[e.colour])
    # Fraction of each output pixel inside the shape (torch: numpy's BLAS stalls on small matrices here).
    rh, rw = torch.from_numpy(_area_matrix(height, size)), torch.from_numpy(_area_matrix(width, size))
    cover = (rh @ torch.from_numpy(masks) @ rw.T).numpy()[..., None]  # [N, size, size, 1]
    bg, fg = colours[:, None, None, 0], colours[:, None, None, 1]
    return np.clip(np.rint(bg + cover * (fg - bg)), 0, 255).astype(np.uint8)


def event_rows(events: list[eq.Event], fps: float) -> list[dict]:
    return [dict(index=e.index, start_frame=e.start_frame, end_frame=e.end_frame,
                 start_time=round(e.start_frame / fps, 6), end_time=round(e.end_frame / fps, 6),
                 background=e.background, shape=e.shape, colour=e.colour, direction=e.direction,
                 caption=e.caption) for e in events]


def synthetic_video(seed: int, i: int, width: int = 128, height: int = 128, fps: int = 10) -> VideoItem:
    """EventQA video `i` of `seed`, planned exactly as `sample_data.generate` plans it, not rendered yet."""
    plan, rng = eq.plan_video(seed, i, width, height, fps)
    vid = eq.video_id(seed, i)
    questions = [dict(q, problem_id=f"{vid}_q{j:02d}", problem_type="multiple choice", data_type="video")
                 for j, q in enumerate(eq.make_questions(plan, rng))]
    return VideoItem(vid, float(fps), plan[-1].end_frame, width, height, event_rows(plan, fps), questions,
                     plan=plan)


def dataset_videos(data_dir: Path | str, split: str | None = "train") -> list[VideoItem]:
    """The videos of one split of an EventQA-style folder (events.jsonl + questions.jsonl + MP4s)."""
    data_dir = Path(data_dir)
    rows = [json.loads(line) for line in (data_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    questions: dict[str, list[dict]] = {}
    for line in (data_dir / "questions.jsonl").read_text().splitlines():
        if line.strip():
            q = json.loads(line)
            questions.setdefault(q["path"], []).append(q)
    out = []
    for r in rows:
        if split is not None and r.get("split", "train") != split:
            continue
        out.append(VideoItem(r["video_id"], float(r["fps"]), int(r["frame_count"]), int(r["width"]),
                             int(r["height"]), r["events"], questions.get(r["path"], []), path=data_dir / r["path"]))
    return out


# --------------------------------------------------------------------------------------------
# Examples and batches.
# --------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One training sequence: what the model sees and the completion it must produce."""

    task: str  # caption | textqa | qa | story
    video: VideoItem
    target: str  # completion text; <|im_end|> is appended when tokenised
    question: dict | None = None  # qa / textqa
    event: int | None = None  # caption: the event described
    family: str | None = None
    window: tuple[int, int] | None = None  # clipqa / textqa: first and last event shown (inclusive)


def examples_of(video: VideoItem, tasks: set[str], think: str = "caption") -> list[Example]:
    out: list[Example] = []
    caps = [e["caption"] for e in video.events]
    if "caption" in tasks:
        out += [Example("caption", video, f"<think>{c}</think>", event=k) for k, c in enumerate(caps)]
    if "story" in tasks:
        out.append(Example("story", video, "<think>" + ". ".join(caps) + "</think>"))
    for q in video.questions:
        target = qa_target(think_text(q, video.events, think), answer_letter(q))
        for task in ("qa", "textqa", "clipqa"):
            if task in tasks:
                out.append(Example(task, video, target, question=q, family=q.get("family")))
    return out


def with_window(example: Example, events: int, rng: random.Random) -> Example:
    """The example restricted to `events` consecutive events that hold its answer (and, for `after`,
    the scene before it), placed at random: a short clip (clipqa) or a short scene list (textqa)."""
    n = len(example.video.events)
    q = example.question
    if events == 1 and q.get("family") == "after":  # needs the scene before the answer too
        events = 2
    if events <= 0 or events >= n:
        return example
    lo = q["answer_event"] - (1 if q.get("family") == "after" else 0)
    hi = q["answer_event"]
    first = rng.randint(max(0, hi - events + 1), min(lo, n - events))
    return Example(example.task, example.video, example.target, q, example.event, example.family,
                   (first, first + events - 1))


def _chat_ids(bundle: ModelBundle, text: str, video_tokens: int | None) -> list[int]:
    """A user turn with a short task text (caption/story/textqa), the video first when there is one."""
    content = ([{"type": "video"}] if video_tokens is not None else []) + [{"type": "text", "text": text}]
    s = bundle.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    ids = bundle.tokenizer(s, add_special_tokens=False)["input_ids"]
    if video_tokens is None:
        return ids
    k = ids.index(bundle.video_token_id)
    return ids[:k] + [bundle.video_token_id] * video_tokens + ids[k + 1:]


def textqa_prompt(bundle: ModelBundle, example: Example) -> str:
    """The events' captions as text where the video would be, then the question as `prompt_ids` words it."""
    from stages.model.tokenizer import question_text

    q = example.question
    # Key first ("red background: a ... on a red background."): a causal LM can find a scene by its
    # background and then copy forward; with the caption alone the key comes after what must be copied.
    events = example.video.events
    if example.window is not None:
        events = events[example.window[0]:example.window[1] + 1]
    story = "Scenes: " + " ".join(f"{e['background']} background: {e['caption']}." for e in events) + "\n"
    return story + question_text(q["problem"], q.get("options"), q.get("problem_type", "multiple choice"),
                                 bundle.config.prompt_style)


@dataclass
class Clip:
    frames: np.ndarray  # uint8 [N, H, W, 3]
    timestamps: list[float]
    event_frames: list[int]  # frames per event (student memories); [N] for a plain clip


def clip_of(bundle: ModelBundle, example: Example, mode: str, top_k: int, fps: float, max_frames: int,
            cache_dir: Path | None = None) -> Clip:
    """The frames an example shows. Teacher: the 64 uniform frames of the video (caption: those of
    the one event, at least 2). Student: the question's ground-truth memory (caption: the event)."""
    v, size = example.video, bundle.config.frame_size
    if example.task == "caption":
        e = v.events[example.event]
        if mode == "teacher":  # the teacher's own frames of this event (per-frame rendering: same pixels as in the full clip)
            full = v.teacher_stamps(bundle.config.teacher_frames)
            idx = [i for i, t in enumerate(full) if e["start_time"] <= t < e["end_time"]]
            idx = idx[:len(idx) // 2 * 2]
            stamps = [full[i] for i in idx] if len(idx) >= 2 else \
                [e["start_time"] + (e["end_time"] - e["start_time"]) * f for f in (0.25, 0.75)]
        else:
            stamps = ground_truth_memory([e], 0, 1, fps, max_frames).timestamps
        return Clip(v.frames(stamps, size, cache_dir), stamps, [len(stamps)])
    if example.task == "clipqa" and example.window is not None:  # the teacher's frames of a few events
        full = v.teacher_stamps(bundle.config.teacher_frames)
        a, b = v.events[example.window[0]]["start_time"], v.events[example.window[1]]["end_time"]
        stamps = [t for t in full if a <= t < b]
        stamps = stamps[:max(2, len(stamps) // 2 * 2)]
        return Clip(v.frames(stamps, size, cache_dir), stamps, [len(stamps)])
    if mode == "teacher" or example.task in ("story", "clipqa"):
        stamps = v.teacher_stamps(bundle.config.teacher_frames)
        return Clip(v.frames(stamps, size, cache_dir), stamps, [len(stamps)])
    memory = ground_truth_memory(v.events, example.question["answer_event"], top_k, fps, max_frames)
    return Clip(v.frames(memory.timestamps, size, cache_dir), memory.timestamps, memory.event_frames)


def build_batch(bundle: ModelBundle, examples: list[Example], mode: str = "teacher", top_k: int = 3,
                fps: float = 1.0, max_frames: int = 64, cache_dir: Path | None = None
                ) -> tuple[ModelInputs | None, dict, list[list[int]]]:
    """(inputs, text-only batch, completion token ids) for examples of ONE task.

    Video tasks give `ModelInputs` exactly as `build_teacher_inputs` / `build_student_inputs` would
    (qa uses the pipeline's own `prompt_ids`); textqa gives a plain token batch (`input_ids`,
    `attention_mask`) and inputs None. Uncompressed video batches also give `group_events`: per
    question, per temporal group, the ground-truth event it shows (for the probe loss).
    """
    from stages.model.inputs import compressed_groups

    tok = bundle.tokenizer
    completions = [tok(ex.target + "<|im_end|>", add_special_tokens=False)["input_ids"] for ex in examples]
    task = examples[0].task
    assert all(ex.task == task for ex in examples), "one task per micro-batch"
    if task == "textqa":
        ids, mask = left_pad([_chat_ids(bundle, textqa_prompt(bundle, ex), None) for ex in examples], bundle.pad_token_id)
        return None, {"input_ids": ids, "attention_mask": mask}, completions
    geo, cfg = bundle.geometry, bundle.config
    student = mode == "student" and task not in ("story", "clipqa")
    pixels, grids, llm_groups, event_groups, rows, stamps, text = [], [], [], [], [], [], {}
    for ex in examples:
        clip = clip_of(bundle, ex, mode, top_k, fps, max_frames, cache_dir)
        if student:
            frames, groups = pad_events(clip.frames, clip.event_frames, geo.temporal_patch_size)
            n_llm = compressed_groups(groups, cfg.compression_ratio, cfg.target_frames)
        else:
            frames = clip.frames
            groups = [math.ceil(len(frames) / geo.temporal_patch_size)]
            n_llm = groups[0]
        pv, (t, gh, gw) = patchify(frames, geo)
        n_tokens = n_llm * gh * gw // geo.merge_size ** 2
        rows.append(prompt_ids(bundle, ex.question, n_tokens) if task in ("qa", "clipqa")
                    else _chat_ids(bundle, CAPTION_PROMPT if task == "caption" else STORY_PROMPT, n_tokens))
        pixels.append(pv)
        grids.append((t, gh, gw))
        llm_groups.append(n_llm)
        event_groups.append(groups)
        stamps.append(clip.timestamps)
    input_ids, attention_mask = left_pad(rows, bundle.pad_token_id)
    video_grid = torch.tensor(grids, dtype=torch.long)
    llm_grid = video_grid.clone()
    llm_grid[:, 0] = torch.tensor(llm_groups, dtype=torch.long)
    inputs = ModelInputs(
        kind="student" if student else "teacher",
        compression="memory" if student else "none",
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_token_type_ids=((input_ids == bundle.video_token_id) & attention_mask.bool()).to(torch.int32) * VIDEO,
        pixel_values_videos=torch.cat(pixels),
        video_grid_thw=video_grid,
        llm_grid_thw=llm_grid,
        second_per_grid_ts=torch.tensor([seconds_per_group(s, geo.temporal_patch_size) for s in stamps],
                                        dtype=torch.float32),
        event_groups=event_groups,
    )
    if not student:  # per temporal group: the event its first frame shows (labels of the probe loss)
        text["group_events"] = [[_event_at(ex.video.events, ts[min(2 * g, len(ts) - 1)]) for g in range(gr[0])]
                                for ex, ts, gr in zip(examples, stamps, event_groups)]
    return inputs, text, completions


def _event_at(events: list[dict], t: float) -> dict:
    for e in events:
        if e["start_time"] <= t < e["end_time"]:
            return e
    return events[-1] if t >= events[-1]["start_time"] else events[0]


class ExampleStream:
    """Endless, seeded stream of examples of one task.

    Videos come in chunks (`chunk` synthetic videos + the data set's training videos mixed in with
    probability `dataset_share`); all examples of a chunk are shuffled and served before the next
    chunk is planned, so each rendered full-video clip serves all its questions from the cache.
    """

    def __init__(self, task: str, dataset: list[VideoItem], synthetic_seed: int, rng_seed: int,
                 chunk: int = 8, dataset_share: float = 0.25, width: int = 128, height: int = 128, fps: int = 10,
                 families: tuple[str, ...] | None = None, think: str = "caption", window: int = 0):
        self.task, self.dataset, self.seed = task, dataset, synthetic_seed
        self.think, self.window = think, window
        self.rng = random.Random(rng_seed)
        self.chunk, self.share = chunk, dataset_share if dataset else 0.0
        self.size = (width, height, fps)
        self.families = families
        self.next_index = 0
        self.buffer: list[Example] = []

    def _refill(self) -> None:
        videos = []
        for _ in range(self.chunk):
            if self.rng.random() < self.share:
                videos.append(self.rng.choice(self.dataset))
            else:
                videos.append(synthetic_video(self.seed, self.next_index, *self.size))
                self.next_index += 1
        ex = [e for v in videos for e in examples_of(v, {self.task}, self.think)
              if self.families is None or e.family is None or e.family in self.families]
        if self.window:
            ex = [with_window(e, self.window, self.rng) for e in ex]
        self.rng.shuffle(ex)
        self.buffer = ex

    def take(self, n: int) -> list[Example]:
        out = []
        while len(out) < n:
            if not self.buffer:
                self._refill()
            out.append(self.buffer.pop())
        return out


def frame_groups(rng: random.Random, n: int, seed: int, size: int, teacher_frames: int = 64,
                 start_index: int = 0) -> tuple[list[np.ndarray], list[dict]]:
    """`n` single temporal groups for the vision task: two consecutive frames of a video's teacher
    sampling, both inside one event (rendered in memory), with that event's row as the label.
    Videos are planned from `seed` at random indices >= start_index."""
    frames, labels = [], []
    while len(frames) < n:
        v = synthetic_video(seed, start_index + rng.randrange(1_000_000))
        stamps = v.teacher_stamps(teacher_frames)
        g = rng.randrange(len(stamps) // 2)
        pair = stamps[2 * g:2 * g + 2]
        e0, e1 = _event_at(v.events, pair[0]), _event_at(v.events, pair[1])
        if e0 is not e1:  # straddles a cut: no single label
            continue
        frames.append(render_at(v.plan, pair, v.fps, v.width, v.height, size))
        labels.append(e0)
    return frames, labels
