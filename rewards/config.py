"""Reward configuration: which rewards, their weights, and how they are run."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class RewardSpec(BaseModel):
    """One named reward with its weight in the sum and its options."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    weight: float = 1.0
    options: dict[str, Any] = Field(default_factory=dict)
    kinds: tuple[str, ...] | None = Field(
        default=None, description="prompt types this reward scores (None: every type)")

    def applies_to(self, kind: str) -> bool:
        return self.kinds is None or kind in self.kinds


class RewardModelSpec(BaseModel):
    """A learned reward (§2.3.4): a Hugging Face sequence-classification model.

    ``scope`` says what it reads: ``summary`` is the text after the last ``</think>``
    (the paper judges helpfulness on the summary only), ``response`` the whole response,
    reasoning included (harmlessness). Its score is logit ``label`` of the model, added to
    the reward with ``weight`` for prompts of the listed ``kinds``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(description="local directory of an AutoModelForSequenceClassification (or a hub id)")
    scope: Literal["summary", "response"]
    weight: float = 1.0
    label: int = Field(default=0, ge=0, description="which output logit is the score")
    kinds: tuple[str, ...] = ("general",)
    input_format: Literal["auto", "chat", "text"] = Field(
        default="auto", description="chat: the tokenizer's chat template; text: 'User: …\\nAssistant: …'; "
        "auto: chat when the tokenizer has a template")
    max_input_tokens: int = Field(default=2048, ge=8, description="tokens read; longer inputs keep their end")
    batch_size: int = Field(default=16, ge=1, description="inputs (question + judged text) per forward pass")


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
    reward_models: tuple[RewardModelSpec, ...] = ()
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

    def rules_for(self, kind: str) -> list[RewardSpec]:
        return [s for s in self.rewards if s.applies_to(kind)]

    def models_for(self, kind: str) -> list[RewardModelSpec]:
        return [m for m in self.reward_models if kind in m.kinds]

    def model_post_init(self, __context: Any) -> None:
        model_names = [m.name for m in self.reward_models]
        clash = sorted({s.name for s in self.rewards} & set(model_names))
        if clash or len(set(model_names)) != len(model_names):
            raise ValueError(f"reward and reward-model names must be unique, got {clash or model_names}")
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
