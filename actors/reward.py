"""Reward actor: scores whole groups in a process pool, never blocking the driver."""

from __future__ import annotations

import math
import time

from actors.telemetry import Telemetry
from learner.batch import Group, ScoredGroup
from rewards.config import RewardsConfig
from rewards.pool import ScoringPool
from rewards.registry import combine
from rewards.types import RewardStatus


class RewardActor:
    """Applies the configured rewards to each completion of a group.

    Scoring runs in worker processes with a wall-clock limit per call (``rewards.pool``),
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
        """``group`` scored (Ray resolves an ObjectRef argument before the call)."""
        start = time.monotonic()
        results = self.pool.score([(c.text, group.reference) for c in group.completions])
        self.telemetry.observe("reward_seconds", time.monotonic() - start)
        self.telemetry.inc("reward_timeouts_total",
                           sum(r.status == RewardStatus.TIMEOUT for res in results for r in res.values()))
        rewards = tuple(combine(r, self.weights) for r in results)
        accuracy = tuple(
            1.0 if r[self.config.accuracy_reward].status == RewardStatus.CORRECT else 0.0
            for r in results
        )
        fmt = self.config.format_reward
        format_ok = tuple(
            math.nan if fmt is None else (1.0 if r[fmt].status == RewardStatus.CORRECT else 0.0)
            for r in results
        )
        return ScoredGroup(group, rewards, accuracy, format_ok)

    def stats(self):
        return self.pool.stats()

    def close(self) -> None:
        self.pool.close()
