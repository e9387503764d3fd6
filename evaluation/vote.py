"""What votes in cons@k, and which votes count as one (DeepSeek-R1 §3).

Each reward's entry in ``rewards.registry`` says what a completion votes for (its
``vote_key``; without one, the verdict votes) and whether votes group by equality or by
equivalence under the reward itself (``vote_response``). Here the entries are applied:
``vote_key`` for one completion, ``same_vote`` for the grouping that
``evaluation.estimators.consensus_correct`` takes.

Equivalence is graded in a scoring pool (``rewards.isolation.pool``), so a pathological
answer costs a timeout, not a hung driver; a timeout or an error counts as "not the same".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rewards.config import RewardSpec
from rewards.isolation.pool import ScoringPool
from rewards.registry import entry
from rewards.types import RewardStatus

Same = Callable[[str, str], bool]


def vote_key(reward: str, response: str, correct: bool, options: Mapping[str, Any]) -> str | None:
    """What ``response`` votes for in cons@k under ``reward`` configured with ``options``;
    None: no vote. ``correct``: the reward's verdict, the vote of rewards without a key."""
    key = entry(reward).vote_key
    if key is None:
        return "correct" if correct else "wrong"
    return key(response, options)


def vote_pairs(vote_lists: Sequence[Sequence[str | None]]) -> list[tuple[str, str]]:
    """The (representative, vote) pairs a majority vote can ask about, sorted: per
    problem, each distinct vote against the distinct votes before it."""
    pairs: set[tuple[str, str]] = set()
    for votes in vote_lists:
        distinct = list(dict.fromkeys(v for v in votes if v is not None))
        pairs.update((rep, v) for i, v in enumerate(distinct) for rep in distinct[:i])
    return sorted(pairs)


def same_from(table: Mapping[tuple[str, str], bool]) -> Same:
    """``same(representative, vote)``: equal, or graded the same in ``table``."""
    return lambda rep, v: rep == v or table.get((rep, v), False)


def same_vote(reward: str, vote_lists: Sequence[Sequence[str | None]], options: Mapping[str, Any], *,
              workers: int, timeout_s: float) -> Same:
    """``same(representative, vote)`` for the votes of ``reward`` in ``vote_lists`` (one
    list per problem). Votes of a reward without ``vote_response`` are the same when
    equal. Otherwise the reward, with ``options``, grades each pair that
    ``vote_pairs`` lists in a scoring pool of ``workers`` processes, ``timeout_s`` per
    call: the vote, stated as a response, against the representative as reference."""
    stated = entry(reward).vote_response
    if stated is None:
        return lambda rep, v: rep == v
    pairs = vote_pairs(vote_lists)
    table: dict[tuple[str, str], bool] = {}
    if pairs:
        spec = RewardSpec(name=reward, options=dict(options))
        with ScoringPool([spec], workers=workers, timeout_s=timeout_s) as pool:
            results = pool.score([(stated(v), rep) for rep, v in pairs])
        table = {p: r[reward].status == RewardStatus.CORRECT for p, r in zip(pairs, results, strict=True)}
    return same_from(table)
