"""Pipelines chain stages through their outputs and skip completed steps on rerun."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray


def test_pipeline_runs_then_resumes_by_skipping(ray_local, tiny_model, tmp_path):
    from orchestrator.config import ConfigError, load_config
    from orchestrator.stages import pipeline
    from tasks.synthetic import make_cold_start, make_dataset
    from tests.conftest import ROOT

    data = make_dataset("addition", tmp_path / "data")
    cold = make_cold_start(tmp_path / "data" / "cold.jsonl", n=32)
    recipe = tmp_path / "p.yaml"
    recipe.write_text(f"""
run: {{name: p, storage: {tmp_path}}}
pipeline:
  steps:
    - name: warm
      stage: sft
      config: {ROOT}/configs/demo/sft_cold_start.yaml
      overrides: ["model.path={tiny_model}", "data.train_path={cold}", "sft.epochs=1",
                  "sft.sequences_per_step=16", "sft.micro_batch_sequences=8", "logging.wandb_mode=disabled"]
    - name: rl
      stage: grpo
      config: {ROOT}/configs/demo/grpo.yaml
      overrides: ["model.path=${{warm.model}}", "data.train_path={data['train']}", "grpo.steps=2",
                  "grpo.prompts_per_step=2", "grpo.samples_per_prompt=4", "cluster.learner_workers=1",
                  "loss.kl_coef=0", "learner.micro_batch_groups=1", "rollout.max_new_tokens=8",
                  "logging.wandb_mode=disabled"]
""")
    cfg = load_config(recipe, model=pipeline.Config)
    messages: list[str] = []
    run_dir = pipeline.run(cfg, progress=lambda d, t, info: messages.append(info))
    assert pipeline.completed_steps(run_dir) == ["rl", "warm"]
    # The RL step trained from the SFT step's checkpoint.
    rl_cfg = (run_dir / "rl" / "config.yaml").read_text()
    assert str(run_dir / "warm" / "final") in rl_cfg
    metrics_before = (run_dir / "rl" / "metrics.jsonl").read_text()

    from orchestrator.preflight import PreflightError

    with pytest.raises(PreflightError, match=r"already holds a run; continue it with run.resume=true"):
        pipeline.run(cfg)  # the same name again, without saying what to do with the first
    messages.clear()
    again = cfg.model_copy(update={"run": cfg.run.model_copy(update={"resume": True})})
    pipeline.run(again, progress=lambda d, t, info: messages.append(info))
    assert sum("skipped" in m for m in messages) == 2
    assert (run_dir / "rl" / "metrics.jsonl").read_text() == metrics_before

    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text().replace("${warm.model}", "${later.model}"))
    with pytest.raises(ConfigError, match="not an earlier step"):
        load_config(bad, model=pipeline.Config)
