"""C-GRPO advantages and loss: a hand-computed example, and the gradient sign on a toy policy."""

import math

import pytest
import torch

from stages.train.cgrpo import cgrpo_loss, group_advantages


def test_group_advantages_by_hand():
    # group 1: R = [1, 0, 2, 1]: mean 1, unbiased std sqrt(2/3); group 2: all equal -> std 0 -> A = 0
    adv, std = group_advantages(torch.tensor([1.0, 0.0, 2.0, 1.0, 3.0, 3.0, 3.0, 3.0]), 4, eps=0.0)
    s = math.sqrt(2 / 3)
    assert adv[:4].tolist() == pytest.approx([0.0, -1 / s, 1 / s, 0.0])
    assert std.tolist() == pytest.approx([s, 0.0])
    adv, _ = group_advantages(torch.tensor([3.0, 3.0, 3.0, 3.0]), 4)  # eps keeps it finite
    assert adv.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_loss_hand_computed():
    """One group of G = 2, rewards [1, 0]; eps = 0 -> A = [+1/sqrt2, -1/sqrt2] (unbiased std = 1/sqrt2).

    ratio = exp(logp - old):          seq 0 [e^0.2 = 1.2214, e^-0.5 = 0.6065]   seq 1 [1, (e^-1, masked)]
    clipped surrogate (clip 0.2), A>0: min(1.2214 A, 1.2 A) = 1.2 A = 0.848528 (clipped);
                                       min(0.6065 A, 0.8 A) = 0.6065 A = 0.428882 (not clipped: A > 0)
                              A<0:     min(1 * -A, 1 * -A) = -0.707107
    x = ref - logp:                   seq 0 [0, 1]   seq 1 [-1, masked]
    k3 = e^x - x - 1:                 seq 0 [0, e - 2 = 0.718282]   seq 1 [e^-1 = 0.367879]
    per-token loss, beta 0.1:         seq 0 [-0.848528, -(0.428882 - 0.071828) = -0.357054] -> mean -0.602791
                                      seq 1 [-(-0.707107 - 0.036788) = 0.743895]            -> mean  0.743895
    loss = (-0.602791 + 0.743895) / 2 = 0.070552
    """
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -1.5], [-0.5, -2.0]])
    ref = torch.tensor([[-1.0, -1.0], [-1.5, -3.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, m = cgrpo_loss(logp, ref, mask, torch.tensor([1.0, 0.0]), 2, old_logp=old, clip_eps=0.2, beta=0.1, eps=0.0)
    assert loss.item() == pytest.approx(0.0705519, abs=1e-6)
    assert m["loss"] == pytest.approx(0.0705519, abs=1e-6)
    assert m["kl"] == pytest.approx((0.7182818 / 2 + 0.3678794) / 2, abs=1e-6)
    assert m["clip_ratio"] == pytest.approx(1 / 3)  # 1 of 3 completion tokens was clipped
    assert m["reward"] == pytest.approx(0.5)
    assert m["reward_std"] == pytest.approx(1 / math.sqrt(2))
    assert m["frac_reward_zero_std"] == 0.0
    assert m["completion_length"] == 1.5
    # gradient. d ratio/d logp = ratio; d k3/d logp = 1 - e^x. Per token, times 1/(tokens of its seq)/(seqs):
    #   [0,0] clipped (surrogate constant) and x = 0:          0
    #   [0,1] (-(0.606531 * 0.707107) + 0.1 * (1 - e)) / 4   = -0.150178
    #   [1,0] (-(1 * -0.707107) + 0.1 * (1 - e^-1)) / 2      =  0.385159
    #   [1,1] masked:                                          0
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, -0.150178, 0.385159, 0.0], abs=1e-6)


def test_on_policy_loss_value():
    # mu = 1 (old = detached current): ratio 1, surrogate = A, so with beta = 0 the loss is -mean(A) = 0
    logp = torch.log(torch.rand(6, 3)).requires_grad_()
    loss, m = cgrpo_loss(logp, None, torch.ones(6, 3), torch.tensor([1.0, 0, 0, 1, 1, 1]), 3, beta=0.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert m["kl"] == 0.0 and m["clip_ratio"] == 0.0 and m["frac_reward_zero_std"] == 0.5


def test_gradient_sign_on_a_categorical_policy():
    """A policy over 4 one-token answers; the group sampled each once and only answer 2 was rewarded.
    One SGD step on the C-GRPO loss raises log p(2) and lowers the others."""
    torch.manual_seed(0)
    logits = torch.nn.Parameter(torch.randn(4) * 0.1)
    ref = logits.detach().log_softmax(-1)
    samples = torch.tensor([0, 1, 2, 3])
    rewards = torch.tensor([0.0, 0.0, 1.0, 0.0])

    def logp_of_samples():
        return logits.log_softmax(-1)[samples].unsqueeze(1)  # [G=4, T=1]

    before = logits.detach().log_softmax(-1).clone()
    loss, _ = cgrpo_loss(logp_of_samples(), ref[samples].unsqueeze(1), torch.ones(4, 1), rewards, 4, beta=0.04)
    loss.backward()
    with torch.no_grad():
        logits -= 0.5 * logits.grad
    after = logits.detach().log_softmax(-1)
    assert after[2] > before[2]
    assert all(after[i] < before[i] for i in (0, 1, 3))
