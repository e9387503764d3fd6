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

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import ray

from actors.rollout import PromptItem
from learner.batch import ScoredGroup


@dataclass
class Launch:
    """One batch of prompts in generation: the engines' streams and when they started."""

    streams: list
    started: float


def launch(engines: Sequence, prompts: Sequence[PromptItem], samples_per_prompt: int, **sampling) -> Launch:
    """Start sampling ``samples_per_prompt`` completions per prompt; ``sampling`` (temperature,
    top_p, max_new_tokens) overrides the engines' configured values."""
    chunks = [prompts[i :: len(engines)] for i in range(len(engines))]
    streams = [e.stream_groups.options(num_returns="streaming").remote(c, samples_per_prompt, **sampling)
               for e, c in zip(engines, chunks, strict=True) if c]
    return Launch(streams, time.monotonic())


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
            on_group: Callable[[], None] | None = None, **sampling) -> list[ScoredGroup]:
    """``samples_per_prompt`` completions per prompt, each group scored as it finishes;
    returned in prompt order. ``on_group()`` is called as each group is routed."""
    refs: list[ray.ObjectRef] = []

    def keep(_: int, scored: ray.ObjectRef) -> None:
        refs.append(scored)
        if on_group is not None:
            on_group()

    route(launch(engines, prompts, samples_per_prompt, **sampling), scoring, keep)
    scored = ray.get(refs)
    if len(scored) != len(prompts):
        raise RuntimeError(f"{len(scored)} groups came back for {len(prompts)} prompts")
    return sorted(scored, key=lambda s: s.group.prompt_index)
