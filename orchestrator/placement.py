"""All placement: which actor goes where, with what resources. Driven by config alone.

A stage names the roles it starts (``ROLES``); ``plan`` turns them and the ``cluster``
section into one placement group — a bundle per learner rank, per rollout engine, for the
reference model and for the reward-model actor — and every actor's share of its bundle.
Co-location is decided here and nowhere else: with ``cluster.colocate_reference_with_learner``
the reference model takes half of learner rank 0's bundle, which is sized for both, instead
of a bundle of its own. Reward actors need no accelerator and float free (no bundle).
``orchestrator.cluster`` starts what the plan says; ``r1lab plan`` prints the same plan.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger(__name__)

ROLES = ("learner", "rollout", "reference", "reward", "reward_model")
COLOCATED_SHARE = 0.5  # of learner rank 0's bundle, each, for it and the reference model
MIN_LOCAL_CPUS = 4  # an embedded local cluster has at least this many CPUs


@dataclass(frozen=True)
class BundlePlan:
    role: str  # the role the bundle was made for
    index: int  # bundle index in the placement group
    resources: dict[str, float]


@dataclass(frozen=True)
class ActorPlan:
    """One actor: its bundle (None: no bundle) and what it asks of it."""

    role: str
    index: int  # among the actors of its role
    bundle: int | None
    num_cpus: float
    num_gpus: float

    @property
    def name(self) -> str:
        return self.role if self.role in ("reference", "reward_model") else f"{self.role}.{self.index}"


@dataclass(frozen=True)
class PlacementPlan:
    bundles: tuple[BundlePlan, ...]
    actors: tuple[ActorPlan, ...]
    strategy: str

    def of(self, role: str) -> list[ActorPlan]:
        return [a for a in self.actors if a.role == role]


def plan(cluster, roles: Sequence[str], *, tensor_parallel_size: int = 1, reward_sets: int = 1) -> PlacementPlan:
    """Bundles and actors for ``roles`` (``cluster`` is a ``ClusterConfig``); ``reward_sets``
    pools of ``cluster.reward_actors`` reward actors each."""
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown roles {unknown}; roles are {', '.join(ROLES)}")
    c = cluster
    bundles: list[BundlePlan] = []
    actors: list[ActorPlan] = []

    def bundle(role: str, cpus: float, gpus: float) -> int:
        bundles.append(BundlePlan(role, len(bundles), {k: v for k, v in {"CPU": cpus, "GPU": gpus}.items() if v}))
        return len(bundles) - 1

    colocate = "learner" in roles and "reference" in roles and c.colocate_reference_with_learner
    if "learner" in roles:
        for rank in range(c.learner_workers):
            if colocate and rank == 0:
                b = bundle("learner", c.cpus_per_actor * 2, c.gpus_per_learner)
                actors.append(ActorPlan("learner", rank, b, c.cpus_per_actor, c.gpus_per_learner * COLOCATED_SHARE))
                actors.append(ActorPlan("reference", 0, b, c.cpus_per_actor, c.gpus_per_learner * COLOCATED_SHARE))
            else:
                b = bundle("learner", c.cpus_per_actor, c.gpus_per_learner)
                actors.append(ActorPlan("learner", rank, b, c.cpus_per_actor, c.gpus_per_learner))
    if "rollout" in roles:
        gpus = c.gpus_per_rollout_engine * tensor_parallel_size
        for i in range(c.rollout_engines):
            actors.append(ActorPlan("rollout", i, bundle("rollout", c.cpus_per_actor, gpus), c.cpus_per_actor, gpus))
    if "reference" in roles and not colocate:
        b = bundle("reference", c.cpus_per_actor, c.gpus_per_reference)
        actors.append(ActorPlan("reference", 0, b, c.cpus_per_actor, c.gpus_per_reference))
    if "reward_model" in roles:
        b = bundle("reward_model", c.cpus_per_actor, c.gpus_per_reward_model)
        actors.append(ActorPlan("reward_model", 0, b, c.cpus_per_actor, c.gpus_per_reward_model))
    if "reward" in roles:
        actors += [ActorPlan("reward", i, None, c.cpus_per_actor, 0.0) for i in range(c.reward_actors * reward_sets)]
    return PlacementPlan(tuple(bundles), tuple(actors), c.placement_strategy)


def grpo_roles(cfg) -> tuple[str, ...]:
    """The roles a GRPO stage starts (``cfg`` is a ``GRPOStageConfig``): the reference
    model only with β > 0, the reward-model actor only when reward models are configured."""
    return ("learner", "rollout", *(("reference",) if cfg.use_reference else ()), "reward",
            *(("reward_model",) if cfg.rewards.reward_models else ()))


def grpo_plan(cfg) -> PlacementPlan:
    """The placement of a GRPO stage: what ``r1lab plan`` prints and ``grpo`` starts."""
    return plan(cfg.cluster, grpo_roles(cfg), tensor_parallel_size=cfg.rollout.tensor_parallel_size)


def create_placement_group(p: PlacementPlan, timeout_s: float = 300.0) -> PlacementGroup | None:
    """The placement group of ``p``'s bundles (None when it has none)."""
    if not p.bundles:
        return None
    pg = placement_group([b.resources for b in p.bundles], strategy=p.strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        need: dict[str, float] = {}
        for b in p.bundles:
            for k, v in b.resources.items():
                need[k] = need.get(k, 0) + v
        raise RuntimeError(
            f"the cluster cannot place {len(p.bundles)} bundles needing {need} "
            f"(available: {ray.available_resources()}); lower cluster.learner_workers / "
            "cluster.rollout_engines or the per-actor resources in cluster.*"
        )
    return pg


def release(pg: PlacementGroup | None) -> None:
    if pg is not None:
        remove_placement_group(pg)


def options_for(pg: PlacementGroup | None, actor: ActorPlan, *, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``.options(...)`` for ``actor``: its resources, in its bundle of ``pg`` if it has one."""
    opts: dict[str, Any] = {"num_cpus": actor.num_cpus, "num_gpus": actor.num_gpus}
    if actor.bundle is not None:
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=actor.bundle
        )
    if env:
        opts["runtime_env"] = {"env_vars": env}
    return opts


def on_node_options(node_id: str) -> dict[str, Any]:
    """A tiny task pinned to one node (``orchestrator.storage``'s checks and staging): no CPU
    reserved, so it runs while the node is full; never moved to another node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


def control_options() -> dict[str, Any]:
    """The run's control actor (``orchestrator.control``) only answers polls: no CPU reserved."""
    return {"num_cpus": 0}


def local_cpus(num_cpus: int | None) -> int:
    """CPUs of an embedded local cluster: ``cluster.num_cpus``, else this machine's."""
    return num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1)


def actor_env() -> dict[str, str]:
    """Environment every r1lab actor gets: CPU DeepSpeed where there is no GPU."""
    keep = ("DS_ACCELERATOR", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE",
            "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TMPDIR", "OMP_NUM_THREADS")
    return {k: os.environ[k] for k in keep if k in os.environ}
