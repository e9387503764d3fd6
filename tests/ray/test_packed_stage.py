"""The grpo stage with packed micro-batches over two learner ranks: the driver deals each
step's groups by tokens (learner.batch.deal_by_tokens), every group is trained on once,
and a rerun gives the same metrics."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray


def test_packed_two_ranks_deal_by_tokens_and_rerun_the_same(ray_local, tiny_model, tmp_path):
    from orchestrator.config import load_config
    from orchestrator.metrics import read_metrics
    from orchestrator.stages import grpo
    from tasks.synthetic import make_dataset
    from tests.conftest import ROOT

    data = make_dataset("addition", tmp_path / "data")
    base = [f"model.path={tiny_model}", f"data.train_path={data['train']}", f"run.storage={tmp_path}",
            "grpo.steps=2", "grpo.prompts_per_step=4", "grpo.samples_per_prompt=4", "cluster.learner_workers=2",
            "loss.kl_coef=0", "learner.max_tokens_per_micro_batch=256", "learner.logprob_chunk_tokens=16",
            "rollout.max_new_tokens=12", "logging.wandb_mode=disabled", "cluster.cpus_per_actor=0.25"]
    runs = [read_metrics(grpo.run(load_config(ROOT / "configs/demo/grpo.yaml", [*base, f"run.name=packed{i}"])))
            for i in range(2)]
    for rows in runs:
        assert [r["groups_trained"] for r in rows] == [4.0, 4.0]  # each group once, over both ranks
        assert all(r["logprob_gap"] < 1e-4 for r in rows)  # the pushed weights are the trained ones
    keys = ("reward_mean", "surrogate_loss", "grad_norm", "response_tokens_mean")
    assert [[r[k] for k in keys] for r in runs[0]] == [[r[k] for k in keys] for r in runs[1]]
