"""A cut-down ``r1lab demo`` (fewer RL steps, fewer evaluation samples): every stage of the
recipe runs for real, RL moves in the right direction, and a rerun skips what is done."""

from __future__ import annotations

import json
import shutil

import pytest

pytestmark = pytest.mark.e2e

CHECKPOINTS = ["base (tiny, pretrained)", "R1-Zero", "R1 cold start (SFT)", "R1 reasoning RL",
               "R1 SFT on rejection samples", "R1 (RL, all scenarios)", "student base",
               "student distilled from R1", "student on answers only"]


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.fixture()
def own_ray():
    """The demo starts an embedded Ray cluster in this process (unless one is up already);
    stop it afterwards so later tests do not compete with its idle workers."""
    import ray

    started_here = not ray.is_initialized()
    yield
    if started_here:
        ray.shutdown()


@pytest.mark.timeout(1800)  # a whole recipe, nine evaluations and a rerun: past the 900 s default on a loaded 2-core machine
def test_cut_down_demo_learns_and_resumes(tiny_base_model, tmp_path, own_ray):
    from orchestrator.tools.demo import run_demo
    from orchestrator.metrics import read_metrics

    out = tmp_path / "runs"
    # The session's base model is the demo's (same builder, same seed): reuse it.
    shutil.copytree(tiny_base_model, out / "models" / "tiny-addition")
    said: list[str] = []
    settings = dict(rl_steps=24, eval_prompts=16, k=4, pretrain_steps=200, sample_prompts=256, progress=said.append)
    demo_dir = run_demo(out, **settings)

    results = json.loads((demo_dir / "results.json").read_text())
    rows = {r["name"]: r for r in results["checkpoints"]}
    assert list(rows) == CHECKPOINTS
    for r in rows.values():
        assert r["k"] == 4 and r["params"] > 0
        for key in ("pass@1", "cons@k", "general_helpful", "general_harmless"):
            assert 0.0 <= r[key] <= 1.0, (r["name"], key, r[key])
    for png in ("accuracy_per_step.png", "response_length_per_step.png"):
        assert (demo_dir / png).stat().st_size > 1000

    # Direction: each reasoning RL stage's training accuracy rises (first vs last 4 steps),
    # and RL for all scenarios raises the harmlessness reward model's score.
    for run in (demo_dir / "r1zero", demo_dir / "r1" / "reasoning_rl"):
        acc = [m["accuracy"] for m in read_metrics(run)]
        assert len(acc) == 24
        assert _mean(acc[-4:]) > _mean(acc[:4]), (run.name, acc)
    # (null on a step that drew no general prompt)
    harmless = [m["reward/harmlessness"] for m in read_metrics(demo_dir / "r1" / "rl_all")
                if m["reward/harmlessness"] is not None and m["reward/harmlessness"] == m["reward/harmlessness"]]
    assert len(harmless) >= 8 and _mean(harmless[-4:]) > _mean(harmless[:4]), harmless

    # A rerun trains nothing and evaluates nothing again.
    weights = sorted(demo_dir.rglob("final/model.safetensors"))
    # R1-Zero, four pipeline steps (the two sampling steps write data) and two students.
    assert len(weights) == 7
    before = {p: p.stat().st_mtime_ns for p in weights}
    said.clear()
    run_demo(out, **settings)
    assert {p: p.stat().st_mtime_ns for p in weights} == before
    assert sum("done before, skipped" in s for s in said) == 6, said  # every pipeline step
    assert sum("done before, reused" in s for s in said) == len(CHECKPOINTS), said
    assert json.loads((demo_dir / "results.json").read_text())["checkpoints"] == results["checkpoints"]
