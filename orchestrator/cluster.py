"""Connecting to Ray and starting the actors of a stage, as placement decides."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import ray

from orchestrator import placement

log = logging.getLogger(__name__)


def connect(address: str | None, *, num_cpus: int | None = None) -> None:
    """Join ``address`` / ``RAY_ADDRESS``, or start an embedded local cluster."""
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS")
    env = placement.actor_env()
    if not _cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    runtime_env = {"env_vars": env} if env else None
    if target:
        ray.init(address=target, runtime_env=runtime_env, log_to_driver=True)
    else:
        cpus = num_cpus or max(4, os.cpu_count() or 1)
        ray.init(address="local", num_cpus=cpus, runtime_env=runtime_env, log_to_driver=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class StageActors:
    """Handles of a stage's actors. The driver holds handles and ObjectRefs, no weights."""

    pg: object
    learners: list = field(default_factory=list)
    rollouts: list = field(default_factory=list)
    rewards: list = field(default_factory=list)
    reference: object | None = None
    reward_model: object | None = None

    def shutdown(self) -> None:
        for a in self.rewards:
            try:
                ray.get(a.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        optional = [a for a in (self.reference, self.reward_model) if a is not None]
        for a in self.learners + self.rollouts + self.rewards + optional:
            ray.kill(a)
        placement.remove_placement_group(self.pg)


def start_grpo_actors(cfg, model_path: str) -> StageActors:
    """Learner group, rollout engines, reward actors, (if β > 0) the reference actor and
    (if reward models are configured) the reward-model actor."""
    from actors.reference import ReferenceActor
    from actors.reward import RewardActor
    from actors.reward_model import RewardModelActor
    from actors.rollout import RolloutActor
    from learner.grpo_role import GRPOLearner

    p = placement.plan(cfg)
    pg = placement.create_placement_group(p)
    env = placement.actor_env()
    actors = StageActors(pg=pg)
    colocate = cfg.use_reference and cfg.cluster.colocate_reference_with_learner
    share = 0.5 if colocate else 1.0

    Learner = ray.remote(GRPOLearner)
    for rank, bundle in enumerate(p.of("learner")):
        actors.learners.append(
            Learner.options(**placement.options_for(pg, bundle, share=share, env=env, max_concurrency=4)).remote(
                model_path, cfg.learner, rank=rank, world_size=cfg.learner.num_workers,
                temperature=cfg.rollout.temperature, groups_per_rank=cfg.groups_per_rank,
                samples_per_prompt=cfg.grpo.samples_per_prompt, max_new_tokens=cfg.rollout.max_new_tokens,
                seed=cfg.run.seed,
            )
        )
    Rollout = ray.remote(RolloutActor)
    for i, bundle in enumerate(p.of("rollout")):
        actors.rollouts.append(
            Rollout.options(**placement.options_for(pg, bundle, env=env)).remote(
                model_path, cfg.rollout, i, run_name=cfg.run.name)
        )
    if cfg.use_reference:
        bundle = p.of("learner")[0] if colocate else p.of("reference")[0]
        actors.reference = ray.remote(ReferenceActor).options(
            **placement.options_for(pg, bundle, share=share, env=env)
        ).remote(model_path, cfg.reference, temperature=cfg.rollout.temperature)
    Reward = ray.remote(RewardActor)
    for i in range(cfg.cluster.num_reward_actors):
        actors.rewards.append(Reward.options(num_cpus=cfg.cluster.cpus_per_actor).remote(
            cfg.rewards, run_name=cfg.run.name, index=i))
    if cfg.rewards.reward_models:
        actors.reward_model = ray.remote(RewardModelActor).options(
            **placement.options_for(pg, p.of("reward_model")[0], env=env)
        ).remote(cfg.rewards.reward_models, run_name=cfg.run.name, trust_remote_code=cfg.model.trust_remote_code)

    master = ray.get(actors.learners[0].address.remote())
    sizes = ray.get([w.setup.remote(*master) for w in actors.learners])
    log.info("learner group of %d ranks ready (%d parameters)", len(sizes), sizes[0])
    others = [a.ready.remote() for a in actors.rollouts + actors.rewards]
    others += [a.ready.remote() for a in (actors.reference, actors.reward_model) if a is not None]
    ray.get(others)
    return actors


def init_weight_push(actors: StageActors, backend: str, tensor_parallel_size: int) -> None:
    """Form the weight-push group: learner rank 0 plus every worker of every engine."""
    host, port = ray.get(actors.learners[0].address.remote())
    spec = ray.get(actors.learners[0].weight_spec.remote())
    world = 1 + len(actors.rollouts) * tensor_parallel_size
    refs = [actors.learners[0].init_weight_group.remote(host, port, world, backend)]
    for i, engine in enumerate(actors.rollouts):
        refs.append(engine.init_weight_group.remote(host, port, 1 + i * tensor_parallel_size, world, backend, spec))
    ray.get(refs)
