"""DAPO's dynamic sampling (``grpo.filter_zero_variance``): groups without a learning
signal are dropped and more prompts sampled, and the learners still get exactly
``prompts_per_step`` groups a step."""

from __future__ import annotations

import json


def _run(model, tmp_path, name, *extra):
    from orchestrator.config import load_config
    from orchestrator.metrics import read_metrics
    from orchestrator.stages import grpo
    from tasks.synthetic import make_dataset
    from tests.conftest import ROOT

    data = make_dataset("addition", tmp_path / "data")
    cfg = load_config(ROOT / "configs/demo/grpo.yaml", [
        f"model.path={model}", f"data.train_path={data['train']}", f"run.storage={tmp_path}", f"run.name={name}",
        "grpo.steps=3", "grpo.prompts_per_step=4", "grpo.samples_per_prompt=4", "cluster.learner_workers=2",
        "loss.kl_coef=0", "learner.micro_batch_groups=1", "rollout.max_new_tokens=24",
        "grpo.filter_zero_variance=true", "logging.wandb_mode=disabled", *extra])
    run_dir = grpo.run(cfg)
    prompts = [json.loads(x) for x in (run_dir / "prompts.jsonl").read_text().splitlines()]
    return read_metrics(run_dir), prompts


def test_zero_variance_groups_are_replaced_until_the_step_is_informative(ray_local, tiny_base_model, tmp_path):
    rows, prompts = _run(tiny_base_model, tmp_path, "dynamic", "grpo.max_sampling_rounds=4")
    for r, p in zip(rows, prompts, strict=True):
        assert r["groups_trained"] == 4
        assert r["sampled_groups"] == 4 + len(p["extra_prompt_indices"])
        assert 1 <= r["sampling_rounds"] <= 4
        if r["sampling_rounds"] < 4:  # enough were found: every trained group has a signal
            assert r["zero_std_group_frac"] == 0.0, r
        if r["zero_variance_groups"] == 0:
            assert r["sampling_rounds"] == 1 and p["extra_prompt_indices"] == []
    assert sum(r["zero_variance_groups"] for r in rows) > 0, rows  # the filter had work to do


def test_when_the_rounds_run_out_zero_variance_groups_fill_the_step(ray_local, tiny_model, tmp_path):
    # A random model never answers right: every group scores all zeros.
    rows, prompts = _run(tiny_model, tmp_path, "none-informative", "grpo.max_sampling_rounds=2",
                         "rewards.rewards=[{name: exact_answer, weight: 1.0}]", "rewards.format_reward=null")
    for r, p in zip(rows, prompts, strict=True):
        assert r["sampling_rounds"] == 2 and r["groups_trained"] == 4 and r["zero_std_group_frac"] == 1.0
        assert r["sampled_groups"] == 8 == r["zero_variance_groups"] and len(p["extra_prompt_indices"]) == 4
