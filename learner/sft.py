"""SFT loss as a pure function of tensors: masked next-token NLL (cold start §2.3.1,
rejection-sampling SFT §2.3.3, distillation §2.4).

The log-probs come from ``grpo.token_logprobs`` and the reduction from ``grpo.aggregate``,
so SFT and GRPO share one definition of both (and the same micro-batch/rank invariance:
pass global normalisers). Shape alphabet as in ``grpo``: ``N`` sequences, ``T`` tokens,
``V`` vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from learner.grpo import aggregate, token_logprobs

__all__ = ["SFTMetrics", "sft_loss", "sft_loss_from_logprobs"]


@dataclass(frozen=True)
class SFTMetrics:
    """Detached scalar tensors (float64) of sums and counts over loss tokens.

    Add over micro-batches (``a + b``), all-reduce over ranks (``to_tensor``/``from_tensor``),
    then ``finalize``. ``correct_count`` is NaN when only log-probs were given.
    """

    token_count: Tensor  # [] loss tokens
    nll_sum: Tensor  # [] Σ -log p(target)
    correct_count: Tensor  # [] tokens where argmax(logits) == target

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, Tensor) or value.dim() != 0 or value.requires_grad:
                raise ValueError(f"SFTMetrics.{field.name} must be a detached 0-dim tensor, got {value!r}")

    def __add__(self, other: SFTMetrics) -> SFTMetrics:
        return SFTMetrics.from_tensor(self.to_tensor() + other.to_tensor())

    def to_tensor(self) -> Tensor:
        """All fields stacked in declaration order, ``[F]`` float64, for one all-reduce."""
        return torch.stack([getattr(self, f.name).to(torch.float64) for f in dataclasses.fields(self)])

    @classmethod
    def from_tensor(cls, stacked: Tensor) -> SFTMetrics:
        names = [f.name for f in dataclasses.fields(cls)]
        if stacked.shape != (len(names),):
            raise ValueError(f"expected a [{len(names)}] tensor of {names}, got {tuple(stacked.shape)}")
        return cls(**{name: stacked[i].detach() for i, name in enumerate(names)})

    def finalize(self) -> dict[str, Tensor]:
        """Token means: ``nll``, ``perplexity = exp(nll)``, ``token_accuracy``."""
        nll = self.nll_sum / self.token_count
        return {"nll": nll, "perplexity": torch.exp(nll), "token_accuracy": self.correct_count / self.token_count}


def sft_loss_from_logprobs(
    logp: Tensor,
    loss_mask: Tensor,
    *,
    agg_mode: str,
    num_sequences: int | None,
    num_tokens: int | None,
    max_tokens: int | None = None,
) -> tuple[Tensor, SFTMetrics]:
    """Masked NLL from target-token log-probs ``logp`` ``[N, T]`` (from ``token_logprobs``).

    ``loss = aggregate(-logp, loss_mask, mode=agg_mode, ...)``. For use when the engine
    computes the log-probs itself; ``sft_loss`` is the usual entry point.
    """
    return _sft(-logp, loss_mask, None, agg_mode, num_sequences, num_tokens, max_tokens)


def sft_loss(
    logits: Tensor,
    target_ids: Tensor,
    loss_mask: Tensor,
    *,
    agg_mode: str,
    num_sequences: int | None,
    num_tokens: int | None,
    max_tokens: int | None = None,
) -> tuple[Tensor, SFTMetrics]:
    """Masked next-token negative log-likelihood.

    ``loss = aggregate(-log softmax(logits)[target_ids], loss_mask, mode=agg_mode, ...)``.

    ``logits`` ``[N, T, V]`` and ``target_ids`` ``[N, T]`` aligned as in ``token_logprobs``
    (``logits[:, :-1]`` with ``input_ids[:, 1:]``); ``loss_mask`` ``[N, T]`` is 1 on the
    response tokens to learn and 0 on prompt and padding (the prompt is conditioned on,
    not learned). Temperature is 1: SFT fits the model's own distribution.

    ``agg_mode`` (see ``grpo.aggregate``): ``"token_mean"`` is what Hugging Face's causal-LM
    loss, TRL's SFTTrainer and torchtune compute (every token weighs the same, so long
    examples weigh more); ``"seq_mean_token_mean"`` weighs every example the same.
    ``num_sequences``/``num_tokens`` count the whole optimizer batch (all micro-batches
    and ranks), which makes the summed micro-batch gradients equal the full-batch one.

    Returns ``(loss, SFTMetrics)`` with detached sums (NLL, token accuracy).
    """
    logp = token_logprobs(logits, target_ids)  # [N, T]
    with torch.no_grad():
        correct = logits.argmax(dim=-1) == target_ids  # [N, T]
    return _sft(-logp, loss_mask, correct, agg_mode, num_sequences, num_tokens, max_tokens)


def _sft(
    nll: Tensor,
    loss_mask: Tensor,
    correct: Tensor | None,
    agg_mode: str,
    num_sequences: int | None,
    num_tokens: int | None,
    max_tokens: int | None,
) -> tuple[Tensor, SFTMetrics]:
    loss = aggregate(
        nll, loss_mask, mode=agg_mode, num_sequences=num_sequences, num_tokens=num_tokens, max_tokens=max_tokens
    )
    with torch.no_grad():
        keep = loss_mask.bool()  # [N, T]
        zero = torch.zeros((), dtype=nll.dtype, device=nll.device)
        metrics = SFTMetrics(
            token_count=keep.sum(dtype=torch.float64),
            nll_sum=torch.where(keep, nll.detach(), zero).sum(dtype=torch.float64),
            correct_count=(
                torch.full((), float("nan"), dtype=torch.float64, device=nll.device)
                if correct is None
                else (correct & keep).sum(dtype=torch.float64)
            ),
        )
    return loss, metrics
