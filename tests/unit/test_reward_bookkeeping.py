"""Reward statuses on their way to the learner: the reward actor flags completions whose
rewards errored, timed out or could not grade them; the learner counts all three per
step and leaves ungradable completions out of the advantages."""

from __future__ import annotations

import math

import pytest
import torch

from actors.reward import RewardActor, _any_status
from learner.batch import Completion, Group, ScoredGroup
from learner.config import GRPOLossConfig
from learner.grpo import group_advantages
from learner.grpo_role import StepStats, group_advantages_of
from rewards.config import RewardsConfig, RewardSpec
from rewards.types import RewardResult, RewardStatus

pytestmark = pytest.mark.unit


def _group(texts=("a", "b", "c", "d"), reference="3") -> Group:
    comps = tuple(Completion((1, 2), (-0.1, -0.2), t, "stop") for t in texts)
    return Group(0, (5, 6), reference, comps, 0)


def _scored(rewards, ungradable=(), **flags) -> ScoredGroup:
    g = _group(tuple("abcdefgh"[: len(rewards)]))
    return ScoredGroup(g, tuple(rewards), tuple(rewards), (1.0,) * len(rewards), ungradable=tuple(ungradable),
                       **flags)


def test_flags_default_to_none_and_are_checked():
    sg = _scored((1.0, 0.0, 0.0, 1.0))
    assert sg.reward_error == sg.reward_timeout == sg.ungradable == (False,) * 4
    assert sg.gradable == (True,) * 4
    flagged = _scored((1.0, 0.0, 0.0, 1.0), ungradable=(False, False, True, False))
    assert flagged.gradable == (True, True, False, True)
    # Later stages keep the flags (the reward-model actor adds its scores with with_added).
    assert flagged.with_added("helpfulness", [0.1] * 4, [0.1] * 4).ungradable == flagged.ungradable
    with pytest.raises(ValueError, match="reward_timeout has 2 values for 4 completions"):
        _scored((1.0, 0.0, 0.0, 1.0), reward_timeout=(True, False))


def test_reward_actor_flags_completions_by_status():
    cfg = RewardsConfig(rewards=(RewardSpec(name="exact_answer"), RewardSpec(name="format_r1", weight=0.5)),
                        accuracy_reward="exact_answer", format_reward="format_r1", workers=1)
    actor = RewardActor(cfg)
    try:
        # An empty reference cannot grade an answer; without an answer it is NO_ANSWER.
        bad_gold = actor.score(_group(("<answer> 3 </answer>", "no answer"), reference=""))
        fine = actor.score(_group(("<answer> 3 </answer>", "<answer> 4 </answer>")))
    finally:
        actor.close()
    assert bad_gold.ungradable == (True, False)
    assert fine.ungradable == (False, False) and fine.accuracy == (1.0, 0.0)
    assert bad_gold.reward_error == bad_gold.reward_timeout == (False, False)
    # Any of a completion's rewards counts (here: the second one's format reward).
    results = [
        {"exact_answer": RewardResult(1.0, RewardStatus.CORRECT), "format_r1": RewardResult(0.0, RewardStatus.WRONG)},
        {"exact_answer": RewardResult(0.0, RewardStatus.WRONG), "format_r1": RewardResult(0.0, RewardStatus.TIMEOUT)},
        {"exact_answer": RewardResult(0.0, RewardStatus.ERROR), "format_r1": RewardResult(0.0, RewardStatus.TIMEOUT)},
        {},  # no rule reward applies to the prompt
    ]
    assert _any_status(results, RewardStatus.TIMEOUT) == (False, True, True, False)
    assert _any_status(results, RewardStatus.ERROR) == (False, False, True, False)


def test_step_stats_count_statuses_and_reach_the_metrics():
    a, b = StepStats(), StepStats()
    a.count(_scored((1.0, 0.0, 0.0, 1.0), reward_error=(True, False, False, False),
                    reward_timeout=(True, True, False, False)), version=0)
    a.count(_scored((0.0, 0.0), ungradable=(True, True)), version=0)  # nothing gradable
    b.count(_scored((1.0, 0.0, 1.0), ungradable=(False, True, False)), version=0)  # valid 1, 1: no signal
    b.count(_scored((1.0, 0.0, 0.0), ungradable=(False, False, True)), version=0)
    m = a.merge(b).finalize()
    assert (m["reward_errors"], m["reward_timeouts"], m["reward_ungradable"]) == (1.0, 2.0, 4.0)
    assert m["ungradable_groups"] == 1.0
    # No learning signal: the all-ungradable group and the one whose gradable rewards agree.
    assert m["zero_std_group_frac"] == 2 / 4
    assert m["reward_mean"] == pytest.approx((2 + 0 + 2 + 1) / 12)  # ungradable 0s still count here


def test_advantages_leave_ungradable_completions_out():
    cfg = GRPOLossConfig()
    plain = _scored((1.0, 0.0, 0.0, 1.0))
    # Without ungradable completions: exactly the unmasked computation.
    want = group_advantages(torch.tensor([plain.rewards], dtype=torch.float32), std_ddof=cfg.advantage_std_ddof,
                            eps=cfg.advantage_eps, scale_by_std=cfg.scale_advantages_by_std)[0]
    assert torch.equal(group_advantages_of(plain, cfg), want)
    # Rewards 1, 0, (ungradable), 1: mean 2/3, ddof=1 std 0.5774; A = 0.3333/(0.5774 + 1e-4) etc.
    adv = group_advantages_of(_scored((1.0, 0.0, 0.0, 1.0), ungradable=(False, False, True, False)), cfg)
    std = math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2)
    torch.testing.assert_close(adv, torch.tensor([1 / 3, -2 / 3, 0.0, 1 / 3]) / (std + cfg.advantage_eps))
    assert adv[2] == 0.0
    assert torch.equal(group_advantages_of(_scored((1.0, 0.0), ungradable=(True, True)), cfg), torch.zeros(2))
