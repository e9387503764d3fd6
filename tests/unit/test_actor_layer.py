"""The actor layer without a cluster: placement decides every actor's bundle and share
(co-location once), ``r1lab plan`` and the stages read the same plan, groups are scored
in one order, resource numbers live in placement only, and no stage imports another."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from orchestrator import placement
from orchestrator.cluster import StageParts
from orchestrator.config import ClusterConfig, load_config
from orchestrator.stages import STAGES


pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def grpo(*overrides: str):
    return load_config(ROOT / "configs/demo/grpo.yaml", list(overrides))


def asks(p: placement.PlacementPlan) -> dict[str, tuple[int | None, float, float]]:
    return {a.name: (a.bundle, a.num_cpus, a.num_gpus) for a in p.actors}


def test_reference_shares_learner_rank_0s_bundle_decided_once():
    cfg = grpo("cluster.gpus_per_learner=1", "cluster.gpus_per_rollout_engine=1")
    p = placement.grpo_plan(cfg)
    # cpus_per_actor 0.5: rank 0's bundle holds the learner and the reference, half each
    assert [(b.role, b.resources) for b in p.bundles] == [
        ("learner", {"CPU": 1.0, "GPU": 1}), ("learner", {"CPU": 0.5, "GPU": 1}), ("rollout", {"CPU": 0.5, "GPU": 1})]
    assert asks(p) == {"learner.0": (0, 0.5, 0.5), "reference": (0, 0.5, 0.5), "learner.1": (1, 0.5, 1),
                       "rollout.0": (2, 0.5, 1), "reward.0": (None, 0.5, 0.0)}
    for b in p.bundles:  # what the actors of a bundle ask for fits in it, exactly
        inside = [a for a in p.actors if a.bundle == b.index]
        assert sum(a.num_cpus for a in inside) == b.resources["CPU"]
        assert sum(a.num_gpus for a in inside) == b.resources.get("GPU", 0)


def test_reference_gets_its_own_bundle_or_none():
    apart = placement.grpo_plan(grpo("cluster.colocate_reference_with_learner=false", "cluster.gpus_per_reference=1"))
    assert [b.role for b in apart.bundles] == ["learner", "learner", "rollout", "reference"]
    assert asks(apart)["reference"] == (3, 0.5, 1) and asks(apart)["learner.0"] == (0, 0.5, 0.0)
    without = placement.grpo_plan(grpo("loss.kl_coef=0"))
    assert not without.of("reference") and [b.role for b in without.bundles] == ["learner", "learner", "rollout"]


def test_the_demo_actors_ask_for_what_they_always_did():
    """Each actor's CPUs (Ray sets its thread count from them) as before the plan held shares."""
    p = placement.grpo_plan(grpo())
    assert {a.name: a.num_cpus for a in p.actors} == {
        "learner.0": 0.5, "reference": 0.5, "learner.1": 0.5, "rollout.0": 0.5, "reward.0": 0.5}
    assert all(a.num_gpus == 0 for a in p.actors)


def test_counts_come_from_cluster():
    cfg = grpo("cluster.learner_workers=4", "cluster.rollout_engines=3", "cluster.reward_actors=2",
               "rollout.tensor_parallel_size=2", "cluster.gpus_per_rollout_engine=1")
    p = placement.grpo_plan(cfg)
    assert [len(p.of(r)) for r in ("learner", "rollout", "reference", "reward")] == [4, 3, 1, 2]
    for a in p.of("rollout"):  # tensor_parallel_size GPUs per engine: a bundle of one GPU per worker
        assert [p.bundles[b].resources["GPU"] for b in a.worker_bundles] == [1, 1]
        assert a.bundle == a.worker_bundles[0] and a.num_gpus == 0  # vLLM's workers hold the GPUs


def test_plan_prints_what_the_stage_starts():
    for path in [ROOT / "configs/demo/grpo.yaml", ROOT / "configs/demo/grpo_all.yaml",
                 *sorted((ROOT / "configs/gpu").glob("*.yaml"))]:
        cfg = load_config(path)
        started = StageParts.for_grpo(cfg).plan(placement.grpo_roles(cfg))
        assert started == placement.grpo_plan(cfg), path
    assert placement.grpo_roles(load_config(ROOT / "configs/demo/grpo_all.yaml"))[-1] == "reward_model"


def test_inference_and_sft_plans():
    c = ClusterConfig(rollout_engines=2, reward_actors=3, learner_workers=2, gpus_per_rollout_engine=1)
    p = placement.plan(c, ("rollout", "reward"), reward_sets=2)
    assert [b.role for b in p.bundles] == ["rollout", "rollout"]
    assert len(p.of("reward")) == 6 and all(a.bundle is None for a in p.of("reward"))
    parts = StageParts("m", c, reward_sets={"a": None, "b": None})
    assert [parts.reward_set(a.index) for a in p.of("reward")] == ["a", "a", "a", "b", "b", "b"]
    sft = placement.plan(c, ("learner",))  # no reference without the role, whatever colocate says
    assert [(a.name, a.num_cpus) for a in sft.actors] == [("learner.0", 0.5), ("learner.1", 0.5)]
    with pytest.raises(ValueError, match="unknown roles"):
        placement.plan(c, ("learner", "critic"))


