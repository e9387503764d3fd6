"""The sample stage end to end on the synthetic addition task: every kept row is correct
per the reward, unique per prompt, within the cap, and the drop counts add up."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

K = 4
PROMPTS = 6


def test_sample_keeps_only_correct_unique_rows_and_counts_the_rest(ray_local, tiny_base_model, tmp_path):
    from orchestrator.config import load_config
    from evaluation.filters import REASONS
    from orchestrator.stages import sample
    from tasks.synthetic import get_task, write_jsonl
    from tasks.templates import render_prompt
    from rewards.basic import exact_answer
    from tests.conftest import ROOT

    rows = get_task("addition").rows("train", test_share=0.1, seed=0)[:PROMPTS + 2]
    data = tmp_path / "train.jsonl"
    write_jsonl(rows, data)
    cfg = load_config(ROOT / "configs/demo/sample.yaml", [
        f"model.path={tiny_base_model}", f"data.train_path={data}", f"run.storage={tmp_path}", "run.name=rs",
        f"sample.samples_per_prompt={K}", f"sample.limit_prompts={PROMPTS}", "sample.max_new_tokens=48",
        "sample.max_per_prompt=1", "sample.temperature=1.0", "logging.progress=false",
    ], model=sample.Config)
    run_dir: Path = sample.run(cfg)

    stats = json.loads((run_dir / "stats.json").read_text())
    kept = [json.loads(line) for line in (run_dir / "sft.jsonl").read_text().splitlines()]
    assert stats["prompts"] == PROMPTS and stats["samples"] == PROMPTS * K
    assert set(stats["dropped"]) == set(REASONS)
    assert stats["kept"] == len(kept)
    assert stats["kept"] + sum(stats["dropped"].values()) == stats["samples"]
    # the tiny model is right on some samples, wrong on others (T = 1)
    assert 0 < stats["kept"] and stats["dropped"]["incorrect"] > 0
    assert stats["dropped"]["incorrect"] == round((1 - stats["accuracy"]) * stats["samples"])

    per_prompt = Counter(r["source_index"] for r in kept)
    assert max(per_prompt.values()) == 1  # max_per_prompt
    assert stats["prompts_with_kept"] == len(per_prompt)
    for r in kept:
        i = r["source_index"]
        assert 0 <= i < PROMPTS
        assert r["prompt"] == render_prompt(rows[i].prompt, "r1zero")
        assert exact_answer(r["response"], rows[i].answer).score == 1.0
