"""Two real Ray nodes on one machine: work lands on the node its resource names, runs in
that node's working directory, and a killed node is reported dead within seconds."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.cluster

# Ray's GCS is told to miss 5 health checks 1 s apart before it declares a node dead
# (conftest.HEAD_ENV); the rest is slack for two shared cores.
DEAD_WITHIN_S = 30.0


# First in the file: its own cluster is stopped before the shared session one starts.
def test_a_killed_worker_node_is_reported_dead_and_the_head_lives_on(ray_two_nodes_fresh):
    cluster = ray_two_nodes_fresh
    before = cluster.node_infos()
    assert {name: info["state"] for name, info in before.items()} == {"head": "ALIVE", "worker": "ALIVE"}

    cluster.kill_node("worker")

    took = cluster.wait_for_state({"worker"}, "DEAD", DEAD_WITHIN_S)
    after = cluster.node_infos()
    assert after["worker"]["node_id"] == before["worker"]["node_id"]
    assert after["head"] == before["head"], f"the head changed when the worker died ({took:.1f} s)"
    with pytest.raises(KeyError, match="no node 'nope'"):
        cluster.kill_node("nope")


def test_each_node_runs_its_work_in_its_own_working_directory(ray_two_nodes, ray_driver):
    cluster = ray_two_nodes
    ray = ray_driver(cluster)
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 2, f"expected the head and the worker alive, the cluster lists {alive}"
    ids = {name: info["node_id"] for name, info in cluster.node_infos().items()}
    assert set(ids) == {"head", "worker"} and ids["head"] != ids["worker"]

    # Defined here, not at module level: a test module is not importable on the nodes (their
    # cwd and sys.path are not the driver's), so the function must travel by value.
    @ray.remote(num_cpus=1)
    def where() -> tuple[str, str]:
        return ray.get_runtime_context().get_node_id(), os.getcwd()

    ran = ray.get([where.options(resources={node.resource: 1}).remote() for node in cluster.nodes.values()])
    for (name, node), (node_id, cwd) in zip(cluster.nodes.items(), ran, strict=True):
        assert node_id == ids[name], f"work placed by {node.resource} ran on another node"
        assert os.path.realpath(cwd) == os.path.realpath(node.work_dir), (
            f"{name}: ran in {cwd}, not in the working directory of its `ray start`")
        assert os.path.realpath(cwd) != os.path.realpath(os.getcwd())
    assert ran[0][1] != ran[1][1], "both nodes share one working directory: relative paths would agree"
