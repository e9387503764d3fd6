"""The one path from a causal LM's logits to per-token log-probs of its input.

The learner's GRPO role (training and ``sequence_logprobs``) and the reference actor
both read log-probs through ``input_logprobs``, so π_θ, π_θold (checked against the
sampler by ``logprob_gap``) and π_ref are the same function of the logits: the same
shift, the same float32 upcast, the same temperature, the same position convention.

Position convention (that of ``learner.batch.TrainBatch``): ``out[:, t]`` is the
log-probability of ``input_ids[:, t]`` given the tokens before it, so column 0 (which
nothing predicts) is 0. The response of a row whose prompt has ``p`` tokens starts at
column ``p``. Shape alphabet as in ``learner.grpo``: ``N`` sequences, ``T`` tokens,
``V`` vocabulary.

SFT's loss (``learner.sft.sft_loss``) takes the same ``grpo.token_logprobs`` on the
same shifted logits, at temperature 1, and also needs the logits for token accuracy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learner.grpo import token_logprobs

__all__ = ["input_logprobs", "model_logprobs"]


def input_logprobs(logits: Tensor, input_ids: Tensor, *, temperature: float) -> Tensor:
    """``logits`` ``[N, T, V]`` of a causal LM run on ``input_ids`` ``[N, T]`` → ``[N, T]``
    float32 log-probs of each input token at ``temperature``, column 0 set to 0.

    ``logits[:, t]`` scores token ``t + 1``; the logits are upcast to float32 before the
    softmax (``grpo.token_logprobs`` explains why the temperature applies here).
    """
    lp = token_logprobs(logits[:, :-1].float(), input_ids[:, 1:], temperature=temperature)  # [N, T-1]
    return torch.nn.functional.pad(lp, (1, 0))  # [N, T], column 0 predicts nothing


def model_logprobs(model, input_ids: Tensor, attention_mask: Tensor | None, *, temperature: float) -> Tensor:
    """``input_logprobs`` of ``model(input_ids, attention_mask).logits``: ``[N, T]``.

    ``model`` is any callable returning an object with ``.logits`` (a transformers causal
    LM, or a DeepSpeed engine wrapping one). Gradients flow unless the caller disables them.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [N, T, V]
    return input_logprobs(logits, input_ids, temperature=temperature)
