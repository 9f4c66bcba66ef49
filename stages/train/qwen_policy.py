"""The Qwen2.5-VL student as an `engine.Policy`: C-GRPO on compressed retrieved inputs (DESIGN.md §1).

One step on one rank, top to bottom (`make_batch` under no_grad, then `step_loss` with grad):

    questions  Q = train.questions_per_step items of (seed, step, rank)           shard_indices
    inputs     each question's memory frames -> compressed (N_target groups)     build_student_inputs
    sample     G = train.group_size completions per question, current policy     runner.generate
    rewards    R_i = r_i + 1[correct] * r_c, eta = a_comp / a_full (teacher's    score_group
               cached rollouts)
    ref / old  log-probs of the sampled tokens on the same compressed input      runner.completion_logprobs
    loss       per-token clipped surrogate - beta * k3 KL, mean over tokens      cgrpo_loss
               then sequences

The policy is built on the driver from plain data (`TrainItem`s: question row, video path, memory,
a_full) and pickled to every Ray Train worker; each worker loads the teacher checkpoint itself
(`build_model`: the student starts from the teacher) and decodes frames through the shared frame cache.

Known costs and limits: the log-prob passes repeat each question's patches G times, so the vision tower
runs G times per question there (generation runs it once); `runner.completion_logprobs` has no
temperature, so ratios and KL are of the T = 1 policy (exact for the default `train.temperature` 1.0).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from data_contracts.config import PipelineConfig
from stages.model import runner
from stages.model.inputs import Memory, ModelInputs, build_student_inputs, load_frames
from stages.model.qwen import ModelBundle, save_model
from stages.rollout.stage import load_teacher
from stages.train.cgrpo import cgrpo_loss
from stages.train.engine import StepContext, shard_indices
from stages.train.rewards import score_group


@dataclass(frozen=True)
class TrainItem:
    """One training question, resolved on the driver (picklable, no workspace needed on workers)."""

    question: dict  # questions-table row: question_id, problem, options, solution, problem_type, data_type
    video_path: str  # absolute path of the video file
    video_key: str  # the video's content hash: key of the shared frame cache
    memory: Memory  # the student's frames: timestamps and frames per retrieved event
    a_full: float | None  # the teacher's mean accuracy over its cached rollouts (None: unknown, no bonus)


@dataclass
class StudentBatch:
    """One rank's rollouts of a step, B = Q * G rows, the G samples of a question contiguous."""

    inputs: ModelInputs  # B rows: each question's compressed input repeated G times
    completions: list[list[int]]  # [B] sampled token ids, through <|im_end|> when it was reached
    mask: Tensor  # [B, Lc] bool, True on completion tokens
    rewards: Tensor  # [B] R_i
    ref_logp: Tensor | None  # [B, Lc] frozen reference (None when beta = 0)
    old_logp: Tensor | None  # [B, Lc] policy at sampling time (only when updates_per_batch > 1)
    metrics: dict[str, float]  # reward components, eta, a_full of this rank's questions
    num_samples: int  # B


def repeat_inputs(inputs: ModelInputs, g: int) -> ModelInputs:
    """Q questions -> Q * G rows (each question repeated G times, groups contiguous), patches included."""
    rows_per_q = (inputs.video_grid_thw.prod(dim=1)).tolist()  # patch rows of each question
    pixels = torch.cat([p for p in inputs.pixel_values_videos.split(rows_per_q) for _ in range(g)])
    rep = lambda t: t.repeat_interleave(g, dim=0)  # noqa: E731
    return replace(inputs, input_ids=rep(inputs.input_ids), attention_mask=rep(inputs.attention_mask),
                   mm_token_type_ids=rep(inputs.mm_token_type_ids), pixel_values_videos=pixels,
                   video_grid_thw=rep(inputs.video_grid_thw), llm_grid_thw=rep(inputs.llm_grid_thw),
                   second_per_grid_ts=rep(inputs.second_per_grid_ts),
                   event_groups=[e for e in inputs.event_groups for _ in range(g)])


