"""C-GRPO advantages and loss (DESIGN.md §1), on one screen.

Shapes: B = questions * G completions, ordered group by group (the G completions of a question are
contiguous); T = completion tokens (padded). All log-probs are of the sampled completion tokens.
The retention bonus is already inside `rewards` (see `rewards.score_group`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """A_i = (R_i - mean R) / (std R + eps) within each group. rewards [B] -> (advantages [B], std [B/G]).

    std is the unbiased one (Bessel), as TRL's GRPOTrainer computes it; eps = 1e-4 as there too.
    """
    r = rewards.view(-1, group_size)
    mean, std = r.mean(dim=1, keepdim=True), r.std(dim=1, keepdim=True)
    return ((r - mean) / (std + eps)).view(-1), std.view(-1)


def cgrpo_loss(
    logp: Tensor,  # [B, T] policy log-probs, with grad
    ref_logp: Tensor | None,  # [B, T] frozen reference on the same (compressed) input; None when beta = 0
    mask: Tensor,  # [B, T] 1 on completion tokens, 0 on padding
    rewards: Tensor,  # [B] R_i = r_i + 1[correct] * r_c
    group_size: int,
    *,
    old_logp: Tensor | None = None,  # [B, T] policy at sampling time; None = detached current (mu = 1)
    clip_eps: float = 0.2,
    beta: float = 0.04,
    eps: float = 1e-4,
    kl_clamp: float = 20.0,
) -> tuple[Tensor, dict[str, float]]:
    adv, std = group_advantages(rewards.to(logp.dtype), group_size, eps)
    a = adv.unsqueeze(1)  # [B, 1]
    ratio = torch.exp(logp - (logp.detach() if old_logp is None else old_logp))
    surrogate = torch.min(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    if ref_logp is not None:
        x = (ref_logp - logp).clamp(-kl_clamp, kl_clamp)
        kl = torch.exp(x) - x - 1  # k3 estimator of KL(policy || ref), >= 0
    else:
        kl = torch.zeros_like(logp)
    m = mask.to(logp.dtype)
    lengths = m.sum(dim=1)

    def seq_mean(t: Tensor) -> Tensor:  # mean over each completion's tokens -> [B]
        return (t * m).sum(dim=1) / lengths.clamp(min=1)

    loss = seq_mean(-(surrogate - beta * kl)).mean()

    clipped = ((ratio < 1 - clip_eps) & (a < 0)) | ((ratio > 1 + clip_eps) & (a > 0))
    metrics = {
        "loss": loss.item(),
        "kl": seq_mean(kl).mean().item(),
        "clip_ratio": ((clipped.to(m.dtype) * m).sum() / m.sum().clamp(min=1)).item(),
        "reward": rewards.float().mean().item(),
        "reward_std": std.mean().item(),
        "frac_reward_zero_std": (std.abs() < 1e-8).float().mean().item(),
        "completion_length": lengths.mean().item(),
    }
    return loss, metrics
