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
    last prompt's group alone (``actors.rollout.stream_items``)."""

    engine: int
    positions: list[int]
    gen: object
    left: set[int]
    started: float
    deadline: float = math.inf  # set by whoever watches it (``supervise.Flight``)


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
    gen = engine.stream_groups.options(num_returns="streaming").remote(
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

    def score(self, number: int, group_ref) -> list[tuple[object, ray.ObjectRef]]:
        """Submit the scoring of group ``number``: (actor, result) per call, in order; the
        last result is the scored group."""
        reward = self.rewards[number % len(self.rewards)]
        calls = [(reward, reward.score.remote(group_ref))]
        for actor, method in ((self.reward_model, "score"), (self.reference, "add_ref_logprobs")):
            if actor is not None:
                calls.append((actor, getattr(actor, method).remote(calls[-1][1])))
        return calls
