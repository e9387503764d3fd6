"""Language-consistency reward (DeepSeek-R1 §2.3.2).

"calculated as the proportion of target language words in the CoT", and summed with
the accuracy reward (weights come from config: ``rewards.registry.combine``).

Words are classified by script, not by a language model: a run of Latin letters is an
English word, each Han character a Chinese one, and so on (``SCRIPTS``). So "en" means
"written in Latin letters" — French reads as English here — and Japanese text that is
all kanji reads as Chinese. What is not a word in any language is left out of both the
count and the total: numbers, punctuation, LaTeX and code (``$…$``, ``\\frac``,
`` `…` ``), and single Latin or Greek letters, which are variables (``x``, ``α``).

Chinese writes no spaces, so Han characters are counted as ``han_chars_per_word`` (1.5:
the mean length of a Chinese word) characters to a word; otherwise one Chinese clause
would outweigh an English sentence and the share would flatter Chinese.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rewards.types import RewardFn, RewardResult, RewardStatus

# Unicode ranges per script. Han: CJK Unified Ideographs, extension A, compatibility.
_HAN = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_KANA = r"\u3040-\u309f\u30a0-\u30ff"
_HANGUL = r"\uac00-\ud7af\u1100-\u11ff"
_CYRILLIC = r"\u0400-\u04ff"
_GREEK = r"\u0370-\u03ff"
_ARABIC = r"\u0600-\u06ff"
_DEVANAGARI = r"\u0900-\u097f"
_LATIN = r"A-Za-z\u00c0-\u024f"

# The scripts each supported language is written in.
SCRIPTS: dict[str, tuple[str, ...]] = {
    "en": ("latin",),
    "zh": ("han",),
    "ja": ("kana", "han"),  # so Chinese in a Japanese CoT is not caught
    "ko": ("hangul",),
    "ru": ("cyrillic",),
    "el": ("greek",),
    "ar": ("arabic",),
    "hi": ("devanagari",),
}

_WORD = re.compile(
    rf"(?P<han>[{_HAN}])|(?P<kana>[{_KANA}]+)|(?P<hangul>[{_HANGUL}]+)"
    rf"|(?P<cyrillic>[{_CYRILLIC}]+)|(?P<greek>[{_GREEK}]+)|(?P<arabic>[{_ARABIC}]+)"
    rf"|(?P<devanagari>[{_DEVANAGARI}]+)|(?P<latin>[{_LATIN}]+(?:['’][{_LATIN}]+)*)"
)
# Math and code are no language's words: remove them before counting.
_NOT_PROSE = re.compile(
    r"\$\$.+?\$\$|\$[^$\n]+?\$|\\\[.+?\\\]|\\\(.+?\\\)"  # LaTeX math
    r"|```.*?```|`[^`\n]+`"  # code blocks and spans
    r"|\\[A-Za-z]+|https?://\S+",  # stray LaTeX commands, links
    re.DOTALL,
)


@dataclass(frozen=True)
class WordCounts:
    """Words per script in a text (Han counted in words, see the module docstring)."""

    by_script: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.by_script.values())

    def share(self, scripts: tuple[str, ...]) -> float | None:
        """Share of words in ``scripts``; None when the text has no words at all."""
        total = self.total
        if total == 0:
            return None
        return sum(self.by_script.get(s, 0.0) for s in scripts) / total


def count_words(text: str, *, han_chars_per_word: float = 1.5) -> WordCounts:
    """Words of ``text`` per script, leaving out math, code and one-letter variables."""
    counts: dict[str, float] = {}
    for m in _WORD.finditer(_NOT_PROSE.sub(" ", text)):
        script = str(m.lastgroup)
        if script in ("latin", "greek") and len(m.group(0)) == 1:
            continue  # a variable, not a word
        weight = 1.0 / han_chars_per_word if script == "han" else 1.0
        counts[script] = counts.get(script, 0.0) + weight
    return WordCounts(counts)


def chain_of_thought(response: str) -> str:
    """The reasoning part: inside ``<think>…</think>``, or before ``</think>`` when the
    prompt opened the block, or the whole response when there are no think tags."""
    close = response.find("</think>")
    if close < 0:
        open_ = response.find("<think>")
        return response if open_ < 0 else response[open_ + len("<think>") :]
    open_ = response.rfind("<think>", 0, close)
    return response[open_ + len("<think>") if open_ >= 0 else 0 : close]


def language_consistency(
    response: str,
    reference: str = "",
    *,
    language: str = "en",
    han_chars_per_word: float = 1.5,
) -> RewardResult:
    """Share of the chain of thought's words written in ``language``'s script.

    A chain of thought with no words (empty, or only formulas) scores 0 with
    ``NO_ANSWER``: scoring it 1 would reward dropping the reasoning.
    """
    del reference  # consistency is a property of the response alone
    scripts = SCRIPTS[language]
    counts = count_words(chain_of_thought(response), han_chars_per_word=han_chars_per_word)
    share = counts.share(scripts)
    if share is None:
        return RewardResult(0.0, RewardStatus.NO_ANSWER, "no words in the chain of thought")
    others = sorted(
        ((n, s) for s, n in counts.by_script.items() if s not in scripts), reverse=True
    )
    mixed = ", ".join(f"{s} {n:.3g}" for n, s in others[:3])
    reason = f"{share:.0%} {language} of {counts.total:.3g} words" + (f"; also {mixed}" if mixed else "")
    status = RewardStatus.CORRECT if share == 1.0 else RewardStatus.WRONG
    return RewardResult(share, status, reason)


def build_language_consistency(language: str = "en", han_chars_per_word: float = 1.5) -> RewardFn:
    if language not in SCRIPTS:
        raise ValueError(
            f"language_consistency: unknown language {language!r}; choose one of {', '.join(SCRIPTS)}"
        )
    if not han_chars_per_word >= 1.0:
        raise ValueError(f"han_chars_per_word must be >= 1, got {han_chars_per_word}")

    def reward(response: str, reference: str) -> RewardResult:
        return language_consistency(
            response, reference, language=language, han_chars_per_word=han_chars_per_word
        )

    return reward
