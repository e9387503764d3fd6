"""All placement: which actor goes where, with what resources. Driven by config alone.

One placement group holds a bundle per learner rank, per rollout engine and for the
reference model; bundle indices are fixed so that co-location is a config choice
(``cluster.colocate_reference_with_learner`` puts the reference model in learner
rank 0's bundle). Reward actors need no accelerator and float free.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundlePlan:
    role: str
    index: int  # bundle index in the placement group
    resources: dict[str, float]


@dataclass(frozen=True)
class PlacementPlan:
    bundles: tuple[BundlePlan, ...]
    strategy: str

    def of(self, role: str) -> list[BundlePlan]:
        return [b for b in self.bundles if b.role == role]


def plan(cfg) -> PlacementPlan:
    """The bundles a GRPO stage needs (``cfg`` is a ``GRPOStageConfig``)."""
    c = cfg.cluster
    bundles: list[BundlePlan] = []

    def add(role: str, resources: dict[str, float]) -> None:
        bundles.append(BundlePlan(role, len(bundles), {k: v for k, v in resources.items() if v}))

    share = 2 if (cfg.use_reference and c.colocate_reference_with_learner) else 1
    for _ in range(cfg.cluster.learner_workers):
        add("learner", {"CPU": c.cpus_per_actor * share, "GPU": c.gpus_per_learner})
    tp = cfg.rollout.tensor_parallel_size
    for _ in range(cfg.cluster.rollout_engines):
        add("rollout", {"CPU": c.cpus_per_actor, "GPU": c.gpus_per_rollout_engine * tp})
    if cfg.use_reference and not c.colocate_reference_with_learner:
        add("reference", {"CPU": c.cpus_per_actor, "GPU": c.gpus_per_reference})
    if cfg.rewards.reward_models:
        add("reward_model", {"CPU": c.cpus_per_actor, "GPU": c.gpus_per_reward_model})
    return PlacementPlan(tuple(bundles), c.placement_strategy)


def plan_learners(num_workers: int, cluster) -> PlacementPlan:
    """Bundles for a stage that only trains (SFT): one per learner rank."""
    bundles = tuple(
        BundlePlan("learner", i, {k: v for k, v in {"CPU": cluster.cpus_per_actor, "GPU": cluster.gpus_per_learner}.items() if v})
        for i in range(num_workers)
    )
    return PlacementPlan(bundles, cluster.placement_strategy)


def plan_inference(cluster, rollout) -> PlacementPlan:
    """Bundles for rollout engines alone (evaluation and sampling need no learner)."""
    gpus = cluster.gpus_per_rollout_engine * rollout.tensor_parallel_size
    bundles = tuple(
        BundlePlan("rollout", i, {k: v for k, v in {"CPU": cluster.cpus_per_actor, "GPU": gpus}.items() if v})
        for i in range(cluster.rollout_engines)
    )
    return PlacementPlan(bundles, cluster.placement_strategy)


def create_placement_group(p: PlacementPlan, timeout_s: float = 300.0) -> PlacementGroup:
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


def options_for(pg: PlacementGroup, bundle: BundlePlan, *, share: float = 1.0,
                env: dict[str, str] | None = None, max_concurrency: int | None = None,
                num_gpus: float | None = None) -> dict[str, Any]:
    """``.options(...)`` for an actor in ``bundle``; ``share`` of its resources."""
    opts: dict[str, Any] = {
        "num_cpus": bundle.resources.get("CPU", 0) * share,
        "num_gpus": bundle.resources.get("GPU", 0) * share if num_gpus is None else num_gpus,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=bundle.index
        ),
    }
    if env:
        opts["runtime_env"] = {"env_vars": env}
    if max_concurrency is not None:
        opts["max_concurrency"] = max_concurrency
    return opts


def actor_env() -> dict[str, str]:
    """Environment every r1lab actor gets: CPU DeepSpeed where there is no GPU."""
    keep = ("DS_ACCELERATOR", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE",
            "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TMPDIR", "OMP_NUM_THREADS")
    return {k: os.environ[k] for k in keep if k in os.environ}
