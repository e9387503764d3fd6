"""Config: YAML + overrides, validation that names the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import (
    MOVED,
    REMOVED,
    ConfigError,
    GRPOStageConfig,
    apply_overrides,
    dump_config,
    load_config,
)

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
    cfg = load_config(ROOT / "configs/demo/grpo.yaml", ["loss.kl_coef=0", "run.name=x1", "grpo.steps=3"])
    assert cfg.loss.kl_coef == 0.0 and not cfg.use_reference
    assert cfg.run.name == "x1" and cfg.grpo.steps == 3
    assert cfg.run.location == "runs/x1"


def test_defaults_are_the_papers(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.loss.clip_eps_low == cfg.loss.clip_eps_high == 0.2
    assert cfg.loss.kl_coef == 0.04
    assert cfg.loss.loss_aggregation == "seq_mean_token_mean"
    assert cfg.loss.kl_log_ratio_clip == 20.0
    assert cfg.grpo.max_staleness_steps == 0
    assert cfg.data.template == "r1zero"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("learner.learning_rate=-1", "learner.learning_rate"),
        ("learner.lerning_rate=1", "learner.lerning_rate: unknown setting"),
        ("grpo.samples_per_prompt=1", "grpo.samples_per_prompt"),
        ("cluster.learner_workers=3", "multiple of cluster.learner_workers"),
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
    raw = {"loss": {"kl_coef": 0.04}}
    out = apply_overrides(raw, ["loss.kl_coef=0.5", "run.resume=true"])
    assert raw == {"loss": {"kl_coef": 0.04}}
    assert out["loss"]["kl_coef"] == 0.5 and out["run"]["resume"] is True


def test_config_is_frozen_and_round_trips(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    with pytest.raises(Exception):
        cfg.grpo.steps = 5  # type: ignore[misc]
    dump_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml")
    assert again == cfg
    assert isinstance(again, GRPOStageConfig)


# Every moved setting: in the file and as an override, the error names the new place.
MOVED_CASES = [
    ("learner.num_workers", "2", "cluster.learner_workers"),
    ("rollout.num_engines", "2", "cluster.rollout_engines"),
    ("cluster.num_reward_actors", "2", "cluster.reward_actors"),
    ("run.output_dir", "/data/runs", "run.storage"),
    ("learner.kl_coef", "0.0", "loss.kl_coef"),
    ("learner.clip_eps_low", "0.2", "loss.clip_eps_low"),
    ("learner.clip_eps_high", "0.28", "loss.clip_eps_high"),
    ("learner.advantage_std_ddof", "0", "loss.advantage_std_ddof"),
    ("learner.advantage_eps", "1.0e-6", "loss.advantage_eps"),
    ("learner.scale_advantages_by_std", "false", "loss.scale_advantages_by_std"),
    ("learner.loss_aggregation", "token_mean", "loss.loss_aggregation"),
    ("learner.updates_per_batch", "2", "loss.updates_per_batch"),
]
REMOVED_CASES = [
    ("grpo.eval_every_steps", "10", "eval stage"),
    ("logging.log_samples_every_steps", "10", "delete it"),
    ("data.test_path", "d/test.jsonl", "eval.benchmarks"),
]


def test_the_tables_are_all_tested():
    assert {k for k, _, _ in MOVED_CASES} == set(MOVED)
    assert {k for k, _, _ in REMOVED_CASES} == set(REMOVED)
    assert all(MOVED[k] == new for k, _, new in MOVED_CASES)


def _nested(key: str, value: str) -> str:
    section, name = key.split(".")
    return f"{section}: {{{name}: {value}}}\n"


@pytest.mark.parametrize(("old", "value", "new"), MOVED_CASES)
def test_moved_setting_in_the_file_names_its_new_place(tmp_path, old, value, new):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, BASE + _nested(old, value)))
    assert f"{old} moved to {new}" in str(err.value)


@pytest.mark.parametrize(("old", "value", "new"), MOVED_CASES)
def test_moved_setting_as_an_override_names_its_new_place(tmp_path, old, value, new):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, BASE), [f"{old}={value}"])
    assert f"{old} moved to {new}; write {new}={value}" in str(err.value)


@pytest.mark.parametrize(("old", "value", "new"), MOVED_CASES)
def test_moved_setting_in_a_section_override_names_its_new_place(tmp_path, old, value, new):
    section, name = old.split(".")
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, BASE), [f"{section}={{{name}: {value}}}"])
    assert f"{old} moved to {new}" in str(err.value)


@pytest.mark.parametrize(("old", "value", "needle"), REMOVED_CASES)
def test_removed_setting_says_what_to_do(tmp_path, old, value, needle):
    for text, overrides in ((BASE + _nested(old, value), []), (BASE, [f"{old}={value}"])):
        with pytest.raises(ConfigError) as err:
            load_config(_write(tmp_path, text), overrides)
        assert f"{old} was removed" in str(err.value) and needle in str(err.value)


def test_moved_settings_are_all_listed_at_once(tmp_path):
    text = BASE + "learner: {num_workers: 2, kl_coef: 0.0}\nrollout: {num_engines: 2}\n"
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text), ["cluster.num_reward_actors=3"])
    msg = str(err.value)
    for needle in ("learner.num_workers moved to cluster.learner_workers", "learner.kl_coef moved to loss.kl_coef",
                   "rollout.num_engines moved to cluster.rollout_engines",
                   "override 'cluster.num_reward_actors=3': cluster.num_reward_actors moved to cluster.reward_actors"):
        assert needle in msg


def test_sft_has_no_loss_section(tmp_path):
    """SFT configs used to inherit the GRPO loss knobs; a leftover one says to delete it."""
    from orchestrator.stages import sft

    text = "model: {path: m}\ndata: {train_path: d.jsonl}\nlearner: {kl_coef: 0.0}\n"
    with pytest.raises(ConfigError, match=r"learner.kl_coef moved to loss.kl_coef, which this stage does not "
                                          r"have \(a grpo setting\): delete it"):
        load_config(_write(tmp_path, text), model=sft.Config)
    assert "loss" not in sft.Config.model_fields
    with pytest.raises(ConfigError, match="learner.num_workers moved to cluster.learner_workers"):
        load_config(_write(tmp_path, "model: {path: m}\ndata: {train_path: d.jsonl}\n"), ["learner.num_workers=2"],
                    model=sft.Config)


def test_new_names_load(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["cluster.learner_workers=2", "cluster.rollout_engines=3",
                                               "cluster.reward_actors=4", "loss.kl_log_ratio_clip=10"])
    assert (cfg.cluster.learner_workers, cfg.cluster.rollout_engines, cfg.cluster.reward_actors) == (2, 3, 4)
    assert cfg.groups_per_rank == 4 and cfg.loss.kl_log_ratio_clip == 10.0


def test_colocated_rollout_refuses_what_cannot_take_turns():
    ok = load_config(ROOT / "configs/demo/grpo.yaml", ["cluster.colocate_rollout_with_learner=true",
                                                        "cluster.rollout_engines=2"])
    assert ok.cluster.colocate_rollout_with_learner
    with pytest.raises(ValueError) as err:
        load_config(ROOT / "configs/demo/grpo.yaml", ["cluster.colocate_rollout_with_learner=true",
                                                       "grpo.max_staleness_steps=1"])
    message = str(err.value)
    assert "grpo.max_staleness_steps=0" in message and "cluster.rollout_engines to cluster.learner_workers (2)" in message
