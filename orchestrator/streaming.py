"""The one routing loop: prompts to engines, each finished group through scoring, then on.

    launch = prompts dealt round-robin over the rollout engines; each engine streams back
             its groups as they finish (a Ray streaming generator)
    route  = as each group finishes (``ray.wait`` over the streams): a reward actor (round
             robin) → the reward-model actor (if any) → the reference actor (if any) →
             ``deliver(i, scored_ref)``

The grpo stage delivers to learner ranks; eval and sample collect (``collect``). Only
ObjectRefs pass through the driver: each actor resolves the previous one's output.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import ray

from actors.rollout import PromptItem
from learner.batch import ScoredGroup


SEED_BITS = 62  # room for vLLM's seed + sample index within a signed 64-bit seed


def prompt_seed(run_seed: int, step: int, prompt_index: int) -> int:
    """The sampling seed of prompt ``prompt_index`` at ``step`` of a run seeded ``run_seed``;
    its completion k is sampled with this seed + k (``actors.vllm_adapter.child_seed``). A
    hash, so neighbouring steps and prompts get unrelated streams."""
    digest = hashlib.blake2b(f"{run_seed}:{step}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - SEED_BITS)


@dataclass
class Launch:
    """One batch of prompts in generation: the engines' streams and when they started.
    ``ready``: groups generated before (restored from a checkpoint, or drained for one),
    routed first, in order."""

    streams: list
    started: float
    ready: list = field(default_factory=list)


def launch(engines: Sequence, prompts: Sequence[PromptItem], samples_per_prompt: int, *,
           seeds: Sequence[int] | None = None, **sampling) -> Launch:
    """Start sampling ``samples_per_prompt`` completions per prompt, prompt k with ``seeds[k]``
    (None: the engines' own random streams); ``sampling`` (temperature, top_p,
    max_new_tokens) overrides the engines' configured values."""
    n = len(engines)
    chunks = [prompts[i::n] for i in range(n)]
    seed_chunks = [None if seeds is None else list(seeds[i::n]) for i in range(n)]
    streams = [e.stream_groups.options(num_returns="streaming").remote(c, samples_per_prompt, seeds=s, **sampling)
               for e, c, s in zip(engines, chunks, seed_chunks, strict=True) if c]
    return Launch(streams, time.monotonic())


def drain(started: Launch) -> None:
    """Wait for every group of ``started`` and move it to ``started.ready``, in the order
    ``route`` would have taken them (for a checkpoint: these groups are stored)."""
    pending = list(started.streams)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            started.ready.append(next(ready[0]))
        except StopIteration:
            continue
        pending.append(ready[0])
    started.streams = []


class Scoring:
    """Where a finished group is scored, in order: a reward actor (round robin over
    ``rewards``), then the reward-model actor and the reference actor where given."""

    def __init__(self, rewards: Sequence, reward_model=None, reference=None) -> None:
        if not rewards:
            raise ValueError("Scoring needs at least one reward actor")
        self.rewards = list(rewards)
        self.reward_model = reward_model
        self.reference = reference
        self.routed = 0  # groups scored so far, across launches

    def score(self, group_ref) -> ray.ObjectRef:
        scored = self.rewards[self.routed % len(self.rewards)].score.remote(group_ref)
        if self.reward_model is not None:
            scored = self.reward_model.score.remote(scored)
        if self.reference is not None:
            scored = self.reference.add_ref_logprobs.remote(scored)
        self.routed += 1
        return scored


def route(started: Launch, scoring: Scoring, deliver: Callable[[int, ray.ObjectRef], None]) -> None:
    """Score each group of ``started`` as it finishes and ``deliver(i, scored_ref)`` it,
    ``i`` counting the groups ``scoring`` has routed (across launches). Returns when every
    stream is exhausted."""
    for group_ref in started.ready:
        deliver(scoring.routed, scoring.score(group_ref))
    pending = list(started.streams)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        stream = ready[0]
        try:
            group_ref = next(stream)
        except StopIteration:
            continue
        pending.append(stream)
        i = scoring.routed
        deliver(i, scoring.score(group_ref))


def collect(engines: Sequence, scoring: Scoring, prompts: Sequence[PromptItem], samples_per_prompt: int, *,
            on_group: Callable[[], None] | None = None, seed: tuple[int, int] | None = None,
            **sampling) -> list[ScoredGroup]:
    """``samples_per_prompt`` completions per prompt, each group scored as it finishes;
    returned in prompt order. ``on_group()`` is called as each group is routed.
    ``seed``: (run seed, slot): prompt p is sampled with ``prompt_seed(*seed, p.index)``."""
    seeds = None if seed is None else [prompt_seed(*seed, p.index) for p in prompts]
    refs: list[ray.ObjectRef] = []

    def keep(_: int, scored: ray.ObjectRef) -> None:
        refs.append(scored)
        if on_group is not None:
            on_group()

    route(launch(engines, prompts, samples_per_prompt, seeds=seeds, **sampling), scoring, keep)
    scored = ray.get(refs)
    if len(scored) != len(prompts):
        raise RuntimeError(f"{len(scored)} groups came back for {len(prompts)} prompts")
    return sorted(scored, key=lambda s: s.group.prompt_index)
