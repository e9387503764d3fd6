"""``r1lab report``: plots and summary from a synthetic metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer

from orchestrator.tools.report import PANELS, command, resolve_run, write_report

pytestmark = pytest.mark.unit
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_run(runs: Path, name: str = "exp", steps: int = 12) -> Path:
    run = runs / name
    run.mkdir(parents=True)
    rows = []
    for s in range(1, steps + 1):
        rows.append({
            "step": s, "reward_mean": 0.1 * s, "accuracy": 0.05 * s if s != 7 else 0.95,
            "format_ok": 1.0, "response_tokens_mean": 100.0 + 10 * s, "kl": 0.001 * s,
            "rollout_tokens_per_s": 1000.0, "learner_tokens_per_s": 500.0 + s,
            "weight_push_s": 0.5 if s < steps else 2.5, "step_s": 2.0,
            "logprob_gap": None if s == 1 else 1e-6,
        })
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_report_writes_pngs_and_summary(tmp_path: Path) -> None:
    run = synthetic_run(tmp_path)
    out = write_report(run)
    for name in [p.name for p in PANELS] + ["overview"]:
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    md = (out / "report.md").read_text()
    # reward_mean: steps 1-5 -> 0.1..0.5, mean 0.3; steps 8-12 -> 0.8..1.2, mean 1.0
    assert "| reward_mean | 0.3 | 1 |" in md
    # response length: 110..150 mean 130; 180..220 mean 200
    assert "| response_tokens_mean | 130 | 200 |" in md
    # accuracy: first 5 -> 0.05..0.25 mean 0.15; best 0.95 at step 7
    assert "| accuracy | 0.15 |" in md
    assert "best accuracy: 0.95 at step 7" in md
    # 12 steps x 2 s; weight push 11 x 0.5 + 2.5 = 8, mean 0.6667, max 2.5
    assert "wall time 24.0 s" in md
    assert "weight push seconds: mean 0.6667, max 2.5, total 8" in md


def test_run_by_name_or_path(tmp_path: Path) -> None:
    run = synthetic_run(tmp_path / "runs")
    assert resolve_run("exp", tmp_path / "runs") == run
    assert resolve_run(str(run), tmp_path / "elsewhere") == run
    command("exp", tmp_path / "runs")
    assert (run / "report" / "report.md").is_file()


def test_missing_run_or_metrics_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no run 'nope'"):
        resolve_run("nope", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        resolve_run("empty", tmp_path)
    with pytest.raises(typer.Exit) as err:
        command("nope", tmp_path)
    assert err.value.exit_code == 2
