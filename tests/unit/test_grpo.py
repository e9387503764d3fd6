"""GRPO math (learner/grpo.py): hand computations, float64 loop references, sharding invariance."""

from __future__ import annotations

import math

import pytest
import torch

from learner.grpo import (
    AGG_MODES,
    GRPOMetrics,
    aggregate,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    k3_kl,
    logprob_gap,
    masked_mean,
    token_logprobs,
)

pytestmark = pytest.mark.unit

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# The math runs in float32 for bf16 inputs and the references are fed the bf16-rounded
# inputs, so bf16 needs only a little more slack than float32.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-3}
SHAPES_NT = [(1, 1), (3, 5), (8, 17)]


def close(actual: torch.Tensor, expected, tol: float) -> None:
    expected_t = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.detach().to(torch.float64), expected_t, rtol=tol, atol=tol)


def as_lists(t: torch.Tensor) -> list:
    return t.detach().to(torch.float64).tolist()


def random_mask(n: int, t: int, gen: torch.Generator) -> torch.Tensor:
    """Right-padded response mask: sequence i has a random length in [1, t]."""
    lengths = torch.randint(1, t + 1, (n,), generator=gen)  # [N]
    return torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)  # [N, T]


# ------------------------------------------------------------------ float64 loop references


def ref_advantages(rows, ddof, eps, scale):
    out = []
    for row in rows:
        g = len(row)
        mean = sum(row) / g
        if all(r == row[0] for r in row):
            out.append([0.0] * g)
        elif scale:
            std = math.sqrt(sum((r - mean) ** 2 for r in row) / (g - ddof))
            out.append([(r - mean) / (std + eps) for r in row])
        else:
            out.append([r - mean for r in row])
    return out


def ref_masked_advantages(rows, valid_rows, ddof, eps, scale):
    """Advantages over each row's valid samples alone; 0 for the others."""
    out = []
    for row, valid in zip(rows, valid_rows, strict=True):
        kept = [r for r, v in zip(row, valid, strict=True) if v]
        if len(kept) < 2:
            out.append([0.0] * len(row))
            continue
        adv = iter(ref_advantages([kept], ddof, eps, scale)[0])
        out.append([next(adv) if v else 0.0 for v in valid])
    return out


def ref_k3(logp, ref, clip):
    out = []
    for lp_row, rf_row in zip(logp, ref, strict=True):
        row = []
        for lp, rf in zip(lp_row, rf_row, strict=True):
            x = rf - lp
            if clip is not None:
                x = min(max(x, -clip), clip)
            row.append(math.exp(x) - x - 1.0)
        out.append(row)
    return out


def ref_surrogate(logp, old, adv, lo, hi):
    loss, clipped = [], []
    for lp_row, old_row, a in zip(logp, old, adv, strict=True):
        lrow, crow = [], []
        for lp, o in zip(lp_row, old_row, strict=True):
            ratio = math.exp(lp - o)
            lrow.append(-min(ratio * a, min(max(ratio, 1 - lo), 1 + hi) * a))
            crow.append((a > 0 and ratio > 1 + hi) or (a < 0 and ratio < 1 - lo))
        loss.append(lrow)
        clipped.append(crow)
    return loss, clipped


def ref_weights(mask, mode, n_seq, n_tok, max_tokens):
    """d(aggregate)/d(per_token[i][t]) for each position."""
    out = []
    for m_row in mask:
        length = max(sum(m_row), 1)
        if mode == "seq_mean_token_mean":
            w = 1.0 / (length * n_seq)
        elif mode == "token_mean":
            w = 1.0 / n_tok
        else:
            w = 1.0 / (n_seq * max_tokens)
        out.append([w if m else 0.0 for m in m_row])
    return out


def ref_aggregate(per_token, mask, mode, n_seq, n_tok, max_tokens):
    weights = ref_weights(mask, mode, n_seq, n_tok, max_tokens)
    return sum(
        w * x for w_row, x_row in zip(weights, per_token, strict=True) for w, x in zip(w_row, x_row, strict=True)
    )


def ref_grpo(logp, old, ref, adv, mask, beta, lo, hi, mode, n_seq, n_tok, max_tokens, clip):
    """Loss and analytic gradient d loss / d logp, by loops."""
    surr, clipped = ref_surrogate(logp, old, adv, lo, hi)
    kl = ref_k3(logp, ref, clip) if ref is not None else None
    per_token = [
        [s + (beta * kl[i][t] if beta else 0.0) for t, s in enumerate(row)] for i, row in enumerate(surr)
    ]
    weights = ref_weights(mask, mode, n_seq, n_tok, max_tokens)
    grad = []
    for i, row in enumerate(logp):
        grow = []
        for t, lp in enumerate(row):
            ratio = math.exp(lp - old[i][t])
            d_surr = 0.0 if clipped[i][t] else -adv[i] * ratio
            d_kl = 0.0
            if beta:
                x = ref[i][t] - lp
                d_kl = 0.0 if (clip is not None and abs(x) > clip) else beta * (1.0 - math.exp(x))
            grow.append(weights[i][t] * (d_surr + d_kl))
        grad.append(grow)
    return ref_aggregate(per_token, mask, mode, n_seq, n_tok, max_tokens), grad


