"""Math answers, the public front: ``equivalent`` for anyone's code, and the
``math_accuracy`` reward with the extraction it uses (``rewards.math_answer``).

``equivalent`` bounds itself in time, since users call it from their own threads:
sympy can be made to run for ever (``9!!!!``) and holds the GIL while it does, so no
thread or ``signal.alarm`` can stop it. Answers that look cheap (short, no factorials,
no power towers or long exponents: ``cheap_to_compare``) are compared in this process,
the rest in a pooled worker process under a deadline (``rewards.isolation.bounded``).
The reward itself has no time limit: it is scored through
``rewards.isolation.pool.ScoringPool``, which bounds every call.
"""

from __future__ import annotations

import sys
from typing import Any

from rewards.config import RewardSpec
from rewards.isolation.bounded import score_within
from rewards.math_answer import (
    Answer,
    Extraction,
    answer_vote,
    as_written,
    build_math_accuracy,
    cheap_to_compare,
    compare,
    extract_answer,
    last_boxed,
    math_accuracy,
    unbox,
    vote_response,
)
from rewards.types import RewardStatus

__all__ = [
    "Answer",
    "Extraction",
    "answer_vote",
    "build_math_accuracy",
    "equivalent",
    "extract_answer",
    "last_boxed",
    "math_accuracy",
    "unbox",
    "vote_response",
]


def _equivalent_in_worker(pred: str, gold: str, options: dict[str, Any], timeout_s: float) -> bool | None:
    """Math-Verify's verdict from a worker process (None: ungradable gold); False past
    ``timeout_s``. Raises when the worker could not compare: the caller compares strings."""
    reward_options = {"extraction": "loose", "max_answer_chars": sys.maxsize, **options}
    spec = RewardSpec(name="math_accuracy", options=reward_options)
    result = score_within(spec, pred, gold, timeout_s)
    if result.status is RewardStatus.CORRECT:
        return True
    if result.status is RewardStatus.UNGRADABLE:
        return None
    if result.status is RewardStatus.ERROR:
        raise RuntimeError(result.reason)
    return False  # WRONG, NO_ANSWER, TIMEOUT


def equivalent(
    pred: str,
    gold: str,
    *,
    float_rounding: int | None = None,
    min_significant_digits: int = 3,
    strict_variables: bool = True,
    set_relation: bool = False,
    timeout_s: float | None = 5.0,
) -> bool | None:
    """Whether ``pred`` states the same mathematical answer as ``gold``.

    Both may be bare answers (``\\frac{1}{2}``, ``1,000``, ``x=3``), ``$…$`` LaTeX, boxed,
    or whole responses; the final answer is taken from each the same way
    (``extract_answer(strict=False)``), as Math-Verify's own tests do. Returns None when
    the gold answer cannot be parsed ("ungradable", not "wrong").

    Safe to call from any thread; never raises for any ``pred`` or ``gold``. It returns
    within ``timeout_s`` seconds: answers that could keep sympy busy (factorials, power
    towers, long exponents, long answers) are compared in a worker process
    (``rewards.isolation.bounded``), and one not decided in time is False — not shown
    equivalent. ``timeout_s=None``: everything in this process, with no limit. Answers
    Math-Verify cannot compare (``12:00``, ``3:4`` against ``3 : 4``) are compared as the
    strings they are, normalised (``as_written``).

    Conventions (they differ between graders, so they are arguments):
      float_rounding: decimal places floats are rounded to before comparing. None: the
        places shown by the prediction's most precise decimal, when that has at least
        ``min_significant_digits`` significant digits (2.6667 = 8/3, 0.3333 = 1/3,
        0.067 ≠ 0.066793), else 6 (Math-Verify's default).
      strict_variables: f(x) ≠ f(y) (Math-Verify ``strict=True``).
      set_relation: compare a relation in the prediction with a set in the gold
        (``-2 ≤ x ≤ 7`` vs ``[-2, 7]``); the other way round is always allowed.
      Lists: "1, 2, 3" is the set {1, 2, 3}, order free (MATH: "all solutions").
    """
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")
    pred, gold = str(pred), str(gold)
    try:
        pred_answer = extract_answer(pred, strict=False)
        gold_answer = extract_answer(gold, strict=False)
    except Exception:  # extraction is plain string work; should it fail, compare strings
        return as_written(pred) == as_written(gold) if gold.strip() else None
    if gold_answer is None:
        return None
    if pred_answer is None:
        return False
    if pred_answer.text.strip() == gold_answer.text.strip():
        return True
    options = {
        "float_rounding": float_rounding,
        "min_significant_digits": min_significant_digits,
        "strict_variables": strict_variables,
        "set_relation": set_relation,
    }
    try:
        if timeout_s is None or (cheap_to_compare(pred_answer.text) and cheap_to_compare(gold_answer.text)):
            return compare(pred_answer.text, gold_answer.text, **options)[0]
        return _equivalent_in_worker(pred, gold, options, timeout_s)
    except Exception:  # Math-Verify could not compare them: ``12:00``, ``3:4`` …
        return as_written(pred_answer.text) == as_written(gold_answer.text)
