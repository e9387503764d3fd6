"""A short real GRPO run through the CLI: it learns, the weight push stays exact, and the
final checkpoint loads in transformers and vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
KEYS = ("step", "policy_version", "reward_mean", "accuracy", "format_ok", "response_tokens_mean", "kl",
        "clip_frac", "logprob_gap", "staleness_mean", "rollout_tokens_per_s", "learner_tokens_per_s",
        "weight_push_s", "step_s")


@pytest.fixture(scope="module")
def grpo_run(tiny_base_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    data = out / "data"
    r1lab = [sys.executable, "-m", "orchestrator.cli"]
    subprocess.run([*r1lab, "data", "make", "addition", "--out", str(data)], check=True, cwd=ROOT)
    env = {**os.environ, "TMPDIR": str(out)}
    # Cut-down demo: 30 steps, one learner rank, KL on (reference actor in the loop).
    proc = subprocess.run(
        [*r1lab, "run", "grpo", "-c", "configs/demo/grpo.yaml", f"model.path={tiny_base_model}",
         f"data.train_path={data / 'train.jsonl'}", f"run.storage={out}", "run.name=e2e",
         "grpo.steps=30", "cluster.learner_workers=1", "logging.wandb_mode=disabled"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "e2e"


@pytest.fixture(scope="module")
def async_run(tiny_base_model, tmp_path_factory) -> Path:
    """The same cut-down run, asynchronous: two steps ahead, partial rollout, TIS."""
    out = tmp_path_factory.mktemp("asy")  # short: Ray's socket paths under TMPDIR must stay within 107 bytes
    data = out / "data"
    r1lab = [sys.executable, "-m", "orchestrator.cli"]
    subprocess.run([*r1lab, "data", "make", "addition", "--out", str(data)], check=True, cwd=ROOT)
    proc = subprocess.run(
        [*r1lab, "run", "grpo", "-c", "configs/demo/grpo_async.yaml", f"model.path={tiny_base_model}",
         f"data.train_path={data / 'train.jsonl'}", f"run.storage={out}", "run.name=e2e-async",
         "grpo.steps=30", "cluster.learner_workers=1", "logging.wandb_mode=disabled"],
        cwd=ROOT, env={**os.environ, "TMPDIR": str(out)}, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "e2e-async"


def test_async_run_with_partial_rollout_learns(async_run):
    rows = _metrics(async_run)
    assert [r["step"] for r in rows] == list(range(1, 31))
    # Admission at launch bounds every token's age. Whether pushes land mid-sample here
    # depends on whether generation or training is the slower side on the machine (when
    # training is, each launch is done before the next push and every token is exactly at
    # the bound); tests/ray/test_partial_rollout.py makes a push land mid-sample for sure.
    assert all(r["staleness_max"] <= 2 for r in rows)
    lags = {k for r in rows for k in r if k.startswith("logprob_gap/lag")}
    assert lags <= {"logprob_gap/lag0", "logprob_gap/lag1", "logprob_gap/lag2"}, lags  # per token, within the bound
    assert all(r["logprob_gap/lag0"] < 0.05 for r in rows if "logprob_gap/lag0" in r)
    assert all(0 < r["is_weight_mean"] <= r["is_weight_max"] <= 2.0 for r in rows)  # TIS, capped at 2
    first = sum(r["accuracy"] for r in rows[:5]) / 5
    last = sum(r["accuracy"] for r in rows[-5:]) / 5
    # The 60-step async demo gained 0.35; runs ahead of learning are not reproducible to
    # the digit (the push lands wherever generation is), so this 30-step cut checks direction.
    assert last - first >= 0.1, (first, last)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_config_metrics_and_learns(grpo_run):
    assert (grpo_run / "config.yaml").exists()
    rows = _metrics(grpo_run)
    assert [r["step"] for r in rows] == list(range(1, 31))
    for r in rows:
        assert set(KEYS) <= r.keys()
        assert r["logprob_gap"] < 0.05, r  # a broken weight push shows up here first
        assert r["staleness_mean"] == 0.0
    first = sum(r["accuracy"] for r in rows[:5]) / 5
    last = sum(r["accuracy"] for r in rows[-5:]) / 5
    # The full demo (60 steps) gains ≥ 0.2; this 30-step cut is held to 0.15.
    assert last - first >= 0.15, (first, last)
    assert rows[-1]["policy_version"] == 30


def test_final_checkpoint_loads_in_transformers_and_vllm(grpo_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = grpo_run / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    ids = tok("What is 12+34", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    code = (
        "import os; os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']='0'\n"
        "from vllm import LLM, SamplingParams\n"
        f"llm = LLM(model={str(final)!r}, dtype='float32', max_model_len=256, kv_cache_memory_bytes=64*2**20, enforce_eager=True)\n"
        "out = llm.generate(['What is 12+34'], SamplingParams(max_tokens=8, temperature=0))\n"
        "print('TOKENS', len(out[0].outputs[0].token_ids))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(grpo_run)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TOKENS " in proc.stdout
