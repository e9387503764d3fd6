"""Rejection-sampling filters (DeepSeek-R1 §2.3.3), pure functions of response text.

"we filtered out chain-of-thought with mixed languages, long paragraphs, and code
blocks", keeping only correct responses. Each sample is dropped for the *first* reason
that applies, in the order of ``REASONS`` (so the counts add up to the samples dropped):

    incorrect → language_mixing → long_paragraph → code_in_cot → duplicate → over_cap

The chain of thought is the text inside ``<think>…</think>`` (before ``</think>`` when
the prompt opened the block), as ``rewards.language.chain_of_thought`` reads it; a
response without think tags is all chain of thought for the language and paragraph
rules, but has no code-in-CoT to find (its code is its answer).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from rewards.language import SCRIPTS, chain_of_thought, count_words

REASONS: tuple[str, ...] = ("incorrect", "language_mixing", "long_paragraph", "code_in_cot", "duplicate", "over_cap")

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class ReadabilityRules:
    """``language``: the CoT's target language (``rewards.language.SCRIPTS``).
    ``min_language_share``: below this share of target-language words the CoT mixes
    languages (1.0: any word in another script). ``max_paragraph_chars``: a paragraph
    (text between blank lines) longer than this is a wall of text."""

    language: str = "en"
    min_language_share: float = 1.0
    max_paragraph_chars: int = 2000

    def __post_init__(self) -> None:
        if self.language not in SCRIPTS:
            raise ValueError(f"unknown language {self.language!r}; choose one of {', '.join(SCRIPTS)}")
        if not 0.0 < self.min_language_share <= 1.0:
            raise ValueError(f"min_language_share must be in (0, 1], got {self.min_language_share}")
        if self.max_paragraph_chars < 1:
            raise ValueError(f"max_paragraph_chars must be >= 1, got {self.max_paragraph_chars}")


def think_block(response: str) -> str | None:
    """The text inside the think block, or None when the response has no think tags."""
    if "<think>" not in response and "</think>" not in response:
        return None
    return chain_of_thought(response)


def mixes_languages(response: str, language: str = "en", *, min_share: float = 1.0) -> bool:
    """The CoT's share of ``language`` words is below ``min_share`` (a CoT without words,
    only formulas, mixes nothing)."""
    share = count_words(chain_of_thought(response)).share(SCRIPTS[language])
    return share is not None and share < min_share


def longest_paragraph_chars(text: str) -> int:
    """Characters in the longest paragraph (blank-line separated, stripped) of ``text``."""
    return max((len(p.strip()) for p in _PARAGRAPH_BREAK.split(text)), default=0)


def has_long_paragraph(response: str, max_chars: int) -> bool:
    return longest_paragraph_chars(chain_of_thought(response)) > max_chars


def has_code_in_cot(response: str) -> bool:
    """A fenced code block (```) inside the think block."""
    cot = think_block(response)
    return cot is not None and "```" in cot


def unreadable_reason(response: str, rules: ReadabilityRules) -> str | None:
    """The first readability rule ``response`` breaks, or None."""
    if mixes_languages(response, rules.language, min_share=rules.min_language_share):
        return "language_mixing"
    if has_long_paragraph(response, rules.max_paragraph_chars):
        return "long_paragraph"
    if has_code_in_cot(response):
        return "code_in_cot"
    return None


def select(responses: Sequence[str], correct: Sequence[bool], rules: ReadabilityRules,
           *, max_per_prompt: int | None = None) -> list[str | None]:
    """For one prompt's samples, why each is dropped (a ``REASONS`` entry) or None if kept.

    Duplicates are identical texts after stripping surrounding whitespace; the first is
    kept. With ``max_per_prompt``, the first that many survivors in sample order are
    kept (sample order is random, so this is an unbiased pick, not the shortest ones).
    """
    if len(responses) != len(correct):
        raise ValueError(f"{len(responses)} responses but {len(correct)} verdicts")
    if max_per_prompt is not None and max_per_prompt < 1:
        raise ValueError(f"max_per_prompt must be >= 1 or None, got {max_per_prompt}")
    seen: set[str] = set()
    kept = 0
    out: list[str | None] = []
    for text, ok in zip(responses, correct, strict=True):
        reason = "incorrect" if not ok else unreadable_reason(text, rules)
        if reason is None and text.strip() in seen:
            reason = "duplicate"
        if reason is None and max_per_prompt is not None and kept >= max_per_prompt:
            reason = "over_cap"
        if reason is None:
            seen.add(text.strip())
            kept += 1
        out.append(reason)
    return out
