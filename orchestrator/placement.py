"""All placement: which actor goes where, with what resources. Driven by config alone.

A stage names the roles it starts (``ROLES``); ``plan`` turns them and the ``cluster``
section into bundles of one GPU at most (a bundle per learner rank, per tensor-parallel
worker of each rollout engine, for the reference model and for the reward-model actor)
and every actor's share of its bundle. The bundles form placement groups:

- the stage's group: learner ranks, reference, reward model, under
  ``cluster.placement_strategy`` (PACK or SPREAD let learner ranks span nodes);
- one group per rollout engine: its ``rollout.tensor_parallel_size`` bundles, STRICT_PACK,
  so the engine's workers share a node. Ray gives a placement group one strategy for all
  its bundles, so "these bundles on one node, those anywhere" needs separate groups.

A tensor-parallel engine actor sits in its group's bundle 0 and captures child tasks:
vLLM's Ray executor, started inside it, finds the group with
``ray.util.get_current_placement_group()`` and puts worker ``i`` on bundle ``i``
(``actors.config.EngineBundles`` names them). A one-GPU engine runs vLLM in its own
process, as on one machine.

Co-location is decided here and nowhere else: with ``cluster.colocate_reference_with_learner``
the reference model takes half of learner rank 0's bundle, which is sized for both, instead
of a bundle of its own; with ``cluster.colocate_rollout_with_learner`` rollout engine i
shares learner rank i's bundle the same way (the learner half, its guests the other half). Reward actors need no accelerator and float free (no bundle).
``cluster.roles.<role>.resources`` (custom resources, e.g. a node's name) are added to each
bundle of the role, or to the actor itself where it has no bundle.
``orchestrator.cluster`` starts what the plan says; ``r1lab plan`` prints the same plan.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.config import EngineBundles

log = logging.getLogger(__name__)

ROLES = ("learner", "rollout", "reference", "reward", "reward_model")
COLOCATED_SHARE = 0.5  # of learner rank 0's bundle, each, for it and the reference model
MIN_LOCAL_CPUS = 4  # an embedded local cluster has at least this many CPUs
ENGINE_STRATEGY = "STRICT_PACK"  # a tensor-parallel engine's workers share one node
STAGE_GROUP = "stage"


@dataclass(frozen=True)
class BundlePlan:
    role: str  # the role the bundle was made for
    index: int  # bundle index in the plan (over all its groups)
    resources: dict[str, float]
    group: int = 0  # index of its group in PlacementPlan.groups


@dataclass(frozen=True)
class GroupPlan:
    """One placement group: ``bundles`` are plan bundle indices, in the group's order."""

    name: str  # "stage", or the rollout engine's name
    strategy: str
    bundles: tuple[int, ...]


@dataclass(frozen=True)
class ActorPlan:
    """One actor: its bundle (None: no bundle) and what it asks of it. ``resources``: the
    custom resources an actor without a bundle asks for. ``worker_bundles``: the bundles of
    a tensor-parallel engine's vLLM workers, in its group (the actor itself sits in the first)."""

    role: str
    index: int  # among the actors of its role
    bundle: int | None
    num_cpus: float
    num_gpus: float
    resources: dict[str, float] = field(default_factory=dict)
    worker_bundles: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return self.role if self.role in ("reference", "reward_model") else f"{self.role}.{self.index}"


@dataclass(frozen=True)
class PlacementPlan:
    bundles: tuple[BundlePlan, ...]
    actors: tuple[ActorPlan, ...]
    strategy: str
    groups: tuple[GroupPlan, ...] = ()

    def of(self, role: str) -> list[ActorPlan]:
        return [a for a in self.actors if a.role == role]

    def in_group(self, bundle: int) -> tuple[int, int]:
        """(group index, bundle index inside that group) of plan bundle ``bundle``."""
        g = self.bundles[bundle].group
        return g, self.groups[g].bundles.index(bundle)

    def specs(self) -> list[tuple[list[dict[str, float]], str]]:
        """What Ray is asked for: each group's bundle resources and strategy, in group order."""
        return [([self.bundles[b].resources for b in g.bundles], g.strategy) for g in self.groups]


def role_resources(cluster, role: str) -> dict[str, float]:
    """``cluster.roles.<role>.resources``: custom resources that steer the role to nodes."""
    spec = cluster.roles.get(role)
    return dict(spec.resources) if spec is not None else {}


