"""GRPO math as pure functions of tensors (DeepSeek-R1 §2.2.1, eq. 1-3).

Everything here is a function of tensors and Python numbers: no config objects, no
``torch.distributed``, no ``.item()`` (no host sync), no trainer state. Metrics come back
as detached tensors holding token-weighted *sums and counts*, so that the learner can add
them over micro-batches and all-reduce them over ranks exactly, then call ``finalize``.

Shape alphabet (used on every tensor line): ``B`` prompts, ``G`` samples per prompt,
``N = B*G`` sequences, ``T`` tokens (response positions, right-padded), ``V`` vocabulary.

The objective (DeepSeekMath eq. 3, which DeepSeek-R1 eq. 1 writes at sequence level)::

    J(θ) = E[ 1/G Σ_i 1/|o_i| Σ_t ( min(ρ_it A_i, clip(ρ_it, 1-ε_low, 1+ε_high) A_i)
                                    - β D_KL,it ) ]
    ρ_it = π_θ(o_it | q, o_i<t) / π_θold(o_it | q, o_i<t)

We minimise ``loss = -J``. Precision: inputs in bfloat16/float16 are upcast and the math
runs in float32 (float64 inputs stay float64); results come back in that compute dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AGG_MODES",
    "GRPOMetrics",
    "aggregate",
    "clipped_surrogate",
    "group_advantages",
    "grpo_loss",
    "importance_weights",
    "k3_kl",
    "kl_estimate",
    "overlong_penalty",
    "logprob_gap",
    "masked_mean",
    "token_logprobs",
]

AGG_MODES = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
IS_MODES = ("none", "tis", "mis", "icepop", "geo_mask")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _compute_dtype(t: Tensor) -> torch.dtype:
    # bf16 has an 8-bit mantissa: exp(Δlogp) and k3's cancellation near 0 are meaningless
    # in it, so the math always runs in at least float32.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes must match, got {shapes}")


# --------------------------------------------------------------------------- eq. 3


def group_advantages(
    rewards: Tensor,
    *,
    std_ddof: int,
    eps: float,
    scale_by_std: bool = True,
    valid: Tensor | None = None,
) -> Tensor:
    """Group-relative advantages, DeepSeek-R1 eq. 3: ``A_i = (r_i - mean(r)) / std(r)``.

    ``rewards`` is ``[B, G]`` (one row per prompt, one column per sample); returns ``[B, G]``
    in float32 (float64 for float64 input). Every token of sample ``i`` later gets ``A_i``.

    Conventions (the paper is silent on all of them; implementations differ):

    - ``std_ddof``: the std estimator's delta degrees of freedom. ``1`` is the unbiased
      sample std that ``torch.std`` gives by default, used by TRL's GRPOTrainer, verl's
      ``compute_grpo_outcome_advantage`` and OpenRLHF's ``group_norm``; ``0`` is the
      population std, the default of ``numpy.std``/``jax.numpy.std`` and therefore of
      ports written with them. For binary rewards ``[1, 0, 0, 1]``: ddof=1 gives
      ``A = ±0.866``, ddof=0 gives ``A = ±1``. Needs ``G > std_ddof``.
    - ``eps``: added to the std *outside* the square root, ``(r - mean) / (std + eps)``,
      as TRL (1e-4), verl (1e-6) and OpenRLHF (1e-9) do. It only matters for groups whose
      rewards are nearly but not exactly equal.
    - Identical rewards in a group (all right, all wrong, or ``G == 1``) give exactly
      zero advantages: such a group carries no learning signal. We set the zeros
      explicitly rather than trust ``0 / (0 + eps)``: ``mean`` of seven float32 ``0.1``s
      leaves a residual of ~7e-9 and a std of ~8e-9, so the bare formula with eps=1e-9
      would hand every sample ``A ≈ -0.8``.
    - ``scale_by_std=False`` returns ``r - mean`` (Dr. GRPO, Liu et al. 2025, "Understanding
      R1-Zero-Like Training": dividing by std up-weights too-easy and too-hard prompts);
      ``std_ddof`` and ``eps`` are then unused.
    - ``valid`` (``[B, G]`` bool, optional): samples whose reward is undefined (the
      reward could not grade them: an unparsable reference) are left out rather than
      scored 0. A left-out sample gets ``A = 0`` and takes no part in its group's mean
      and std: the statistics are those of the group's valid samples alone (``n`` of
      them, std with ``n - std_ddof`` in the denominator). Fewer than two valid samples
      count as identical rewards (zero advantages), so a group with no valid sample
      contributes nothing. With a mask the mean and variance are two-pass masked sums,
      equal to the unmasked ``torch.mean``/``torch.std`` up to rounding but not bit for
      bit: pass ``None`` (the default: every sample valid) when nothing is left out.
    """
    if rewards.dim() != 2:
        raise ValueError(
            f"rewards must be [B, G] (prompts x samples per prompt), got shape {tuple(rewards.shape)}; "
            "reshape a flat [B*G] tensor with rewards.view(-1, G)"
        )
    num_samples = rewards.shape[1]
    if std_ddof < 0:
        raise ValueError(f"std_ddof must be >= 0, got {std_ddof}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if scale_by_std and num_samples <= std_ddof:
        raise ValueError(
            f"a std with ddof={std_ddof} needs more than {std_ddof} samples per prompt, got G={num_samples}; "
            "sample more per prompt or pass scale_by_std=False"
        )
    if valid is not None:
        if valid.shape != rewards.shape or valid.dtype != torch.bool:
            raise ValueError(
                f"valid must be a bool tensor shaped like rewards {tuple(rewards.shape)}, "
                f"got {valid.dtype} {tuple(valid.shape)}"
            )
        return _masked_group_advantages(rewards, valid, std_ddof=std_ddof, eps=eps, scale_by_std=scale_by_std)
    r = rewards.to(_compute_dtype(rewards))  # [B, G]
    centered = r - r.mean(dim=1, keepdim=True)  # [B, G]
    if scale_by_std:
        std = r.std(dim=1, correction=std_ddof, keepdim=True)  # [B, 1]
        adv = centered / (std + eps)  # [B, G]
    else:
        adv = centered  # [B, G]
    identical = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)  # [B, 1]
    return torch.where(identical, torch.zeros_like(adv), adv)  # [B, G]


def _masked_group_advantages(
    rewards: Tensor, valid: Tensor, *, std_ddof: int, eps: float, scale_by_std: bool
) -> Tensor:
    """``group_advantages`` over the ``valid`` samples of each row; 0 elsewhere."""
    r = rewards.to(_compute_dtype(rewards))  # [B, G]
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    count = valid.sum(dim=1, keepdim=True).to(r.dtype)  # [B, 1] valid samples per group
    mean = torch.where(valid, r, zero).sum(dim=1, keepdim=True) / count.clamp(min=1)  # [B, 1]
    centered = torch.where(valid, r - mean, zero)  # [B, G]
    if scale_by_std:
        # Rows with count <= ddof have no std; they have < 2 valid samples and are zeroed below.
        var = (centered * centered).sum(dim=1, keepdim=True) / (count - std_ddof).clamp(min=1)  # [B, 1]
        adv = centered / (var.sqrt() + eps)  # [B, G]
    else:
        adv = centered  # [B, G]
    inf = torch.full((), float("inf"), dtype=r.dtype, device=r.device)
    highest = torch.where(valid, r, -inf).amax(dim=1, keepdim=True)  # [B, 1]
    lowest = torch.where(valid, r, inf).amin(dim=1, keepdim=True)  # [B, 1]
    identical = (highest == lowest) | (count < 2)  # [B, 1] includes rows with no valid sample
    return torch.where(identical | ~valid, torch.zeros_like(adv), adv)  # [B, G]


# --------------------------------------------------------------------------- eq. 2


def k3_kl(logp: Tensor, ref_logp: Tensor, *, log_ratio_clip: float | None = 20.0) -> Tensor:
    """Per-token KL estimate, DeepSeek-R1 eq. 2 (Schulman's "k3" estimator).

    ``D = π_ref/π_θ - log(π_ref/π_θ) - 1``, computed per token from log-probs of the
    sampled tokens: with ``x = ref_logp - logp``, ``D = exp(x) - x - 1``.
    ``logp``, ``ref_logp``: ``[N, T]``; returns ``[N, T]``.

    ``D >= 0`` everywhere (``exp(x) >= 1 + x``), ``D = 0`` where ``logp == ref_logp``, and
    under tokens sampled from π_θ its expectation is exactly KL(π_θ || π_ref) (unbiased,
    lower variance than ``-x``). Computed as ``expm1(x) - x``, which keeps the ``x²/2``
    behaviour near 0 instead of cancelling it against the ``- 1``.

    ``log_ratio_clip``: ``x`` is clamped to ``[-clip, clip]`` before the exp, so one token
    the reference finds far likelier cannot overflow the loss (``exp(20) ≈ 4.9e8``); the
    clamp also zeroes that token's KL gradient. 20 is verl's ``low_var_kl`` value (verl
    then also clamps D to [-10, 10]); TRL and OpenRLHF do not clamp. ``None`` disables it.
    """
    _check_same_shape(logp=logp, ref_logp=ref_logp)
    dtype = _compute_dtype(logp)
    log_ratio = ref_logp.to(dtype) - logp.to(dtype)  # [N, T]
    if log_ratio_clip is not None:
        if log_ratio_clip <= 0:
            raise ValueError(f"log_ratio_clip must be > 0 or None, got {log_ratio_clip}")
        log_ratio = log_ratio.clamp(-log_ratio_clip, log_ratio_clip)  # [N, T]
    return torch.expm1(log_ratio) - log_ratio  # [N, T]


def kl_estimate(logp: Tensor, ref_logp: Tensor, *, estimator: str = "k3",
                log_ratio_clip: float | None = 20.0) -> Tensor:
    """Per-token estimate of KL(π_θ || π_ref) from the sampled tokens' log-probs, by one of
    Schulman's estimators, with ``x = ref_logp - logp`` (clamped as in ``k3_kl``):

    - ``"k1"``: ``-x = log π_θ/π_ref``: unbiased, high variance, can be negative per token
      (the PPO-RLHF reward penalty);
    - ``"k2"``: ``x²/2``: biased (its gradient is that of a squared log-ratio), low variance,
      never negative;
    - ``"k3"``: ``e^x - x - 1``: unbiased and never negative (DeepSeek-R1 eq. 2; ``k3_kl``).

    ``logp``, ``ref_logp``: ``[N, T]``; returns ``[N, T]``.
    """
    if estimator == "k3":
        return k3_kl(logp, ref_logp, log_ratio_clip=log_ratio_clip)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")
    _check_same_shape(logp=logp, ref_logp=ref_logp)
    dtype = _compute_dtype(logp)
    x = ref_logp.to(dtype) - logp.to(dtype)  # [N, T]
    if log_ratio_clip is not None:
        x = x.clamp(-log_ratio_clip, log_ratio_clip)  # [N, T]
    return -x if estimator == "k1" else 0.5 * x * x  # [N, T]


def overlong_penalty(lengths: Tensor, *, max_tokens: int, buffer: int) -> Tensor:
    """DAPO's soft over-long punishment (Yu et al. 2025, eq. 13), added to a response's
    reward: 0 up to ``max_tokens - buffer`` tokens, then falling linearly to -1 at
    ``max_tokens`` (and -1 beyond). ``lengths``: ``[N]`` response tokens; returns ``[N]``.
    """
    if not 0 < buffer <= max_tokens:
        raise ValueError(f"need 0 < buffer <= max_tokens, got buffer={buffer}, max_tokens={max_tokens}")
    free = max_tokens - buffer
    over = (lengths.to(torch.float32) - free).clamp(min=0.0)  # [N]
    return -(over / buffer).clamp(max=1.0)  # [N]


# --------------------------------------------------------------------------- eq. 1


def _surrogate_parts(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_eps_low: float, clip_eps_high: float
) -> tuple[Tensor, Tensor, Tensor]:
    _check_same_shape(logp=logp, old_logp=old_logp)
    if logp.dim() != 2 or advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"expected logp [N, T] and advantages [N] (one per sequence), got "
            f"logp {tuple(logp.shape)} and advantages {tuple(advantages.shape)}"
        )
    if not 0.0 <= clip_eps_low < 1.0 or clip_eps_high < 0.0:
        raise ValueError(
            f"need 0 <= clip_eps_low < 1 and clip_eps_high >= 0, got {clip_eps_low}, {clip_eps_high}"
        )
    dtype = _compute_dtype(logp)
    adv = advantages.to(dtype).unsqueeze(1)  # [N, 1]
    ratio = torch.exp(logp.to(dtype) - old_logp.to(dtype))  # [N, T]
    unclipped = ratio * adv  # [N, T]
    clipped = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high) * adv  # [N, T]
    # Where the two are equal (ratio inside the range) torch.minimum sends half the
    # gradient to each branch, and both carry d(ratio)·A, so the gradient is exact.
    objective = torch.minimum(unclipped, clipped)  # [N, T]
    # Clipping is active (and the token's gradient zero) exactly where min() picked the
    # flat branch: A > 0 with ratio above 1+ε_high, or A < 0 with ratio below 1-ε_low.
    clip_active = ((adv > 0) & (ratio > 1.0 + clip_eps_high)) | (
        (adv < 0) & (ratio < 1.0 - clip_eps_low)
    )  # [N, T]
    return -objective, clip_active, ratio


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, *, clip_eps_low: float, clip_eps_high: float
) -> tuple[Tensor, Tensor]:
    """Per-token clipped surrogate, the min(...) of DeepSeek-R1 eq. 1, as a LOSS.

    ``loss_it = -min(ρ_it A_i, clip(ρ_it, 1 - ε_low, 1 + ε_high) A_i)`` with
    ``ρ_it = exp(logp_it - old_logp_it)``.

    ``logp`` (current policy, carries the gradient), ``old_logp`` (the policy that
    sampled, π_θold): ``[N, T]``. ``advantages``: ``[N]``, one per sequence, broadcast
    over its tokens. For a single pass per batch (μ = 1) pass ``old_logp = logp.detach()``:
    ρ = 1 and the gradient is the plain policy gradient.

    Returns ``(loss [N, T], clip_active [N, T] bool)``; ``clip_active`` marks tokens whose
    gradient the clip zeroed (A > 0 and ρ > 1+ε_high, or A < 0 and ρ < 1-ε_low), as
    TRL counts its low/high clip ratios; mask it before counting.

    Conventions: the paper has one ε (``clip_eps_low == clip_eps_high``). DAPO's
    "clip-higher" (Yu et al. 2025) raises only the upper bound (ε_low 0.2, ε_high 0.28) so
    low-probability tokens can grow. The ratio itself is not clamped: with A < 0 and
    ρ > 1+ε the loss is unbounded above, as in PPO (dual-clip is not implemented).
    """
    loss, clip_active, _ = _surrogate_parts(logp, old_logp, advantages, clip_eps_low, clip_eps_high)
    return loss, clip_active


# --------------------------------------------------------------------------- off-policy correction


def importance_weights(
    proximal_logp: Tensor,
    behaviour_logp: Tensor,
    mask: Tensor,
    *,
    mode: str,
    cap: float = 2.0,
    low: float = 0.5,
    high: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """Per-token weights that correct for samples drawn by another policy than the one the
    update is taken around: the rollout engine's (``behaviour_logp``: its log-probs of the
    sampled tokens, older weights when generation ran ahead, and another numeric stack even
    on the same weights) versus the learner's (``proximal_logp``: the learner's log-probs
    of the same tokens before this update, detached). ``[N, T]`` each, ``mask`` ``[N, T]``.

    With ``ρ_t = π_prox(o_t) / π_behav(o_t)`` per token, the modes are:

    - ``"none"``: every weight 1 (on-policy runs: the engine and the learner agree to ~1e-6
      in fp32, see ``logprob_gap``);
    - ``"tis"``: truncated IS, ``w_t = min(ρ_t, cap)`` (Yao et al. 2025, "Your efficient RL
      framework secretly brings you off-policy RL training"): unbiased up to the truncation,
      variance bounded by ``cap``;
    - ``"mis"``: sequence-level masked IS: a sequence whose geometric-mean ratio
      ``exp(mean_t log ρ_t)`` exceeds ``cap`` is dropped (all its weights 0); the tokens of
      the others get ``min(ρ_t, cap)``. The geometric mean, not the product, so that the
      test does not depend on the length (a product over thousands of tokens is 0 or ∞);
    - ``"icepop"``: two-sided token masking (IcePop, Ling team 2025): ``w_t = ρ_t`` where
      ``low <= ρ_t <= high``, else 0, so tokens the two stacks disagree on most give no
      gradient at all instead of a clipped one;
    - ``"geo_mask"``: two-sided sequence masking by the geometric-mean ratio: a sequence
      outside ``[low, high]`` is dropped, the others weigh 1 (rejection without reweighting).

    Why the default is TIS for runs that generate ahead (``grpo.max_staleness_steps > 0``)
    and none on-policy: generating ahead makes ``π_behav`` older than the learner by up to
    that many updates, and the clipped ratio ``π_θ/π_behav`` then clips most tokens of a
    stale sample. Taking the PPO ratio around the learner's own pre-update policy (AReaL's
    decoupled PPO) keeps the trust region where the update happens, and the truncated
    weight carries the rest of the correction with bounded variance; the masking modes trade
    a little bias (dropped tokens) for no large weights at all, which long traces with rare
    large mismatches may prefer.

    Returns ``(weights [N, T], kept [N, T] bool)``, both detached; masked-out positions of
    ``mask`` get weight 0 and ``kept`` False. ``kept`` marks the tokens not masked by the
    correction (for the ``masked_frac`` metric).
    """
    _check_same_shape(proximal_logp=proximal_logp, behaviour_logp=behaviour_logp, mask=mask)
    if mode not in IS_MODES:
        raise ValueError(f"unknown off-policy correction {mode!r}; choose one of {IS_MODES}")
    if not cap >= 1.0:
        raise ValueError(f"cap must be >= 1, got {cap}")
    if not 0.0 < low <= 1.0 <= high:
        raise ValueError(f"need 0 < low <= 1 <= high, got low={low}, high={high}")
    with torch.no_grad():
        keep = mask.bool()  # [N, T]
        dtype = _compute_dtype(proximal_logp)
        zero = torch.zeros((), dtype=dtype, device=proximal_logp.device)
        log_ratio = torch.where(keep, proximal_logp.to(dtype) - behaviour_logp.to(dtype), zero)  # [N, T]
        ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))  # [N, T]
        if mode == "none":
            weights = torch.ones_like(ratio)  # [N, T]
        elif mode == "tis":
            weights = ratio.clamp(max=cap)  # [N, T]
        elif mode == "icepop":
            weights = torch.where((ratio >= low) & (ratio <= high), ratio, zero)  # [N, T]
        else:
            tokens = keep.sum(dim=1).clamp(min=1).to(dtype)  # [N]
            geo = torch.exp((log_ratio.sum(dim=1) / tokens).clamp(-20.0, 20.0)).unsqueeze(1)  # [N, 1]
            if mode == "mis":
                weights = torch.where(geo <= cap, ratio.clamp(max=cap), zero)  # [N, T]
            else:  # geo_mask
                weights = torch.where((geo >= low) & (geo <= high), torch.ones_like(ratio), zero)  # [N, T]
        weights = torch.where(keep, weights, zero)  # [N, T]
        kept = keep & (weights > 0)  # [N, T]
    return weights, kept


# --------------------------------------------------------------------------- aggregation


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    *,
    mode: str,
    num_sequences: int | None,
    num_tokens: int | None,
    max_tokens: int | None = None,
) -> Tensor:
    """Reduce a per-token loss ``[N, T]`` to a scalar; ``mask`` ``[N, T]`` (bool or 0/1) marks
    the tokens that count (response tokens, not prompt or padding).

    Modes, with ``l_it`` the per-token loss and ``m_it`` the mask:

    - ``"seq_mean_token_mean"`` — DeepSeek-R1 eq. 1 / DeepSeekMath GRPO:
      ``Σ_i (Σ_t m_it l_it / |o_i|) / num_sequences`` with ``|o_i| = Σ_t m_it``. Every
      sequence weighs the same, so tokens of long responses weigh less. (verl
      ``seq-mean-token-mean``, TRL ``loss_type="grpo"``.)
    - ``"token_mean"`` — DAPO: ``Σ_it m_it l_it / num_tokens``. Every token weighs the
      same. (verl ``token-mean``, TRL ``"dapo"``.)
    - ``"seq_mean_token_sum_norm"`` — Dr. GRPO: ``Σ_it m_it l_it / (num_sequences *
      max_tokens)``, a per-sequence token *sum* divided by a constant instead of the
      response's own length, removing the length bias. ``max_tokens`` is the generation
      budget (``rollout.max_new_tokens``), one number for the whole run: not the padded
      width of a micro-batch, which varies with the split and includes the prompt.
      (verl ``seq-mean-token-sum-norm``, TRL ``"dr_grpo"``.)

    The normalisers are GLOBAL and passed in: ``num_sequences`` is the number of sequences
    and ``num_tokens`` the number of masked tokens in the whole optimizer batch, over all
    micro-batches and all ranks. Each mode is then a plain sum of per-sequence terms, so
    summing the results of any split of the batch (micro-batches, ranks; uneven, any
    padding) gives exactly the full-batch loss and gradient. Consequences for the caller:
    gradients must be SUMMED over micro-batches and ranks. DDP and DeepSpeed average
    across ranks (multiply the loss by the world size to undo it), and DeepSpeed divides
    the loss by ``gradient_accumulation_steps`` in ``backward`` (undo or disable that).
    A sequence must not be split across micro-batches or ranks (context parallelism would
    need ``|o_i|`` passed in). A sequence with no masked token (padding row) adds 0.

    Masked positions get zero gradient, but must hold finite values (pad log-probs with
    0, not -inf): a NaN there would leak through the backward pass.
    """
    _check_same_shape(per_token=per_token, mask=mask)
    if mode not in AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; choose one of {AGG_MODES}")
    needs = {
        "seq_mean_token_mean": {"num_sequences": num_sequences},
        "token_mean": {"num_tokens": num_tokens},
        "seq_mean_token_sum_norm": {"num_sequences": num_sequences, "max_tokens": max_tokens},
    }[mode]
    for name, value in needs.items():
        if value is None or value <= 0:
            raise ValueError(
                f"mode {mode!r} needs {name} as a positive int counted over the whole optimizer "
                f"batch (all micro-batches and ranks), got {value!r}"
            )
    keep = mask.bool()  # [N, T]
    x = per_token.to(_compute_dtype(per_token))  # [N, T]
    masked = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))  # [N, T]
    if mode == "seq_mean_token_mean":
        seq_len = keep.sum(dim=1).clamp(min=1).to(x.dtype)  # [N]
        return (masked.sum(dim=1) / seq_len).sum() / num_sequences
    if mode == "token_mean":
        return masked.sum() / num_tokens
    return masked.sum() / (num_sequences * max_tokens)


# --------------------------------------------------------------------------- helpers


def masked_mean(x: Tensor, mask: Tensor, *, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is set (``[N, T]`` each, any equal shape).

    ``dim=None`` reduces everything to a scalar; an int reduces that dim. An empty mask
    gives NaN (0/0), like ``torch.mean`` of nothing. Not for losses across micro-batches:
    use ``aggregate`` with global normalisers there.
    """
    _check_same_shape(x=x, mask=mask)
    keep = mask.bool()  # [N, T]
    xf = x.to(_compute_dtype(x))  # [N, T]
    masked = torch.where(keep, xf, torch.zeros((), dtype=xf.dtype, device=xf.device))  # [N, T]
    if dim is None:
        return masked.sum() / keep.sum().to(xf.dtype)
    return masked.sum(dim=dim) / keep.sum(dim=dim).to(xf.dtype)


