"""Weight push: after a learner update and one push, the vLLM engine scores tokens as the
learner does (fp32, within 1e-4); before the push it does not."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray


def _actors(ray, model_path, *, zero_stage=2):
    from actors.config import RolloutConfig
    from actors.rollout import RolloutActor
    from learner.config import GRPOLossConfig, LearnerConfig
    from learner.grpo_role import GRPOLearner
    from orchestrator.cluster import init_weight_push
    from orchestrator.cluster import StageActors

    learner = ray.remote(GRPOLearner).options(num_cpus=0.5, max_concurrency=4).remote(
        str(model_path), LearnerConfig(learning_rate=5e-2, zero_stage=zero_stage, weight_push_bucket_bytes=2**17),
        rank=0, world_size=1, temperature=1.0, groups_per_rank=1, samples_per_prompt=4, max_new_tokens=16,
        loss=GRPOLossConfig(kl_coef=0.0),
    )
    ray.get(learner.setup.remote(*ray.get(learner.address.remote())))
    rollout = ray.remote(RolloutActor).options(num_cpus=0.5).remote(
        str(model_path), RolloutConfig(max_new_tokens=16, max_model_len=256, kv_cache_bytes=64 * 2**20, dtype="float32")
    )
    actors = StageActors(pg=None, learners=[learner], rollouts=[rollout])
    init_weight_push(actors, "gloo", 1)
    return learner, rollout


def test_push_makes_engine_match_learner(ray_local, tiny_model):
    ray = ray_local
    from actors.rollout import PromptItem
    from learner.batch import ScoredGroup

    learner, rollout = _actors(ray, tiny_model)
    prompt = (5, 6, 7, 8, 9, 10)
    group = ray.get(rollout.generate_groups.remote([PromptItem(0, prompt, "x")], 4))[0]
    response = group.completions[0].token_ids

    before_engine = ray.get(rollout.score_tokens.remote(prompt, response))
    before_learner = ray.get(learner.sequence_logprobs.remote(prompt, response))
    assert max(abs(a - b) for a, b in zip(before_engine, before_learner, strict=True)) < 1e-4

    # One real GRPO update with unequal rewards moves the learner's weights.
    scored = ScoredGroup(group, (1.0, 0.0, 0.0, 1.0), (1.0, 0.0, 0.0, 1.0), (1.0,) * 4)
    ray.get(learner.feed.remote([scored]))
    stats = ray.get(learner.train_step.remote(1))
    assert stats.sequences == 4
    after_learner = ray.get(learner.sequence_logprobs.remote(prompt, response))
    stale_engine = ray.get(rollout.score_tokens.remote(prompt, response))
    assert max(abs(a - b) for a, b in zip(stale_engine, after_learner, strict=True)) > 1e-3

    ray.get([learner.push_weights.remote(1), rollout.receive_weights.remote(1)])
    pushed_engine = ray.get(rollout.score_tokens.remote(prompt, response))
    assert max(abs(a - b) for a, b in zip(pushed_engine, after_learner, strict=True)) < 1e-4
    assert ray.get(rollout.version.remote()) == 1

    # Sampled log-probs after the push agree with the learner too (the logprob_gap metric).
    fresh = ray.get(rollout.generate_groups.remote([PromptItem(1, prompt, "x")], 2))[0]
    for c in fresh.completions:
        lp = ray.get(learner.sequence_logprobs.remote(prompt, c.token_ids))
        assert max(abs(a - b) for a, b in zip(c.logprobs, lp, strict=True)) < 1e-4

    # As the grpo driver pushes: learner rank 0 asks the group's engines to receive.
    ray.get(learner.push_weights.remote(2, 60.0), timeout=120)
    assert ray.get(rollout.version.remote()) == 2
    # An engine that is gone is named at once, not when the deadline passes.
    ray.kill(rollout, no_restart=True)
    with pytest.raises(ray.exceptions.RayTaskError) as failed:
        ray.get(learner.push_weights.remote(3, 60.0), timeout=50)
    from learner.weight_sync import EnginePushFailed

    assert isinstance(failed.value.cause, EnginePushFailed), failed.value
    assert failed.value.cause.engine == 0 and not failed.value.cause.late
    assert "rollout 0 failed to take policy version 3" in str(failed.value.cause)
    ray.kill(learner)