def _sum(*parts: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            if v:
                out[k] = out.get(k, 0) + v
    return out


def _check_engine_gpus(c, tensor_parallel_size: int) -> None:
    if tensor_parallel_size > 1 and c.gpus_per_rollout_engine > 1:
        raise ValueError(
            f"cluster.gpus_per_rollout_engine is {c.gpus_per_rollout_engine} with rollout.tensor_parallel_size "
            f"{tensor_parallel_size}: each tensor-parallel worker takes one bundle of at most one GPU "
            "(vLLM's Ray executor refuses more); set cluster.gpus_per_rollout_engine=1")


def plan(cluster, roles: Sequence[str], *, tensor_parallel_size: int = 1, reward_sets: int = 1) -> PlacementPlan:
    """Bundles, groups and actors for ``roles`` (``cluster`` is a ``ClusterConfig``);
    ``reward_sets`` pools of ``cluster.reward_actors`` reward actors each."""
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown roles {unknown}; roles are {', '.join(ROLES)}")
    c = cluster
    _check_engine_gpus(c, tensor_parallel_size)
    bundles: list[BundlePlan] = []
    actors: list[ActorPlan] = []
    engine_groups: list[tuple[str, list[int]]] = []

    def bundle(role: str, cpus: float, gpus: float, extra: dict[str, float]) -> int:
        bundles.append(BundlePlan(role, len(bundles), _sum({"CPU": cpus, "GPU": gpus}, extra)))
        return len(bundles) - 1

    res = {r: role_resources(c, r) for r in ROLES}
    colocate = "learner" in roles and "reference" in roles and c.colocate_reference_with_learner
    engines_on_ranks = "learner" in roles and "rollout" in roles and getattr(c, "colocate_rollout_with_learner", False)
    if engines_on_ranks and c.gpus_per_rollout_engine not in (0, c.gpus_per_learner):
        raise ValueError("cluster.colocate_rollout_with_learner: a co-located engine uses its rank's GPU; leave "
                         "cluster.gpus_per_rollout_engine at 0 or equal to cluster.gpus_per_learner")
    if "learner" in roles:
        for rank in range(c.learner_workers):
            # Who shares rank `rank`'s bundle: the reference model (rank 0), engine `rank`.
            guests = ((("reference", 0),) if colocate and rank == 0 else ()) + \
                     ((("rollout", rank),) if engines_on_ranks else ())
            extra = _sum(res["learner"], *(res[role] for role, _ in guests))
            b = bundle("learner", c.cpus_per_actor * (1 + len(guests)), c.gpus_per_learner, extra)
            share = c.gpus_per_learner * (COLOCATED_SHARE if guests else 1.0) / max(1, len(guests))
            actors.append(ActorPlan("learner", rank, b, c.cpus_per_actor,
                                    c.gpus_per_learner * COLOCATED_SHARE if guests else c.gpus_per_learner))
            actors += [ActorPlan(role, i, b, c.cpus_per_actor, share) for role, i in guests]
    if "rollout" in roles and not engines_on_ranks:
        for i in range(c.rollout_engines):
            own = [bundle("rollout", c.cpus_per_actor, c.gpus_per_rollout_engine, res["rollout"])
                   for _ in range(tensor_parallel_size)]
            engine_groups.append((f"rollout.{i}", own))
            if tensor_parallel_size == 1:  # vLLM runs in the actor's process, on its bundle
                actors.append(ActorPlan("rollout", i, own[0], c.cpus_per_actor, c.gpus_per_rollout_engine))
            else:  # the actor drives vLLM's workers, one per bundle, and holds no GPU itself
                actors.append(ActorPlan("rollout", i, own[0], c.cpus_per_actor, 0.0, worker_bundles=tuple(own)))
    if "reference" in roles and not colocate:
        b = bundle("reference", c.cpus_per_actor, c.gpus_per_reference, res["reference"])
        actors.append(ActorPlan("reference", 0, b, c.cpus_per_actor, c.gpus_per_reference))
    if "reward_model" in roles:
        b = bundle("reward_model", c.cpus_per_actor, c.gpus_per_reward_model, res["reward_model"])
        actors.append(ActorPlan("reward_model", 0, b, c.cpus_per_actor, c.gpus_per_reward_model))
    if "reward" in roles:
        actors += [ActorPlan("reward", i, None, c.cpus_per_actor, 0.0, resources=res["reward"])
                   for i in range(c.reward_actors * reward_sets)]
    return _grouped(bundles, actors, c.placement_strategy, engine_groups)


def _grouped(bundles: list[BundlePlan], actors: list[ActorPlan], strategy: str,
             engine_groups: list[tuple[str, list[int]]]) -> PlacementPlan:
    """The plan with each bundle assigned to its group: the stage's first (if it has
    bundles), then one group per rollout engine."""
    in_engines = {b for _, own in engine_groups for b in own}
    stage = tuple(b.index for b in bundles if b.index not in in_engines)
    groups = ([GroupPlan(STAGE_GROUP, strategy, stage)] if stage else [])
    groups += [GroupPlan(name, ENGINE_STRATEGY, tuple(own)) for name, own in engine_groups]
    group_of = {b: g for g, grp in enumerate(groups) for b in grp.bundles}
    bundles = [BundlePlan(b.role, b.index, b.resources, group_of[b.index]) for b in bundles]
    return PlacementPlan(tuple(bundles), tuple(actors), strategy, tuple(groups))


def grpo_roles(cfg) -> tuple[str, ...]:
    """The roles a GRPO stage starts (``cfg`` is a ``GRPOStageConfig``): the reference
    model only with β > 0, the reward-model actor only when reward models are configured."""
    return ("learner", "rollout", *(("reference",) if cfg.use_reference else ()), "reward",
            *(("reward_model",) if cfg.rewards.reward_models else ()))


def grpo_plan(cfg) -> PlacementPlan:
    """The placement of a GRPO stage: what ``r1lab plan`` prints and ``grpo`` starts."""
    return plan(cfg.cluster, grpo_roles(cfg), tensor_parallel_size=cfg.rollout.tensor_parallel_size)


@dataclass(frozen=True)
class Placement:
    """A plan's placement groups on the cluster, one per ``plan.groups`` entry."""

    plan: PlacementPlan
    groups: tuple[PlacementGroup, ...]


class PlacementError(RuntimeError):
    """The cluster cannot hold a plan; the message names what it needs and what to lower."""


LOWER = {"learner": "cluster.learner_workers", "rollout": "cluster.rollout_engines",
         "reward": "cluster.reward_actors", "reference": "cluster.colocate_reference_with_learner=true",
         "reward_model": "rewards.reward_models"}


def needs(p: PlacementPlan) -> dict[str, dict[str, float]]:
    """Resources the plan asks for, per role (its bundles, and its actors without one)."""
    out: dict[str, dict[str, float]] = {}
    for b in p.bundles:
        out[b.role] = _sum(out.get(b.role, {}), b.resources)
    for a in p.actors:
        if a.bundle is None:
            out[a.role] = _sum(out.get(a.role, {}), {"CPU": a.num_cpus, "GPU": a.num_gpus}, a.resources)
    return out


def unplaceable(p: PlacementPlan, nodes: Sequence[dict[str, float]]) -> list[str]:
    """Why ``p`` can never be placed on ``nodes`` (each node's total resources), as things
    that must hold for any placement; empty when it might be. Not a full bin packing: a
    plan passing these may still wait for resources other work holds."""
    fits = lambda need, node: all(node.get(k, 0) + 1e-9 >= v for k, v in need.items())  # noqa: E731
    problems = []
    total = _sum(*nodes)
    by_role = needs(p)
    for key, amount in sorted(_sum(*by_role.values()).items()):
        if amount > total.get(key, 0) + 1e-9:
            parts = ", ".join(f"{role} {r[key]:g}" for role, r in by_role.items() if r.get(key))
            nodes_have = "1 node has" if len(nodes) == 1 else f"{len(nodes)} nodes have"
            problems.append(f"{amount:g} {key} ({parts}) but the cluster's {nodes_have} {total.get(key, 0):g}")
    for b in p.bundles:
        if not any(fits(b.resources, n) for n in nodes):
            problems.append(f"a {b.role} bundle of {b.resources}, which no single node holds")
            break
    for g in p.groups:
        group = [p.bundles[b].resources for b in g.bundles]
        if g.strategy == "STRICT_PACK" and len(group) > 1 and not any(fits(_sum(*group), n) for n in nodes):
            problems.append(f"group {g.name!r} ({len(group)} bundles, STRICT_PACK) on one node, which no node holds")
        if g.strategy == "STRICT_SPREAD" and sum(any(fits(r, n) for r in group) for n in nodes) < len(group):
            problems.append(f"group {g.name!r} ({len(group)} bundles, STRICT_SPREAD) on {len(group)} different "
                            f"nodes, but only {len(nodes)} nodes are up")
    for a in p.actors:
        need = _sum({"CPU": a.num_cpus, "GPU": a.num_gpus}, a.resources)
        if a.bundle is None and not any(fits(need, n) for n in nodes):
            problems.append(f"{a.name} needs {need}, which no single node holds")
            break
    return problems


def check_fits(p: PlacementPlan, *, autoscaling: bool = False, nodes: Sequence[dict] | None = None) -> None:
    """Refuse at once a plan the cluster's nodes (default: Ray's alive nodes; or ``nodes``,
    each node's resources) can never hold, naming what to lower (with ``autoscaling``, log
    what is waited for instead)."""
    if nodes is None:
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    problems = unplaceable(p, nodes)
    if not problems:
        return
    roles = sorted({b.role for b in p.bundles} | {a.role for a in p.actors})
    lower = ", ".join(LOWER[r] for r in roles if r in LOWER)
    if autoscaling:
        log.warning("waiting for the autoscaler to add nodes: the plan needs %s", "; ".join(problems))
        return
    raise PlacementError(f"this cluster cannot hold the plan: it needs {'; '.join(problems)}.\nLower {lower}, or "
                         "cluster.cpus_per_actor / cluster.gpus_per_*; or add nodes (on an autoscaling cluster, "
                         "set cluster.autoscaling=true to wait for them)")


def create_placement_groups(p: PlacementPlan, timeout_s: float = 300.0, every_s: float = 15.0) -> Placement | None:
    """The placement groups of ``p``, all ready (None when it has no bundles). While they
    wait, a line every ``every_s`` says for what. On failure none is left behind, and the
    error names the groups Ray could not place."""
    if not p.bundles:
        return None
    groups = tuple(placement_group(bundles, strategy=strategy) for bundles, strategy in p.specs())
    deadline = time.monotonic() + timeout_s
    pending = [g.ready() for g in groups]
    while pending and time.monotonic() < deadline:
        left = max(0.0, deadline - time.monotonic())
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(every_s, left))
        if pending:
            waiting = [g for g, pg in zip(p.groups, groups, strict=True) if not _is_ready(pg)]
            log.warning("waiting for resources (%.0f s left): %s; available now: %s", deadline - time.monotonic(),
                        ", ".join(_describe(p, g) for g in waiting), _short_resources(ray.available_resources()))
    if not pending:
        return Placement(p, groups)
    waiting = [g for g, pg in zip(p.groups, groups, strict=True) if not _is_ready(pg)]
    for pg in groups:
        remove_placement_group(pg)
    raise PlacementError(
        f"the cluster cannot place {', '.join(_describe(p, g) for g in waiting)} within {timeout_s:.0f} s "
        f"(available: {_short_resources(ray.available_resources())}); lower cluster.learner_workers / "
        "cluster.rollout_engines / rollout.tensor_parallel_size or the per-actor resources in cluster.*, or check "
        "that nodes offer the resources named in cluster.roles")


