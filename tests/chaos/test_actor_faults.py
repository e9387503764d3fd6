"""Actors killed (kill -9) or stopped (SIGSTOP) mid-run, from outside the run: every step
still trains on all its groups, once each, and the run ends as the uninterrupted one did
(same prompts, metrics and weights), with each restart recorded in faults.jsonl."""

from __future__ import annotations

import json
import signal

import pytest

from tests.chaos import runs
from tests.chaos.conftest import Faults, kill, kill_pool_worker, report

pytestmark = pytest.mark.chaos

# Deadlines small enough that a stopped actor is found in seconds (supervise.Deadlines).
WATCHDOG = ("run.hang_grace_s=20", "run.min_tokens_per_s=100000", "rewards.timeout_s=2")


def _check_run(run_dir, straight) -> tuple[list[dict], list[dict]]:
    from transformers import AutoModelForCausalLM

    from orchestrator.metrics import read_metrics

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, runs.STEPS + 1))  # every step once
    assert all(r["groups_trained"] == runs.PROMPTS_PER_STEP for r in rows)
    got = runs.outcome(run_dir)
    assert got[1] == straight[1]  # the same prompts per step
    runs.close_rows(got[0], straight[0])  # nothing lost, nothing trained twice
    runs.same_weights(got[2], straight[2], atol=1e-5)
    AutoModelForCausalLM.from_pretrained(run_dir / "final")
    faults = [json.loads(x) for x in (run_dir / "faults.jsonl").read_text().splitlines()]
    return rows, faults


def test_lost_and_stopped_actors_are_restarted_and_their_work_redone(ray_local, tiny_model, addition_data,
                                                                     straight_runs, tmp_path):
    from orchestrator.stages import grpo

    faults = Faults({
        1: [(kill("RolloutActor"), 0.0), (kill("RewardActor"), 0.0)],  # between steps
        2: [(kill("RolloutActor"), 0.3), (kill("ReferenceActor"), 0.0), (kill_pool_worker(), 0.0)],  # mid-step
        3: [(kill("RewardActor", signal.SIGSTOP), 0.0)],  # stopped before the step scores
    })
    cfg = runs.config(tiny_model, addition_data, tmp_path, "chaos", extra=WATCHDOG)
    rows, events = _check_run(grpo.run(cfg, progress=faults.progress), straight_runs(0))
    assert not faults.errors, faults.errors
    assert len(faults.done) == 6
    last = rows[-1]
    assert last["restarts/rollout"] >= 2 and last["restarts/reference"] >= 1
    assert last["restarts/reward"] >= 2  # killed, then stopped and restarted by the watchdog
    assert last["restarts/learner"] == 0
    roles = [e["role"] for e in events]
    assert {"rollout", "reward", "reference"} <= set(roles)
    hung = [e for e in events if e["cause"].startswith("hung")]
    assert hung and hung[0]["role"] == "reward" and hung[0]["pid"] > 0 and hung[0]["node"]
    assert all(e["recovered_s"] is None or e["recovered_s"] < 300 for e in events)
    report(faults, events)


def test_a_lost_learner_rank_restarts_the_group_from_its_checkpoint(ray_local, tiny_model, addition_data,
                                                                    straight_runs, tmp_path):
    from orchestrator.stages import grpo

    faults = Faults({2: [(kill("GRPOLearner"), 0.0)]})
    cfg = runs.config(tiny_model, addition_data, tmp_path, "learner", extra=("grpo.checkpoint_every_steps=1",))
    rows, events = _check_run(grpo.run(cfg, progress=faults.progress), straight_runs(0))
    assert not faults.errors, faults.errors
    assert rows[-1]["restarts/learner"] == 1
    restart = [e for e in events if e["role"] == "learner" and "resume_from" in e]
    back = [e for e in events if e["role"] == "learner" and e.get("recovered_s") is not None]
    assert len(back) == 1 and back[0]["time"] > restart[0]["time"]
    # Killed as step 2 ends: its checkpoint may or may not have been written.
    assert len(restart) == 1 and restart[0]["resume_from"].endswith(("step-1", "step-2"))
    report(faults, events)
    print(f"learner group: every actor started again in {back[0]['recovered_s']:.1f} s, resumed from "
          f"{restart[0]['resume_from'].rsplit('/', 1)[-1]}")


def test_async_partial_rollout_run_keeps_going_through_lost_engines(ray_local, tiny_model, addition_data,
                                                                     straight_runs, tmp_path):
    """Generation two steps ahead with partial rollout (a push interrupts the samples in
    flight): an engine killed between steps, while it generates, and stopped (SIGSTOP), and
    a reward actor killed. Async runs are not reproducible to the digit, so the check is
    the bookkeeping: every step once, on the uninterrupted run's prompts, with all its
    groups, no token older than the bound, and each restart recorded."""
    from orchestrator.stages import grpo

    faults = Faults({
        1: [(kill("RolloutActor"), 0.0)],  # the next push must form its group again
        2: [(kill("RolloutActor"), 0.3), (kill("RewardActor"), 0.0)],  # mid-generation
        3: [(kill("RolloutActor", signal.SIGSTOP), 0.0)],  # hung: found by the watchdog
    })
    cfg = runs.config(tiny_model, addition_data, tmp_path, "async-chaos", staleness=2,
                      extra=(*WATCHDOG, "grpo.partial_rollout=true", "rollout.max_new_tokens=24"))
    run_dir = grpo.run(cfg, progress=faults.progress)
    assert not faults.errors, faults.errors
    assert len(faults.done) == 4
    from orchestrator.metrics import read_metrics

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, runs.STEPS + 1))  # every step once
    assert all(r["groups_trained"] == runs.PROMPTS_PER_STEP for r in rows)  # nothing lost or trained twice
    assert runs.outcome(run_dir)[1] == straight_runs(0)[1]  # the prompt order does not depend on staleness
    assert all(r["staleness_max"] <= 2 for r in rows), [r["staleness_max"] for r in rows]
    assert rows[-1]["restarts/rollout"] >= 3 and rows[-1]["restarts/reward"] >= 1
    assert rows[-1]["restarts/learner"] == 0
    events = [json.loads(x) for x in (run_dir / "faults.jsonl").read_text().splitlines()]
    hung = [e for e in events if e["cause"].startswith("hung")]
    assert hung and hung[0]["role"] == "rollout", events
    report(faults, events)


def test_async_partial_rollout_run_restarts_after_a_lost_learner_rank(ray_local, tiny_model, addition_data,
                                                                       straight_runs, tmp_path):
    """A learner rank killed in an async partial-rollout run: every actor starts again from
    the checkpoint, with the groups it stored for the steps ahead, and the run ends with
    each step trained once on its prompts."""
    from orchestrator.metrics import read_metrics
    from orchestrator.stages import grpo

    faults = Faults({2: [(kill("GRPOLearner"), 0.0)]})
    cfg = runs.config(tiny_model, addition_data, tmp_path, "async-learner", staleness=2,
                      extra=("grpo.partial_rollout=true", "grpo.checkpoint_every_steps=1"))
    run_dir = grpo.run(cfg, progress=faults.progress)
    assert not faults.errors, faults.errors
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, runs.STEPS + 1))
    assert all(r["groups_trained"] == runs.PROMPTS_PER_STEP for r in rows)
    assert runs.outcome(run_dir)[1] == straight_runs(0)[1]
    assert all(r["staleness_max"] <= 2 for r in rows)
    assert rows[-1]["restarts/learner"] == 1
