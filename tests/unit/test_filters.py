"""Rejection-sampling filters (evaluation/filters.py), table-driven."""

from __future__ import annotations

import pytest

from evaluation.filters import (
    REASONS,
    ReadabilityRules,
    has_code_in_cot,
    has_long_paragraph,
    longest_paragraph_chars,
    mixes_languages,
    select,
    unreadable_reason,
)

CLEAN = "<think> First add the units, then the tens. </think> <answer> 42 </answer>"
MIXED = "<think> First add the units, 然后 add the tens. </think> <answer> 42 </answer>"
CODE = "<think> Let me test:\n```python\nprint(1)\n```\n</think> Answer: \\boxed{1}"
LONG = "<think> " + "word " * 100 + "\n\nshort. </think> <answer> 1 </answer>"  # 500-char paragraph
RULES = ReadabilityRules(language="en", max_paragraph_chars=200)


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        (CLEAN, None),
        (MIXED, "language_mixing"),  # one Han word among Latin ones
        (LONG, "long_paragraph"),
        (CODE, "code_in_cot"),
        # code in the final answer, after </think>, is the answer, not the CoT
        ("<think> Plan: loop over the list. </think>\n```python\ndef f(): pass\n```", None),
        # formulas and one-letter variables are no language: not mixing
        ("<think> Let $x^2 = 4$, so x = 2 or α = 3. </think> <answer> 2 </answer>", None),
        # mixing outside the CoT (the summary) is not judged
        ("<think> Add them up. </think> 答案 42", None),
        # the prompt opened <think>: the CoT is everything before </think>
        (" Add 然后 carry. </think> <answer> 3 </answer>", "language_mixing"),
        # the first rule that applies wins: mixed and with code
        ("<think> 然后 test\n```\nx\n```\n</think>", "language_mixing"),
    ],
)
def test_unreadable_reason(response, reason):
    assert unreadable_reason(response, RULES) == reason


@pytest.mark.parametrize(
    ("text", "longest"),
    [("", 0), ("abc", 3), ("ab\n\nabcd\n \nx", 4), ("one\ntwo", 7), ("  pad  \n\n\tx", 3)],
)
def test_longest_paragraph_chars(text, longest):
    assert longest_paragraph_chars(text) == longest


def test_thresholds_are_inclusive_bounds():
    para = "<think> " + "a" * 50 + " </think>"
    assert not has_long_paragraph(para, 50) and has_long_paragraph(para, 49)
    # 9 English words + 3 Han characters = 2 Chinese words (1.5 chars a word): 9/11 = 0.818
    text = "<think> one two three four five six seven eight nine 然后好 </think>"
    assert not mixes_languages(text, "en", min_share=0.81)
    assert mixes_languages(text, "en", min_share=0.82)
    assert mixes_languages(text, "zh", min_share=0.5)
    assert not has_code_in_cot("no think tags at all\n```python\nx = 1\n```")


def test_rules_reject_bad_settings():
    with pytest.raises(ValueError, match="unknown language"):
        ReadabilityRules(language="xx")
    with pytest.raises(ValueError, match="min_language_share"):
        ReadabilityRules(min_language_share=0)
    with pytest.raises(ValueError, match="max_paragraph_chars"):
        ReadabilityRules(max_paragraph_chars=0)


@pytest.mark.parametrize(
    ("responses", "correct", "cap", "expected"),
    [
        # wrong answers go first, whatever else is wrong with them
        ([CLEAN, MIXED, CODE], [False, False, False], None, ["incorrect"] * 3),
        ([CLEAN, MIXED, LONG, CODE], [True] * 4, None, [None, "language_mixing", "long_paragraph", "code_in_cot"]),
        # identical (up to surrounding whitespace) responses: the first is kept
        ([CLEAN, " " + CLEAN + "\n", CLEAN], [True] * 3, None, [None, "duplicate", "duplicate"]),
        # a duplicate of a wrong response is still "incorrect", and the next right one is kept
        ([CLEAN, CLEAN.replace("42", "43"), CLEAN.replace("42", "43")], [False, True, True], None,
         ["incorrect", None, "duplicate"]),
        # at most 2 kept: the first two survivors in sample order
        ([CLEAN, MIXED, CLEAN + " ", CLEAN.replace("units", "ones"), CLEAN.replace("units", "digits")],
         [True] * 5, 2, [None, "language_mixing", "duplicate", None, "over_cap"]),
    ],
)
def test_select(responses, correct, cap, expected):
    reasons = select(responses, correct, RULES, max_per_prompt=cap)
    assert reasons == expected
    assert all(r is None or r in REASONS for r in reasons)


def test_select_checks_its_inputs():
    with pytest.raises(ValueError, match="verdicts"):
        select([CLEAN], [True, False], RULES)
    with pytest.raises(ValueError, match="max_per_prompt"):
        select([CLEAN], [True], RULES, max_per_prompt=0)
