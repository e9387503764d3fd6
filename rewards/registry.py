"""Rewards by name, and their weighted sum.

A reward is a deterministic function ``(response, reference) -> RewardResult``. Config
names rewards and weights; ``build_reward`` turns a name and keyword options into such a
function, and ``combine`` sums the weighted scores (paper §2.3.2: accuracy and language
consistency are summed directly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rewards.types import RewardResult

RewardFn = Callable[[str, str], RewardResult]
RewardFactory = Callable[..., RewardFn]

_FACTORIES: dict[str, RewardFactory] = {}


def register(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator: make ``factory(**options) -> RewardFn`` available under ``name``."""

    def wrap(factory: RewardFactory) -> RewardFactory:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"reward {name!r} is registered twice")
        _FACTORIES[name] = factory
        return factory

    return wrap


def available() -> list[str]:
    _load_builtin()
    return sorted(_FACTORIES)


def build_reward(name: str, **options: Any) -> RewardFn:
    """The reward function registered as ``name``, configured with ``options``."""
    _load_builtin()
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(
            f"unknown reward {name!r}; choose one of {', '.join(available())}"
        ) from None
    return factory(**options)


@dataclass(frozen=True)
class WeightedReward:
    name: str
    weight: float
    fn: RewardFn


def combine(results: dict[str, RewardResult], weights: dict[str, float]) -> float:
    """Weighted sum of scores; both dicts must name the same rewards."""
    if results.keys() != weights.keys():
        raise ValueError(f"rewards {sorted(results)} and weights {sorted(weights)} differ")
    return float(sum(weights[k] * results[k].score for k in results))


def _load_builtin() -> None:
    # Importing the modules runs their @register decorators.
    import rewards.basic  # noqa: F401

    for optional in ("rewards.math", "rewards.format", "rewards.language", "rewards.code"):
        try:
            __import__(optional)
        except ModuleNotFoundError as err:  # module not written yet or extra not installed
            if err.name != optional:
                raise
