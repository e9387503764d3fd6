"""The staleness bound: with max_staleness_steps=1 generation runs one step ahead, and
each sample records the policy version that produced it."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray


def test_one_step_ahead_gives_staleness_one(ray_local, tiny_model, tmp_path):
    from orchestrator.config import load_config
    from orchestrator.metrics import read_metrics
    from orchestrator.stages import grpo
    from tasks.synthetic import make_dataset
    from tests.conftest import ROOT

    data = make_dataset("addition", tmp_path / "data")
    cfg = load_config(ROOT / "configs/demo/grpo.yaml", [
        f"model.path={tiny_model}", f"data.train_path={data['train']}", f"run.storage={tmp_path}",
        "run.name=stale", "grpo.steps=4", "grpo.max_staleness_steps=1", "grpo.prompts_per_step=2",
        "grpo.samples_per_prompt=4", "cluster.learner_workers=1", "loss.kl_coef=0", "learner.micro_batch_groups=1",
        "rollout.max_new_tokens=8", "logging.wandb_mode=disabled",
    ])
    run_dir = grpo.run(cfg)
    rows = read_metrics(run_dir)
    # Step 1 trains on version-0 samples at version 0; from step 2 on, samples were made
    # one version before the learner's (they were launched before the previous push).
    assert [r["staleness_mean"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    assert [r["policy_version"] for r in rows] == [1, 2, 3, 4]
    # Reward bookkeeping reaches metrics.jsonl through StepStats.finalize.
    assert all({"reward_errors", "reward_timeouts", "reward_ungradable", "ungradable_groups"} <= r.keys() for r in rows)
    assert (run_dir / "final" / "model.safetensors").exists()
    # Generating ahead turns the off-policy correction on (loss.off_policy_correction=auto:
    # TIS): weights are recorded, and the log-prob gap is split by version lag. A sample of
    # the current weights differs only by numerics.
    seen = [(r["is_weight_mean"], r["is_weight_max"], r["is_masked_frac"]) for r in rows]
    assert all(0 < mean <= top <= 2.0 and masked == 0 for mean, top, masked in seen), seen
    assert rows[0]["logprob_gap/lag0"] < 1e-4 and "logprob_gap/lag1" not in rows[0]
    gaps = [{k for k in r if k.startswith("logprob_gap/")} for r in rows]
    assert gaps == [{"logprob_gap/lag0"}] + [{"logprob_gap/lag1"}] * 3, gaps
