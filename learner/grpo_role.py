"""The GRPO learner role: one DeepSpeed data-parallel rank per ``GRPOLearner`` actor.

A step consumes this rank's share of the step's groups *as they arrive* (the driver
``feed``s ObjectRefs while ``train_step`` runs; the actor is threaded for that), turns
them into micro-batches, and runs forward/backward on each at once. Groups are taken in
the order the driver numbered them, not the order the ``feed`` calls ran in (a threaded
actor does not keep call order), so the float sums of a step are the same on every run; DeepSpeed reduces
gradients across ranks and applies the optimizer at the accumulation boundary.

Loss scaling: ``learner.grpo.aggregate`` divides by the *global* number of sequences (or
tokens, or sequences × ``max_new_tokens`` for Dr. GRPO), so summing the micro-batch
losses of all ranks gives the full-batch loss; ``learner.engine`` sums the gradients.
Rank 0 also sends the weight pushes (``learner.weight_sync``).
"""

from __future__ import annotations

import dataclasses

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from learner import grpo
from learner.batch import (ScoredGroup, TrainBatch, collate, pack_rows, select_rows, token_budget_micro_batches,
                           unpack_row)
from learner.config import GRPOLossConfig, LearnerConfig
from learner.engine import EngineShape
from learner.logprobs import model_logprobs
from learner.rank import LearnerRank
from learner.weight_sync import EnginePushFailed, WeightSpec, create_group, send_weights