def _short_resources(resources: dict[str, float]) -> dict[str, float]:
    """Without Ray's per-node and per-group bookkeeping resources."""
    return {k: round(v, 3) for k, v in resources.items()
            if not k.startswith(("node:", "bundle_group", "memory", "object_store_memory")) and "_group_" not in k}


def _is_ready(pg: PlacementGroup) -> bool:
    ready, _ = ray.wait([pg.ready()], timeout=0)
    return bool(ready)


def _describe(p: PlacementPlan, g: GroupPlan) -> str:
    need = _sum(*(p.bundles[b].resources for b in g.bundles))
    return f"group {g.name!r} ({len(g.bundles)} bundles, {g.strategy}, needing {need})"


def release(placed: Placement | None) -> None:
    if placed is not None:
        for pg in placed.groups:
            remove_placement_group(pg)


def options_for(placed: Placement | None, actor: ActorPlan, *, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``.options(...)`` for ``actor``: its resources, in its bundle of its group if it has
    one. A tensor-parallel engine captures its child tasks: vLLM's workers join its group."""
    opts: dict[str, Any] = {"num_cpus": actor.num_cpus, "num_gpus": actor.num_gpus}
    if actor.resources:
        opts["resources"] = dict(actor.resources)
    if actor.bundle is not None:
        group, index = placed.plan.in_group(actor.bundle)
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placed.groups[group], placement_group_bundle_index=index,
            placement_group_capture_child_tasks=bool(actor.worker_bundles),
        )
    if env:
        opts["runtime_env"] = {"env_vars": env}
    return opts