def ref_token_logprobs(logits, targets, temperature):
    out = []
    for l_row, t_row in zip(logits, targets, strict=True):
        row = []
        for scores, target in zip(l_row, t_row, strict=True):
            scaled = [s / temperature for s in scores]
            top = max(scaled)
            lse = top + math.log(sum(math.exp(s - top) for s in scaled))
            row.append(scaled[target] - lse)
        out.append(row)
    return out


# ------------------------------------------------------------------ group_advantages (eq. 3)


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # [B=1, G=4]
    # mean = 2/4 = 0.5; deviations ±0.5, squared 0.25 each, sum 1.0
    # ddof=1: var = 1.0/3 = 0.3333, std = 0.5774 -> A = ±0.5/0.5774 = ±0.8660
    close(group_advantages(rewards, std_ddof=1, eps=0.0), [[0.8660254, -0.8660254, -0.8660254, 0.8660254]], 1e-6)
    # ddof=0: var = 1.0/4 = 0.25, std = 0.5 -> A = ±0.5/0.5 = ±1
    close(group_advantages(rewards, std_ddof=0, eps=0.0), [[1.0, -1.0, -1.0, 1.0]], 1e-6)
    # Dr. GRPO (no std): A = r - 0.5 = ±0.5
    close(group_advantages(rewards, std_ddof=1, eps=0.0, scale_by_std=False), [[0.5, -0.5, -0.5, 0.5]], 1e-6)


def test_group_advantages_eps_is_added_to_the_std():
    rewards = torch.tensor([[0.0, 2.0]])  # mean 1, deviations ±1
    # ddof=0: std = sqrt((1 + 1)/2) = 1; eps=1 outside the sqrt: A = ±1/(1 + 1) = ±0.5
    # (inside it would be ±1/sqrt(1 + 1) = ±0.7071)
    close(group_advantages(rewards, std_ddof=0, eps=1.0), [[-0.5, 0.5]], 1e-6)


def test_group_advantages_rows_are_independent():
    rewards = torch.tensor([[1.0, 0.0], [3.0, 1.0]])  # [B=2, G=2]
    # row 0: mean 0.5, ddof=1 std = sqrt(0.5/1) = 0.7071 -> ±0.5/0.7071 = ±0.7071
    # row 1: mean 2.0, ddof=1 std = sqrt(2/1) = 1.4142 -> ±1/1.4142 = ±0.7071
    close(group_advantages(rewards, std_ddof=1, eps=0.0), [[0.7071068, -0.7071068], [0.7071068, -0.7071068]], 1e-6)


def test_identical_rewards_give_zero_advantages():
    rewards = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.1, 0.1, 0.1]])  # [B=3, G=3]
    for ddof in (0, 1):
        for scale in (True, False):
            adv = group_advantages(rewards, std_ddof=ddof, eps=1e-9, scale_by_std=scale)
            assert torch.equal(adv, torch.zeros(3, 3))
    # seven float32 0.1s: mean leaves a ~1e-8 residual that a tiny eps would blow up
    sevens = torch.full((1, 7), 0.1, dtype=torch.float32)
    assert torch.equal(group_advantages(sevens, std_ddof=1, eps=1e-9), torch.zeros(1, 7))
    # a group of one is identical by definition (ddof=0 allows it)
    assert torch.equal(group_advantages(torch.tensor([[5.0], [2.0]]), std_ddof=0, eps=1e-6), torch.zeros(2, 1))


