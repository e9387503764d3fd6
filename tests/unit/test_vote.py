"""What votes in cons@k: the registry's per-reward vote keys, and how votes group."""

from __future__ import annotations

import pytest

from evaluation.estimators import consensus_correct
from evaluation.vote import same_from, same_vote, vote_key, vote_pairs
from rewards.registry import REWARDS, RewardEntry, available, build_reward, entry, register

pytestmark = pytest.mark.unit

_BOX = "<think> work </think> The answer is $\\boxed{{{}}}$."


def test_the_table_holds_every_builtin_reward():
    builtin = {"code_tests", "exact_answer", "format_r1", "format_r1zero", "language_consistency",
               "math_accuracy", "no_phrase", "summary_match"}
    assert builtin <= set(available())  # other tests register rewards of their own
    assert all(isinstance(e, RewardEntry) for e in REWARDS.values())
    with pytest.raises(ValueError, match="unknown reward 'nope'; choose one of .*code_tests, exact_answer"):
        entry("nope")
    with pytest.raises(ValueError, match="unknown reward"):
        build_reward("nope")


def test_register_refuses_a_second_reward_under_one_name():
    with pytest.raises(ValueError, match="registered twice"):
        register("exact_answer", RewardEntry(lambda: build_reward("summary_match")))
    register("exact_answer", REWARDS["exact_answer"])  # the same entry again is no change


@pytest.mark.parametrize(
    ("reward", "response", "correct", "options", "expected"),
    [
        # math: the final answer, unwrapped from $…$ and the box
        ("math_accuracy", _BOX.format("\\frac12"), False, {}, "\\frac12"),
        ("math_accuracy", "<answer>$3$</answer>", True, {}, "3"),
        ("math_accuracy", "I think it is 7", False, {}, None),  # strict: no box, no "answer is"
        ("math_accuracy", "I think it is 7", False, {"extraction": "loose"}, "I think it is 7"),
        # exact_answer: the <answer> text as the reward compares it
        ("exact_answer", "<think>x</think><answer> 42 </answer>", True, {}, "42"),
        ("exact_answer", "42", False, {}, None),
        # code_tests: the program, blank lines and trailing spaces dropped
        ("code_tests", "```python\ndef f():  \n\n    return 1\n```", True, {}, "def f():\n    return 1"),
        ("code_tests", "no code here", False, {}, None),
        # any other reward: the verdict
        ("format_r1zero", "anything", True, {}, "correct"),
        ("summary_match", "anything", False, {}, "wrong"),
        ("language_consistency", "anything", False, {"language": "en"}, "wrong"),
    ],
)
def test_vote_key_per_reward(reward, response, correct, options, expected):
    assert vote_key(reward, response, correct, options) == expected


def test_vote_pairs_are_each_distinct_vote_against_the_ones_before_it():
    lists = [["b", "a", None, "b", "c"], ["a", "b"], [None, None]]
    # (representative, vote): b before a and c, a before c; then a before b
    assert vote_pairs(lists) == [("a", "b"), ("a", "c"), ("b", "a"), ("b", "c")]


def test_same_from_a_table():
    same = same_from({("0.5", "\\frac12"): True, ("0.5", "3"): False})
    assert same("0.5", "\\frac12") and same("x", "x")
    assert not same("0.5", "3") and not same("\\frac12", "0.5")  # only the graded direction


def test_votes_without_equivalence_group_by_equality():
    same = same_vote("exact_answer", [["1/2", "0.5"]], {}, workers=1, timeout_s=1.0)
    assert same("1/2", "1/2") and not same("1/2", "0.5")


def test_math_votes_group_by_equivalence():
    votes = [["3", "\\frac12", "0.5", "3", "1/2"]]
    same = same_vote("math_accuracy", votes, {}, workers=1, timeout_s=30.0)
    assert same("\\frac12", "0.5") and same("\\frac12", "1/2") and not same("3", "\\frac12")
    # three notations of 1/2 outvote two 3s
    assert consensus_correct(votes[0], [False, True, True, False, True], same=same)
