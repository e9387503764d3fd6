"""The learner's update does not depend on how a step's groups are split: one rank with
gradient accumulation, two ZeRO-2 ranks and two ZeRO-3 ranks give the same weights."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.ray


def _groups(n_groups=2, g=4, seed=0):
    from learner.batch import Completion, Group, ScoredGroup

    rng = random.Random(seed)
    out = []
    for k in range(n_groups):
        comps = []
        for _ in range(g):
            ids = tuple(rng.randrange(5, 300) for _ in range(rng.randrange(3, 9)))
            comps.append(Completion(ids, tuple(-rng.uniform(1, 6) for _ in ids), "x", "stop"))
        rewards = tuple(float(rng.random() < 0.5) for _ in range(g))
        rewards = rewards if len(set(rewards)) > 1 else (1.0,) + rewards[1:] if rewards[0] == 0 else (0.0,) + rewards[1:]
        group = Group(k, tuple(rng.randrange(5, 300) for _ in range(6)), "a", tuple(comps), 0)
        out.append(ScoredGroup(group, rewards, rewards, (1.0,) * g))
    return out


def _train(ray, model, *, ranks, zero_stage, groups):
    from learner.config import GRPOLossConfig, LearnerConfig
    from learner.worker import LearnerWorker

    cfg = LearnerConfig(zero_stage=zero_stage, learning_rate=1e-3, micro_batch_groups=1)
    per_rank = len(groups) // ranks
    workers = [
        ray.remote(LearnerWorker).options(num_cpus=0.5, max_concurrency=4).remote(
            str(model), cfg, rank=r, world_size=ranks, temperature=1.0, groups_per_rank=per_rank,
            samples_per_prompt=groups[0].group.size, loss=GRPOLossConfig(kl_coef=0.0))
        for r in range(ranks)
    ]
    addr = ray.get(workers[0].address.remote())
    ray.get([w.setup.remote(*addr) for w in workers])
    # Under ZeRO-3 gathering parameters is collective: every rank takes part.
    before = ray.get([w.parameter_vector.remote() for w in workers])[0]
    for i, g in enumerate(groups):
        ray.get(workers[i % ranks].feed.remote([g]))
    stats = ray.get([w.train_step.remote(1) for w in workers])
    after = ray.get([w.parameter_vector.remote() for w in workers])[0]
    for w in workers:
        ray.kill(w)
    return before, after, stats


def test_same_update_for_any_split(ray_local, tiny_model):
    ray = ray_local
    groups = _groups()
    b1, one, s1 = _train(ray, tiny_model, ranks=1, zero_stage=2, groups=groups)
    _, two, s2 = _train(ray, tiny_model, ranks=2, zero_stage=2, groups=groups)
    _, three, _ = _train(ray, tiny_model, ranks=2, zero_stage=3, groups=groups)
    moved = (one - b1).abs()
    assert moved.max() > 1e-4  # the step really changed the weights
    # Adam's first step is ~lr·sign(g); equal gradients give equal updates.
    assert torch.allclose(one, two, atol=2e-5), (one - two).abs().max()
    assert torch.allclose(one, three, atol=2e-5), (one - three).abs().max()
    assert sum(s.sequences for s in s2) == s1[0].sequences == 8
