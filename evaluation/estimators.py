"""Evaluation estimators, pure: pass@1 over k samples, unbiased pass@k, cons@k.

DeepSeek-R1 §3 "Evaluation Setup": k responses per question at temperature 0.6, top-p
0.95; pass@1 = (1/k) Σ p_i, the mean correctness of the k samples (then the mean over
questions); cons@k = the correctness of the majority-voted answer. pass@k for k > 1 is
Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", §2.1): from n
samples of which c are correct, 1 - C(n-c, k) / C(n, k), an unbiased estimate of the
chance that at least one of k samples is correct. pass@1 is its k = 1 case (c / n), so
there is one formula here, not two.

No torch, no Ray, no reward code: the caller says which answers are the same
(``same``) and which samples are correct.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. 2021 unbiased pass@k for one problem: 1 - C(n-c, k) / C(n, k).

    ``n`` samples, ``c`` of them correct, ``k`` <= ``n``. Exact integer binomials (no
    float products), so n = k gives exactly 0 or 1 and c = 0 gives exactly 0.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples, got n={n}; sample at least k per prompt")
    # C(n-c, k) is 0 when fewer than k samples are wrong: some correct one is always drawn.
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean of ``pass_at_k`` over problems given as (n, c) pairs; nan for no problems."""
    if not counts:
        return math.nan
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


@dataclass(frozen=True)
class Vote:
    """The majority answer of one problem's samples.

    ``members``: indices of the samples in the winning cluster, in sample order; the
    first is the cluster's representative. ``votes`` = len(members).
    """

    members: tuple[int, ...]
    clusters: int  # how many distinct answers (clusters) were voted for

    @property
    def representative(self) -> int:
        return self.members[0]

    @property
    def votes(self) -> int:
        return len(self.members)


def majority_vote(
    answers: Sequence[str | None],
    *,
    same: Callable[[str, str], bool] = operator.eq,
) -> Vote | None:
    """Cluster the samples' final answers and return the largest cluster.

    Clustering is greedy, in sample order: each answer joins the first cluster whose
    representative (its first member) it is ``same`` as, called ``same(representative,
    answer)``, else starts a new cluster. (Equivalence by a math grader need not be
    transitive; comparing with the representative only keeps the result independent of
    the order in which clusters grew.)

    Conventions:
      - ``None`` (no extractable answer) does not vote. All None: no vote, returns None.
      - Ties: among clusters of the largest size, the one whose first member came
        earliest in sample order wins. Sample order is the engine's, which is random
        with respect to the answers, so this is a fair, reproducible tie-break.
    """
    reps: list[str] = []
    members: list[list[int]] = []
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        for j, rep in enumerate(reps):
            if same(rep, answer):
                members[j].append(i)
                break
        else:
            reps.append(answer)
            members.append([i])
    if not members:
        return None
    # max() returns the first of equal maxima: clusters are in order of first member.
    best = max(members, key=len)
    return Vote(tuple(best), len(members))


def consensus_correct(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    *,
    same: Callable[[str, str], bool] = operator.eq,
) -> bool:
    """cons@k verdict for one problem: is the majority-voted answer correct?

    The winning cluster's verdict is its representative's (members are the same
    answer, so they share a verdict; a grader that disagrees with itself across
    members is not second-guessed here). No vote (no sample has an answer): wrong.
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} verdicts")
    vote = majority_vote(answers, same=same)
    return vote is not None and bool(correct[vote.representative])


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; nan for an empty sequence (an empty benchmark has no score)."""
    return sum(values) / len(values) if values else math.nan
