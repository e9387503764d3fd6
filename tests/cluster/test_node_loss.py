"""A whole node lost mid-run (every process of its `ray start` SIGKILLed), and a
replacement node joining, as an autoscaler's would: the rollout engine and reward actor
that ran there restart on the new node, and the run finishes every step with all its
groups, once each."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.chaos]

STEPS, PROMPTS = 4, 2
# Rollout and reward need the "spot" resource, which the worker node offers and, once
# the worker is gone, only the spare node that replaces it (conftest.ray_nodes_with_spare);
# the learner stays on the head.


# Async: generation two steps ahead and pushes interrupting the samples in flight
# (partial rollout), so the node goes while groups for later steps live on it.
MODES = {"sync": (), "async-partial": ("grpo.max_staleness_steps=2", "grpo.partial_rollout=true",
                                       "rollout.max_new_tokens=24")}


@pytest.mark.parametrize("mode", list(MODES))
def test_a_lost_node_s_actors_restart_on_its_replacement(ray_nodes_with_spare, tmp_path, ray_driver, tiny_model,
                                                         mode):
    from orchestrator.config import load_config
    from orchestrator.metrics import read_metrics
    from orchestrator.stages import grpo
    from tasks.synthetic import make_dataset
    from tests.conftest import ROOT

    cluster = ray_nodes_with_spare
    ray_driver(cluster)
    data = make_dataset("addition", tmp_path / "data")["train"]
    cfg = load_config(ROOT / "configs/demo/grpo.yaml", [
        f"model.path={tiny_model}", f"data.train_path={data}", f"run.storage={tmp_path / 'runs'}",
        "run.name=node-loss", f"grpo.steps={STEPS}", f"grpo.prompts_per_step={PROMPTS}",
        "grpo.samples_per_prompt=4", "cluster.learner_workers=1", "loss.kl_coef=0",
        "learner.micro_batch_groups=1", "rollout.max_new_tokens=8", "logging.wandb_mode=disabled",
        "run.hang_grace_s=30", "cluster.cpus_per_actor=0.5",
        "cluster.roles.rollout.resources={spot: 0.5}", "cluster.roles.reward.resources={spot: 0.5}",
        "cluster.roles.learner.resources={node_head: 0.1}", *MODES[mode],
    ])
    lost: dict[str, float] = {}

    def lose_the_worker() -> None:
        lost["at"] = time.time()
        cluster.kill_node("worker")
        lost["spare_up_s"] = cluster.start_node("spare")

    def progress(step: int, total: int, line: str) -> None:
        if step == 1:
            threading.Thread(target=lose_the_worker, daemon=True).start()

    run_dir = grpo.run(cfg, progress=progress)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["groups_trained"] == PROMPTS for r in rows)
    assert rows[-1]["restarts/rollout"] >= 1 and rows[-1]["restarts/reward"] >= 1
    assert rows[-1]["restarts/learner"] == 0
    if mode == "async-partial":
        assert all(r["staleness_max"] <= 2 for r in rows)
    events = [json.loads(x) for x in (run_dir / "faults.jsonl").read_text().splitlines()]
    spare = cluster.node_infos()["spare"]["node_id"]
    moved = {e["role"] for e in events if e["node"] == spare}
    assert {"rollout", "reward"} <= moved, events
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run_dir / "final")
    for e in events:
        print(f"{e['role']}: noticed {e['detected_at'] - lost['at']:.1f} s after the node was lost, back in "
              f"{e['recovered_s'] if e['recovered_s'] is None else round(e['recovered_s'], 1)} s "
              f"(replacement node up in {lost['spare_up_s']:.1f} s)")
