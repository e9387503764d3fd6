"""Bad input and interruptions that need a cluster: a plan the cluster cannot hold, bad rows
skipped and counted, an earlier run moved aside (never deleted), a full disk when final/ is
written, and Ctrl-C through the command line. Each checks what is on disk afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import ROOT

GOOD = [{"prompt": f"What is {a}+{a + 1}", "answer": str(2 * a + 1)} for a in range(10, 30)]


def _config(tiny_model, tmp_path: Path, name: str, *extra: str, data: Path | None = None):
    from orchestrator.config import load_config

    if data is None:
        data = tmp_path / "good.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    return load_config(ROOT / "configs/demo/grpo.yaml", [
        f"model.path={tiny_model}", f"data.train_path={data}", f"run.storage={tmp_path / 'runs'}", f"run.name={name}",
        "grpo.steps=2", "grpo.prompts_per_step=2", "grpo.samples_per_prompt=2", "cluster.learner_workers=1",
        "loss.kl_coef=0", "learner.micro_batch_groups=1", "rollout.max_new_tokens=8", "rollout.max_model_len=160",
        "logging.wandb_mode=disabled", *extra])


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_plan_the_cluster_cannot_hold_is_refused_before_any_actor(ray_local, tiny_model, tmp_path):
    from orchestrator.preflight import PreflightError
    from orchestrator.stages import grpo

    cfg = _config(tiny_model, tmp_path, "big", "cluster.learner_workers=16", "grpo.prompts_per_step=16")
    t0 = time.monotonic()
    with pytest.raises(PreflightError, match=r"(?s)this cluster cannot hold the plan: it needs [\d.]+ CPU \(learner 8, "
                                             r"rollout 0.5, reward 0.5\) but the cluster's 1 node has 4.*"
                                             r"Lower cluster.learner_workers") as err:
        grpo.run(cfg)
    seconds = time.monotonic() - t0
    assert seconds < 15, seconds
    assert not (tmp_path / "runs").exists()
    print(f"| a plan the cluster cannot hold | 2 | {seconds:.1f} s | {str(err.value)[:160]} |")


def test_overwrite_moves_the_earlier_run_aside_and_bad_rows_are_skipped_and_counted(ray_local, tiny_model, tmp_path):
    from orchestrator import preflight
    from orchestrator.stages import grpo

    earlier = tmp_path / "runs" / "again"
    (earlier / "final").mkdir(parents=True)
    (earlier / "config.yaml").write_text("run: {name: again}\n")
    (earlier / "final" / "model.safetensors").write_bytes(b"the earlier run's weights")
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GOOD) + "[1, 2]\n"
                    + json.dumps({"prompt": "1 + " * 60 + "1", "answer": "61"}) + "\n")
    cfg = _config(tiny_model, tmp_path, "again", "run.overwrite=true", "data.skip_bad_rows=true", data=data)
    run_dir = grpo.run(cfg)

    aside = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("again" + preflight.REPLACED)]
    assert len(aside) == 1, list((tmp_path / "runs").iterdir())
    assert (aside[0] / "final" / "model.safetensors").read_bytes() == b"the earlier run's weights"
    assert _steps(run_dir) == [1, 2]
    assert (run_dir / "final" / "model.safetensors").stat().st_size > 1000
    report = json.loads((run_dir / preflight.DATA_REPORT).read_text())
    assert report["rows"] == 22 and report["skipped"] == 2
    assert "mixed.jsonl:21: a row must be a JSON object" in report["first_skipped"][0]
    assert "mixed.jsonl:22: the prompt is" in report["first_skipped"][1]
    prompts = [json.loads(x) for x in (run_dir / "prompts.jsonl").read_text().splitlines()]
    assert all(i < 20 for p in prompts for i in p["prompt_indices"])


@pytest.fixture()
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to fill ({mounted.stderr.decode().strip()})")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_at_the_final_save_keeps_a_checkpoint_and_resume_finishes(ray_local, tiny_model, small_disk):
    import shutil

    from orchestrator.stages import StageError, grpo

    filler = small_disk / "filler"

    def fill_at_the_end(done: int, total: int, _: str) -> None:
        if done == total:  # as another job filling the disk while the last step trained
            filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 64 * 1024))

    cfg = _config(tiny_model, small_disk, "full", "grpo.checkpoint_every_steps=1")
    with pytest.raises(StageError, match=r"saving final/ failed: .*No space left on device.*run.resume=true") as err:
        grpo.run(cfg, progress=fill_at_the_end)
    print(f"full disk: {err.value}")
    run_dir = small_disk / "runs" / "full"
    assert not (run_dir / "final").exists()
    assert not [p for p in run_dir.iterdir() if p.name.startswith("final.")], list(run_dir.iterdir())
    assert _steps(run_dir) == [1, 2]  # every row complete
    assert (run_dir / "checkpoints" / "step-1" / "trainer_state.json").exists()

    filler.unlink()  # room again: the resume trains what the checkpoint lacks and writes final/
    grpo.run(cfg.model_copy(update={"run": cfg.run.model_copy(update={"resume": True})}))
    assert (run_dir / "final" / "model.safetensors").exists()
    assert _steps(run_dir) == [1, 2]  # no step recorded twice


def test_ctrl_c_stops_with_a_checkpoint_and_the_printed_command_continues(ray_local, tiny_model, tmp_path):
    from orchestrator.cli import app

    cfg_path = tmp_path / "grpo.yaml"
    data = tmp_path / "good.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    cfg_path.write_text((ROOT / "configs/demo/grpo.yaml").read_text())
    overrides = [f"model.path={tiny_model}", f"data.train_path={data}", f"run.storage={tmp_path / 'runs'}",
                 "run.name=ctrl-c", "grpo.steps=40", "grpo.prompts_per_step=2", "grpo.samples_per_prompt=2",
                 "cluster.learner_workers=1", "loss.kl_coef=0", "learner.micro_batch_groups=1",
                 "rollout.max_new_tokens=8", "rollout.max_model_len=160", "logging.wandb_mode=disabled"]
    metrics = tmp_path / "runs" / "ctrl-c" / "metrics.jsonl"

    def press_ctrl_c_after_step_2() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.1)

    threading.Thread(target=press_ctrl_c_after_step_2, daemon=True).start()
    result = CliRunner().invoke(app, ["run", "grpo", "-c", str(cfg_path), *overrides])
    out = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    continue_line = next(x for x in result.output.splitlines() if x.startswith("continue: "))
    assert "stopped; saved: checkpoint" in out and "continue: r1lab run grpo -c" in out, result.output
    stopped_at = len(metrics.read_text().splitlines())
    assert 2 <= stopped_at < 40

    args = continue_line.removeprefix("continue: r1lab run ").split()
    assert args[-1] == "run.resume=true", args
    result = CliRunner().invoke(app, ["run", *args])
    assert result.exit_code == 0, result.output
    assert _steps(metrics.parent) == list(range(1, 41))
    assert (metrics.parent / "final" / "model.safetensors").exists()
