"""The reward table: each reward's name, how to build it, and what it votes in cons@k.

A reward is a deterministic function ``(response, reference) -> RewardResult``. Config
names rewards, their options and weights; ``build_reward`` turns a name and options into
such a function, and ``combine`` sums the weighted scores (paper §2.3.2: accuracy and
language consistency are summed directly).

What a completion votes for in cons@k (paper §3) belongs to its reward, which alone
knows what its answer is: the final answer for ``math_accuracy``, equivalent answers
voting together (``\\frac12`` and ``0.5``); the ``<answer>`` text for ``exact_answer``,
by string equality as that reward compares; the normalised program for ``code_tests``;
for any other reward the verdict itself (cons@k = "most samples were correct").
``evaluation.vote`` counts the votes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rewards.basic import answer_tag_vote, build_exact_answer, build_no_phrase, build_summary_match
from rewards.code import build_code_tests, program_vote
from rewards.format import build_format_r1, build_format_r1zero
from rewards.language import build_language_consistency
from rewards.math_answer import answer_vote, build_math_accuracy, vote_response
from rewards.types import RewardFn, RewardResult

__all__ = ["REWARDS", "RewardEntry", "RewardFn", "available", "build_reward", "combine", "entry", "register"]

RewardFactory = Callable[..., RewardFn]
VoteKey = Callable[[str, Mapping[str, Any]], str | None]


@dataclass(frozen=True)
class RewardEntry:
    """One reward of the table.

    ``build(**options)``: the reward function configured with ``RewardSpec.options``;
      raises ValueError naming a bad option.
    ``vote_key(response, options)``: what the response votes for in cons@k, None for no
      vote. None here: the reward's verdict votes ("correct" or "wrong").
    ``vote_response(vote)``: a response stating ``vote``, for rewards whose votes group
      by equivalence: two votes are one when the reward grades one, stated so, correct
      against the other as reference. None here: equal strings vote together.
    """

    build: RewardFactory
    vote_key: VoteKey | None = None
    vote_response: Callable[[str], str] | None = None


REWARDS: dict[str, RewardEntry] = {
    "exact_answer": RewardEntry(build_exact_answer, vote_key=answer_tag_vote),
    "summary_match": RewardEntry(build_summary_match),
    "no_phrase": RewardEntry(build_no_phrase),
    "math_accuracy": RewardEntry(build_math_accuracy, vote_key=answer_vote, vote_response=vote_response),
    "format_r1zero": RewardEntry(build_format_r1zero),
    "format_r1": RewardEntry(build_format_r1),
    "language_consistency": RewardEntry(build_language_consistency),
    "code_tests": RewardEntry(build_code_tests, vote_key=program_vote),
}


def register(name: str, reward: RewardEntry) -> None:
    """Add a reward defined outside this package (a plugin module, a test) to the table.
    Scoring-pool workers see it when the module that calls this is among the pool's
    ``imports``."""
    if name in REWARDS and REWARDS[name] != reward:
        raise ValueError(f"reward {name!r} is registered twice")
    REWARDS[name] = reward


def available() -> list[str]:
    return sorted(REWARDS)


def entry(name: str) -> RewardEntry:
    """The table's entry for ``name``; ValueError listing the known names if none."""
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; choose one of {', '.join(available())}") from None


def build_reward(name: str, **options: Any) -> RewardFn:
    """The reward function registered as ``name``, configured with ``options``."""
    return entry(name).build(**options)


def combine(results: dict[str, RewardResult], weights: dict[str, float]) -> float:
    """Weighted sum of scores; both dicts must name the same rewards."""
    if results.keys() != weights.keys():
        raise ValueError(f"rewards {sorted(results)} and weights {sorted(weights)} differ")
    return float(sum(weights[k] * results[k].score for k in results))
