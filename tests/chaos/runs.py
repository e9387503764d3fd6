"""The run the chaos tier compares against: a short GRPO run of the demo config (with a
reference, so every role is present), and what to compare of its outcome."""

from __future__ import annotations

import json
from pathlib import Path

STEPS = 4
PROMPTS_PER_STEP = 2
TIMING = ("_s", "per_s", "seconds")


def config(tiny_model, data, store, name: str, staleness: int = 0, resume: bool = False, extra=()):
    from orchestrator.config import load_config
    from tests.conftest import ROOT

    return load_config(ROOT / "configs/demo/grpo.yaml", [
        f"model.path={tiny_model}", f"data.train_path={data}", f"run.storage={store}", f"run.name={name}",
        f"run.resume={str(resume).lower()}", f"grpo.steps={STEPS}", f"grpo.max_staleness_steps={staleness}",
        f"grpo.prompts_per_step={PROMPTS_PER_STEP}", "grpo.samples_per_prompt=4", "cluster.learner_workers=1",
        "loss.kl_coef=0.01", "learner.micro_batch_groups=1", "rollout.max_new_tokens=8",
        "logging.wandb_mode=disabled", *extra,
    ])


def timeless(rows: list[dict]) -> list[dict]:
    """Metrics rows without timings and restart counts (which differ by design)."""
    return [{k: v for k, v in r.items() if not k.endswith(TIMING) and not k.startswith("restarts/")} for r in rows]


def outcome(run_dir: Path) -> tuple[list[dict], list[dict], dict]:
    """(metrics rows without timings, prompts per step, final weights)."""
    from safetensors.torch import load_file

    from orchestrator.metrics import read_metrics

    prompts = [json.loads(x) for x in (run_dir / "prompts.jsonl").read_text().splitlines()]
    return timeless(read_metrics(run_dir)), prompts, load_file(run_dir / "final" / "model.safetensors")


def same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name].float() - b[name].float()).abs().max().item() <= atol, name


def close_rows(a: list[dict], b: list[dict], rel: float = 1e-5) -> None:
    """Rows equal key by key; floats to ``rel`` (a regenerated group is sampled by a freshly
    built engine, whose CPU kernels may round the last bits differently)."""
    import math

    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b, strict=True):
        for k, va in ra.items():
            vb = rb[k]
            if isinstance(va, float) and isinstance(vb, float):
                assert math.isclose(va, vb, rel_tol=rel, abs_tol=1e-9), (ra["step"], k, va, vb)
            else:
                assert va == vb, (ra["step"], k, va, vb)