@dataclass
class StepStats:
    """Sums and counts from one rank's step; ``merge`` adds ranks, ``finalize`` divides.

    Reward bookkeeping counts completions, over all the rule rewards that scored each
    one (a completion counts once however many of its rewards hit the status):
    ``reward_errors`` (a reward raised or its worker died), ``reward_timeouts`` (past
    the scoring deadline), ``reward_ungradable`` (the reference could not be parsed:
    left out of the advantages), and ``ungradable_groups`` (groups with no gradable
    completion, which contribute zero advantage).
    """

    sequences: float = 0.0
    response_tokens: float = 0.0
    reward_sum: float = 0.0
    accuracy_sum: float = 0.0
    accuracy_count: float = 0.0
    format_sum: float = 0.0
    format_count: float = 0.0
    truncated: float = 0.0
    staleness_sum: float = 0.0  # Σ over response tokens of (learner version - the version that drew it)
    staleness_max: float = 0.0
    gap_sum: float = 0.0
    gap_tokens: float = 0.0
    is_weight_sum: float = 0.0  # off-policy correction: Σ weights over response tokens
    is_weight_max: float = 0.0
    is_masked: float = 0.0  # response tokens the correction gave weight 0
    is_tokens: float = 0.0
    kl_sum: float = 0.0
    clip_count: float = 0.0
    loss_tokens: float = 0.0
    surrogate_sum: float = 0.0
    zero_std_groups: float = 0.0
    groups: float = 0.0
    reward_errors: float = 0.0
    reward_timeouts: float = 0.0
    reward_ungradable: float = 0.0
    ungradable_groups: float = 0.0
    learner_seconds: float = 0.0
    wait_seconds: float = 0.0
    grad_norm: float = 0.0
    # component name -> [sum, count] (reward-model scores, reported as reward/<name>)
    components: dict[str, list[float]] = field(default_factory=dict)
    # policy-version lag of the sample -> [Σ |rollout - learner| log-prob, tokens]
    gap_by_lag: dict[int, list[float]] = field(default_factory=dict)

    def count(self, g: ScoredGroup, version: int) -> None:
        """Add one group's rewards and shape; ``version`` is the learner's policy version."""
        n = g.group.size
        self.groups += 1
        self.sequences += n
        self.reward_sum += sum(g.rewards)
        graded = [x for x in g.accuracy if not math.isnan(x)]
        self.accuracy_sum += sum(graded)
        self.accuracy_count += len(graded)
        for name, values in g.components:
            total = self.components.setdefault(name, [0.0, 0.0])
            total[0] += sum(values)
            total[1] += len(values)
        fmt = [x for x in g.format_ok if not math.isnan(x)]
        self.format_sum += sum(fmt)
        self.format_count += len(fmt)
        self.response_tokens += sum(len(c.token_ids) for c in g.group.completions)
        self.truncated += sum(c.finish_reason == "length" for c in g.group.completions)
        for k in range(n):
            lags = [version - v for v in g.group.token_versions(k)]
            self.staleness_sum += sum(lags)
            self.staleness_max = max(self.staleness_max, max(lags))
        self.reward_errors += sum(g.reward_error)
        self.reward_timeouts += sum(g.reward_timeout)
        self.reward_ungradable += sum(g.ungradable)
        valid = [r for r, ok in zip(g.rewards, g.gradable, strict=True) if ok]
        self.ungradable_groups += float(not valid)
        # No learning signal: identical rewards among the gradable completions, or none.
        self.zero_std_groups += float(not valid or max(valid) == min(valid))

    def merge(self, other: StepStats) -> StepStats:
        out = StepStats()
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name in ("components", "gap_by_lag"):
                combined = {k: [x + y for x, y in zip(a.get(k, [0.0, 0.0]), b.get(k, [0.0, 0.0]), strict=True)]
                            for k in a.keys() | b.keys()}
            elif f.name.endswith("seconds") or f.name in ("grad_norm", "is_weight_max", "staleness_max"):
                combined = max(a, b)  # ranks run in parallel, the step takes the slowest
            else:
                combined = a + b
            setattr(out, f.name, combined)
        return out

    def finalize(self) -> dict[str, float]:
        def div(a: float, b: float) -> float:
            return a / b if b else float("nan")

        return {
            "reward_mean": div(self.reward_sum, self.sequences),
            "accuracy": div(self.accuracy_sum, self.accuracy_count),
            "format_ok": div(self.format_sum, self.format_count),
            "response_tokens_mean": div(self.response_tokens, self.sequences),
            "truncated_frac": div(self.truncated, self.sequences),
            "staleness_mean": div(self.staleness_sum, self.response_tokens),  # per token
            "staleness_max": self.staleness_max,
            "logprob_gap": div(self.gap_sum, self.gap_tokens),
            "kl": div(self.kl_sum, self.loss_tokens),
            "clip_frac": div(self.clip_count, self.loss_tokens),
            "surrogate_loss": div(self.surrogate_sum, self.loss_tokens),
            "groups_trained": self.groups,
            "zero_std_group_frac": div(self.zero_std_groups, self.groups),
            "reward_errors": self.reward_errors,
            "reward_timeouts": self.reward_timeouts,
            "reward_ungradable": self.reward_ungradable,
            "ungradable_groups": self.ungradable_groups,
            "learner_tokens_per_s": div(self.response_tokens, self.learner_seconds),
            "grad_norm": self.grad_norm,
            **{f"reward/{k}": div(total, n) for k, (total, n) in sorted(self.components.items())},
            **({"is_weight_mean": div(self.is_weight_sum, self.is_tokens), "is_weight_max": self.is_weight_max,
                "is_masked_frac": div(self.is_masked, self.is_tokens)} if self.is_tokens else {}),
            **{f"logprob_gap/lag{k}": div(total, n) for k, (total, n) in sorted(self.gap_by_lag.items())},
        }