def test_group_advantages_leave_invalid_samples_out_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # [B=1, G=4]
    valid = torch.tensor([[True, True, False, True]])  # sample 2 could not be graded
    # valid rewards 1, 0, 1: n = 3, mean = 2/3 = 0.6667; deviations 0.3333, -0.6667, 0.3333,
    # squared 0.1111, 0.4444, 0.1111, sum 0.6667
    # ddof=1: var = 0.6667/(3 - 1) = 0.3333, std = 0.5774 -> A = 0.3333/0.5774 = 0.5774 and
    # -0.6667/0.5774 = -1.1547; the left-out sample gets 0
    want = [[0.5773503, -1.1547005, 0.0, 0.5773503]]
    close(group_advantages(rewards, std_ddof=1, eps=0.0, valid=valid), want, 1e-6)
    # ddof=0: var = 0.6667/3 = 0.2222, std = 0.4714 -> A = 0.7071, -1.4142
    close(group_advantages(rewards, std_ddof=0, eps=0.0, valid=valid), [[0.7071068, -1.4142136, 0.0, 0.7071068]], 1e-6)
    # Dr. GRPO (no std): A = r - 0.6667
    close(group_advantages(rewards, std_ddof=1, eps=0.0, scale_by_std=False, valid=valid),
          [[0.3333333, -0.6666667, 0.0, 0.3333333]], 1e-6)
    # Scored 0 instead (today's behaviour without a mask) it would pull the mean to 0.5:
    # A = ±0.8660, and the ungradable sample would be pushed down as if wrong.
    close(group_advantages(rewards, std_ddof=1, eps=0.0), [[0.8660254, -0.8660254, -0.8660254, 0.8660254]], 1e-6)
    # What a left-out sample scored does not matter.
    other = torch.tensor([[1.0, 0.0, 7.0, 1.0]])
    assert torch.equal(group_advantages(other, std_ddof=1, eps=0.0, valid=valid),
                       group_advantages(rewards, std_ddof=1, eps=0.0, valid=valid))


def test_group_advantages_with_too_few_valid_samples_are_zero():
    rewards = torch.tensor([[0.5, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])  # [B=3, G=3]
    valid = torch.tensor([
        [False, False, False],  # nothing gradable: the group contributes nothing
        [False, True, False],  # one valid sample: identical by definition
        [True, True, False],  # valid rewards 1, 1 are identical (the 0 is left out)
    ])  # fmt: skip
    for ddof in (0, 1):
        for scale in (True, False):
            adv = group_advantages(rewards, std_ddof=ddof, eps=1e-9, scale_by_std=scale, valid=valid)
            assert torch.equal(adv, torch.zeros(3, 3))


def test_group_advantages_all_valid_mask_matches_unmasked():
    gen = torch.Generator().manual_seed(5)
    rewards = torch.rand(4, 6, generator=gen)  # [B, G]
    everyone = torch.ones(4, 6, dtype=torch.bool)
    close(group_advantages(rewards, std_ddof=1, eps=1e-4, valid=everyone),
          group_advantages(rewards, std_ddof=1, eps=1e-4), 1e-6)
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        group_advantages(rewards, std_ddof=1, eps=1e-4, valid=everyone[:, :3])
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        group_advantages(rewards, std_ddof=1, eps=1e-4, valid=everyone.float())


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="more than 1 samples"):
        group_advantages(torch.tensor([[1.0], [0.0]]), std_ddof=1, eps=1e-6)
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        group_advantages(torch.tensor([1.0, 0.0]), std_ddof=1, eps=1e-6)
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.tensor([[1.0, 0.0]]), std_ddof=1, eps=-1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (3, 4), (5, 16)])
@pytest.mark.parametrize("ddof,eps,scale", [(1, 1e-6, True), (0, 1e-4, True), (1, 1e-6, False)])
def test_group_advantages_matches_loop(dtype, shape, ddof, eps, scale):
    gen = torch.Generator().manual_seed(0)
    binary = torch.randint(0, 2, shape, generator=gen).to(torch.float64)  # [B, G]
    partial = torch.rand(shape, generator=gen, dtype=torch.float64)  # [B, G]
    rewards = (binary + 0.5 * partial).to(dtype)  # [B, G]
    rewards[0] = rewards[0, 0]  # one identical group in every case
    adv = group_advantages(rewards, std_ddof=ddof, eps=eps, scale_by_std=scale)
    assert adv.shape == shape
    assert adv.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    close(adv, ref_advantages(as_lists(rewards), ddof, eps, scale), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 2), (4, 4), (6, 16)])
@pytest.mark.parametrize("ddof,eps,scale", [(1, 1e-6, True), (0, 1e-4, True), (1, 1e-6, False)])
def test_masked_group_advantages_match_loop(dtype, shape, ddof, eps, scale):
    gen = torch.Generator().manual_seed(1)
    binary = torch.randint(0, 2, shape, generator=gen).to(torch.float64)  # [B, G]
    partial = torch.rand(shape, generator=gen, dtype=torch.float64)  # [B, G]
    rewards = (binary + 0.5 * partial).to(dtype)  # [B, G]
    valid = torch.rand(shape, generator=gen) > 0.3  # [B, G]
    valid[0] = False  # a group with nothing gradable
    valid[1] = False
    valid[1, 0] = True  # a group with one gradable sample
    adv = group_advantages(rewards, std_ddof=ddof, eps=eps, scale_by_std=scale, valid=valid)
    assert adv.shape == shape
    assert adv.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    close(adv, ref_masked_advantages(as_lists(rewards), valid.tolist(), ddof, eps, scale), TOL[dtype])


