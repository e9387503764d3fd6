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

from learner.grpo import token_entropy, token_logprobs

__all__ = ["chunked_input_logprobs", "input_logprobs", "model_logprobs"]


def input_logprobs(logits: Tensor, input_ids: Tensor, *, temperature: float) -> Tensor:
    """``logits`` ``[N, T, V]`` of a causal LM run on ``input_ids`` ``[N, T]`` → ``[N, T]``
    float32 log-probs of each input token at ``temperature``, column 0 set to 0.

    ``logits[:, t]`` scores token ``t + 1``; the logits are upcast to float32 before the
    softmax (``grpo.token_logprobs`` explains why the temperature applies here).
    """
    lp = token_logprobs(logits[:, :-1].float(), input_ids[:, 1:], temperature=temperature)  # [N, T-1]
    return torch.nn.functional.pad(lp, (1, 0))  # [N, T], column 0 predicts nothing


def model_logprobs(model, input_ids: Tensor, attention_mask: Tensor | None, *, temperature: float,
                   chunk_tokens: int = 0, position_ids: Tensor | None = None) -> Tensor:
    """Per-token log-probs ``[N, T]`` of ``input_ids`` under ``model``: the one function the
    GRPO role (training and ``sequence_logprobs``) and the reference actor call.

    ``model`` is a transformers causal LM, or anything called like one that also has
    ``get_output_embeddings()`` (``learner.engine.Engine``). ``chunk_tokens`` 0 takes the
    full float32 logits ``[N, T, V]`` (``input_logprobs``); ``chunk_tokens`` > 0 asks the
    model for its final hidden states instead (its own LM head then runs on one position
    only) and applies the head ``chunk_tokens`` positions at a time
    (``chunked_input_logprobs``): O(chunk_tokens × V) memory, the same float32 math. Not
    under ZeRO-3 (``LearnerConfig`` says why).
    ``position_ids`` (with ``attention_mask`` None) runs packed rows: ``learner.batch.pack_rows``.
    Gradients flow unless the caller disables them.
    """
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    if position_ids is not None:
        inputs.update(position_ids=position_ids, use_cache=False)  # no cache: transformers reads packing from positions
    if not chunk_tokens:
        logits = model(**inputs).logits  # [N, T, V]
        return input_logprobs(logits, input_ids, temperature=temperature)
    # The last hidden states come after the final norm: what the head reads (tested).
    hidden = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]  # [N, T, H]
    head = model.get_output_embeddings()
    lp, _ = _chunked(hidden, head, input_ids, temperature=temperature, chunk_tokens=chunk_tokens,
                     head_trains=any(p.requires_grad for p in head.parameters()), entropy=False)
    return lp


def chunked_input_logprobs(hidden: Tensor, head_weight: Tensor, input_ids: Tensor, *, temperature: float,
                           chunk_tokens: int, head_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``input_logprobs`` from the last hidden states instead of the logits: the LM head
    is applied ``chunk_tokens`` positions at a time, and each chunk's logits are recomputed
    in the backward pass (``torch.utils.checkpoint``) rather than kept, so peak memory is
    O(chunk_tokens × V) instead of O(N × T × V). Exact: the same float32 math per position.

    ``hidden`` ``[N, T, H]`` (the model's final hidden states), ``head_weight`` ``[V, H]``
    (and ``head_bias`` ``[V]``, if the head has one), ``input_ids`` ``[N, T]``. Returns
    ``(log-probs [N, T], entropy [N, T])``: log-probs as ``input_logprobs`` (column 0 is 0),
    and the entropy of each position's distribution at ``temperature`` (detached, a metric).
    """
    def head(x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, head_weight, head_bias)  # [C, V]

    trains = head_weight.requires_grad or (head_bias is not None and head_bias.requires_grad)
    lp, ent = _chunked(hidden, head, input_ids, temperature=temperature, chunk_tokens=chunk_tokens,
                       head_trains=trains, entropy=True)
    return lp, ent


def _chunked(hidden: Tensor, head, input_ids: Tensor, *, temperature: float, chunk_tokens: int,
             head_trains: bool, entropy: bool) -> tuple[Tensor, Tensor | None]:
    """``chunked_input_logprobs`` with the LM head as a callable ``[C, H] → [C, V]`` (a
    model's own head module, bias and all). ``head_trains``: whether the head's
    weights need gradients (then each chunk is recomputed in backward even when the hidden
    states need none). ``entropy`` False returns None for it: its temporaries (two more
    ``[C, V]`` tensors, in forward and again in the recomputation) are a third of the peak."""
    from torch.utils.checkpoint import checkpoint

    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.dim() != 3 or input_ids.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden [N, T, H] and input_ids [N, T], got {tuple(hidden.shape)} and "
                         f"{tuple(input_ids.shape)}")
    n, t, h = hidden.shape
    states = hidden[:, :-1].reshape(-1, h)  # [N*(T-1), H]: position t predicts token t + 1
    targets = input_ids[:, 1:].reshape(-1)  # [N*(T-1)]

    def piece(x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        logits = head(x)[None]  # [1, C, V]
        lp = token_logprobs(logits, y[None], temperature=temperature)[0]  # [C]
        return (lp, token_entropy(logits, temperature=temperature)[0]) if entropy else (lp,)  # [C] each

    lps, ents = [], []
    for start in range(0, states.shape[0], chunk_tokens):
        x, y = states[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if torch.is_grad_enabled() and (x.requires_grad or head_trains):
            out = checkpoint(piece, x, y, use_reentrant=False)
        else:
            out = piece(x, y)
        lps.append(out[0])
        ents.extend(e.detach() for e in out[1:])
    lp = torch.nn.functional.pad(torch.cat(lps).reshape(n, t - 1), (1, 0))  # [N, T]
    if not entropy:
        return lp, None
    return lp, torch.nn.functional.pad(torch.cat(ents).reshape(n, t - 1), (1, 0))  # [N, T] each
