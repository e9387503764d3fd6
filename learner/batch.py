"""The contract between rollout, reward, reference and learner.

Everything that crosses an actor boundary in a GRPO step is one of these frozen
dataclasses, checked on construction. Token sequences travel as tuples of ints and
per-token log-probs as tuples of floats (small, cheap to pickle); the learner turns a
list of groups into one padded ``TrainBatch`` of tensors.

Position convention for ``TrainBatch``: ``logprobs[:, t]`` is the log-probability of
``input_ids[:, t]`` given the tokens before it, so column 0 is always 0 and masked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch


_FLAGS = ("reward_error", "reward_timeout", "ungradable")


@dataclass(frozen=True)
class Completion:
    """One sampled response: its tokens, the sampler's log-prob of each, and text."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    text: str
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    # The policy version that drew each token, when a weight push landed while it was
    # being sampled (partial rollout, ``actors.partial``); empty: all the group's version.
    versions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"completion has {len(self.token_ids)} tokens but {len(self.logprobs)} log-probs"
            )
        if self.versions and len(self.versions) != len(self.token_ids):
            raise ValueError(f"completion has {len(self.token_ids)} tokens but {len(self.versions)} versions")
        if not self.token_ids:
            raise ValueError("empty completion: the engine returned no tokens")


@dataclass(frozen=True)
class Group:
    """G completions of one prompt, sampled by one policy version."""

    prompt_index: int
    prompt_ids: tuple[int, ...]
    reference: str
    completions: tuple[Completion, ...]
    policy_version: int
    kind: str = "reasoning"  # the prompt's type: which rewards apply (§2.3.4)
    question: str = ""  # the bare prompt text, for reward models that read it

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"prompt {self.prompt_index} tokenised to nothing")
        if not self.completions:
            raise ValueError(f"group of prompt {self.prompt_index} has no completions")

    @property
    def size(self) -> int:
        return len(self.completions)

    def token_versions(self, k: int) -> tuple[int, ...]:
        """The policy version of each token of completion ``k``."""
        c = self.completions[k]
        return c.versions or (self.policy_version,) * len(c.token_ids)


@dataclass(frozen=True)
class ScoredGroup:
    """A group with its rewards (one per completion) and, once the reference actor has
    seen it, the reference policy's log-probs of each completion's tokens.

    The three flag tuples say, per completion, whether any of the rule rewards that
    scored it (not only the accuracy reward) ended in an error, in a timeout, or could
    not grade it (the reference answer or tests do not parse). Such a reward scores 0;
    the learner counts all three, and leaves ungradable completions out of the
    advantages (``learner.grpo.group_advantages(valid=...)``) rather than treat the 0 as
    a verdict. Left empty they mean "none": they are filled in as all False.
    """

    group: Group
    rewards: tuple[float, ...]  # [G] weighted sum of the configured rewards
    accuracy: tuple[float, ...]  # [G] 1.0 where the accuracy reward passed (nan: not graded)
    format_ok: tuple[float, ...]  # [G] 1.0 where the format reward passed (or nan: none)
    ref_logprobs: tuple[tuple[float, ...], ...] | None = None  # [G][T_i]
    # Named parts of the reward worth reporting on their own (reward-model scores), [G] each.
    components: tuple[tuple[str, tuple[float, ...]], ...] = ()
    reward_error: tuple[bool, ...] = ()  # [G] some rule reward raised or its worker died
    reward_timeout: tuple[bool, ...] = ()  # [G] some rule reward ran past its deadline
    ungradable: tuple[bool, ...] = ()  # [G] some rule reward could not grade the completion

    def __post_init__(self) -> None:
        g = self.group.size
        for name in _FLAGS:
            if not getattr(self, name):
                object.__setattr__(self, name, (False,) * g)  # frozen: fill the default once
        for name in ("rewards", "accuracy", "format_ok", *_FLAGS):
            if len(getattr(self, name)) != g:
                raise ValueError(f"{name} has {len(getattr(self, name))} values for {g} completions")
        if any(not math.isfinite(r) for r in self.rewards):
            raise ValueError(f"non-finite reward in group {self.group.prompt_index}: {self.rewards}")
        if self.ref_logprobs is not None:
            if len(self.ref_logprobs) != g:
                raise ValueError(f"ref_logprobs for {len(self.ref_logprobs)} of {g} completions")
            for c, ref in zip(self.group.completions, self.ref_logprobs, strict=True):
                if len(ref) != len(c.token_ids):
                    raise ValueError(
                        f"ref_logprobs has {len(ref)} values for a {len(c.token_ids)}-token completion"
                    )
        for name, values in self.components:
            if len(values) != g:
                raise ValueError(f"component {name!r} has {len(values)} values for {g} completions")

    @property
    def gradable(self) -> tuple[bool, ...]:
        """[G] True where every rule reward could grade the completion."""
        return tuple(not u for u in self.ungradable)

    def with_ref_logprobs(self, ref: Sequence[Sequence[float]]) -> ScoredGroup:
        return replace(self, ref_logprobs=tuple(tuple(float(x) for x in r) for r in ref))

    def with_added(self, name: str, weighted: Sequence[float], raw: Sequence[float]) -> ScoredGroup:
        """This group with ``weighted`` added to its rewards and ``raw`` kept as component ``name``."""
        rewards = tuple(r + float(w) for r, w in zip(self.rewards, weighted, strict=True))
        return replace(self, rewards=rewards, components=(*self.components, (name, tuple(float(x) for x in raw))))