# ------------------------------------------------------------------ k3_kl (eq. 2)


def test_k3_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.3]]))  # [N=1, T=3]
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.3]]))
    # token 0: x = log(0.25/0.5) = -0.6931, ratio 0.5: 0.5 + 0.6931 - 1 = 0.1931
    # token 1: x = log(0.5/0.25) = +0.6931, ratio 2.0: 2.0 - 0.6931 - 1 = 0.3069
    # token 2: x = 0, ratio 1: 1 - 0 - 1 = 0
    close(k3_kl(logp, ref), [[0.1931472, 0.3068528, 0.0]], 1e-6)


def test_k3_is_nonnegative_and_zero_at_equality():
    gen = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        logp = (-3 * torch.rand(16, 33, generator=gen)).to(dtype)  # [N, T]
        # large and tiny log-ratios: tiny ones are where exp(x) - x - 1 cancels
        for scale in (3.0, 1e-3, 1e-6):
            ref = (logp.double() + scale * torch.randn(16, 33, generator=gen, dtype=torch.float64)).to(dtype)
            assert (k3_kl(logp, ref) >= 0).all()
        same = k3_kl(logp, logp)
        assert torch.equal(same, torch.zeros_like(same))


def test_k3_clamps_the_log_ratio():
    logp = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)  # [N=1, T=2]
    ref = torch.tensor([[30.0, 5.0]], dtype=torch.float64)
    kl = k3_kl(logp, ref, log_ratio_clip=20.0)
    # token 0: x = 30 clamped to 20: e^20 - 20 - 1 = 485165174.41; token 1: e^5 - 5 - 1 = 142.4132
    close(kl, [[math.exp(20) - 21, math.exp(5) - 6]], 1e-10)
    kl.sum().backward()
    # clamped token: no gradient; token 1: d/dlogp (e^x - x - 1), x = ref - logp, is 1 - e^x = 1 - 148.41 = -147.41
    close(logp.grad, [[0.0, 1 - math.exp(5)]], 1e-10)
    unclamped = k3_kl(logp.detach(), ref, log_ratio_clip=None)
    close(unclamped, [[math.exp(30) - 31, math.exp(5) - 6]], 1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_NT)
def test_k3_matches_loop(dtype, shape):
    gen = torch.Generator().manual_seed(2)
    logp = (-4 * torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype)  # [N, T]
    ref = (-4 * torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype)  # [N, T]
    close(k3_kl(logp, ref, log_ratio_clip=3.0), ref_k3(as_lists(logp), as_lists(ref), 3.0), TOL[dtype])


# ------------------------------------------------------------------ clipped_surrogate (eq. 1)


def test_clipped_surrogate_by_hand_and_gradients():
    ratios = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.25], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0], dtype=torch.float64)  # [N=5]
    logp = torch.log(ratios).unsqueeze(1).requires_grad_(True)  # [N, T=1], old_logp = 0
    old = torch.zeros(5, 1, dtype=torch.float64)
    loss, clipped = clipped_surrogate(logp, old, adv, clip_eps_low=0.2, clip_eps_high=0.28)
    # seq 0: A=+1, ρ=1.5 > 1.28: min(1.5, 1.28) = 1.28 -> loss -1.28, clipped
    # seq 1: A=+1, ρ=0.5:         min(0.5, 0.8)  = 0.5  -> loss -0.5,  not clipped
    # seq 2: A=-1, ρ=1.5:         min(-1.5, -1.28) = -1.5 -> loss 1.5, not clipped (unbounded)
    # seq 3: A=-1, ρ=0.5 < 0.8:   min(-0.5, -0.8) = -0.8 -> loss 0.8,  clipped
    # seq 4: A=+1, ρ=1.25 inside [0.8, 1.28] (clip-higher lets it grow): loss -1.25
    close(loss, [[-1.28], [-0.5], [1.5], [0.8], [-1.25]], 1e-12)
    assert clipped.squeeze(1).tolist() == [True, False, False, True, False]
    loss.sum().backward()
    # d loss / d logp = -A ρ where not clipped, 0 where clipped:
    # seq 1: -1 * 0.5 = -0.5; seq 2: +1 * 1.5 = 1.5; seq 4: -1.25
    close(logp.grad, [[0.0], [-0.5], [1.5], [0.0], [-1.25]], 1e-12)


