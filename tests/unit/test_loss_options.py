"""The loss options beside the paper's: KL estimators k1/k2/k3, the KL in the reward
instead of the loss, and DAPO's over-long handling (penalty or mask)."""

from __future__ import annotations

import math

import pytest
import torch

from learner import grpo
from learner.batch import Completion, Group, ScoredGroup
from learner.config import GRPOLossConfig
from learner.grpo_role import group_advantages_of, shaped_rewards

pytestmark = pytest.mark.unit


def test_kl_estimators_match_their_formulas():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    x = [float(r - p) for r, p in zip(ref[0], logp[0])]
    k1 = grpo.kl_estimate(logp, ref, estimator="k1")[0].tolist()
    k2 = grpo.kl_estimate(logp, ref, estimator="k2")[0].tolist()
    k3 = grpo.kl_estimate(logp, ref, estimator="k3")[0].tolist()
    for i, xi in enumerate(x):
        assert math.isclose(k1[i], -xi, abs_tol=1e-6)
        assert math.isclose(k2[i], xi * xi / 2, abs_tol=1e-6)
        assert math.isclose(k3[i], math.exp(xi) - xi - 1, abs_tol=1e-6)
    assert torch.equal(grpo.kl_estimate(logp, ref, estimator="k3"), grpo.k3_kl(logp, ref))
    with pytest.raises(ValueError, match="unknown KL estimator"):
        grpo.kl_estimate(logp, ref, estimator="k4")


def test_all_three_estimate_the_same_kl_on_samples_from_the_policy():
    """E_{o~π}[k] = KL(π || π_ref) for k1 and k3 (unbiased); k2 is close for near policies."""
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6), 0)
    q = torch.softmax(torch.log(p) + 0.3 * torch.randn(6), 0)
    exact = float((p * (p.log() - q.log())).sum())
    samples = torch.multinomial(p, 200_000, replacement=True)
    logp, ref = p.log()[samples][None], q.log()[samples][None]
    for estimator, tol in (("k1", 0.03), ("k3", 0.03), ("k2", 0.2)):
        got = float(grpo.kl_estimate(logp, ref, estimator=estimator).mean())
        assert math.isclose(got, exact, rel_tol=tol), (estimator, got, exact)


def test_overlong_penalty_ramps_over_the_buffer():
    lengths = torch.tensor([10, 12, 14, 16, 20])
    got = grpo.overlong_penalty(lengths, max_tokens=16, buffer=4).tolist()
    assert got == [0.0, 0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="0 < buffer <= max_tokens"):
        grpo.overlong_penalty(lengths, max_tokens=16, buffer=0)


def _scored(rewards, lengths, ref_shift=0.0) -> ScoredGroup:
    comps = tuple(Completion(tuple(range(n)), tuple([-0.5] * n), "x", "length" if n >= 16 else "stop")
                  for n in lengths)
    refs = tuple(tuple([-0.5 + ref_shift] * n) for n in lengths)
    return ScoredGroup(Group(0, (5, 6), "3", comps, 0), tuple(rewards), tuple(rewards), (1.0,) * len(rewards),
                       ref_logprobs=refs)


def test_shaped_rewards_add_the_overlong_penalty_and_the_kl_in_reward():
    g = _scored((1.0, 1.0, 0.0, 0.0), (8, 14, 16, 4), ref_shift=-0.1)
    plain = GRPOLossConfig()
    assert shaped_rewards(g, plain, 16).tolist() == [1.0, 1.0, 0.0, 0.0]
    penalised = shaped_rewards(g, GRPOLossConfig(overlong="penalty", overlong_buffer_tokens=4), 16).tolist()
    assert penalised == pytest.approx([1.0, 0.5, -1.0, 0.0])
    # The default buffer is a quarter of the budget (4 of 16 here).
    assert shaped_rewards(g, GRPOLossConfig(overlong="penalty"), 16).tolist() == pytest.approx(penalised)
    # KL in the reward: β Σ_t k1 with log π/π_ref = 0.1 on every token.
    in_reward = shaped_rewards(g, GRPOLossConfig(kl_in="reward", kl_coef=0.5, kl_estimator="k1"), 16).tolist()
    assert in_reward == pytest.approx([1.0 - 0.5 * 0.1 * 8, 1.0 - 0.5 * 0.1 * 14, -0.5 * 0.1 * 16, -0.5 * 0.1 * 4])
    # The advantages are the group-normalised shaped rewards.
    adv = group_advantages_of(g, GRPOLossConfig(overlong="penalty", overlong_buffer_tokens=4), 16)
    want = grpo.group_advantages(torch.tensor([penalised]), std_ddof=1, eps=1e-4, scale_by_std=True)[0]
    assert torch.allclose(adv, want)


def test_kl_in_reward_needs_reference_log_probs():
    g = _scored((1.0, 0.0), (4, 4))
    no_ref = ScoredGroup(g.group, g.rewards, g.accuracy, g.format_ok)
    with pytest.raises(ValueError, match="needs the reference's log-probs"):
        shaped_rewards(no_ref, GRPOLossConfig(kl_in="reward", kl_coef=0.1), 16)
