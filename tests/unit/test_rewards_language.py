"""Language-consistency reward (§2.3.2): share of target-language words in the CoT."""

from __future__ import annotations

import pytest

from rewards.language import chain_of_thought, count_words, language_consistency
from rewards.registry import build_reward, combine
from rewards.types import RewardResult, RewardStatus

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "text, counts",
    [
        ("We add the two numbers.", {"latin": 5}),
        ("It's the student’s turn", {"latin": 4}),  # apostrophes stay inside words
        # One-letter Latin and Greek words are variables, not words.
        ("Let x be the root and α the angle", {"latin": 7}),
        # Math and code are no language: $…$, \[…\], \frac, `…`, ```…```.
        ("So $\\sin x = \\frac{a}{b}$ and \\[ \\cos y \\] hold", {"latin": 3}),
        ("Run `print(hello world)` then\n```python\nfor word in words: pass\n```\ndone", {"latin": 3}),
        ("Compute 12 + 30 = 42 !", {"latin": 1}),
        # Han characters: 1.5 to a word (3 characters -> 2 words).
        ("我们计", {"han": 2.0}),
        ("我们需要计算 the derivative", {"han": 4.0, "latin": 2}),
        ("Пусть это так", {"cyrillic": 3}),
        ("これは ひらがな", {"kana": 2}),
        ("수학 문제", {"hangul": 2}),
        ("café déjà vu", {"latin": 3}),
    ],
)
def test_count_words(text, counts):
    assert count_words(text).by_script == pytest.approx(counts)


@pytest.mark.parametrize(
    "response, cot",
    [
        ("<think>reason</think><answer>4</answer>", "reason"),
        ("reason</think>summary", "reason"),  # the prompt opened <think>
        ("<think>unfinished reasoning", "unfinished reasoning"),
        ("no tags at all", "no tags at all"),
        ("<think>a</think> summary <think>b</think>", "a"),
    ],
)
def test_chain_of_thought(response, cot):
    assert chain_of_thought(response) == cot


# (response, language, score) — hand-computed shares.
CASES = [
    # All English: 1.
    ("<think>First we add both numbers, then divide by two.</think><answer>4</answer>", "en", 1.0),
    # 6 Han characters = 4 words; "the derivative" = 2 words: 4/6 zh.
    ("<think>我们需要计算 the derivative</think>", "zh", 4 / 6),
    ("<think>我们需要计算 the derivative</think>", "en", 2 / 6),
    # 8 Han characters = 16/3 words, 2 English words, x a variable: (16/3) / (22/3) zh.
    ("<think>我们需要计算 the derivative，设 x 为</think>", "zh", 16 / 22),
    # 3 Han characters = 2 words, 6 English words: 6/8 en.
    ("<think>We need to find the sum 然后求</think>", "en", 6 / 8),
    # Only the CoT counts: the answer and summary may be in any language.
    ("<think>Let us count the apples.</think>答案是四个苹果。", "en", 1.0),
    ("<think>计算两个数的和</think>The answer is four apples.", "zh", 1.0),
    # Japanese: kana and kanji both count.
    ("<think>この問題を解きます</think>", "ja", 1.0),
    ("<think>Пусть это так, then</think>", "ru", 3 / 4),
]


@pytest.mark.parametrize("response, language, score", CASES)
def test_share_of_target_language_words(response, language, score):
    result = language_consistency(response, language=language)
    assert result.score == pytest.approx(score)
    assert result.status is (RewardStatus.CORRECT if score == 1.0 else RewardStatus.WRONG)


@pytest.mark.parametrize(
    "response",
    [
        "<think></think><answer>4</answer>",  # empty reasoning
        "<think>$x^2 + 1 = 2$, 12 * 3 = 36</think>",  # formulas only
        "",
    ],
)
def test_no_words_scores_zero_not_one(response):
    # 1 here would pay the model to drop its reasoning.
    result = language_consistency(response)
    assert (result.score, result.status) == (0.0, RewardStatus.NO_ANSWER)


def test_reason_names_the_mix():
    reason = language_consistency("<think>我们需要计算 the derivative</think>", language="en").reason
    assert reason.startswith("33% en of 6 words") and "han 4" in reason


def test_summed_with_accuracy_by_configured_weights():
    # §2.3.2: "combine the accuracy ... and the reward for language consistency by
    # directly summing them". Weights come from config.
    response = "<think>We need to find the sum 然后求</think><answer>4</answer>"
    results = {
        "accuracy": RewardResult(1.0, RewardStatus.CORRECT, ""),
        "language_consistency": build_reward("language_consistency", language="en")(response, "4"),
    }
    assert combine(results, {"accuracy": 1.0, "language_consistency": 1.0}) == pytest.approx(1.75)
    assert combine(results, {"accuracy": 1.0, "language_consistency": 0.5}) == pytest.approx(1.375)


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown language 'fr'"):
        build_reward("language_consistency", language="fr")
    with pytest.raises(ValueError, match="han_chars_per_word"):
        build_reward("language_consistency", han_chars_per_word=0.5)
    one_char_words = build_reward("language_consistency", language="zh", han_chars_per_word=1.0)
    result = one_char_words("<think>我们需要计算 the derivative</think>", "")
    assert result.score == pytest.approx(6 / 8)
