"""pass@k, cons@k and pass@1 estimators (evaluation/estimators.py), by hand."""

from __future__ import annotations

import itertools
import math

import pytest

from evaluation.estimators import consensus_correct, majority_vote, mean, mean_pass_at_k, pass_at_k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        # k = 1 is c / n: 1 - C(3,1)/C(5,1) = 1 - 3/5 = 0.4
        (5, 2, 1, 0.4),
        # 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
        (5, 2, 2, 0.7),
        # 1 - C(7,5)/C(10,5) = 1 - 21/252 = 11/12
        (10, 3, 5, 11 / 12),
        # n = k: 1 if any sample is correct (C(3,4) = 0), else 1 - C(4,4)/C(4,4) = 0
        (4, 1, 4, 1.0),
        (4, 0, 4, 0.0),
        # c = 0: never; c = n: always
        (16, 0, 1, 0.0),
        (16, 0, 8, 0.0),
        (16, 16, 1, 1.0),
        (16, 16, 16, 1.0),
        # fewer wrong samples (2) than k (3): some correct one is always drawn
        (6, 4, 3, 1.0),
    ],
)
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-15)


def test_pass_at_k_matches_subset_enumeration_and_chen_product_form():
    for n in range(1, 9):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                # Chen et al.'s numerically stable form: 1 - prod_{i=n-c+1}^{n} (1 - k/i)
                product = 1.0 if n - c < k else 1.0 - math.prod(1 - k / i for i in range(n - c + 1, n + 1))
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
                assert pass_at_k(n, c, k) == pytest.approx(product, abs=1e-12)


def test_pass_at_k_rejects_impossible_inputs():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)


def test_mean_pass_at_k_is_the_mean_over_problems():
    # problem A: 2 of 4 correct -> pass@1 0.5, pass@2 1 - C(2,2)/C(4,2) = 1 - 1/6 = 5/6
    # problem B: 0 of 4 -> 0, 0
    assert mean_pass_at_k([(4, 2), (4, 0)], 1) == pytest.approx(0.25)
    assert mean_pass_at_k([(4, 2), (4, 0)], 2) == pytest.approx(5 / 12)
    assert math.isnan(mean_pass_at_k([], 1))
    assert math.isnan(mean([]))


def test_majority_vote_exact_strings_and_tie_rule():
    # 8 and 7 both get two votes; 7 appeared first, so 7 wins.
    vote = majority_vote(["7", "8", "8", "7", None])
    assert vote.members == (0, 3) and vote.clusters == 2
    # a clear majority wins wherever it appears
    assert majority_vote(["1", "2", "2", "3", "2"]).members == (1, 2, 4)
    # no answers at all: no vote
    assert majority_vote([None, None]) is None


def test_majority_vote_groups_equivalent_notations():
    from rewards.math import equivalent

    answers = ["3", r"\frac12", "0.5", "3", "1/2", None]
    # \frac12, 0.5 and 1/2 are one answer (3 votes) and beat 3 (2 votes).
    vote = majority_vote(answers, same=lambda rep, a: bool(equivalent(a, rep)))
    assert vote.members == (1, 2, 4) and vote.clusters == 2
    # with exact string matching they would be three clusters of one and 3 would win
    assert majority_vote(answers).members == (0, 3)


def test_majority_vote_compares_with_the_representative_only():
    # a non-transitive "same": x ~ y and y ~ z but not x ~ z
    pairs = {("x", "y"), ("y", "z")}
    same = lambda rep, a: rep == a or (rep, a) in pairs  # noqa: E731
    vote = majority_vote(["x", "y", "z", "z"], same=same)
    # clusters: {x, y} (y joins x), {z, z} (z is not same as x): tie 2-2, x's came first
    assert vote.members == (0, 1) and vote.clusters == 2


@pytest.mark.parametrize(
    ("answers", "correct", "expected"),
    [
        (["5", "5", "4"], [True, True, False], True),  # majority right
        (["4", "5", "4"], [False, True, False], False),  # majority wrong, one right
        (["4", "5"], [False, True], False),  # tie: first cluster (4) wins
        ([None, None, "5"], [False, False, True], True),  # no-answer samples do not vote
        ([None, None], [False, False], False),  # no vote at all: wrong
    ],
)
def test_consensus_correct(answers, correct, expected):
    assert consensus_correct(answers, correct) is expected


def test_consensus_correct_needs_one_verdict_per_answer():
    with pytest.raises(ValueError, match="verdicts"):
        consensus_correct(["1", "2"], [True])