def test_scoring_order_reward_then_reward_model_then_reference():
    from orchestrator.streaming import Scoring, deliver

    sent = []

    class Method:
        """An actor method stand-in, for one group or (``options(num_returns=n)``) for n."""

        def __init__(self, name: str, groups: int = 1) -> None:
            self.name, self.groups = name, groups

        def options(self, num_returns):
            return Method(self.name, num_returns)

        def remote(self, *args):
            sent.append((self.name, args))
            out = [f"{self.name}({g})" for g in args[len(args) - self.groups:]]
            return out[0] if self.groups == 1 else out

    class Handle:
        def __init__(self, name: str, *methods: str) -> None:
            for m in methods:
                setattr(self, m, Method(name))
            self.name = name

    s = Scoring([Handle("r0", "score", "score_groups"), Handle("r1", "score", "score_groups")],
                Handle("rm", "score", "score_groups"), Handle("ref", "add_ref_logprobs", "add_ref_logprobs_groups"))
    # Group number n goes to reward actor n mod 2, whatever order the groups come in.
    calls = s.score([2, 0, 1], ["g2", "g0", "g1"])
    assert [c[-1][1] for c in calls] == ["ref(rm(r0(g2)))", "ref(rm(r0(g0)))", "ref(rm(r1(g1)))"]
    assert [[a.name for a, _ in c] for c in calls] == [["r0", "rm", "ref"], ["r0", "rm", "ref"], ["r1", "rm", "ref"]]
    assert [r for _, r in calls[1]] == ["r0(g0)", "rm(r0(g0))", "ref(rm(r0(g0)))"]
    # One call per actor: r0 takes g2 and g0 together, r1 g1 alone, the later hops all three.
    assert [name for name, _ in sent] == ["r0", "r1", "rm", "ref"]
    assert sent[0][1] == ("g2", "g0")
    sent.clear()
    assert [[r for _, r in c] for c in Scoring([Handle("r0", "score", "score_groups")]).score([5], ["g"])] == [["r0(g)"]]
    sent.clear()
    # Delivery: number n to rank n mod 2 as its (n div 2)-th, one call per rank.
    puts = deliver([Handle("l0", "put", "put_groups"), Handle("l1", "put", "put_groups")], [4, 5, 6], ["a", "b", "c"])
    assert [(rank.name, ref) for rank, ref in puts] == [("l0", "l0(a)"), ("l1", "l1(b)"), ("l0", "l0(c)")]
    assert sent == [("l0", ([2, 3], "a", "c")), ("l1", (2, "b"))]


def _sources(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


RESOURCE_FIELDS = {"cpus_per_actor", "gpus_per_learner", "gpus_per_rollout_engine", "gpus_per_reference",
                   "gpus_per_reward_model", "colocate_reference_with_learner"}


def test_placement_is_the_only_module_with_resource_numbers():
    found = []
    for path in _sources("orchestrator", "actors"):
        if path == ROOT / "orchestrator/placement.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in RESOURCE_FIELDS:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} reads {node.attr}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "options":
                for kw in node.keywords:
                    if kw.arg in ("num_cpus", "num_gpus", "resources", "scheduling_strategy"):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} .options({kw.arg}=...)")
    assert not found, "resource numbers outside orchestrator/placement.py:\n" + "\n".join(found)


def test_no_stage_imports_another_stage():
    stage_modules = set(STAGES.values())
    wrong = []
    for path in _sources("orchestrator/stages"):
        me = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            wrong += [f"{me} imports {n}" for n in names if n in stage_modules and n != me]
    assert not wrong, "stages import stages (move shared code into an orchestrator module):\n" + "\n".join(wrong)


def test_cpu_engines_are_built_first_gpu_engines_with_the_rest():
    from orchestrator.cluster import _engines_first

    cpu = [placement.ActorPlan("learner", 0, 0, 1, 0), placement.ActorPlan("rollout", 0, 1, 1, 0),
           placement.ActorPlan("reward", 0, None, 1, 0), placement.ActorPlan("rollout", 1, 2, 1, 0)]
    first, rest = _engines_first(cpu)
    assert [a.name for a in first] == ["rollout.0", "rollout.1"]
    assert [a.name for a in rest] == ["learner.0", "reward.0"]
    gpu = [placement.ActorPlan("learner", 0, 0, 1, 1), placement.ActorPlan("rollout", 0, 1, 1, 1)]
    assert _engines_first(gpu) == ([], gpu)


def test_a_stream_names_each_group_but_the_last():
    from actors.rollout import read_items, stream_items

    finished = [(2, "g2"), (0, "g0"), (1, "g1")]  # the order the prompts finished in
    items = list(stream_items(iter(finished), 3))
    assert items == [2, "g2", 0, "g0", "g1"]  # the last group alone: the reader knows which is left
    assert list(read_items(iter(items), 3)) == finished
    assert list(stream_items(iter([(0, "g")]), 1)) == ["g"]
