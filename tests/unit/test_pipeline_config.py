"""Pipeline and distill recipes validate every step before running anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import ConfigError, load_config
from orchestrator.stages import distill, pipeline

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def test_r1_recipe_steps_chain_outputs():
    cfg = load_config(ROOT / "configs/demo/pipeline_r1.yaml", ["run.storage=/x"], model=pipeline.Config)
    names = [s.name for s in cfg.pipeline.steps]
    assert names == ["cold_start", "reasoning_rl", "rejection_sampling", "non_reasoning", "sft_rs", "rl_all"]
    configs = {s.name: pipeline.step_config(cfg, s)[1] for s in cfg.pipeline.steps}
    assert configs["reasoning_rl"].model.path == "/x/demo-r1/cold_start/final"
    assert configs["rl_all"].model.path == "/x/demo-r1/sft_rs/final"
    assert str(configs["sft_rs"].data.train_path) == "/x/demo-r1/rejection_sampling/sft.jsonl"
    assert [str(p) for p in configs["sft_rs"].data.extra_train_paths] == ["/x/demo-r1/non_reasoning/sft.jsonl"]
    assert configs["non_reasoning"].rewards.accuracy_reward == "format_r1"
    assert [m.scope for m in configs["rl_all"].rewards.reward_models] == ["summary", "response"]
    assert configs["rejection_sampling"].rewards.accuracy_reward == "math_accuracy"
    assert all(c.run.name == n and str(c.run.storage) == "/x/demo-r1" for n, c in configs.items())


def test_distill_is_sample_then_sft():
    cfg = load_config(ROOT / "configs/demo/distill.yaml", ["distill.teacher=/t", "run.storage=/o"],
                      model=distill.Config)
    p = distill.as_pipeline(cfg)
    sample_cfg = pipeline.step_config(p, p.pipeline.steps[0])[1]
    sft_cfg = pipeline.step_config(p, p.pipeline.steps[1])[1]
    assert sample_cfg.model.path == "/t"
    assert str(sft_cfg.data.train_path) == "/o/demo-distill/teacher_samples/sft.jsonl"
    assert sft_cfg.data.template == "none" and sft_cfg.sft.epochs == 3


@pytest.mark.parametrize(("steps", "needle"), [
    ("[]", "pipeline.steps is empty"),
    ("[{name: a, stage: sft, config: x.yaml}, {name: a, stage: sft, config: y.yaml}]", "used twice"),
    ("[{name: a, stage: pipeline, config: x.yaml}]", "do not nest"),
    ("[{name: a, stage: sft, config: x.yaml, overrides: ['model.path=${b.model}']}]", "not an earlier step"),
])
def test_bad_recipes_are_refused(tmp_path, steps, needle):
    p = tmp_path / "p.yaml"
    p.write_text(f"pipeline: {{steps: {steps}}}\n")
    with pytest.raises(ConfigError, match=needle):
        load_config(p, model=pipeline.Config)


def test_gpu_distillation_recipe_validates_both_steps():
    cfg = load_config(ROOT / "configs/gpu/distill/distill-qwen2.5-1.5b.yaml", model=distill.Config)
    p = distill.as_pipeline(cfg)
    sample_cfg = pipeline.step_config(p, p.pipeline.steps[0])[1]
    sft_cfg = pipeline.step_config(p, p.pipeline.steps[1])[1]
    assert sft_cfg.model.path == "Qwen/Qwen2.5-1.5B" and sft_cfg.learner.dtype == "bf16"
    assert str(sft_cfg.data.train_path).endswith("distill-qwen2.5-1.5b/teacher_samples/sft.jsonl")
    assert sample_cfg.cluster.rollout_engines == 8
