"""A toy policy: a tiny categorical language model doing real C-GRPO steps on a synthetic task.

The task: Q questions, each with a hidden correct letter A-D and a cached "teacher accuracy" a_full.
The model writes up to `max_new_tokens` tokens from a 10-word vocabulary; the text is scored by the
real reward plug-ins (`format`, `accuracy`) and the retention bonus (`score_group`), and the loss is
the real `cgrpo_loss`. It exists to exercise the training machinery (DeepSpeed, Ray Train, checkpoints,
resume) in seconds; the Qwen2.5-VL student implements the same `Policy` protocol.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_contracts.config import TrainConfig
from stages.train.cgrpo import cgrpo_loss
from stages.train.engine import StepContext, shard_indices
from stages.train.rewards import score_group

VOCAB = ["<think>", "</think>", "<answer>", "</answer>", "A", "B", "C", "D", "hmm", "<eos>"]
EOS, BOS = VOCAB.index("<eos>"), len(VOCAB)  # BOS exists only as an input embedding


class ToyLM(nn.Module):
    """logits of token t given (question, token t-1, position t): enough to learn a format and a letter."""

    def __init__(self, num_questions: int, max_len: int, hidden: int = 32):
        super().__init__()
        self.q = nn.Embedding(num_questions, hidden)
        self.tok = nn.Embedding(len(VOCAB) + 1, hidden)
        self.pos = nn.Embedding(max_len, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, len(VOCAB)))

    def forward(self, q: Tensor, prev: Tensor) -> Tensor:  # q [B], prev [B, t] -> logits [B, t, V]
        h = self.q(q)[:, None] + self.tok(prev) + self.pos(torch.arange(prev.shape[1]))[None]
        return self.mlp(h)


@dataclass
class ToyBatch:
    q: Tensor  # [B] question id of each completion, B = questions * G, grouped
    tokens: Tensor  # [B, L] sampled tokens
    mask: Tensor  # [B, L] 1 up to and including <eos>
    rewards: Tensor  # [B] R_i
    ref_logp: Tensor | None  # [B, L]
    old_logp: Tensor | None  # [B, L], only when updates_per_batch > 1
    metrics: dict[str, float]
    num_samples: int


def decode(tokens: list[int]) -> str:
    out = []
    for t in tokens:
        if t == EOS:
            break
        out.append(VOCAB[t])
    return "".join(out)


class ToyPolicy:
    def __init__(self, cfg: TrainConfig, num_questions: int = 16, max_new_tokens: int = 8, hidden: int = 32,
                 warmup_steps: int = 40, crash_at: tuple[int, int] | None = None):
        """crash_at=(step, rank): that rank SIGKILLs its own process when the step begins (fault injection)."""
        self.cfg, self.num_questions, self.max_new_tokens, self.hidden = cfg, num_questions, max_new_tokens, hidden
        self.warmup_steps, self.crash_at = warmup_steps, crash_at
        g = torch.Generator().manual_seed(1234)
        self.answers = ["ABCD"[int(i)] for i in torch.randint(4, (num_questions,), generator=g)]
        # teacher accuracy per question; every 8th question the teacher never got right (a_full = 0)
        self.a_full = [0.0 if i % 8 == 7 else 0.5 + 0.5 * ((i * 37) % 5) / 4 for i in range(num_questions)]

    # -- Policy protocol ----------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """Random init (seeded by the engine), then a short supervised warm-up on the format with random
        letters, standing in for the SFT warm-up: the format is likely, the letter is at chance."""
        g = torch.Generator().manual_seed(self.cfg.seed)
        model = ToyLM(self.num_questions, self.max_new_tokens, self.hidden)
        opt = torch.optim.Adam(model.parameters(), lr=3e-2)
        template = [VOCAB.index(w) for w in ["<think>", "hmm", "</think>", "<answer>", "A", "</answer>", "<eos>"]]
        for _ in range(self.warmup_steps):
            q = torch.randint(self.num_questions, (32,), generator=g)
            tok = torch.tensor(template + [EOS] * (self.max_new_tokens - len(template))).repeat(32, 1)
            tok[:, 4] = 4 + torch.randint(4, (32,), generator=g)
            loss = F.cross_entropy(model(q, self._prev(tok)).flatten(0, 1), tok.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.zero_grad(set_to_none=True)
        return model

    def make_batch(self, model: nn.Module, ref_model: nn.Module | None, ctx: StepContext) -> ToyBatch:
        if self.crash_at == (ctx.step, ctx.rank):
            os.kill(os.getpid(), signal.SIGKILL)
        cfg, G = self.cfg, self.cfg.group_size
        qs = shard_indices(self.num_questions, cfg.questions_per_step, seed=cfg.seed, step=ctx.step,
                           rank=ctx.rank, world_size=ctx.world_size)
        q = torch.tensor(qs).repeat_interleave(G)
        tokens = torch.full((len(q), 0), EOS, dtype=torch.long)
        slot = torch.full((len(q), 1), EOS, dtype=torch.long)  # placeholder for the token being sampled
        for _ in range(self.max_new_tokens):  # fixed length on every rank (ZeRO-3 gathers per call)
            logits = model(q, self._prev(torch.cat([tokens, slot], dim=1)))[:, -1] / cfg.temperature
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=ctx.generator)
            tokens = torch.cat([tokens, nxt], dim=1)
        ended = (tokens == EOS).long().cumsum(1)
        mask = ((ended == 0) | ((ended == 1) & (tokens == EOS))).float()  # through the first <eos>

        texts = [decode(t.tolist()) for t in tokens]
        rewards, comps, etas = [], {}, []
        for j, qi in enumerate(qs):
            s = score_group(texts[j * G:(j + 1) * G], f"<answer>{self.answers[qi]}</answer>", "multiple choice",
                            "video", self.a_full[qi], cfg.alpha, cfg.tau, cfg.reward_names, cfg.correct_threshold)
            rewards += s.totals
            for k, v in s.components.items():
                comps.setdefault(k, []).extend(v)
            etas += [s.eta] if s.eta is not None else []
        metrics = {f"reward/{k}/mean": sum(v) / len(v) for k, v in comps.items()}
        metrics["eta/mean"] = sum(etas) / len(etas) if etas else float("nan")
        return ToyBatch(
            q=q, tokens=tokens, mask=mask, rewards=torch.tensor(rewards),
            ref_logp=self._logp(ref_model, q, tokens) if ref_model is not None else None,
            old_logp=self._logp(model, q, tokens) if ctx.updates_per_batch > 1 else None,
            metrics=metrics, num_samples=len(q),
        )

    def step_loss(self, model: nn.Module, batch: ToyBatch, ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
        logp = self._logp(model, batch.q, batch.tokens)
        loss, metrics = cgrpo_loss(logp, batch.ref_logp, batch.mask, batch.rewards, self.cfg.group_size,
                                   old_logp=batch.old_logp, clip_eps=self.cfg.clip_epsilon, beta=self.cfg.beta)
        return loss, {**metrics, **batch.metrics}

    # -- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def _prev(tokens: Tensor) -> Tensor:  # inputs for predicting `tokens`: BOS then tokens shifted right
        return torch.cat([torch.full_like(tokens[:, :1], BOS), tokens[:, :-1]], dim=1)

    def _logp(self, model: nn.Module, q: Tensor, tokens: Tensor) -> Tensor:  # [B, L]
        logits = model(q, self._prev(tokens)) / self.cfg.temperature
        return logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