def test_clipped_surrogate_symmetric_eps_and_zero_advantage():
    logp = torch.log(torch.tensor([[1.25, 0.7]], dtype=torch.float64))  # [N=1, T=2]
    old = torch.zeros(1, 2, dtype=torch.float64)
    # eps 0.2 both sides, A=+2: token 0 ρ=1.25 > 1.2 -> min(2.5, 2.4) = 2.4, clipped;
    # token 1 ρ=0.7 -> min(1.4, 1.6) = 1.4, not clipped
    loss, clipped = clipped_surrogate(logp, old, torch.tensor([2.0]), clip_eps_low=0.2, clip_eps_high=0.2)
    close(loss, [[-2.4, -1.4]], 1e-12)
    assert clipped.tolist() == [[True, False]]
    # A = 0: loss 0, never counted as clipped
    loss, clipped = clipped_surrogate(logp, old, torch.tensor([0.0]), clip_eps_low=0.2, clip_eps_high=0.2)
    close(loss, [[0.0, 0.0]], 1e-12)
    assert not clipped.any()


def test_clipped_surrogate_on_policy_gradient_is_minus_advantage():
    # μ = 1: old_logp = logp.detach() -> ρ = 1, gradient = -A per token
    logp = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    loss, clipped = clipped_surrogate(logp, logp.detach(), adv, clip_eps_low=0.2, clip_eps_high=0.2)
    loss.sum().backward()
    assert not clipped.any()
    close(logp.grad, (-adv).unsqueeze(1).expand(3, 4), 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_NT)
def test_clipped_surrogate_matches_loop(dtype, shape):
    gen = torch.Generator().manual_seed(3)
    n, _ = shape
    logp = (-2 * torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype)  # [N, T]
    old = (logp.double() + 0.4 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)  # [N, T]
    adv = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)  # [N]
    loss, clipped = clipped_surrogate(logp, old, adv, clip_eps_low=0.2, clip_eps_high=0.28)
    want_loss, want_clipped = ref_surrogate(as_lists(logp), as_lists(old), as_lists(adv), 0.2, 0.28)
    close(loss, want_loss, TOL[dtype])
    assert clipped.tolist() == want_clipped


# ------------------------------------------------------------------ aggregate


def test_aggregate_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])  # [N=2, T=3]
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # GRPO: per-sequence means 6/3 = 2 and 4/1 = 4, mean over 2 sequences -> 3
    close(aggregate(per_token, mask, mode="seq_mean_token_mean", num_sequences=2, num_tokens=None), 3.0, 1e-6)
    # DAPO: (1 + 2 + 3 + 4) / 4 tokens = 2.5
    close(aggregate(per_token, mask, mode="token_mean", num_sequences=None, num_tokens=4), 2.5, 1e-6)
    # Dr. GRPO: (6 + 4) / (2 sequences * 4 max tokens) = 1.25
    close(
        aggregate(per_token, mask, mode="seq_mean_token_sum_norm", num_sequences=2, num_tokens=None, max_tokens=4),
        1.25,
        1e-6,
    )
    # global normalisers: this is half of a 4-sequence, 8-token batch -> 6/4 = 1.5 and 10/8 = 1.25
    close(aggregate(per_token, mask, mode="seq_mean_token_mean", num_sequences=4, num_tokens=None), 1.5, 1e-6)
    close(aggregate(per_token, mask, mode="token_mean", num_sequences=None, num_tokens=8), 1.25, 1e-6)


def test_aggregate_empty_row_adds_zero():
    per_token = torch.tensor([[1.0, 3.0], [7.0, 7.0]])  # [N=2, T=2]
    mask = torch.tensor([[1, 1], [0, 0]])  # second row is padding
    # (4/2 + 0) / 2 = 1.0, no NaN from 0/0
    close(aggregate(per_token, mask, mode="seq_mean_token_mean", num_sequences=2, num_tokens=None), 1.0, 1e-6)


def test_aggregate_rejects_bad_arguments():
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="unknown aggregation mode"):
        aggregate(x, m, mode="mean", num_sequences=2, num_tokens=6)
    with pytest.raises(ValueError, match="num_tokens"):
        aggregate(x, m, mode="token_mean", num_sequences=2, num_tokens=None)
    with pytest.raises(ValueError, match="num_sequences"):
        aggregate(x, m, mode="seq_mean_token_mean", num_sequences=0, num_tokens=6)
    with pytest.raises(ValueError, match="max_tokens"):
        aggregate(x, m, mode="seq_mean_token_sum_norm", num_sequences=2, num_tokens=6)
    with pytest.raises(ValueError, match="shapes must match"):
        aggregate(x, torch.ones(2, 4), mode="token_mean", num_sequences=2, num_tokens=6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_NT)
