"""Prompts to engines, and each finished group through scoring.

    launch = prompts dealt round-robin over the rollout engines (prompt k to engine k mod
             R), each with its own seed; each engine streams back its groups as they finish
             (a Ray streaming generator)
    score  = a reward actor (group number mod W) → the reward-model actor (if any) → the
             reference actor (if any)

``orchestrator.supervise.Flight`` drives both, redoing what a lost actor dropped. Only
ObjectRefs pass through the driver: each actor resolves the previous one's output.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import ray

from actors.rollout import PromptItem


SEED_BITS = 62  # room for vLLM's seed + sample index within a signed 64-bit seed


def prompt_seed(run_seed: int, step: int, prompt_index: int) -> int:
    """The sampling seed of prompt ``prompt_index`` at ``step`` of a run seeded ``run_seed``;
    its completion k is sampled with this seed + k (``actors.vllm_adapter.child_seed``). A
    hash, so neighbouring steps and prompts get unrelated streams."""
    digest = hashlib.blake2b(f"{run_seed}:{step}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - SEED_BITS)


@dataclass
class Stream:
    """One engine's share of a launch: ``positions`` (into the launch's prompts) in the
    order it was given them, the ones it has not yielded yet, and its Ray stream, which
    yields k then the group of its k-th prompt, for each prompt as it finishes, and the
    last prompt's group alone (``actors.rollout.stream_items``); for a lone prompt, the
    ObjectRef of its group instead (``lone``)."""

    engine: int
    positions: list[int]
    gen: object
    left: set[int]
    started: float
    deadline: float = math.inf  # set by whoever watches it (``supervise.Flight``)

    @property
    def lone(self) -> bool:
        return isinstance(self.gen, ray.ObjectRef)


@dataclass
class Launch:
    """One batch of prompts in generation. ``ready``: groups generated before (restored
    from a checkpoint, or drained for one), by position."""

    prompts: list[PromptItem]
    seeds: list[int | None]
    samples_per_prompt: int
    sampling: dict
    streams: list[Stream]
    started: float
    ready: dict[int, ray.ObjectRef] = field(default_factory=dict)
    version: int | None = None  # the policy version the engines hold (None: not checked)


def launch(engines: Sequence, prompts: Sequence[PromptItem], samples_per_prompt: int, *,
           seeds: Sequence[int] | None = None, version: int | None = None, **sampling) -> Launch:
    """Start sampling ``samples_per_prompt`` completions per prompt, prompt k with ``seeds[k]``
    (None: the engines' own random streams), prompt k on engine k mod len(engines);
    ``sampling`` (temperature, top_p, max_new_tokens) overrides the engines' configured
    values. ``version``: the policy version the engines must hold (an engine restarted
    since then refuses, and is caught up first: ``supervise.Flight``)."""
    started = Launch(list(prompts), list(seeds) if seeds is not None else [None] * len(prompts),
                     samples_per_prompt, sampling, [], time.monotonic(), version=version)
    n = len(engines)
    for e, engine in enumerate(engines):
        positions = list(range(e, len(prompts), n))
        if positions:
            start_stream(started, engine, e, positions)
    return started


def start_stream(started: Launch, engine, index: int, positions: Sequence[int],
                 version: int | None = None) -> Stream:
    """Sample the prompts at ``positions`` of ``started`` on ``engine`` (number ``index``),
    with their own seeds, on an engine holding ``version`` (default: the launch's); the
    stream joins ``started.streams``."""
    prompts = [started.prompts[p] for p in positions]
    seeds = [started.seeds[p] for p in positions]
    # A lone prompt's stream yields its group alone (``actors.rollout.stream_items``): one
    # plain return then, half what a Ray stream costs the driver (its item and its end).
    returns = 1 if len(positions) == 1 else "streaming"
    gen = engine.stream_groups.options(num_returns=returns).remote(
        prompts, started.samples_per_prompt, seeds=None if seeds[0] is None else seeds,
        expect_version=started.version if version is None else version, **started.sampling)
    stream = Stream(index, list(positions), gen, set(positions), time.monotonic())
    started.streams.append(stream)
    return stream


class Scoring:
    """Where a finished group is scored, in order: a reward actor (``number`` mod the
    reward actors), then the reward-model actor and the reference actor where given."""

    def __init__(self, rewards: Sequence, reward_model=None, reference=None) -> None:
        if not rewards:
            raise ValueError("Scoring needs at least one reward actor")
        self.rewards = list(rewards)
        self.reward_model = reward_model
        self.reference = reference

    def score(self, numbers: Sequence[int], group_refs: Sequence) -> list[list[tuple[object, ray.ObjectRef]]]:
        """Submit the scoring of groups ``numbers`` (``group_refs``, one each): per group,
        (actor, result) per call, in order; the last result is the scored group. The groups
        bound for one actor go in one call (``each``)."""
        calls: list[list[tuple[object, ray.ObjectRef]]] = [[] for _ in numbers]
        by_reward: dict[int, list[int]] = {}
        for i, number in enumerate(numbers):
            by_reward.setdefault(number % len(self.rewards), []).append(i)
        for w, mine in by_reward.items():
            reward = self.rewards[w]
            for i, ref in zip(mine, each(reward.score, reward.score_groups, [group_refs[i] for i in mine]),
                              strict=True):
                calls[i].append((reward, ref))
        later = []
        if self.reward_model is not None:
            later.append((self.reward_model, self.reward_model.score, self.reward_model.score_groups))
        if self.reference is not None:
            later.append((self.reference, self.reference.add_ref_logprobs, self.reference.add_ref_logprobs_groups))
        for actor, one, many in later:
            for c, ref in zip(calls, each(one, many, [c[-1][1] for c in calls]), strict=True):
                c.append((actor, ref))
        return calls


def deliver(learners: Sequence, numbers: Sequence[int], group_refs: Sequence) -> list[tuple[object, ray.ObjectRef]]:
    """Queue group ``numbers[i]`` (``group_refs[i]``) at learner rank number mod L as its
    (number div L)-th, one call per rank; per group, (rank, result of its put)."""
    by_rank: dict[int, list[int]] = {}
    for i, number in enumerate(numbers):
        by_rank.setdefault(number % len(learners), []).append(i)
    out: list = [None] * len(numbers)
    for r, mine in by_rank.items():
        rank = learners[r]
        results = put_all(rank, [numbers[i] // len(learners) for i in mine], [group_refs[i] for i in mine])
        for i, ref in zip(mine, results, strict=True):
            out[i] = (rank, ref)
    return out


def put_all(rank, indices: Sequence[int], group_refs: Sequence) -> list[ray.ObjectRef]:
    """Queue ``group_refs[i]`` at learner ``rank`` as its ``indices[i]``-th group, in one
    call; the result of each group's put."""
    if len(group_refs) == 1:
        return [rank.put.remote(indices[0], group_refs[0])]
    return list(rank.put_groups.options(num_returns=len(group_refs)).remote(list(indices), *group_refs))


def each(one, many, group_refs: Sequence) -> list[ray.ObjectRef]:
    """A result per group of ``group_refs`` from one call: actor method ``many(*groups)``
    (one return per group), or ``one(group)`` for a lone group. An actor call costs the
    driver about 0.3 ms of CPU (submission, reply, bookkeeping), a group it carries a
    tenth of that: at 256 engines, a call per group and hop was a third of its time."""
    if len(group_refs) == 1:
        return [one.remote(group_refs[0])]
    return list(many.options(num_returns=len(group_refs)).remote(*group_refs))
