"""Placement on two real Ray nodes: ``cluster.roles.<role>.resources`` steer each role's
bundles to the node that offers the resource, a tensor-parallel engine's bundles share one
node, and learner ranks span nodes under SPREAD. Nothing heavy runs in the bundles: a
probe actor in each reports the node it landed on."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.cluster


def _nodes_of(ray, placed, plan) -> dict[str, list[str]]:
    """Node id of every bundle each actor of ``plan`` holds (a TP engine: all of them)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from orchestrator import placement

    @ray.remote(num_cpus=0)
    class Probe:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    found: dict[str, list[str]] = {}
    for a in plan.actors:
        opts = placement.options_for(placed, a)
        opts.update(num_cpus=0, num_gpus=0)  # a probe takes nothing from the bundle
        if a.bundle is None:
            found[a.name] = [ray.get(Probe.options(**opts).remote().node.remote())]
            continue
        nodes = []
        for b in a.worker_bundles or (a.bundle,):
            group, index = plan.in_group(b)
            strategy = PlacementGroupSchedulingStrategy(placed.groups[group], placement_group_bundle_index=index)
            nodes.append(ray.get(Probe.options(num_cpus=0, scheduling_strategy=strategy).remote().node.remote()))
        found[a.name] = nodes
    return found


def test_roles_land_on_the_nodes_their_resources_name(ray_two_nodes, ray_driver):
    from orchestrator import placement
    from orchestrator.config import ClusterConfig

    cluster = ray_two_nodes
    ray = ray_driver(cluster)
    ids = {name: info["node_id"] for name, info in cluster.node_infos().items()}
    head, worker = cluster.nodes["head"].resource, cluster.nodes["worker"].resource
    config = ClusterConfig(learner_workers=2, rollout_engines=1, reward_actors=1, cpus_per_actor=0.5, roles={
        "learner": {"resources": {head: 0.01}}, "rollout": {"resources": {worker: 0.01}},
        "reward": {"resources": {worker: 0.01}}})
    plan = placement.plan(config, ("learner", "rollout", "reward"), tensor_parallel_size=2)
    placed = placement.create_placement_groups(plan, timeout_s=60)
    try:
        found = _nodes_of(ray, placed, plan)
    finally:
        placement.release(placed)
    assert found == {"learner.0": [ids["head"]], "learner.1": [ids["head"]],
                     "rollout.0": [ids["worker"], ids["worker"]], "reward.0": [ids["worker"]]}

    # Learner ranks span nodes: SPREAD with one CPU-heavy bundle per node's worth.
    spread = placement.plan(ClusterConfig(learner_workers=2, cpus_per_actor=2, placement_strategy="SPREAD"),
                            ("learner",))
    placed = placement.create_placement_groups(spread, timeout_s=60)
    try:
        nodes = _nodes_of(ray, placed, spread)
    finally:
        placement.release(placed)
    assert {nodes["learner.0"][0], nodes["learner.1"][0]} == {ids["head"], ids["worker"]}


def test_a_role_no_node_can_host_is_refused_with_the_group_named(ray_two_nodes, ray_driver):
    from orchestrator import placement
    from orchestrator.config import ClusterConfig

    ray_driver(ray_two_nodes)
    config = ClusterConfig(rollout_engines=1, cpus_per_actor=0.5, roles={"rollout": {"resources": {"node_nope": 0.01}}})
    plan = placement.plan(config, ("rollout",), tensor_parallel_size=2)
    with pytest.raises(RuntimeError, match=r"group 'rollout.0' \(2 bundles, STRICT_PACK.*node_nope.*cluster.roles"):
        placement.create_placement_groups(plan, timeout_s=5)


def test_a_tp2_engine_runs_on_the_node_its_role_names(ray_two_nodes, ray_driver, tiny_model):
    """A real engine of tensor_parallel_size=2, steered to the worker node by
    cluster.roles.rollout: both its bundles are there and it samples (vLLM "mp" workers on
    CPU; the Ray executor takes the same bundles on GPUs)."""
    from actors.config import RolloutConfig
    from actors.rollout import PromptItem, RolloutActor
    from orchestrator import placement
    from orchestrator.config import ClusterConfig

    cluster = ray_two_nodes
    ray = ray_driver(cluster)
    worker = cluster.node_infos()["worker"]["node_id"]
    config = ClusterConfig(rollout_engines=1, cpus_per_actor=1,
                           roles={"rollout": {"resources": {cluster.nodes["worker"].resource: 0.01}}})
    plan = placement.plan(config, ("rollout",), tensor_parallel_size=2)
    (engine,) = plan.of("rollout")
    placed = placement.create_placement_groups(plan, timeout_s=60)
    try:
        rollout = ray.remote(RolloutActor).options(**placement.options_for(placed, engine)).remote(
            str(tiny_model), RolloutConfig(max_new_tokens=8, max_model_len=128, kv_cache_bytes=32 * 2**20,
                                           dtype="float32", tensor_parallel_size=2),
            bundles=placement.engine_bundles(plan, engine, config))
        setup = ray.get(rollout.engine_setup.remote(), timeout=300)
        assert setup.bundle_nodes == (worker, worker) and setup.placement_group == placed.groups[0].id.hex()
        (group,) = ray.get(rollout.generate_groups.remote([PromptItem(0, (5, 6, 7), "x")], 2), timeout=120)
        assert len(group.completions) == 2 and all(c.token_ids for c in group.completions)
        ray.kill(rollout)
    finally:
        placement.release(placed)