@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_matches_loop(dtype, shape, mode):
    gen = torch.Generator().manual_seed(4)
    per_token = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)  # [N, T]
    mask = random_mask(*shape, gen)  # [N, T]
    n_seq, n_tok, max_tokens = shape[0] + 2, int(mask.sum()) + 5, shape[1] + 3
    got = aggregate(per_token, mask, mode=mode, num_sequences=n_seq, num_tokens=n_tok, max_tokens=max_tokens)
    want = ref_aggregate(as_lists(per_token), mask.tolist(), mode, n_seq, n_tok, max_tokens)
    close(got, want, TOL[dtype])


# ------------------------------------------------------------------ helpers


def test_masked_mean_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    # (1 + 3 + 6) / 3 = 3.3333; per row: (1 + 3)/2 = 2, 6/1 = 6
    close(masked_mean(x, mask), 10 / 3, 1e-6)
    close(masked_mean(x, mask, dim=1), [2.0, 6.0], 1e-6)
    assert torch.isnan(masked_mean(x, torch.zeros(2, 3)))


def test_logprob_gap_by_hand():
    a = torch.tensor([[0.0, -1.0, -2.0]], requires_grad=True)
    b = torch.tensor([[0.1, -1.3, -9.0]])
    mask = torch.tensor([[1, 1, 0]])
    # |0 - 0.1| = 0.1, |-1 + 1.3| = 0.3, third masked: (0.1 + 0.3) / 2 = 0.2
    gap = logprob_gap(a, b, mask)
    close(gap, 0.2, 1e-6)
    assert not gap.requires_grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_NT)
def test_masked_mean_and_gap_match_loop(dtype, shape):
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)  # [N, T]
    b = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)  # [N, T]
    mask = random_mask(*shape, gen)  # [N, T]
    pairs = [(x, y, m) for xr, yr, mr in zip(as_lists(a), as_lists(b), mask.tolist()) for x, y, m in zip(xr, yr, mr)]
    count = sum(m for _, _, m in pairs)
    close(masked_mean(a, mask), sum(x for x, _, m in pairs if m) / count, TOL[dtype])
    close(logprob_gap(a, b, mask), sum(abs(x - y) for x, y, m in pairs if m) / count, TOL[dtype])


def test_token_logprobs_by_hand():
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]]))  # [N=1, T=2, V=3]
    targets = torch.tensor([[2, 0]])
    # softmax = [1/6, 2/6, 3/6]: log(3/6) = -0.6931, log(1/6) = -1.7918
    close(token_logprobs(logits, targets), [[-0.6931472, -1.7917595]], 1e-6)
    # temperature 2: probs ∝ [1, √2, √3] = [1, 1.4142, 1.7321], sum 4.1463
    # log(1.7321 / 4.1463) = -0.8729; log(1 / 4.1463) = -1.4222
    close(token_logprobs(logits, targets, temperature=2.0), [[-0.8729016, -1.4222077]], 1e-6)


