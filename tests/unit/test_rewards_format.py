"""Format rewards: table-driven, adversarial. Every way a response can miss the shape fails."""

from __future__ import annotations

import pytest

from rewards.format import r1_format, r1zero_format
from rewards.registry import build_reward
from rewards.types import RewardStatus

pytestmark = pytest.mark.unit

R1ZERO_OK = [
    "<think>2 + 2 = 4</think><answer>4</answer>",
    "<think>\nreasoning\n</think>\n<answer>\n4\n</answer>\n",
    "  <think>a</think> <answer>b</answer>  ",
    "<think>use <b>bold</b> and a < b > c</think><answer>\\boxed{4}</answer>",  # other tags are text
]

R1ZERO_BAD = [
    # (response, what the reason must say)
    ("", "missing <think>"),
    ("4", "missing <think>"),
    ("<answer>4</answer>", "missing <think>"),
    ("<think>a</think>", "missing <answer>"),
    ("<think>a</think> 4", "missing <answer>"),
    ("<think>a<answer>4</answer>", "missing </think>"),  # missing close tag
    ("<think>a</think><answer>4", "missing </answer>"),
    ("<answer>4</answer><think>a</think>", "out of order"),  # wrong order
    ("</think>a<think><answer>4</answer>", "out of order"),
    ("<think>a<answer>4</answer></think>", "out of order"),  # nesting
    ("<think>a</think><answer><think>b</think>4</answer>", "2 <think> tags"),
    ("<think>a</think><think>b</think><answer>4</answer>", "2 <think> tags"),  # duplicates
    ("<think>a</think><answer>4</answer><answer>5</answer>", "2 <answer> tags"),
    ("<think><think>a</think></think><answer>4</answer>", "2 <think> tags"),
    ("Sure! <think>a</think><answer>4</answer>", "text before <think>"),  # text outside tags
    ("<think>a</think> so <answer>4</answer>", "text after </think>"),
    ("<think>a</think><answer>4</answer> Hope this helps", "text after </answer>"),
    ("<think>a</think><answer>4</answer><|endoftext|>", "text after </answer>"),
    ("<think> </think><answer>4</answer>", "empty <think></think>"),  # empty blocks
    ("<think>a</think><answer>\n</answer>", "empty <answer></answer>"),
    ("<THINK>a</THINK><answer>4</answer>", "missing <think>"),  # tags are exact
    ("< think>a</think><answer>4</answer>", "missing <think>"),
]


@pytest.mark.parametrize("response", R1ZERO_OK)
def test_r1zero_accepts(response):
    assert r1zero_format(response).score == 1.0


@pytest.mark.parametrize("response, why", R1ZERO_BAD)
def test_r1zero_rejects(response, why):
    result = r1zero_format(response)
    assert (result.score, result.status) == (0.0, RewardStatus.WRONG)
    assert why in result.reason, result.reason


R1_OK = [
    "<think>2 + 2 = 4</think>The sum is **4**: $\\boxed{4}$.",
    "<think>\nlong\nreasoning\n</think>\n\n## Summary\n\nIt is 4.\n",
]

R1_BAD = [
    ("", "missing <think>"),
    ("The answer is 4.", "missing <think>"),
    ("<think>a</think>", "no summary"),
    ("<think>a</think>\n  \n", "no summary"),
    ("<think>a", "missing </think>"),  # never closed
    ("</think>summary", "missing <think>"),
    ("Hmm. <think>a</think>summary", "text before <think>"),
    ("<think>a</think>b</think>summary", "2 </think> tags"),
    ("<think>a</think>summary<think>more</think>", "2 <think> tags"),
    ("<think>a<think>b</think>summary", "2 <think> tags"),
    ("<think>a</think>summary <answer>4</answer>", "unexpected <answer>"),
    ("<think> </think>summary", "empty <think></think>"),
]


@pytest.mark.parametrize("response", R1_OK)
def test_r1_accepts(response):
    assert r1_format(response).score == 1.0


@pytest.mark.parametrize("response, why", R1_BAD)
def test_r1_rejects(response, why):
    result = r1_format(response)
    assert (result.score, result.status) == (0.0, RewardStatus.WRONG)
    assert why in result.reason, result.reason


@pytest.mark.parametrize(
    "name, response, score",
    [
        # The chat template ended the prompt with "<think>\n": the response starts inside.
        ("format_r1zero", "reasoning</think><answer>4</answer>", 1.0),
        ("format_r1zero", "<think>reasoning</think><answer>4</answer>", 0.0),
        ("format_r1zero", "</think><answer>4</answer>", 0.0),  # empty reasoning
        ("format_r1", "reasoning</think>It is 4.", 1.0),
        ("format_r1", "<think>reasoning</think>It is 4.", 0.0),
        ("format_r1", "reasoning, no close", 0.0),
    ],
)
def test_think_opened_in_prompt(name, response, score):
    reward = build_reward(name, think_opened_in_prompt=True)
    assert reward(response, "").score == score


def test_opened_twice_says_why():
    reward = build_reward("format_r1zero", think_opened_in_prompt=True)
    reason = reward("<think>a</think><answer>4</answer>", "").reason
    assert "the prompt already opened it" in reason


def test_registered_names_and_reference_ignored():
    for name in ("format_r1zero", "format_r1"):
        reward = build_reward(name)
        good = R1ZERO_OK[0] if name == "format_r1zero" else R1_OK[0]
        assert reward(good, "anything").score == reward(good, "").score == 1.0


def test_linear_time_on_a_megabyte():
    """A hundred times the text takes about a hundred times as long (a quadratic scan would
    take ten thousand): measured against the same scan of a hundredth of the text, so a
    loaded machine slows both sides alike."""
    import time

    def seconds(n: int) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for text in ("<think>" * (n // 5), "<think>" + "a" * n + "</think><answer>4</answer>"):
                r1zero_format(text)
                r1_format(text)
            best = min(best, time.perf_counter() - start)
        return best

    small, large = seconds(10_000), seconds(1_000_000)
    assert large < 1000 * small + 0.1, (small, large)