class SyncedGenerate:
    """The model with `generate(..., synced_gpus=True)`: under ZeRO-3 every forward gathers parameters
    collectively, so all ranks keep stepping until the last one's samples end (as HF does for ZeRO-3
    when its HfDeepSpeedConfig is in use, which needs `accelerate`). Everything else is the model's."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __getattr__(self, name: str):
        return getattr(self.module, name)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.module.generate(*args, synced_gpus=True, **kwargs)


class QwenPolicy:
    """`engine.Policy` for the compressed-input student. `items` are the training questions."""

    def __init__(self, config: PipelineConfig, teacher_dir: str | Path, items: list[TrainItem],
                 frame_cache: str | Path | None = None, use_gpu: bool = False):
        if not items:
            raise ValueError("no training questions: the student needs at least one question with rollouts")
        self.config, self.cfg = config, config.train
        self.teacher_dir, self.items, self.use_gpu = str(teacher_dir), list(items), use_gpu
        self.frame_cache = Path(frame_cache) if frame_cache else None
        self.bundle: ModelBundle | None = None  # set by build_model on the worker

    # -- Policy protocol --------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The student starts as the teacher: the same checkpoint, loaded on every rank."""
        self.bundle = load_teacher(self.teacher_dir, self.config.model)
        return self.bundle.model.train()

    def build_reference(self, model: nn.Module) -> nn.Module | None:
        """A frozen copy of the starting weights (None when beta = 0: no KL term)."""
        return copy.deepcopy(model).eval().requires_grad_(False) if self.cfg.beta > 0 else None

    def make_batch(self, model: nn.Module, ref_model: nn.Module | None, ctx: StepContext) -> StudentBatch:
        cfg, G = self.cfg, self.cfg.group_size
        student = self._view(model)
        picked = shard_indices(len(self.items), cfg.questions_per_step, seed=cfg.seed, step=ctx.step,
                               rank=ctx.rank, world_size=ctx.world_size)
        items = [self.items[i] for i in picked]
        inputs = self._student_inputs(student, items).to(student.device)  # Q questions, compressed

        # Sample G completions per question from the current policy (global RNG: seeded by (seed, step, rank)).
        gen = runner.generate(student, inputs, cfg.max_new_tokens, cfg.temperature, num_samples=G)

        # Score each group; the retention bonus uses the teacher's cached a_full.
        rewards, components, etas = [], {}, []
        for j, item in enumerate(items):
            q = item.question
            s = score_group(gen.texts[j * G:(j + 1) * G], q["solution"], q["problem_type"], q["data_type"],
                            item.a_full, cfg.alpha, cfg.tau, cfg.reward_names, cfg.correct_threshold)
            rewards += s.totals
            for name, values in s.components.items():
                components.setdefault(name, []).extend(values)
            etas += [s.eta] if s.eta is not None else []
        metrics = {f"reward/{name}/mean": sum(v) / len(v) for name, v in components.items()}
        metrics["eta/mean"] = sum(etas) / len(etas) if etas else float("nan")
        known = [i.a_full for i in items if i.a_full is not None]
        metrics["a_full/mean"] = sum(known) / len(known) if known else float("nan")

        # Log-probs of the sampled tokens on the same compressed input: reference, and old policy if mu > 1.
        group_inputs = repeat_inputs(inputs, G)  # B = Q * G rows
        ref_logp = old_logp = None
        if ref_model is not None:
            ref_logp, _ = runner.completion_logprobs(replace(student, model=ref_model), group_inputs, gen.token_ids)
        if ctx.updates_per_batch > 1:
            old_logp, _ = runner.completion_logprobs(student, group_inputs, gen.token_ids)
        return StudentBatch(
            inputs=group_inputs, completions=gen.token_ids, mask=self._mask(gen.token_ids, student.device),
            rewards=torch.tensor(rewards, device=student.device), ref_logp=ref_logp, old_logp=old_logp,
            metrics=metrics, num_samples=len(gen.token_ids),
        )

    def step_loss(self, model: nn.Module, batch: StudentBatch, ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
        logp, _ = runner.completion_logprobs(self._view(model), batch.inputs, batch.completions)  # [B, Lc], grad
        loss, metrics = cgrpo_loss(logp, batch.ref_logp, batch.mask, batch.rewards, self.cfg.group_size,
                                   old_logp=batch.old_logp, clip_eps=self.cfg.clip_epsilon, beta=self.cfg.beta)
        return loss, {**metrics, **batch.metrics}

    def save_final(self, state_dict: dict[str, Tensor], out_dir: Path) -> Path:
        """The trained weights into a fresh copy of the teacher, saved with save_pretrained (+ tokenizer)."""
        bundle = load_teacher(self.teacher_dir, self.config.model)
        missing, unexpected = bundle.model.load_state_dict(state_dict, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight")}  # tied to the embeddings
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"final weights do not fit the model: missing {missing}, unexpected {unexpected}")
        return save_model(bundle, Path(out_dir) / "student")

    # -- helpers ----------------------------------------------------------------------------------
    def _view(self, model: nn.Module) -> ModelBundle:
        """The runner's view of the model being trained (the DeepSpeed engine's module) or of the reference."""
        module = getattr(model, "module", model)
        if self.cfg.zero_stage == 3 and dist.is_initialized() and dist.get_world_size() > 1:
            module = SyncedGenerate(module)
        return replace(self.bundle, model=module)

    def _student_inputs(self, bundle: ModelBundle, items: list[TrainItem]) -> ModelInputs:
        frames = [load_frames(bundle, i.video_path, i.memory.timestamps, self.frame_cache, i.video_key)
                  for i in items]  # uint8 [N_i, H, W, 3] each
        return build_student_inputs(bundle, [i.question for i in items], frames, [i.memory for i in items])

    @staticmethod
    def _mask(completions: list[list[int]], device) -> Tensor:
        mask = torch.zeros((len(completions), max(map(len, completions))), dtype=torch.bool, device=device)
        for b, c in enumerate(completions):
            mask[b, :len(c)] = True
        return mask