def test_token_logprobs_rejects_bad_input():
    logits = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="integer"):
        token_logprobs(logits, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\[N, T, V\]"):
        token_logprobs(logits, torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_NT)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_logprobs_matches_loop(dtype, shape, temperature):
    gen = torch.Generator().manual_seed(6)
    vocab = 11
    logits = (3 * torch.randn(*shape, vocab, generator=gen, dtype=torch.float64)).to(dtype)  # [N, T, V]
    targets = torch.randint(0, vocab, shape, generator=gen)  # [N, T]
    got = token_logprobs(logits, targets, temperature=temperature)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    close(got, ref_token_logprobs(as_lists(logits), targets.tolist(), temperature), TOL[dtype])


# ------------------------------------------------------------------ grpo_loss


def test_grpo_loss_by_hand():
    # N=2 sequences, T=2; ρ = 1 everywhere (old = logp); seq 1 has one real token
    logp = torch.log(torch.tensor([[0.5, 0.4], [0.3, 0.9]], dtype=torch.float64))  # [N, T]
    ref = logp.clone()
    ref[0, 0] = math.log(0.25)  # x = log(0.25/0.5) = -0.6931 -> k3 = 0.1931
    adv = torch.tensor([1.0, -0.5], dtype=torch.float64)  # [N]
    mask = torch.tensor([[1, 1], [1, 0]])
    # per-token: surrogate -A ρ = [[-1, -1], [0.5, pad]]; + 0.1 * kl -> [[-0.980685, -1], [0.5, pad]]
    common = dict(beta=0.1, clip_eps_low=0.2, clip_eps_high=0.2, num_sequences=2, num_tokens=3)
    loss, metrics = grpo_loss(logp, logp, ref, adv, mask, agg_mode="seq_mean_token_mean", **common)
    # ((-0.980685 - 1)/2 + 0.5/1) / 2 = (-0.9903426 + 0.5) / 2 = -0.2451713
    close(loss, -0.2451713, 1e-6)
    loss, _ = grpo_loss(logp, logp, ref, adv, mask, agg_mode="token_mean", **common)
    # (-0.980685 - 1 + 0.5) / 3 = -0.4935617
    close(loss, -0.4935617, 1e-6)
    # metrics: 3 tokens, Σkl = 0.1931, Σ surrogate = -1 - 1 + 0.5 = -1.5, Σρ = 3, no clipping
    final = metrics.finalize()
    close(metrics.token_count, 3.0, 0)
    close(final["kl"], 0.1931472 / 3, 1e-6)
    close(final["surrogate_loss"], -0.5, 1e-12)
    close(final["ratio_mean"], 1.0, 1e-12)
    close(final["clip_frac"], 0.0, 0)


def test_grpo_loss_clip_metrics_by_hand():
    # ρ per token: [1.5, 0.5] for A=+1 and [0.5, 1.5] for A=-1, eps 0.2
    logp = torch.log(torch.tensor([[1.5, 0.5], [0.5, 1.5]]))  # [N=2, T=2]
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    loss, m = grpo_loss(
        logp, old, None, adv, torch.ones(2, 2), beta=0.0, clip_eps_low=0.2, clip_eps_high=0.2,
        agg_mode="token_mean", num_sequences=2, num_tokens=4,
    )  # fmt: skip
    # clipped: (A=+1, ρ=1.5) high and (A=-1, ρ=0.5) low -> clip_frac 2/4, low 1/4, high 1/4
    f = m.finalize()
    close(f["clip_frac"], 0.5, 0)
    close(f["clip_frac_low"], 0.25, 0)
    close(f["clip_frac_high"], 0.25, 0)
    # Σρ = 1.5 + 0.5 + 0.5 + 1.5 = 4 -> mean 1; loss = (-1.2 - 0.5 + 0.8 + 1.5)/4 = 0.15
    close(f["ratio_mean"], 1.0, 1e-6)
    close(loss, 0.15, 1e-6)
    assert torch.isnan(f["kl"])  # no reference model: nothing measured


def test_grpo_loss_kl_handling():
    logp = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    ref = logp.detach() + 0.5
    common = dict(
        clip_eps_low=0.2, clip_eps_high=0.2, agg_mode="token_mean", num_sequences=2, num_tokens=6
    )
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(logp, logp.detach(), None, torch.ones(2), torch.ones(2, 3), beta=0.1, **common)
    with pytest.raises(ValueError, match="beta"):
        grpo_loss(logp, logp.detach(), ref, torch.ones(2), torch.ones(2, 3), beta=-0.1, **common)
    # beta = 0 with a reference: KL measured, loss unchanged
    with_ref, m = grpo_loss(logp, logp.detach(), ref, torch.ones(2), torch.ones(2, 3), beta=0.0, **common)
    without, _ = grpo_loss(logp, logp.detach(), None, torch.ones(2), torch.ones(2, 3), beta=0.0, **common)
    assert torch.equal(with_ref, without)
    close(m.finalize()["kl"], math.exp(0.5) - 1.5, 1e-12)  # every token: x = 0.5


def test_grpo_metrics_are_detached_tensors():
    logp = torch.randn(2, 3, requires_grad=True)
    _, m = grpo_loss(
        logp, logp.detach(), logp.detach(), torch.ones(2), torch.ones(2, 3), beta=0.1, clip_eps_low=0.2,
        clip_eps_high=0.2, agg_mode="token_mean", num_sequences=2, num_tokens=6,
    )  # fmt: skip
    for value in list(m.to_tensor()) + list(m.finalize().values()):
        assert isinstance(value, torch.Tensor) and not value.requires_grad
    with pytest.raises(ValueError, match="detached"):
        GRPOMetrics(**{name: torch.zeros((), requires_grad=True) for name in GRPOMetrics.__dataclass_fields__})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_NT)