@dataclass(frozen=True)
class TrainBatch:
    """Padded tensors for N = sum of group sizes sequences of at most T tokens."""

    input_ids: torch.Tensor  # [N, T] int64, prompt + response, right-padded
    attention_mask: torch.Tensor  # [N, T] int64
    loss_mask: torch.Tensor  # [N, T] float32, 1 on response tokens
    old_logprobs: torch.Tensor  # [N, T] float32, sampler log-probs (0 off the mask)
    ref_logprobs: torch.Tensor | None  # [N, T] float32 or None when beta == 0
    advantages: torch.Tensor  # [N] float32
    token_versions: torch.Tensor  # [N, T] int64, the policy version that drew each response token (0 off it)

    def __post_init__(self) -> None:
        n, t = self.input_ids.shape
        checks = {
            "attention_mask": (self.attention_mask, (n, t), torch.int64),
            "loss_mask": (self.loss_mask, (n, t), torch.float32),
            "old_logprobs": (self.old_logprobs, (n, t), torch.float32),
            "advantages": (self.advantages, (n,), torch.float32),
            "token_versions": (self.token_versions, (n, t), torch.int64),
        }
        if self.ref_logprobs is not None:
            checks["ref_logprobs"] = (self.ref_logprobs, (n, t), torch.float32)
        if self.input_ids.dtype != torch.int64:
            raise TypeError(f"input_ids must be int64, got {self.input_ids.dtype}")
        for name, (tensor, shape, dtype) in checks.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
            if tensor.dtype != dtype:
                raise TypeError(f"{name} must be {dtype}, got {tensor.dtype}")

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_response_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def to(self, device: torch.device | str) -> TrainBatch:
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return TrainBatch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


def pad_token_id(model_config) -> int:
    """The id a model's batches are padded with (a transformers ``PretrainedConfig``)."""
    return int(model_config.pad_token_id or model_config.eos_token_id or 0)


