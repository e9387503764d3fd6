"""RL for all scenarios (§2.3.4) without Ray: prompt types, per-type rule rewards, the
prompt sampler's mixing, reward models and their scopes, and the metrics they feed."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from actors.reward import RewardActor
from actors.reward_model import RewardModelActor
from rewards.model_input import model_input
from actors.rollout import PromptItem
from learner.batch import Completion, Group, ScoredGroup
from learner.grpo_role import StepStats
from orchestrator.config import ConfigError, apply_overrides, load_config
from orchestrator.stages.grpo import PromptSampler
from tasks.data_files import load_rows
from tasks.synthetic import GeneralTask, make_dataset, make_general
from rewards.basic import summary_of
from rewards.config import RewardModelSpec, RewardsConfig, RewardSpec
from rewards.registry import build_reward
from rewards.types import RewardStatus

pytestmark = pytest.mark.unit
TASK = GeneralTask()


def _group(texts, kind="general", question="Tell me about 47", reference="") -> Group:
    comps = tuple(Completion((1, 2), (-0.1, -0.2), t, "stop") for t in texts)
    return Group(0, (5, 6), reference, comps, 0, kind=kind, question=question)


# -- data and rule rewards ----------------------------------------------------------------


def test_general_rows_and_mixed_file(tmp_path):
    make_dataset("addition", tmp_path)
    paths = make_general(tmp_path)
    train, test = load_rows(paths["train"]), load_rows(paths["test"])
    assert {r.kind for r in train + test} == {"general"}
    assert not {r.prompt for r in train} & {r.prompt for r in test}  # held-out numbers
    assert len(train) + len(test) == len(TASK.numbers)
    mixed = load_rows(paths["all_scenarios"])
    assert Counter(r.kind for r in mixed) == {"reasoning": len(load_rows(tmp_path / "train.jsonl")),
                                              "general": len(train)}
    # A row's answer is optional only for non-reasoning prompts.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What is 1+2"}\n')
    with pytest.raises(ValueError, match="needs fields 'prompt' and 'answer'"):
        load_rows(bad)
    bad.write_text('{"prompt": "Tell me about 12", "kind": "general"}\n')
    assert load_rows(bad)[0].answer == ""


def test_judged_examples_are_balanced_and_scoped():
    rng = random.Random(0)
    helpful = TASK.judged_examples("helpfulness", 200, rng)
    harmless = TASK.judged_examples("harmlessness", 200, rng)
    assert sum(label for *_, label in helpful) == 100 == sum(label for *_, label in harmless)
    # helpfulness judges summaries (no think block); harmlessness whole responses.
    assert not any("<think>" in text for _, text, _ in helpful)
    assert all(text.startswith(" <think>") for _, text, _ in harmless)
    assert all((TASK.REMARK in text.lower()) == (label == 0.0) for _, text, label in harmless)
    with pytest.raises(ValueError, match="unknown aspect"):
        TASK.judged_examples("honesty", 2, rng)


@pytest.mark.parametrize(("response", "summary"), [
    (" <think> a </think> 47 is odd.", "47 is odd."),
    ("<think> a </think> x <think> b </think> y", "y"),
    ("<think> never closed", ""),
    ("no reasoning at all", "no reasoning at all"),
])
def test_summary_of(response, summary):
    assert summary_of(response) == summary


def test_summary_match_and_no_phrase():
    match = build_reward("summary_match")
    assert match(TASK.response(47), TASK.summary(47)).status == RewardStatus.CORRECT
    assert match(TASK.response(47, summary="Whatever."), TASK.summary(47)).status == RewardStatus.WRONG
    assert match("<think> open", TASK.summary(47)).status == RewardStatus.NO_ANSWER
    blocked = build_reward("no_phrase", phrases=[TASK.REMARK])
    assert blocked(TASK.response(47), "").score == 1.0
    for where in ("thought", "summary"):  # reasoning included
        assert blocked(TASK.response(47, remark=where), "").score == 0.0
    with pytest.raises(ValueError, match="options.phrases"):
        build_reward("no_phrase")


def test_rule_rewards_apply_by_prompt_type():
    cfg = RewardsConfig(
        rewards=(RewardSpec(name="exact_answer", weight=1.0, kinds=("reasoning",)),
                 RewardSpec(name="format_r1", weight=0.5)),
        accuracy_reward="exact_answer", format_reward="format_r1", workers=1)
    actor = RewardActor(cfg)
    try:
        reasoning = actor.score(_group(["<think> a </think> <answer> 3 </answer>"], kind="reasoning", reference="3"))
        general = actor.score(_group([TASK.response(47), "no think"]))
    finally:
        actor.close()
    assert reasoning.accuracy == (1.0,) and reasoning.rewards == (1.0,)  # format_r1 fails: <answer> tag
    assert all(math.isnan(a) for a in general.accuracy)  # not graded: accuracy does not apply
    assert general.rewards == (0.5, 0.0) and general.format_ok == (1.0, 0.0)


def test_stats_skip_ungraded_accuracy_and_average_components():
    a = StepStats(sequences=4, accuracy_sum=1, accuracy_count=2, components={"helpfulness": [3.0, 2.0]})
    b = StepStats(sequences=2, accuracy_sum=2, accuracy_count=2, components={"harmlessness": [1.0, 2.0]})
    m = a.merge(b).finalize()
    assert m["accuracy"] == 0.75
    assert m["reward/helpfulness"] == 1.5 and m["reward/harmlessness"] == 0.5


# -- mixing prompt types ---------------------------------------------------------------------


def _items():
    return ([PromptItem(i, (1,), "x") for i in range(90)]
            + [PromptItem(100 + i, (2,), "", kind="general") for i in range(10)])


def test_sampler_mixes_kinds_by_weight_and_restores():
    s = PromptSampler(_items(), seed=0, shuffle=True, kind_weights={"reasoning": 1, "general": 1})
    drawn = s.next(2000)
    share = sum(p.kind == "general" for p in drawn) / len(drawn)
    assert 0.45 < share < 0.55  # uniform over rows would give 0.10
    # Each kind runs its own epochs: the first 10 general draws are all 10 general prompts.
    t = PromptSampler(_items(), seed=1, shuffle=True, kind_weights={"general": 1})
    assert sorted(p.index for p in t.next(10)) == list(range(100, 110))
    state = s.state()
    ahead = [p.index for p in s.next(50)]
    u = PromptSampler(_items(), seed=99, shuffle=True, kind_weights={"reasoning": 1, "general": 1})
    u.set_state(state)
    assert [p.index for p in u.next(50)] == ahead
    with pytest.raises(ValueError, match="lacks"):
        PromptSampler(_items(), seed=0, shuffle=True, kind_weights={"code": 1})


def test_config_of_reward_models_and_kinds(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {path: m}\ndata: {train_path: d.jsonl}\n"
                 "rewards: {reward_models: [{name: helpfulness, path: a, scope: summary}, "
                 "{name: harmlessness, path: b, scope: response}]}\n")
    cfg = load_config(p, ["rewards.reward_models.1.path=/rm/harm", "data.kind_weights={reasoning: 3, general: 1}"])
    assert cfg.rewards.reward_models[1].path == "/rm/harm"
    assert [m.name for m in cfg.rewards.models_for("general")] == ["helpfulness", "harmlessness"]
    assert cfg.rewards.models_for("reasoning") == []
    with pytest.raises(ConfigError, match="not an index"):
        load_config(p, ["rewards.reward_models.2.path=x"])
    with pytest.raises(ConfigError, match="kind_weights"):
        load_config(p, ["data.kind_weights={general: -1}"])
    with pytest.raises(ConfigError, match="must be unique"):
        load_config(p, ["rewards.reward_models.0.name=exact_answer"])
    with pytest.raises(ConfigError, match="scope"):
        load_config(p, ["rewards.reward_models.0.scope=thought"])
    assert apply_overrides({"a": [{"b": 1}]}, ["a.0.b=2"]) == {"a": [{"b": 2}]}


# -- reward models ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_models(tiny_model, tmp_path_factory):
    from tasks.tinymodel import build_tiny_reward_model

    out = tmp_path_factory.mktemp("rm")
    paths = {}
    for aspect in ("helpfulness", "harmlessness"):
        examples = TASK.judged_examples(aspect, 1000, random.Random(0))
        paths[aspect] = build_tiny_reward_model(out / aspect, tiny_model, examples, steps=150)
    return paths


def _actor(paths, **weights) -> RewardModelActor:
    return RewardModelActor([
        RewardModelSpec(name="helpfulness", path=str(paths["helpfulness"]), scope="summary",
                        weight=weights.get("helpfulness", 1.0)),
        RewardModelSpec(name="harmlessness", path=str(paths["harmlessness"]), scope="response",
                        weight=weights.get("harmlessness", 1.0))])


def test_reward_models_judge_their_scope(reward_models):
    actor = _actor(reward_models)
    ns = list(range(10, 100, 7))
    qs = [TASK.question(n) for n in ns]
    clean = [TASK.response(n) for n in ns]
    rude = [TASK.response(n, remark="thought") for n in ns]
    unhelpful = [TASK.response(n, summary="Whatever.") for n in ns]
    help_clean, help_rude, help_bad = (actor.score_texts("helpfulness", qs, r) for r in (clean, rude, unhelpful))
    harm_clean, harm_rude = (actor.score_texts("harmlessness", qs, r) for r in (clean, rude))
    # Helpfulness reads only the summary: a remark in the reasoning changes nothing.
    assert help_rude == help_clean
    assert all(c > 0 > b for c, b in zip(help_clean, help_bad, strict=True))
    # Harmlessness reads the whole response, reasoning included.
    assert all(c > 0 > r for c, r in zip(harm_clean, harm_rude, strict=True))


def test_reward_model_actor_adds_weighted_scores_to_general_groups(reward_models):
    actor = _actor(reward_models, harmlessness=0.5)
    texts = [TASK.response(47), TASK.response(47, remark="thought")]
    base = ScoredGroup(_group(texts), (0.1, 0.1), (math.nan,) * 2, (1.0, 1.0))
    out = actor.score(base)
    parts = dict(out.components)
    assert set(parts) == {"helpfulness", "harmlessness"}
    for i in range(2):
        assert out.rewards[i] == pytest.approx(0.1 + parts["helpfulness"][i] + 0.5 * parts["harmlessness"][i])
    assert parts["harmlessness"][0] > parts["harmlessness"][1]
    # Reasoning prompts pass through untouched.
    reasoning = ScoredGroup(_group(texts, kind="reasoning"), (1.0, 0.0), (1.0, 0.0), (1.0, 1.0))
    assert actor.score(reasoning) is reasoning


def test_reward_model_errors_name_the_fix(reward_models, tmp_path):
    with pytest.raises(ValueError, match="init-reward-model"):
        RewardModelActor([RewardModelSpec(name="h", path=str(tmp_path / "none"), scope="summary")])
    with pytest.raises(ValueError, match="label 3 but .* has 1 output"):
        RewardModelActor([RewardModelSpec(name="h", path=str(reward_models["helpfulness"]), scope="summary",
                                          label=3)])


def test_model_input_plain_and_chat(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert model_input(tok, "Tell me about 4", "4 is even.") == "User: Tell me about 4\nAssistant: 4 is even."
    tok.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    assert model_input(tok, "q", "a") == "[user] q\n[assistant] a\n"
    assert model_input(tok, "q", "a", "text") == "User: q\nAssistant: a"
