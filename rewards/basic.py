"""The exact-answer reward: no parser, for tasks whose answers are plain strings.

It reads the R1-Zero output shape of Table 1: ``<think> … </think> <answer> … </answer>``.
The format rewards live in ``rewards.format``, the math reward in ``rewards.math``.
"""

from __future__ import annotations

import re

from rewards.registry import RewardFn, register
from rewards.types import RewardResult, RewardStatus

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer_tag(response: str) -> str | None:
    """Text of the last ``<answer>…</answer>`` block, stripped; None if there is none."""
    found = _ANSWER.findall(response)
    return found[-1].strip() if found else None


def exact_answer(response: str, reference: str) -> RewardResult:
    """1 when the last ``<answer>`` equals the reference after stripping whitespace."""
    answer = extract_answer_tag(response)
    if answer is None:
        return RewardResult(0.0, RewardStatus.NO_ANSWER, "no <answer> block")
    gold = reference.strip()
    if not gold:
        return RewardResult(0.0, RewardStatus.UNGRADABLE, "empty reference answer")
    if answer == gold:
        return RewardResult(1.0, RewardStatus.CORRECT, "answer matches")
    return RewardResult(0.0, RewardStatus.WRONG, f"answer {answer[:40]!r} != {gold[:40]!r}")


@register("exact_answer")
def _exact_answer_factory() -> RewardFn:
    return exact_answer