def engine_bundles(p: PlacementPlan, actor: ActorPlan, cluster) -> EngineBundles | None:
    """The bundles, in its own group, that a tensor-parallel engine hands vLLM's workers."""
    if not actor.worker_bundles:
        return None
    return EngineBundles(tuple(p.in_group(b)[1] for b in actor.worker_bundles),
                         gpus_per_worker=cluster.gpus_per_rollout_engine)


def on_node_options(node_id: str) -> dict[str, Any]:
    """A tiny task pinned to one node (``orchestrator.storage``'s checks and staging): no CPU
    reserved, so it runs while the node is full; never moved to another node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


def control_options() -> dict[str, Any]:
    """The run's control actor (``orchestrator.control``) only answers polls: no CPU
    reserved, on the driver's own node (losing another node must not lose it)."""
    import ray

    return on_node_options(ray.get_runtime_context().get_node_id())


def local_cpus(num_cpus: int | None) -> int:
    """CPUs of an embedded local cluster: ``cluster.num_cpus``, else this machine's."""
    return num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1)


def actor_env() -> dict[str, str]:
    """Environment every r1lab actor gets: CPU DeepSpeed where there is no GPU."""
    keep = ("DS_ACCELERATOR", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE",
            "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TMPDIR", "OMP_NUM_THREADS", "VLLM_LOGGING_LEVEL")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    if os.environ.get("R1LAB_VERBOSE") != "1":
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines: a few hundred a run
    return env
