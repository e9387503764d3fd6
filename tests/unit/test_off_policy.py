"""Off-policy correction (``learner.grpo.importance_weights``): each mode against a direct
computation of its definition, masking, and the weighted loss."""

from __future__ import annotations

import math

import pytest
import torch

from learner import grpo


def _case():
    torch.manual_seed(0)
    behaviour = -torch.rand(3, 5) * 3  # [N, T]
    proximal = behaviour + torch.tensor([[0.0, 0.1, -0.2, 1.5, 0.0],
                                         [0.05, -0.05, 0.0, 0.02, 0.0],
                                         [2.0, 2.0, 2.0, -0.1, 0.0]])  # [N, T]
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    return proximal, behaviour, mask


def test_every_mode_matches_its_definition():
    proximal, behaviour, mask = _case()
    rho = torch.exp(proximal - behaviour)
    w, kept = grpo.importance_weights(proximal, behaviour, mask, mode="none")
    assert torch.equal(w, mask.float()) and torch.equal(kept, mask)

    w, _ = grpo.importance_weights(proximal, behaviour, mask, mode="tis", cap=2.0)
    assert torch.allclose(w, torch.where(mask, rho.clamp(max=2.0), torch.zeros(())))
    assert math.isclose(float(w[0, 3]), 2.0)  # e^1.5 truncated

    w, kept = grpo.importance_weights(proximal, behaviour, mask, mode="icepop", low=0.5, high=2.0)
    expect = torch.where(mask & (rho >= 0.5) & (rho <= 2.0), rho, torch.zeros(()))
    assert torch.allclose(w, expect)
    assert not kept[0, 3] and not kept[2, 0] and kept[1].all()

    geo = [math.exp(sum(float(proximal[i, t] - behaviour[i, t]) for t in range(5) if mask[i, t]) / int(mask[i].sum()))
           for i in range(3)]
    w, kept = grpo.importance_weights(proximal, behaviour, mask, mode="mis", cap=2.0)
    for i in range(3):
        dropped = geo[i] > 2.0
        assert bool((w[i] == 0).all()) == dropped, (i, geo[i])
        if not dropped:
            assert torch.allclose(w[i], torch.where(mask[i], rho[i].clamp(max=2.0), torch.zeros(())))
    assert geo[2] > 2.0 and geo[0] < 2.0  # row 2 is the one dropped

    w, kept = grpo.importance_weights(proximal, behaviour, mask, mode="geo_mask", low=0.9, high=1.1)
    for i in range(3):
        inside = 0.9 <= geo[i] <= 1.1
        assert torch.equal(w[i], (mask[i] & inside).float()), (i, geo[i])


def test_on_policy_samples_get_weight_one_in_every_mode():
    _, behaviour, mask = _case()
    for mode in grpo.IS_MODES:
        w, kept = grpo.importance_weights(behaviour.clone(), behaviour, mask, mode=mode)
        assert torch.equal(w, mask.float()) and torch.equal(kept, mask), mode


def test_bad_arguments_are_named():
    proximal, behaviour, mask = _case()
    with pytest.raises(ValueError, match="unknown off-policy correction"):
        grpo.importance_weights(proximal, behaviour, mask, mode="ppo")
    with pytest.raises(ValueError, match="cap must be >= 1"):
        grpo.importance_weights(proximal, behaviour, mask, mode="tis", cap=0.5)
    with pytest.raises(ValueError, match="0 < low <= 1 <= high"):
        grpo.importance_weights(proximal, behaviour, mask, mode="icepop", low=1.5)


def test_weights_scale_each_tokens_surrogate_and_its_gradient():
    proximal, behaviour, mask = _case()
    advantages = torch.tensor([1.0, -0.5, 0.3])
    w, _ = grpo.importance_weights(proximal, behaviour, mask, mode="tis", cap=2.0)
    logp = proximal.clone().requires_grad_(True)
    common = dict(beta=0.0, clip_eps_low=0.2, clip_eps_high=0.2, agg_mode="token_mean", num_sequences=3,
                  num_tokens=int(mask.sum()))
    loss, _ = grpo.grpo_loss(logp, proximal, None, advantages, mask, is_weights=w, **common)
    loss.backward()
    # Around the proximal policy the ratio is 1: d loss / d logp_t = -A_i w_t / num_tokens.
    expect = torch.where(mask, -advantages.unsqueeze(1) * w / int(mask.sum()), torch.zeros(()))
    assert torch.allclose(logp.grad, expect, atol=1e-6)
    plain = proximal.clone().requires_grad_(True)
    grpo.grpo_loss(plain, proximal, None, advantages, mask, **common)[0].backward()
    assert torch.allclose(plain.grad, torch.where(mask, -advantages.unsqueeze(1) / int(mask.sum()), torch.zeros(())))
    with pytest.raises(ValueError, match="must be detached"):
        grpo.grpo_loss(logp, proximal, None, advantages, mask, is_weights=w.clone().requires_grad_(True), **common)