@pytest.mark.parametrize("mode", AGG_MODES)
def test_grpo_loss_and_gradient_match_loop(dtype, shape, mode):
    gen = torch.Generator().manual_seed(7)
    n, t = shape
    logp = (-2 * torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype)  # [N, T]
    old = (logp.double() + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)  # [N, T]
    ref = (logp.double() + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)  # [N, T]
    adv = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)  # [N]
    mask = random_mask(n, t, gen)  # [N, T]
    n_tok, max_tokens = int(mask.sum()), t + 2
    logp.requires_grad_(True)
    loss, _ = grpo_loss(
        logp, old, ref, adv, mask, beta=0.04, clip_eps_low=0.2, clip_eps_high=0.28, agg_mode=mode,
        num_sequences=n, num_tokens=n_tok, max_tokens=max_tokens, kl_log_ratio_clip=20.0,
    )  # fmt: skip
    loss.backward()
    want_loss, want_grad = ref_grpo(
        as_lists(logp), as_lists(old), as_lists(ref), as_lists(adv), mask.tolist(),
        0.04, 0.2, 0.28, mode, n, n_tok, max_tokens, 20.0,
    )  # fmt: skip
    close(loss, want_loss, TOL[dtype])
    # bf16: the gradient itself is rounded to bf16 on its way back into logp
    close(logp.grad, want_grad, 1e-2 if dtype == torch.bfloat16 else TOL[dtype])


# ------------------------------------------------------------------ sharding invariance (STYLE rule 5)


def _sharding_batch():
    """Six sequences of varying lengths, garbage (but finite) values at padded positions."""
    gen = torch.Generator().manual_seed(8)
    lengths = [3, 7, 1, 5, 2, 6]
    n, t = len(lengths), max(lengths)
    mask = torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # [N, T]
    logp = -2 * torch.rand(n, t, generator=gen, dtype=torch.float64)  # [N, T]
    old = logp + 0.3 * torch.randn(n, t, generator=gen, dtype=torch.float64)  # [N, T]
    ref = logp + 0.3 * torch.randn(n, t, generator=gen, dtype=torch.float64)  # [N, T]
    logp = torch.where(mask, logp, torch.full_like(logp, 7.0))  # padding: finite junk
    rewards = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)  # [B=2, G=3]
    adv = group_advantages(rewards, std_ddof=1, eps=1e-6).reshape(-1)  # [B*G]
    return logp, old, ref, adv, mask, lengths


def _loss_on(rows, logp_leaf, old, ref, adv, mask, lengths, mode, beta, n_seq, n_tok, max_tokens):
    """Loss of one micro-batch holding `rows`, trimmed to its own longest sequence."""
    t = max(lengths[i] for i in rows)
    idx = torch.tensor(rows)
    return grpo_loss(
        logp_leaf[idx, :t], old[idx, :t], ref[idx, :t], adv[idx], mask[idx, :t],
        beta=beta, clip_eps_low=0.2, clip_eps_high=0.28, agg_mode=mode,
        num_sequences=n_seq, num_tokens=n_tok, max_tokens=max_tokens,
    )  # fmt: skip


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batch_and_rank_splits_give_the_full_batch_gradient(mode, beta):
    logp, old, ref, adv, mask, lengths = _sharding_batch()
    n_seq, n_tok, max_tokens = len(lengths), int(mask.sum()), 8

    full_leaf = logp.clone().requires_grad_(True)
    full_loss, full_metrics = _loss_on(
        list(range(6)), full_leaf, old, ref, adv, mask, lengths, mode, beta, n_seq, n_tok, max_tokens
    )
    full_loss.backward()
    # padded positions (and the 7.0 junk there) get exactly zero gradient
    assert torch.equal(full_leaf.grad[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
    assert (full_leaf.grad[mask] != 0).any()

    splits = {
        "micro-batches 1+3+2": [[[0], [1, 2, 3], [4, 5]]],
        "2 ranks x uneven micro-batches": [[[0, 1], [2]], [[3], [4, 5]]],
        "3 ranks, shuffled": [[[5, 2]], [[0], [4]], [[3, 1]]],
    }
    for name, ranks in splits.items():
        rank_grads, rank_losses, rank_metrics = [], [], []
        for micro_batches in ranks:
            leaf = logp.clone().requires_grad_(True)  # one replica per rank
            loss_sum = torch.zeros((), dtype=torch.float64)
            metrics = None
            for rows in micro_batches:
                loss, m = _loss_on(rows, leaf, old, ref, adv, mask, lengths, mode, beta, n_seq, n_tok, max_tokens)
                loss.backward()  # gradient accumulation: .grad sums over micro-batches
                loss_sum = loss_sum + loss.detach()
                metrics = m if metrics is None else metrics + m
            rank_grads.append(leaf.grad)
            rank_losses.append(loss_sum)
            rank_metrics.append(metrics.to_tensor())
        # all-reduce(SUM) over ranks
        torch.testing.assert_close(sum(rank_grads), full_leaf.grad, rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(sum(rank_losses), full_loss.detach(), rtol=0, atol=1e-6, msg=name)
        summed = GRPOMetrics.from_tensor(sum(rank_metrics))
        torch.testing.assert_close(summed.to_tensor(), full_metrics.to_tensor(), rtol=0, atol=1e-9, msg=name)
