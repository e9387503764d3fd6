"""Reward actor: scores whole groups in a process pool, never blocking the driver."""

from __future__ import annotations

import math
import time

from actors.telemetry import Telemetry
from learner.batch import Group, ScoredGroup
from rewards.config import RewardsConfig
from rewards.isolation.pool import ScoringPool
from rewards.registry import combine
from rewards.types import RewardStatus


class RewardActor:
    """Applies the configured rewards to each completion of a group.

    Scoring runs in worker processes with a wall-clock limit per call (``rewards.isolation.pool``),
    so a verifier that hangs costs one timeout, counted, not a stuck step.
    """

    def __init__(self, config: RewardsConfig, run_name: str = "", index: int = 0) -> None:
        self.config = config
        self.telemetry = Telemetry(run_name, f"reward-{index}")
        self.weights = {s.name: s.weight for s in config.rewards}
        self.pool = ScoringPool(config.rewards, workers=config.workers, timeout_s=config.timeout_s)

    def ready(self) -> bool:
        return True

    def score(self, group: Group) -> ScoredGroup:
        """``group`` scored by the rewards that apply to its prompt type (Ray resolves an
        ObjectRef argument before the call). Rewards that do not apply count 0; accuracy
        and format are nan where their reward does not apply. Each completion is flagged
        where any of its rewards ended in ERROR, TIMEOUT or UNGRADABLE (the learner counts
        them and leaves ungradable completions out of the advantages)."""
        start = time.monotonic()
        names = [s.name for s in self.config.rules_for(group.kind)]
        texts = [(c.text, group.reference) for c in group.completions]
        results = self.pool.score(texts, names) if names else [{} for _ in texts]
        self.telemetry.observe("reward_seconds", time.monotonic() - start)
        self.telemetry.inc("reward_timeouts_total",
                           sum(r.status == RewardStatus.TIMEOUT for res in results for r in res.values()))
        weights = {n: self.weights[n] for n in names}
        rewards = tuple(combine(r, weights) for r in results)
        return ScoredGroup(group, rewards, _passed(results, self.config.accuracy_reward),
                           _passed(results, self.config.format_reward),
                           reward_error=_any_status(results, RewardStatus.ERROR),
                           reward_timeout=_any_status(results, RewardStatus.TIMEOUT),
                           ungradable=_any_status(results, RewardStatus.UNGRADABLE))

    def score_groups(self, *groups: Group) -> tuple[ScoredGroup, ...]:
        """``score`` of several groups in one call, one result each (the driver asks for as
        many returns): a call costs the driver more than the groups it carries."""
        return tuple(self.score(g) for g in groups)

    def close(self) -> None:
        self.pool.close()


def _passed(results: list[dict], name: str | None) -> tuple[float, ...]:
    """1.0 / 0.0 per completion by reward ``name``'s status; nan where it did not run."""
    return tuple(math.nan if name is None or name not in r else float(r[name].status == RewardStatus.CORRECT)
                 for r in results)


def _any_status(results: list[dict], status: RewardStatus) -> tuple[bool, ...]:
    """Per completion: did any of its rewards end with ``status``?"""
    return tuple(any(r.status == status for r in res.values()) for res in results)
