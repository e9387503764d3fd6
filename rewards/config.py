"""Reward configuration: which rewards, their weights, and how they are run."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class RewardSpec(BaseModel):
    """One named reward with its weight in the sum and its options."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    weight: float = 1.0
    options: dict[str, Any] = Field(default_factory=dict)


class RewardsConfig(BaseModel):
    """The reward set of an RL stage.

    Paper defaults (§2.2.2): accuracy plus the ``<think>`` format reward, summed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    rewards: tuple[RewardSpec, ...] = (
        RewardSpec(name="exact_answer", weight=1.0),
        RewardSpec(name="format_r1zero", weight=0.1),
    )
    # Which reward's pass/fail is reported as `accuracy` and which as `format_ok`.
    accuracy_reward: str = "exact_answer"
    format_reward: str | None = "format_r1zero"
    workers: int = Field(default=2, ge=1, description="scoring processes per reward actor")
    timeout_s: float = Field(default=5.0, gt=0, description="wall-clock limit per scoring call")

    @field_validator("rewards")
    @classmethod
    def _unique_names(cls, specs: tuple[RewardSpec, ...]) -> tuple[RewardSpec, ...]:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"each reward may appear once, got {names}")
        if not specs:
            raise ValueError("at least one reward is needed, e.g. rewards: [{name: exact_answer}]")
        return specs

    def model_post_init(self, __context: Any) -> None:
        names = {s.name for s in self.rewards}
        if self.accuracy_reward not in names:
            raise ValueError(
                f"accuracy_reward {self.accuracy_reward!r} is not among the rewards {sorted(names)}"
            )
        if self.format_reward is not None and self.format_reward not in names:
            raise ValueError(
                f"format_reward {self.format_reward!r} is not among the rewards {sorted(names)};"
                " set format_reward: null to report no format metric"
            )
