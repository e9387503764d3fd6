"""Partial rollout: a weight push lands while samples are being drawn; they continue from
their tokens so far under the new weights, and every token records the version that drew it."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.ray

BUDGET = 240  # tokens a sample draws (EOS ignored): long enough to be mid-flight at the push


def _actors(ray, model_path):
    from actors.config import RolloutConfig
    from actors.rollout import RolloutActor
    from learner.config import GRPOLossConfig, LearnerConfig
    from learner.grpo_role import GRPOLearner
    from orchestrator.cluster import StageActors, init_weight_push, partial_rollout_calls

    learner = ray.remote(GRPOLearner).options(num_cpus=0.5, max_concurrency=4).remote(
        str(model_path), LearnerConfig(learning_rate=5e-2, weight_push_bucket_bytes=2**17),
        rank=0, world_size=1, temperature=1.0, groups_per_rank=1, samples_per_prompt=4, max_new_tokens=16,
        loss=GRPOLossConfig(kl_coef=0.0),
    )
    ray.get(learner.setup.remote(*ray.get(learner.address.remote())))
    rollout = ray.remote(RolloutActor).options(num_cpus=0.5, max_concurrency=partial_rollout_calls(0)).remote(
        str(model_path), RolloutConfig(max_new_tokens=16, max_model_len=256, kv_cache_bytes=64 * 2**20,
                                       dtype="float32"), partial_rollout=True)
    init_weight_push(StageActors(pg=None, learners=[learner], rollouts=[rollout]), "gloo", 1)
    return learner, rollout


def test_push_mid_generation_continues_samples_under_the_new_weights(ray_local, tiny_model):
    ray = ray_local
    from actors.rollout import PromptItem
    from learner.batch import ScoredGroup

    learner, rollout = _actors(ray, tiny_model)
    prompt = (5, 6, 7, 8, 9, 10)
    # Sampled like the classic engine: sample j of a seeded prompt is seeded seed + j.
    warm = ray.get(rollout.generate_groups.remote([PromptItem(0, prompt, "x")], 4, seeds=[3]))[0]
    assert all(c.versions == (0,) * len(c.token_ids) for c in warm.completions)
    # One update with unequal rewards moves the learner to version 1 (not pushed yet).
    ray.get(learner.feed.remote([ScoredGroup(warm, (1.0, 0.0, 0.0, 1.0), (1.0, 0.0, 0.0, 1.0), (1.0,) * 4)]))
    ray.get(learner.train_step.remote(1))

    prompts = [PromptItem(1, prompt, "x"), PromptItem(2, (11, 12, 13), "y")]
    before = ray.get(rollout.in_flight.remote())["tokens_sampled"]
    generation = rollout.generate_groups.remote(prompts, 2, seeds=[7, 8], max_new_tokens=BUDGET, ignore_eos=True)
    deadline = time.monotonic() + 120
    while ray.get(rollout.in_flight.remote())["tokens_sampled"] < before + 4 * 12:  # the 4 samples step together
        assert time.monotonic() < deadline, "the engine drew no tokens within 120 s"
        time.sleep(0.05)
    t0 = time.monotonic()
    ray.get([learner.push_weights.remote(1), rollout.receive_weights.remote(1)], timeout=120)
    push_s = time.monotonic() - t0
    ready, _ = ray.wait([generation], timeout=0)
    assert not ready, "the push waited for the generation in flight"
    groups = ray.get(generation, timeout=300)

    assert ray.get(rollout.version.remote()) == 1
    assert ray.get(rollout.in_flight.remote())["resumed"] == 4  # every sample was stopped once and continued
    for g in groups:
        assert g.policy_version == 0  # a group's version is that of its oldest token
        for c in g.completions:
            assert len(c.token_ids) == BUDGET and c.finish_reason == "length"
            first_new = c.versions.index(1)
            assert first_new >= 10 and c.versions == (0,) * first_new + (1,) * (BUDGET - first_new)
            # Tokens after the push are drawn and scored by the new policy: their sampled
            # log-probs are the learner's (which holds version 1) after re-prefilling the
            # sample's earlier tokens under the new weights.
            learner_lp = ray.get(learner.sequence_logprobs.remote(g.prompt_ids, c.token_ids))
            new = [abs(a - b) for a, b, v in zip(c.logprobs, learner_lp, c.versions, strict=True) if v == 1]
            old = [abs(a - b) for a, b, v in zip(c.logprobs, learner_lp, c.versions, strict=True) if v == 0]
            assert max(new) < 1e-4, max(new)
            assert max(old) > 1e-3  # those were drawn by version 0
    assert push_s < 60
    ray.kill(learner)
    ray.kill(rollout)


def test_grpo_with_partial_rollout_keeps_the_staleness_bound(ray_local, tiny_model, tmp_path):
    from orchestrator.config import load_config
    from orchestrator.metrics import read_metrics
    from orchestrator.stages import grpo
    from tasks.synthetic import make_dataset
    from tests.conftest import ROOT

    data = make_dataset("addition", tmp_path / "data")
    cfg = load_config(ROOT / "configs/demo/grpo.yaml", [
        f"model.path={tiny_model}", f"data.train_path={data['train']}", f"run.storage={tmp_path}",
        "run.name=partial", "grpo.steps=4", "grpo.max_staleness_steps=2", "grpo.partial_rollout=true",
        "grpo.prompts_per_step=2", "grpo.samples_per_prompt=4", "cluster.learner_workers=1", "loss.kl_coef=0",
        "learner.micro_batch_groups=1", "rollout.max_new_tokens=8", "logging.wandb_mode=disabled",
    ])
    run_dir = grpo.run(cfg)
    rows = read_metrics(run_dir)
    assert [r["policy_version"] for r in rows] == [1, 2, 3, 4]
    # Groups are admitted by launch: generation for step s starts at version >= s - 1 - 2,
    # so no token is more than two versions behind, and none was dropped for it.
    assert rows[0]["staleness_max"] == 0.0
    assert all(0 <= r["staleness_mean"] <= r["staleness_max"] <= 2 for r in rows), rows
    assert all(r["groups_trained"] == 2 for r in rows)
    assert (run_dir / "final" / "model.safetensors").exists()


def test_colocated_engines_take_turns_and_train_as_the_disaggregated_run(ray_local, tiny_model, tmp_path):
    """Co-located (engine i in learner rank i's bundle, asleep while the ranks train) is the
    same algorithm: on CPUs, where sleeping frees nothing, the same metrics to the digit."""
    from orchestrator import placement
    from orchestrator.config import load_config
    from orchestrator.metrics import read_metrics
    from orchestrator.stages import grpo
    from tasks.synthetic import make_dataset
    from tests.conftest import ROOT

    data = make_dataset("addition", tmp_path / "data")
    base = [f"model.path={tiny_model}", f"data.train_path={data['train']}", f"run.storage={tmp_path}",
            "grpo.steps=2", "grpo.prompts_per_step=2", "grpo.samples_per_prompt=4", "cluster.learner_workers=1",
            "loss.kl_coef=0", "learner.micro_batch_groups=1", "rollout.max_new_tokens=8",
            "logging.wandb_mode=disabled"]
    apart = load_config(ROOT / "configs/demo/grpo.yaml", [*base, "run.name=apart"])
    together = load_config(ROOT / "configs/demo/grpo.yaml",
                           [*base, "run.name=together", "cluster.colocate_rollout_with_learner=true"])
    plan = placement.grpo_plan(together)
    (rank,), (engine,) = plan.of("learner"), plan.of("rollout")
    assert engine.bundle == rank.bundle and len(plan.bundles) == 1
    rows = {name: read_metrics(grpo.run(cfg)) for name, cfg in (("apart", apart), ("together", together))}
    same = ("reward_mean", "accuracy", "surrogate_loss", "grad_norm", "response_tokens_mean", "logprob_gap")
    assert [[r[k] for k in same] for r in rows["together"]] == [[r[k] for k in same] for r in rows["apart"]]
    log = (tmp_path / "together" / "driver.log").read_text()
    assert log.count("engines' sleep done") == 2 and log.count("engines' wake-up done") == 4
