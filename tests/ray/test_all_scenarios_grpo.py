"""RL for all scenarios on a local Ray cluster: general prompts go through the reward-model
actor, reasoning prompts through the rule rewards, in one GRPO run."""

from __future__ import annotations

import math
import random

import pytest

pytestmark = pytest.mark.ray


def test_grpo_mixes_rule_rewards_and_reward_models(ray_local, tiny_model, tmp_path):
    from orchestrator.config import load_config
    from orchestrator.metrics import read_metrics
    from orchestrator.stages import StageError, grpo
    from tasks.synthetic import GeneralTask, make_dataset, make_general
    from tasks.tinymodel import build_tiny_reward_model
    from tests.conftest import ROOT

    make_dataset("addition", tmp_path / "data")
    data = make_general(tmp_path / "data")
    rms = {a: build_tiny_reward_model(tmp_path / a, tiny_model,
                                      GeneralTask().judged_examples(a, 200, random.Random(0)), steps=20)
           for a in ("helpfulness", "harmlessness")}
    overrides = [
        f"model.path={tiny_model}", f"data.train_path={data['all_scenarios']}", f"run.storage={tmp_path}",
        "run.name=all", "grpo.steps=3", "grpo.prompts_per_step=4", "grpo.samples_per_prompt=4",
        "cluster.learner_workers=1", "loss.kl_coef=0", "rollout.max_new_tokens=16", "logging.wandb_mode=disabled",
        f"rewards.reward_models.0.path={rms['helpfulness']}", f"rewards.reward_models.1.path={rms['harmlessness']}",
    ]
    cfg = load_config(ROOT / "configs/demo/grpo_all.yaml", overrides)
    run_dir = grpo.run(cfg)
    rows = read_metrics(run_dir)
    assert len(rows) == 3
    for r in rows:  # general prompts were drawn every step (weights 3:1, 4 prompts, seed 0)
        assert math.isfinite(r["reward/helpfulness"]) and math.isfinite(r["reward/harmlessness"])
    assert any(math.isfinite(r["accuracy"]) for r in rows)
    assert (run_dir / "final" / "model.safetensors").exists()

    # General prompts that nothing scores are refused before any actor starts.
    bad = load_config(ROOT / "configs/demo/grpo_all.yaml", [*overrides, "rewards.reward_models=[]",
                                                             "rewards.rewards.1.kinds=[reasoning]",
                                                             "rewards.rewards.2.kinds=[reasoning]", "run.name=unscored"])
    with pytest.raises(StageError, match="kind 'general'.*no reward scores them"):
        grpo.run(bad)