def shaped_rewards(g: ScoredGroup, config: GRPOLossConfig, max_new_tokens: int) -> torch.Tensor:
    """``[G]`` the group's rewards as the advantages see them: with ``loss.overlong=penalty``
    DAPO's soft over-long punishment added, with ``loss.kl_in=reward`` β times each
    response's summed KL to the reference (its rollout log-probs against the reference's)
    subtracted."""
    rewards = torch.tensor(g.rewards, dtype=torch.float32)  # [G]
    if config.overlong == "penalty":
        lengths = torch.tensor([len(c.token_ids) for c in g.group.completions])  # [G]
        buffer = config.overlong_buffer_tokens or max(1, max_new_tokens // 4)
        rewards = rewards + grpo.overlong_penalty(lengths, max_tokens=max_new_tokens, buffer=min(buffer, max_new_tokens))
    if config.kl_in == "reward" and config.kl_coef > 0:
        if g.ref_logprobs is None:
            raise ValueError("loss.kl_in=reward needs the reference's log-probs, and this group has none")
        for i, (c, ref) in enumerate(zip(g.group.completions, g.ref_logprobs, strict=True)):
            kl = grpo.kl_estimate(torch.tensor([c.logprobs]), torch.tensor([ref]), estimator=config.kl_estimator,
                                  log_ratio_clip=config.kl_log_ratio_clip)  # [1, T]
            rewards[i] -= config.kl_coef * float(kl.sum())
    return rewards


def group_advantages_of(g: ScoredGroup, config: GRPOLossConfig, max_new_tokens: int = 1) -> torch.Tensor:
    """``[G]`` float32 advantages of one scored group under ``config``'s conventions;
    completions no rule reward could grade get 0 and stay out of the group's statistics."""
    # Only groups with an ungradable completion take the masked path, so the others keep
    # the unmasked statistics bit for bit.
    valid = None if all(g.gradable) else torch.tensor([g.gradable])  # [1, G]
    return grpo.group_advantages(
        shaped_rewards(g, config, max_new_tokens)[None], std_ddof=config.advantage_std_ddof,
        eps=config.advantage_eps, scale_by_std=config.scale_advantages_by_std, valid=valid,
    )[0]  # [G]


class GRPOLearner(LearnerRank):
    """One data-parallel rank of GRPO. Rank 0 also sends weight pushes."""

    def __init__(self, model_path: str, config: LearnerConfig, *, loss: GRPOLossConfig, rank: int,
                 world_size: int, temperature: float, groups_per_rank: int, samples_per_prompt: int,
                 max_new_tokens: int, seed: int = 0, group_wait_s: float = 3600.0) -> None:
        """A step is ``groups_per_rank`` groups of ``samples_per_prompt`` on each of
        ``world_size`` ranks, in micro-batches of ``config.micro_batch_groups`` groups (or
        packed rows of ``config.max_tokens_per_micro_batch`` tokens), under the loss
        conventions of ``loss`` (the stage's ``loss`` section).
        ``temperature``: the sampling temperature (log-probs are taken at it).
        ``max_new_tokens``: the generation budget, Dr. GRPO's loss normaliser.
        ``group_wait_s``: how long ``train_step`` waits for its next group before it
        fails, naming the group (the driver's own deadlines are shorter)."""
        super().__init__(model_path, config, rank=rank, world_size=world_size, seed=seed)
        if not config.max_tokens_per_micro_batch and groups_per_rank % config.micro_batch_groups:
            raise ValueError(f"groups_per_rank ({groups_per_rank}) must be a multiple of "
                             f"learner.micro_batch_groups ({config.micro_batch_groups})")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (rollout.max_new_tokens), got {max_new_tokens}")
        if loss.off_policy_correction == "auto":  # decided by the stage (orchestrator.config); alone: on-policy
            loss = loss.model_copy(update={"off_policy_correction": "none"})
        self.loss = loss
        self.temperature = temperature
        self.groups_per_rank = groups_per_rank
        self.samples_per_prompt = samples_per_prompt
        self.max_new_tokens = max_new_tokens
        self.group_wait_s = group_wait_s
        self._inbox: dict[int, object] = {}  # feed number -> ScoredGroup or its ObjectRef
        self._arrived = threading.Condition()
        self._numbered = 0  # the number the next unnumbered feed gets
        self._taken = 0  # the number train_step takes next
        self._weight_group = None
        self._receivers: list = []  # the engines of the weight-push group (rank 0)
        self._weight_spec: WeightSpec | None = None
        self._push_buffers: list[torch.Tensor] | None = None
        self._proximal: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # batch -> (log-probs, IS weights)

    def _engine_shape(self) -> EngineShape:
        if self.config.max_tokens_per_micro_batch:
            # Packed micro-batches vary in number; each step says where its last one is
            # (Engine.backward_step), and a step holds at most one per sequence.
            return EngineShape(self.rank, self.world_size, micro_batch_sequences=1,
                               accumulation_steps=self.groups_per_rank * self.samples_per_prompt)
        micro = self.config.micro_batch_groups
        return EngineShape(self.rank, self.world_size, micro_batch_sequences=micro * self.samples_per_prompt,
                           accumulation_steps=self.groups_per_rank // micro)

    # -- streaming input ----------------------------------------------------------------
    def feed(self, refs: Sequence, first: int | None = None) -> int:
        """Queue ScoredGroup ObjectRefs (nested in a list, so Ray does not resolve them),
        numbered ``first, first + 1, ...`` (default: after the last numbered feed).
        ``train_step`` takes them in number order. Returns how many wait untaken."""
        with self._arrived:
            start = self._numbered if first is None else first
            for k, r in enumerate(refs):
                self._inbox[start + k] = r
            self._numbered = max(self._numbered, start + len(refs))
            self._arrived.notify_all()
            return len(self._inbox)

    def put(self, number: int, group: ScoredGroup) -> int:
        """Queue one group as number ``number``. The driver passes an ObjectRef, which Ray
        resolves before the call: a group whose generation or scoring failed never
        reaches the rank, and the driver re-issues it under the same number."""
        return self.feed([group], number)

    def put_groups(self, numbers: Sequence[int], *groups: ScoredGroup) -> tuple[int, ...]:
        """``put`` of several groups in one call (``groups[i]`` as number ``numbers[i]``), one
        result each: how many wait untaken once it is queued."""
        return tuple(self.put(n, g) for n, g in zip(numbers, groups, strict=True))

    def _next_group(self) -> tuple[ScoredGroup, float]:
        import ray

        start = time.monotonic()
        with self._arrived:
            if not self._arrived.wait_for(lambda: self._taken in self._inbox, timeout=self.group_wait_s):
                raise TimeoutError(f"learner rank {self.rank}: group {self._taken} did not arrive within "
                                   f"{self.group_wait_s:g} s (the driver feeds it; is the driver alive?)")
            item = self._inbox.pop(self._taken)
            self._taken += 1
        group = ray.get(item) if isinstance(item, ray.ObjectRef) else item
        return group, time.monotonic() - start

    # -- one optimizer step ---------------------------------------------------------------
    def train_step(self, step: int) -> StepStats:
        """Consume ``groups_per_rank`` groups (as they arrive), update, return stats."""
        if self.config.max_tokens_per_micro_batch:
            return self._packed_step()
        cfg, loss = self.config, self.loss
        stats = StepStats()
        num_sequences = self.groups_per_rank * self.samples_per_prompt * self.world_size
        streaming = loss.loss_aggregation != "token_mean"  # token_mean needs the global token count first
        batches: list[TrainBatch] = []
        pending: list[ScoredGroup] = []
        compute = 0.0
        for _ in range(self.groups_per_rank):
            group, waited = self._next_group()
            stats.wait_seconds += waited
            stats.count(group, self.version)
            pending.append(group)
            if len(pending) == cfg.micro_batch_groups:
                batch = self._collate(pending)
                pending = []
                batches.append(batch)
                if streaming:  # backward on each micro-batch as soon as it is complete
                    t0 = time.monotonic()
                    self._backward(batch, stats, num_sequences, None, first_pass=True)
                    compute += time.monotonic() - t0
        t0 = time.monotonic()
        num_tokens = int(self.engine.all_reduce_sum(float(sum(b.num_response_tokens for b in batches))))
        for p in range(loss.updates_per_batch):
            if not (p == 0 and streaming):
                for batch in batches:
                    self._backward(batch, stats, num_sequences, num_tokens, first_pass=(p == 0))
            stats.grad_norm = self.engine.grad_norm()
        self._proximal.clear()
        compute += time.monotonic() - t0
        stats.learner_seconds = compute
        self.version += 1
        return stats

    def _packed_step(self) -> StepStats:
        """``train_step`` with ``learner.max_tokens_per_micro_batch``: all of the rank's
        groups first (a micro-batch can take sequences of several groups, so none starts
        before the last group is in), then packed rows of at most that many tokens. Ranks
        may cut different numbers of micro-batches; the ones with fewer make idle calls,
        so that every rank reduces gradients as often (ZeRO-2 and -3 reduce in backward)."""
        stats = StepStats()
        groups = []
        for _ in range(self.groups_per_rank):
            group, waited = self._next_group()
            stats.wait_seconds += waited
            stats.count(group, self.version)
            groups.append(group)
        t0 = time.monotonic()
        whole = self._collate(groups)
        lengths = whole.attention_mask.sum(1).tolist()  # [N]
        batches = [select_rows(whole, rows)
                   for rows in token_budget_micro_batches(lengths, self.config.max_tokens_per_micro_batch)]
        calls = int(self.engine.all_reduce_max(float(len(batches))))
        num_sequences = self.groups_per_rank * self.samples_per_prompt * self.world_size
        num_tokens = int(self.engine.all_reduce_sum(float(whole.num_response_tokens)))
        for p in range(self.loss.updates_per_batch):
            for k in range(calls):
                if k < len(batches):
                    self._backward(batches[k], stats, num_sequences, num_tokens, first_pass=(p == 0),
                                   last=k == calls - 1)
                else:
                    self._idle_backward(last=k == calls - 1)
            stats.grad_norm = self.engine.grad_norm()
        self._proximal.clear()
        stats.learner_seconds = time.monotonic() - t0
        self.version += 1
        return stats

    def _logprobs(self, b: TrainBatch) -> torch.Tensor:
        """``[N, T]`` π_θ log-probs of ``b``'s tokens; with packed micro-batches the model
        runs on one row of the real tokens, the result laid back out as ``b``."""
        chunk = self.config.logprob_chunk_tokens
        if not self.config.max_tokens_per_micro_batch:
            return model_logprobs(self.engine, b.input_ids, b.attention_mask, temperature=self.temperature,
                                  chunk_tokens=chunk)  # [N, T]
        ids, positions = pack_rows(b.attention_mask, b.input_ids)  # [1, L] each
        lp = model_logprobs(self.engine, ids, None, temperature=self.temperature, chunk_tokens=chunk,
                            position_ids=positions)  # [1, L]
        return unpack_row(lp, b.attention_mask)  # [N, T]

    def _idle_backward(self, *, last: bool) -> None:
        """A micro-batch with no data: a zero loss on a two-token row, for a rank that cut
        fewer packed micro-batches than another (every parameter gets a zero gradient)."""
        ids = torch.full((1, 2), self.engine.pad_id, dtype=torch.int64, device=self.engine.device)  # [1, 2]
        lp = model_logprobs(self.engine, ids, None, temperature=self.temperature,
                            chunk_tokens=self.config.logprob_chunk_tokens)  # [1, 2]
        self.engine.backward_step(lp.sum() * 0.0, last=last)

    def _backward(self, batch: TrainBatch, stats: StepStats, num_sequences: int,
                  num_tokens: int | None, *, first_pass: bool, last: bool | None = None) -> None:
        cfg = self.loss
        b = batch.to(self.engine.device)
        logp = self._logprobs(b)  # [N, T]
        n_tok = float(b.loss_mask.sum())
        if first_pass and n_tok:  # a micro-batch of masked responses only has no gap (not nan)
            gap = grpo.logprob_gap(logp.detach(), b.old_logprobs, b.loss_mask)
            stats.gap_sum += float(gap) * n_tok
            stats.gap_tokens += n_tok
            self._gap_by_lag(stats, logp.detach(), b)
        old_logp, weights = b.old_logprobs, None
        if cfg.off_policy_correction != "none":
            # Decoupled PPO: the ratio is taken around the learner's own log-probs before
            # this update (kept from the first pass), and the rollout's sampling policy is
            # corrected for by the importance weights.
            if first_pass:
                proximal = logp.detach()  # [N, T]
                weights, kept = grpo.importance_weights(
                    proximal, b.old_logprobs, b.loss_mask, mode=cfg.off_policy_correction, cap=cfg.is_cap,
                    low=cfg.is_low, high=cfg.is_high)  # [N, T] each
                self._proximal[id(batch)] = (proximal, weights)
                mask = b.loss_mask.bool()  # [N, T]
                stats.is_weight_sum += float(weights[mask].sum())
                stats.is_weight_max = max(stats.is_weight_max, float(weights[mask].max()) if mask.any() else 0.0)
                stats.is_masked += float((mask & ~kept).sum())
                stats.is_tokens += float(mask.sum())
            old_logp, weights = self._proximal[id(batch)]
        loss, m = grpo.grpo_loss(
            logp, old_logp, b.ref_logprobs, b.advantages, b.loss_mask,
            beta=cfg.kl_coef if cfg.kl_in == "loss" else 0.0, clip_eps_low=cfg.clip_eps_low,
            clip_eps_high=cfg.clip_eps_high, agg_mode=cfg.loss_aggregation, num_sequences=num_sequences,
            num_tokens=num_tokens, max_tokens=self.max_new_tokens, kl_log_ratio_clip=cfg.kl_log_ratio_clip,
            is_weights=weights, kl_estimator=cfg.kl_estimator,
        )
        if first_pass:
            stats.loss_tokens += float(m.token_count)
            stats.surrogate_sum += float(m.surrogate_sum)
            stats.clip_count += float(m.clip_low_count + m.clip_high_count)
            if not math.isnan(float(m.kl_sum)):
                stats.kl_sum += float(m.kl_sum)
        self.engine.backward_step(loss, last=last)

    def _gap_by_lag(self, stats: StepStats, logp: torch.Tensor, b: TrainBatch) -> None:
        """|rollout - learner| log-prob per token, by how many versions behind the learner
        the policy that drew the token was (0: the same weights: what is left is numerics).
        Per token: a sample continued after a push (partial rollout) counts its tokens
        under the versions that drew them."""
        lags = self.version - b.token_versions  # [N, T]
        mask = b.loss_mask.bool()  # [N, T]
        for lag in sorted(set(lags[mask].tolist())):
            at = mask & (lags == lag)  # [N, T]
            tokens = float(at.sum())
            total = stats.gap_by_lag.setdefault(int(lag), [0.0, 0.0])
            total[0] += float(grpo.logprob_gap(logp, b.old_logprobs, at)) * tokens
            total[1] += tokens

    def _collate(self, groups: list[ScoredGroup]) -> TrainBatch:
        batch = collate(groups, [group_advantages_of(g, self.loss, self.max_new_tokens) for g in groups],
                        self.engine.pad_id)
        if self.loss.overlong == "mask":  # responses cut at the budget give no gradient
            cut = torch.tensor([c.finish_reason == "length" for g in groups for c in g.group.completions])  # [N]
            batch = dataclasses.replace(batch, loss_mask=batch.loss_mask * (~cut).to(torch.float32)[:, None])
        return batch

    # -- weights ----------------------------------------------------------------------------
    def weight_spec(self) -> WeightSpec:
        if self._weight_spec is None:
            self._weight_spec = WeightSpec.of(self.engine.named_full_params(), self.config.weight_push_bucket_bytes)
        return self._weight_spec

    def init_weight_group(self, host: str, port: int, world_size: int, backend: str, engines: Sequence = ()) -> int:
        """Join the weight-push group (rank 0: its source); ``engines``: the rollout actors
        in it, which ``push_weights`` may ask to receive."""
        if self.rank == 0:
            self._weight_group = create_group(host, port, 0, world_size, backend=backend)
            self._receivers = list(engines)
        return self.rank

    def push_weights(self, version: int, engines_within_s: float | None = None) -> float:
        """Broadcast the current weights (rank 0; other ranks join a ZeRO-3 gather).

        ``engines_within_s``: rank 0 also asks each engine of the group to receive version
        ``version`` (``RolloutActor.receive_weights``) and waits that long for them all; the
        driver then makes one call a push instead of one per engine. An engine that fails or
        is late raises ``EnginePushFailed`` naming it, while the broadcast it left waiting
        stays behind in a thread (the driver restarts the group). None: whoever calls this
        has the engines receive."""
        start = time.monotonic()
        named = self.engine.named_full_params()
        if self.rank == 0:
            if self._weight_group is None:
                raise RuntimeError("init_weight_group must run before push_weights")
            spec = self.weight_spec()
            if self._push_buffers is None:
                self._push_buffers = spec.allocate(named[0][1].device)
            tensors = [t for _, t in named]
            if engines_within_s is None or not self._receivers:
                send_weights(self._weight_group, spec, tensors, self._push_buffers)
            else:
                self._send_to_engines(version, spec, tensors, engines_within_s)
        return time.monotonic() - start

    def _send_to_engines(self, version: int, spec: WeightSpec, tensors: list[torch.Tensor], within_s: float) -> None:
        import ray

        receiving = [e.receive_weights.remote(version) for e in self._receivers]
        sent, failed = threading.Event(), []

        def send() -> None:
            try:
                send_weights(self._weight_group, spec, tensors, self._push_buffers)
            except BaseException as err:  # noqa: BLE001 - handed to the caller below
                failed.append(err)
            finally:
                sent.set()

        threading.Thread(target=send, name="weight-push", daemon=True).start()
        deadline = time.monotonic() + within_s
        pending = list(receiving)
        while pending:  # an engine that fails is named at once, not at the deadline
            left = deadline - time.monotonic()
            if left <= 0:
                i = receiving.index(pending[0])
                raise EnginePushFailed(i, f"rollout {i} did not take policy version {version} within "
                                          f"{within_s:.0f} s", late=True)
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=min(left, 1.0))
            _raise_first_failure(receiving, ready, version)
        if not sent.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"learner rank 0's broadcast of policy version {version} did not end within "
                               f"{within_s:.0f} s, although every engine received it")
        if failed:
            raise failed[0]

    def last_pushed(self) -> list[torch.Tensor]:
        """Rank 0: the flat buckets of the last push (a restarted engine loads them with
        ``RolloutActor.load_weights``); no collective, so safe while a step trains."""
        if self.rank != 0 or self._push_buffers is None:
            raise RuntimeError("last_pushed: only learner rank 0 keeps the last push, after its first push")
        return [b.detach().to("cpu", copy=True) for b in self._push_buffers]

    # -- inspection -------------------------------------------------------------------------
    def sequence_logprobs(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> list[float]:
        """Log-probs of ``response_ids`` after ``prompt_ids`` under the current weights, at
        the sampling temperature."""
        ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=self.engine.device)  # [1, T]
        with torch.no_grad():
            lp = model_logprobs(self.engine, ids, None, temperature=self.temperature,
                                chunk_tokens=self.config.logprob_chunk_tokens)[0]  # [T]
        return lp[len(prompt_ids) :].tolist()


def _raise_first_failure(receiving: list, ready: list, version: int) -> None:
    """``EnginePushFailed`` for the first engine whose ``receive_weights`` among ``ready``
    failed (its index in ``receiving``); nothing if none did. One read for them all, one each
    only after a failure."""
    import ray

    try:
        ray.get(ready)
        return
    except ray.exceptions.RayError:
        pass
    for ref in ready:
        try:
            ray.get(ref)
        except ray.exceptions.RayError as err:
            i = receiving.index(ref)
            cause = getattr(err, "cause", None) or err
            first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
            raise EnginePushFailed(i, f"rollout {i} failed to take policy version {version}: {first}") from None
