"""The exact-answer reward: no parser, for tasks whose answers are plain strings.

It reads the R1-Zero output shape of Table 1: ``<think> … </think> <answer> … </answer>``.
The format rewards live in ``rewards.format``, the math reward in ``rewards.math``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from rewards.types import RewardFn, RewardResult, RewardStatus

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer_tag(response: str) -> str | None:
    """Text of the last ``<answer>…</answer>`` block, stripped; None if there is none."""
    found = _ANSWER.findall(response)
    return found[-1].strip() if found else None


def _same_text(found: str | None, gold: str, *, what: str, missing: str) -> RewardResult:
    """CORRECT when ``found`` equals ``gold``; ``found`` None: NO_ANSWER (``missing``)."""
    if found is None:
        return RewardResult(0.0, RewardStatus.NO_ANSWER, missing)
    if not gold:
        return RewardResult(0.0, RewardStatus.UNGRADABLE, f"empty reference {what}")
    if found == gold:
        return RewardResult(1.0, RewardStatus.CORRECT, f"{what} matches")
    return RewardResult(0.0, RewardStatus.WRONG, f"{what} {found[:40]!r} != {gold[:40]!r}")


def exact_answer(response: str, reference: str) -> RewardResult:
    """1 when the last ``<answer>`` equals the reference after stripping whitespace."""
    return _same_text(extract_answer_tag(response), reference.strip(), what="answer", missing="no <answer> block")


def build_exact_answer() -> RewardFn:
    """``exact_answer`` as the registry builds it (it takes no options)."""
    return exact_answer


def answer_tag_vote(response: str, options: Mapping[str, Any]) -> str | None:
    """What a response votes for in cons@k under ``exact_answer``: its ``<answer>`` text,
    compared by string equality as the reward compares; None (no vote) without one."""
    del options  # exact_answer takes none
    return extract_answer_tag(response)


def summary_of(response: str) -> str:
    """The text after the last ``</think>``; empty when a ``<think>`` is left open; the
    whole response when it has no reasoning block."""
    end = response.rfind("</think>")
    if end >= 0:
        return response[end + len("</think>"):].strip()
    return "" if "<think>" in response else response.strip()


def summary_match(response: str, reference: str) -> RewardResult:
    """1 when the summary (text after the last ``</think>``) equals the reference, with
    runs of whitespace collapsed."""
    summary = " ".join(summary_of(response).split())
    return _same_text(summary or None, " ".join(reference.split()), what="summary", missing="no summary")


def build_summary_match() -> RewardFn:
    """``summary_match`` as the registry builds it (it takes no options)."""
    return summary_match


def build_no_phrase(phrases: list[str] | tuple[str, ...] = ()) -> RewardFn:
    """1 when none of ``phrases`` occurs anywhere in the response, reasoning included
    (case-insensitive): a blocklist rule."""
    blocked = [p.lower() for p in phrases if p.strip()]
    if not blocked:
        raise ValueError("no_phrase needs options.phrases: a non-empty list of phrases to block")

    def reward(response: str, reference: str) -> RewardResult:
        text = response.lower()
        found = next((p for p in blocked if p in text), None)
        if found is None:
            return RewardResult(1.0, RewardStatus.CORRECT, "no blocked phrase")
        return RewardResult(0.0, RewardStatus.WRONG, f"contains {found!r}")

    return reward
