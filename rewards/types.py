"""The one result type every reward returns, and the shape of a reward function."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass


class RewardStatus(str, enum.Enum):
    """Why a reward came out as it did.

    ``UNGRADABLE`` (the reference itself could not be parsed) is not ``WRONG``: the
    first is a data problem to count and report, the second a training signal.
    """

    CORRECT = "correct"
    WRONG = "wrong"
    NO_ANSWER = "no_answer"
    UNGRADABLE = "ungradable"
    TIMEOUT = "timeout"
    ERROR = "error"


@dataclass(frozen=True)
class RewardResult:
    """A score with the reason for it.

    ``score`` is the reward's value (1.0/0.0 for pass/fail rewards, a share for the
    language reward). ``reason`` is one short human-readable line.
    """

    score: float
    status: RewardStatus
    reason: str = ""

    def __post_init__(self) -> None:
        if not math.isfinite(self.score):
            raise ValueError(f"reward score must be finite, got {self.score!r}")
        if not isinstance(self.status, RewardStatus):
            raise TypeError(f"status must be a RewardStatus, got {type(self.status).__name__}")


# A reward: ``(response, reference) -> RewardResult``, deterministic, no I/O.
RewardFn = Callable[[str, str], RewardResult]
