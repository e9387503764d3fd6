"""Config: YAML + overrides, validation that names the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import ConfigError, GRPOStageConfig, apply_overrides, dump_config, load_config

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = """
model: {path: m}
data: {train_path: d/train.jsonl}
"""


def test_demo_config_loads_and_overrides_apply():
    cfg = load_config(ROOT / "configs/demo/grpo.yaml", ["learner.kl_coef=0", "run.name=x1", "grpo.steps=3"])
    assert cfg.learner.kl_coef == 0.0 and not cfg.use_reference
    assert cfg.run.name == "x1" and cfg.grpo.steps == 3
    assert cfg.run.dir == Path("runs/x1")


def test_defaults_are_the_papers(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.learner.clip_eps_low == cfg.learner.clip_eps_high == 0.2
    assert cfg.learner.kl_coef == 0.04
    assert cfg.learner.loss_aggregation == "seq_mean_token_mean"
    assert cfg.grpo.max_staleness_steps == 0
    assert cfg.data.template == "r1zero"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("learner.learning_rate=-1", "learner.learning_rate"),
        ("learner.lerning_rate=1", "learner.lerning_rate: unknown setting"),
        ("grpo.samples_per_prompt=1", "grpo.samples_per_prompt"),
        ("learner.num_workers=3", "multiple of learner.num_workers"),
        ("rollout.max_new_tokens=5000", "rollout.max_model_len"),
        ("rewards.accuracy_reward=nope", "accuracy_reward 'nope'"),
    ],
)
def test_bad_values_name_the_field(tmp_path, override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, BASE), [override])
    assert needle in str(err.value)


def test_missing_required_section_says_how_to_set_it(tmp_path):
    with pytest.raises(ConfigError, match=r"model: required, set it in the file or as model=\.\.\."):
        load_config(_write(tmp_path, "data: {train_path: x}\n"))


def test_malformed_override_and_file(tmp_path):
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "a: [1, 2\n"))


def test_override_does_not_mutate_input_and_parses_yaml():
    raw = {"learner": {"kl_coef": 0.04}}
    out = apply_overrides(raw, ["learner.kl_coef=0.5", "run.resume=true"])
    assert raw == {"learner": {"kl_coef": 0.04}}
    assert out["learner"]["kl_coef"] == 0.5 and out["run"]["resume"] is True


def test_config_is_frozen_and_round_trips(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    with pytest.raises(Exception):
        cfg.grpo.steps = 5  # type: ignore[misc]
    dump_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml")
    assert again == cfg
    assert isinstance(again, GRPOStageConfig)
