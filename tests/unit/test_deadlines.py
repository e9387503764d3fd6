"""supervise.Deadlines: each deadline is the grace plus the work at the slowest speed that
is not a hang, and grows with what it waits for."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def _config(*overrides: str):
    from orchestrator.config import load_config
    from tests.conftest import ROOT

    return load_config(ROOT / "configs/demo/grpo.yaml", ["model.path=/m", "data.train_path=/d.jsonl", *overrides])


def test_deadlines_follow_the_config():
    from orchestrator.supervise import Deadlines

    base = Deadlines.for_grpo(_config("run.hang_grace_s=10", "run.min_tokens_per_s=100"))
    assert min(base.generation_s, base.scoring_s, base.learner_s) > 10 and base.restart_s >= 20
    longer = Deadlines.for_grpo(_config("run.hang_grace_s=10", "run.min_tokens_per_s=100",
                                        "rollout.max_new_tokens=200"))
    assert longer.generation_s > base.generation_s
    two = Deadlines.for_grpo(_config("run.hang_grace_s=10", "run.min_tokens_per_s=100", "cluster.rollout_engines=2"))
    assert two.generation_s < base.generation_s  # each engine has half the prompts
    slow = Deadlines.for_grpo(_config("run.hang_grace_s=10", "run.min_tokens_per_s=100", "rewards.timeout_s=30"))
    assert slow.scoring_s - base.scoring_s >= 25


def test_deadlines_by_hand():
    from orchestrator.supervise import Deadlines

    d = Deadlines.of(grace_s=5, tokens_per_s=10, prompts_per_engine=2, samples=4, max_new_tokens=10,
                     max_model_len=20, reward_timeout_s=1.5, reward_calls_per_worker=4, learner_tokens=100)
    assert d.generation_s == 5 + 2 * 4 * 10 / 10
    assert d.scoring_s == 5 + 4 * 1.5 + 4 * 20 / 10
    assert d.learner_s == 5 + 100 / 10
    assert d.restart_s == 2 * 5 + 120
