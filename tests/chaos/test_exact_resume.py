"""Exact runs: two runs of one config agree, and a run stopped (Ctrl-C) after step 2 and
resumed matches the uninterrupted one: the same prompts per step, the same metrics
(timings aside) and final weights equal to 1e-6, on-policy and two steps stale."""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.chaos import runs

pytestmark = pytest.mark.chaos

STOP_AT = 2


def _ctrl_c_after(step: int):
    def progress(done: int, total: int, line: str) -> None:
        if done == step:
            os.kill(os.getpid(), signal.SIGINT)  # as a user's Ctrl-C: stop with a checkpoint
    return progress


@pytest.mark.parametrize("staleness", [0, 2])
def test_resumed_run_matches_the_uninterrupted_one(ray_local, tiny_model, addition_data, straight_runs, tmp_path,
                                                   staleness):
    from orchestrator.stages import grpo

    straight = straight_runs(staleness)
    assert [p["step"] for p in straight[1]] == list(range(1, runs.STEPS + 1))
    assert all(len(p["prompt_indices"]) == runs.PROMPTS_PER_STEP for p in straight[1])

    if staleness == 0:  # two runs of one config are identical
        again = runs.outcome(grpo.run(runs.config(tiny_model, addition_data, tmp_path, "again", staleness)))
        assert again[:2] == straight[:2]
        runs.same_weights(again[2], straight[2])

    cfg = runs.config(tiny_model, addition_data, tmp_path, "resumed", staleness)
    stopped_dir = grpo.run(cfg, progress=_ctrl_c_after(STOP_AT))
    assert not (stopped_dir / "final").exists()
    assert json.loads((stopped_dir / "checkpoints" / "latest").read_text())["step"] == STOP_AT
    # A crash while writing leaves these; resume must not pick them.
    (stopped_dir / "checkpoints" / f".step-{STOP_AT + 1}.tmp-deadbeef" / "learner").mkdir(parents=True)
    (stopped_dir / "checkpoints" / f"step-{STOP_AT + 5}" / "learner").mkdir(parents=True)
    with (stopped_dir / "metrics.jsonl").open("a") as f:  # a step recorded after the checkpoint, then a crash
        f.write(json.dumps({"step": STOP_AT + 1, "reward_mean": -1.0}) + "\n")

    resumed = runs.outcome(grpo.run(runs.config(tiny_model, addition_data, tmp_path, "resumed", staleness,
                                                resume=True)))
    assert resumed[1] == straight[1]  # the same prompts per step
    assert resumed[0] == straight[0]  # the same metrics, so the same completions and rewards
    runs.same_weights(resumed[2], straight[2])