def pad_rows(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-pad ``(prompt_ids, response_ids)`` rows to the longest, ``T`` tokens.

    The one place sequences are padded (GRPO and SFT batches, the reference actor).
    Returns ``(input_ids [N, T] int64, attention_mask [N, T] int64, response_mask [N, T]
    float32)``: prompt then response then ``pad_id``; 1 on real tokens; 1 on response tokens.
    """
    n = len(rows)
    t = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((n, t), pad_id, dtype=torch.int64)  # [N, T]
    attention = torch.zeros((n, t), dtype=torch.int64)  # [N, T]
    response = torch.zeros((n, t), dtype=torch.float32)  # [N, T]
    for i, (p, r) in enumerate(rows):
        k = len(p) + len(r)
        input_ids[i, :k] = torch.tensor([*p, *r])
        attention[i, :k] = 1
        response[i, len(p) : k] = 1.0
    return input_ids, attention, response


def collate(groups: Sequence[ScoredGroup], advantages: Sequence[torch.Tensor], pad_id: int) -> TrainBatch:
    """Pad the groups' sequences into one ``TrainBatch``.

    ``advantages[i]`` is the ``[G_i]`` advantage tensor of ``groups[i]`` (computed by the
    caller with ``learner.grpo.group_advantages``).
    """
    rows: list[tuple[tuple[int, ...], Completion, tuple[float, ...] | None, tuple[int, ...]]] = []
    for sg in groups:
        refs = sg.ref_logprobs if sg.ref_logprobs is not None else (None,) * sg.group.size
        for k, (c, ref) in enumerate(zip(sg.group.completions, refs, strict=True)):
            rows.append((sg.group.prompt_ids, c, ref, sg.group.token_versions(k)))
    has_ref = all(r[2] is not None for r in rows)
    if not has_ref and any(r[2] is not None for r in rows):
        raise ValueError("some groups have reference log-probs and some do not")
    input_ids, attention, loss_mask = pad_rows([(p, c.token_ids) for p, c, _, _ in rows], pad_id)  # [N, T] each
    n, t = input_ids.shape
    old = torch.zeros((n, t), dtype=torch.float32)  # [N, T]
    ref = torch.zeros((n, t), dtype=torch.float32) if has_ref else None  # [N, T]
    versions = torch.zeros((n, t), dtype=torch.int64)  # [N, T]
    for i, (prompt, c, r, drawn_by) in enumerate(rows):
        p, k = len(prompt), len(c.token_ids)
        old[i, p : p + k] = torch.tensor(c.logprobs, dtype=torch.float32)
        if ref is not None:
            ref[i, p : p + k] = torch.tensor(r, dtype=torch.float32)
        versions[i, p : p + k] = torch.tensor(drawn_by, dtype=torch.int64)
    adv = torch.cat([a.to(torch.float32).reshape(-1) for a in advantages])  # [N]
    if adv.shape[0] != n:
        raise ValueError(f"{adv.shape[0]} advantages for {n} sequences")
    return TrainBatch(input_ids, attention, loss_mask, old, ref, adv, versions)


def select_rows(batch: TrainBatch, rows: Sequence[int]) -> TrainBatch:
    """The sequences ``rows`` of ``batch``, in that order, cut to the longest of them."""
    index = torch.as_tensor(list(rows), dtype=torch.int64)  # [n]
    width = int(batch.attention_mask[index].sum(1).max())
    take = lambda x: None if x is None else x[index][:, :width] if x.dim() == 2 else x[index]  # noqa: E731
    return TrainBatch(*(take(getattr(batch, f)) for f in batch.__dataclass_fields__))


def pack_rows(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The right-padded rows ``input_ids`` ``[N, T]`` laid end to end in one row without
    their padding: ``(input_ids [1, L], position_ids [1, L])``, L the real tokens, the
    positions restarting at 0 for each sequence.

    A causal LM that reads sequence boundaries from restarting positions attends within
    each sequence only: transformers ≥ 5 builds that mask from ``position_ids`` when no
    attention mask is given and no cache is kept (``masking_utils.find_packed_sequence_indices``,
    for sdpa and eager attention alike; on CPU this is what runs). On GPU,
    ``learner.attn_implementation=flash_attention_2`` reads the same positions as
    variable-length attention (GPU only, not yet run). ``tests/unit/test_packing.py`` checks
    that a packed row gives the padded rows' log-probs and gradients.
    """
    real = attention_mask.bool()  # [N, T]
    positions = torch.cumsum(attention_mask, 1) - 1  # [N, T]: right padding, so 0.. per row
    return input_ids[real][None], positions[real][None]  # [1, L] each


def unpack_row(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token ``values`` ``[1, L]`` of a ``pack_rows`` row back in the padded layout
    ``[N, T]`` of ``attention_mask``, 0 on padding and on each sequence's first token (which
    in the packed row the previous sequence's last token "predicted"). Differentiable."""
    real = attention_mask.bool()  # [N, T]
    first = real.clone()
    first[:, 1:] = False  # [N, T]: column 0, where every right-padded sequence starts
    out = values.new_zeros(real.shape)  # [N, T]
    out = out.masked_scatter(real, values[0])
    return out.masked_fill(first, 0.0)


def token_budget_micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Sequences of ``lengths`` tokens, in order, cut into runs of at most ``max_tokens``
    tokens: the micro-batches of ``learner.max_tokens_per_micro_batch``, as lists of
    sequence indices. A sequence longer than ``max_tokens`` is a micro-batch alone."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    out: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if not out or used + n > max_tokens:
            out.append([])
            used = 0
        out[-1].append(i)
        used += n
    return out


def deal_by_tokens(lengths: Sequence[int], ranks: int) -> list[int]:
    """The rank of each group, so that the ranks' token counts are near equal.

    ``lengths[i]``: group ``i``'s tokens (prompt + responses, all its sequences). Longest
    first, each group goes to the rank with the fewest tokens so far among the ranks that
    still take groups (LPT scheduling); ties go to the earlier group and the lower rank,
    so the same lengths always give the same dealing. Every rank takes ``len // ranks``
    or one more groups (exactly ``len / ranks`` when it divides, the ``groups_per_rank``
    each ``GRPOLearner.train_step`` consumes).
    """
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    n = len(lengths)
    base, extra = divmod(n, ranks)
    room = [base + (r < extra) for r in range(ranks)]  # groups each rank still takes
    tokens = [0] * ranks
    out = [0] * n
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        r = min((r for r in range(ranks) if room[r]), key=lambda r: (tokens[r], r))
        out[i] = r
        room[r] -= 1
        tokens[r] += lengths[i]
    return out