def logprob_gap(logp_a: Tensor, logp_b: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute difference of two log-prob tensors ``[N, T]`` over masked tokens.

    Detached. Used to check the rollout engine's log-probs against the learner's for the
    same weights: a gap well above bf16 noise (~1e-2) means a mismatch (temperature,
    chat template, stale weights) and a biased importance ratio.
    """
    _check_same_shape(logp_a=logp_a, logp_b=logp_b)
    dtype = _compute_dtype(logp_a)
    return masked_mean((logp_a.detach().to(dtype) - logp_b.detach().to(dtype)).abs(), mask)


def token_logprobs(logits: Tensor, target_ids: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Log-probability of each target token: ``log softmax(logits / temperature)[target]``.

    ``logits`` ``[N, T, V]``, ``target_ids`` ``[N, T]`` (int) → ``[N, T]``, float32 (float64
    for float64 logits). ``logits[:, t]`` must be the scores *for* ``target_ids[:, t]``:
    shift before calling (``logits[:, :-1]`` with ``input_ids[:, 1:]``).

    Computed as ``logit[target] - logsumexp(logits)`` in float32: no full ``[N, T, V]``
    log-softmax is kept for backward, only the float32 copy of the logits.

    ``temperature``: the samples come from ``softmax(logits / temperature)``, so π_θ and
    π_θold in the importance ratio (and π_ref in the KL) are all taken at the sampling
    temperature: the learner divides its logits by it (verl and TRL do this); otherwise
    every ratio is off. Log-probs compared with the rollout engine's must be of the same
    distribution: vLLM returns temperature-scaled log-probs only with
    ``logprobs_mode="processed_logprobs"`` (which also applies top-k/top-p truncation);
    its default (``"raw_logprobs"``, checked in vLLM 0.32) is the unscaled model
    distribution, i.e. ``temperature=1`` here. Use 1.0 for SFT.
    """
    if logits.dim() != 3 or target_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [N, T, V] and target_ids [N, T], got {tuple(logits.shape)} and "
            f"{tuple(target_ids.shape)}"
        )
    if target_ids.is_floating_point():
        raise ValueError(f"target_ids must be an integer tensor, got {target_ids.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = logits.to(_compute_dtype(logits))  # [N, T, V]
    if temperature != 1.0:
        x = x / temperature  # [N, T, V]
    picked = x.gather(dim=-1, index=target_ids.long().unsqueeze(-1)).squeeze(-1)  # [N, T]
    return picked - torch.logsumexp(x, dim=-1)  # [N, T]


def token_entropy(logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Entropy of each position's distribution ``softmax(logits / temperature)``: ``[..., V]``
    → ``[...]``, float32, detached (a metric: how spread the policy still is)."""
    with torch.no_grad():
        x = logits.to(_compute_dtype(logits))
        if temperature != 1.0:
            x = x / temperature
        return torch.logsumexp(x, dim=-1) - (torch.softmax(x, dim=-1) * x).sum(-1)


# --------------------------------------------------------------------------- the loss


@dataclass(frozen=True)
class GRPOMetrics:
    """Detached scalar tensors (float64) of token-weighted sums and counts over masked tokens.

    Sums and counts, not means, so that micro-batches add (``a + b``) and ranks all-reduce
    (``to_tensor`` → ``all_reduce(SUM)`` → ``from_tensor``) exactly; ``finalize`` turns them
    into means. ``kl_sum`` is NaN when no reference log-probs were given (nothing measured).
    """

    token_count: Tensor  # [] masked tokens
    surrogate_sum: Tensor  # [] Σ per-token surrogate loss
    kl_sum: Tensor  # [] Σ per-token k3 KL (NaN without ref_logp)
    clip_low_count: Tensor  # [] tokens clipped at 1 - ε_low (A < 0)
    clip_high_count: Tensor  # [] tokens clipped at 1 + ε_high (A > 0)
    ratio_sum: Tensor  # [] Σ importance ratio π_θ / π_θold

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, Tensor) or value.dim() != 0 or value.requires_grad:
                raise ValueError(f"GRPOMetrics.{field.name} must be a detached 0-dim tensor, got {value!r}")

    def __add__(self, other: GRPOMetrics) -> GRPOMetrics:
        return GRPOMetrics.from_tensor(self.to_tensor() + other.to_tensor())

    def to_tensor(self) -> Tensor:
        """All fields stacked in declaration order, ``[F]`` float64, for one all-reduce."""
        return torch.stack([getattr(self, f.name).to(torch.float64) for f in dataclasses.fields(self)])

    @classmethod
    def from_tensor(cls, stacked: Tensor) -> GRPOMetrics:
        names = [f.name for f in dataclasses.fields(cls)]
        if stacked.shape != (len(names),):
            raise ValueError(f"expected a [{len(names)}] tensor of {names}, got {tuple(stacked.shape)}")
        return cls(**{name: stacked[i].detach() for i, name in enumerate(names)})

    def finalize(self) -> dict[str, Tensor]:
        """Token means: ``kl``, ``clip_frac`` (and its low/high parts), ``ratio_mean``,
        ``surrogate_loss``. Still tensors; the caller decides when to sync to host."""
        n = self.token_count
        return {
            "kl": self.kl_sum / n,
            "clip_frac": (self.clip_low_count + self.clip_high_count) / n,
            "clip_frac_low": self.clip_low_count / n,
            "clip_frac_high": self.clip_high_count / n,
            "ratio_mean": self.ratio_sum / n,
            "surrogate_loss": self.surrogate_sum / n,
        }


def _loss_metrics(mask: Tensor, advantages: Tensor, surrogate: Tensor, kl: Tensor | None, clip_active: Tensor,
                  ratio: Tensor) -> GRPOMetrics:
    """The detached token sums of one micro-batch (``grpo_loss``)."""
    with torch.no_grad():
        keep = mask.bool()  # [N, T]
        adv_sign = advantages.unsqueeze(1)  # [N, 1]

        def masked_sum(x: Tensor) -> Tensor:
            return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dtype=torch.float64)

        nan = torch.full((), float("nan"), dtype=torch.float64, device=mask.device)
        return GRPOMetrics(
            token_count=keep.sum(dtype=torch.float64),
            surrogate_sum=masked_sum(surrogate.detach()),
            kl_sum=nan if kl is None else masked_sum(kl.detach()),
            clip_low_count=(clip_active & keep & (adv_sign < 0)).sum(dtype=torch.float64),
            clip_high_count=(clip_active & keep & (adv_sign > 0)).sum(dtype=torch.float64),
            ratio_sum=masked_sum(ratio.detach()),
        )


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    beta: float,
    clip_eps_low: float,
    clip_eps_high: float,
    agg_mode: str,
    num_sequences: int | None,
    num_tokens: int | None,
    max_tokens: int | None = None,
    kl_log_ratio_clip: float | None = 20.0,
    is_weights: Tensor | None = None,
    kl_estimator: str = "k3",
) -> tuple[Tensor, GRPOMetrics]:
    """The GRPO loss, ``-J`` of DeepSeek-R1 eq. 1, for one micro-batch.

    ``per_token = clipped_surrogate(logp, old_logp, advantages) + beta * k3_kl(logp, ref_logp)``,
    reduced by ``aggregate(per_token, mask, mode=agg_mode, ...)``.

    ``logp``, ``old_logp``, ``ref_logp``, ``mask``: ``[N, T]``; ``advantages``: ``[N]``
    (from ``group_advantages``, flattened). ``ref_logp`` may be ``None`` only when
    ``beta == 0`` (no reference model, as DAPO and Dr. GRPO run); when given with
    ``beta == 0`` the KL is still measured for the metrics. The KL enters as a loss term
    (DeepSeekMath), not as a reward penalty (PPO-RLHF style).

    ``clip_eps_low/high``: see ``clipped_surrogate`` (the paper: both equal).
    ``agg_mode``, ``num_sequences``, ``num_tokens``, ``max_tokens``: see ``aggregate``;
    the normalisers count the whole optimizer batch, over micro-batches and ranks.
    ``kl_log_ratio_clip``: see ``k3_kl``; ``kl_estimator``: see ``kl_estimate`` (the paper: k3).
    ``is_weights``: ``[N, T]`` detached off-policy weights (``importance_weights``) that
    multiply each token's surrogate (not the KL term, which is taken under the current
    policy); None: all 1. ``old_logp`` is then the learner's own pre-update log-probs.

    Returns ``(loss, GRPOMetrics)``; the metrics are detached sums over masked tokens.
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (reference-model log-probs); pass them or set beta=0")
    _check_same_shape(logp=logp, mask=mask)

    surrogate, clip_active, ratio = _surrogate_parts(
        logp, old_logp, advantages, clip_eps_low, clip_eps_high
    )  # [N, T] each
    if is_weights is not None:
        _check_same_shape(logp=logp, is_weights=is_weights)
        if is_weights.requires_grad:
            raise ValueError("is_weights must be detached: they weigh tokens, they are not trained")
        surrogate = surrogate * is_weights.to(surrogate.dtype)  # [N, T]
    per_token = surrogate  # [N, T]
    kl = None
    if ref_logp is not None:
        if beta > 0:
            kl = kl_estimate(logp, ref_logp, estimator=kl_estimator, log_ratio_clip=kl_log_ratio_clip)  # [N, T]
            per_token = per_token + beta * kl  # [N, T]
        else:
            with torch.no_grad():
                kl = kl_estimate(logp, ref_logp, estimator=kl_estimator, log_ratio_clip=kl_log_ratio_clip)  # [N, T]
    loss = aggregate(
        per_token,
        mask,
        mode=agg_mode,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        max_tokens=max_tokens,
    )

    metrics = _loss_metrics(mask, advantages, surrogate, kl, clip_active, ratio)
    return loss, metrics
