"""Exact runs: two runs of one config agree, and a run stopped (Ctrl-C) after step 2 and
resumed matches the uninterrupted one: the same prompts per step, the same metrics
(timings aside) and final weights equal to 1e-6, on-policy and two steps stale."""

from __future__ import annotations

import json
import os
import signal

import pytest

pytestmark = pytest.mark.ray

STEPS, STOP_AT = 4, 2


def _config(tiny_model, data, store, name: str, staleness: int, resume: bool = False):
    from orchestrator.config import load_config
    from tests.conftest import ROOT

    return load_config(ROOT / "configs/demo/grpo.yaml", [
        f"model.path={tiny_model}", f"data.train_path={data}", f"run.storage={store}", f"run.name={name}",
        f"run.resume={str(resume).lower()}", f"grpo.steps={STEPS}", f"grpo.max_staleness_steps={staleness}",
        "grpo.prompts_per_step=2", "grpo.samples_per_prompt=4", "cluster.learner_workers=1", "loss.kl_coef=0",
        "learner.micro_batch_groups=1", "rollout.max_new_tokens=8", "logging.wandb_mode=disabled",
    ])


def _timeless(rows: list[dict]) -> list[dict]:
    timing = ("_s", "per_s", "seconds")
    return [{k: v for k, v in r.items() if not k.endswith(timing)} for r in rows]


def _outcome(run_dir) -> tuple[list[dict], list[dict], dict]:
    from safetensors.torch import load_file

    from orchestrator.metrics import read_metrics

    prompts = [json.loads(x) for x in (run_dir / "prompts.jsonl").read_text().splitlines()]
    return _timeless(read_metrics(run_dir)), prompts, load_file(run_dir / "final" / "model.safetensors")


def _ctrl_c_after(step: int):
    def progress(done: int, total: int, line: str) -> None:
        if done == step:
            os.kill(os.getpid(), signal.SIGINT)  # as a user's Ctrl-C: stop with a checkpoint
    return progress


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name].float() - b[name].float()).abs().max().item() <= 1e-6, name


@pytest.mark.parametrize("staleness", [0, 2])
def test_resumed_run_matches_the_uninterrupted_one(ray_local, tiny_model, tmp_path, staleness):
    from orchestrator.stages import grpo
    from tasks.synthetic import make_dataset

    data = make_dataset("addition", tmp_path / "data")["train"]
    straight = _outcome(grpo.run(_config(tiny_model, data, tmp_path, "straight", staleness)))
    assert [p["step"] for p in straight[1]] == list(range(1, STEPS + 1))
    assert all(len(p["prompt_indices"]) == 2 for p in straight[1])

    if staleness == 0:  # two runs of one config are identical
        again = _outcome(grpo.run(_config(tiny_model, data, tmp_path, "again", staleness)))
        assert again[:2] == straight[:2]
        _same_weights(again[2], straight[2])

    stopped_dir = grpo.run(_config(tiny_model, data, tmp_path, "resumed", staleness), progress=_ctrl_c_after(STOP_AT))
    assert not (stopped_dir / "final").exists()
    assert json.loads((stopped_dir / "checkpoints" / "latest").read_text())["step"] == STOP_AT
    # A crash while writing leaves these; resume must not pick them.
    (stopped_dir / "checkpoints" / f".step-{STOP_AT + 1}.tmp-deadbeef" / "learner").mkdir(parents=True)
    (stopped_dir / "checkpoints" / f"step-{STOP_AT + 5}" / "learner").mkdir(parents=True)
    with (stopped_dir / "metrics.jsonl").open("a") as f:  # a step recorded after the checkpoint, then a crash
        f.write(json.dumps({"step": STOP_AT + 1, "reward_mean": -1.0}) + "\n")

    resumed = _outcome(grpo.run(_config(tiny_model, data, tmp_path, "resumed", staleness, resume=True)))
    assert resumed[1] == straight[1]  # the same prompts per step
    assert resumed[0] == straight[0]  # the same metrics, so the same completions and rewards
    _same_weights(resumed[2], straight[2])
