"""Operate jobs on a two-node cluster with the `r1lab` CLI: a plain `ray job submit` and an
`r1lab start` side by side in `status`, logs, the dashboard metric, a graceful stop at a
step boundary, resume to the end, and the Jobs address found from the GCS address."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS = 150  # ~0.3 s each: the stop (~15 s after step 3) lands mid-run; the resumed run still ends soon


def _cli(*args: str, env: dict, ok: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "r1lab"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if ok:
        assert proc.returncode == 0, f"r1lab {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _wait(predicate, timeout: float, what: str, interval: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _metric(ports: list[int], name: str) -> float:
    values = [0.0]
    for port in ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        values += [float(m.group(1)) for m in re.finditer(rf"^{name}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)]
    return max(values)


def _row(table: str, key: str) -> str:
    """The last row naming ``key``: a run's latest job (jobs are listed oldest first)."""
    return next((ln for ln in reversed(table.splitlines()) if f" {key} " in ln), "")


@pytest.fixture
def env(ray_two_nodes):
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    return {**base, "RAY_AUTH_MODE": "disabled", "COLUMNS": "250", "RAY_ADDRESS": ray_two_nodes.dashboard_url}


def test_the_jobs_address_is_the_clusters_own_dashboard(ray_two_nodes, env):
    cluster = ray_two_nodes
    assert not cluster.dashboard_url.endswith(":8265"), "the fixture's dashboard must not sit on Ray's default port"
    no_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    for address in (cluster.gcs_address, f"http://127.0.0.1:{cluster.ports.dashboard}"):
        out = _cli("status", "--address", address, env=no_env).stdout
        assert f"r1lab runs on {cluster.dashboard_url}" in out, out
    out = _cli("status", env={**no_env, "RAY_ADDRESS": cluster.gcs_address}).stdout
    assert f"r1lab runs on {cluster.dashboard_url}" in out, out

    wrong = _cli("status", "--address", "127.0.0.1:1", env=no_env, ok=False)
    assert wrong.returncode != 0 and "nothing answers at the Ray address 127.0.0.1:1" in wrong.stdout, wrong.stdout
    wrong = _cli("logs", "anything", env={**no_env, "RAY_ADDRESS": "http://127.0.0.1:1"}, ok=False)
    assert wrong.returncode != 0 and "no Ray Jobs API answers at http://127.0.0.1:1" in wrong.stdout, wrong.stdout


def test_start_status_logs_metrics_stop_resume(ray_two_nodes, env, tiny_model, tmp_path):
    cluster = ray_two_nodes
    plain = f"plain-{uuid.uuid4().hex[:6]}"
    subprocess.run([str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url, "--submission-id", plain,
                    "--no-wait", "--", "python", "-c", "import time; print(1234 * 1000, flush=True); time.sleep(600)"],
                   env=env, check=True, capture_output=True, timeout=120)

    data = tmp_path / "data"
    _cli("data", "make", "addition", "--out", str(data), env=env)
    run = "jobs-cluster"
    out = tmp_path / "runs"
    run_dir = out / run
    _cli("start", "grpo", "-c", "configs/demo/grpo.yaml", f"model.path={tiny_model}",
         f"data.train_path={data / 'train.jsonl'}", f"run.storage={out}",
         f"run.name={run}", f"grpo.steps={STEPS}", "grpo.prompts_per_step=2", "grpo.samples_per_prompt=4",
         "cluster.learner_workers=1", "loss.kl_coef=0", "learner.micro_batch_groups=1",
         "rollout.max_new_tokens=16", "logging.wandb_mode=disabled", "--address", cluster.gcs_address, env=env)

    def running_with_steps():
        table = _cli("status", env=env).stdout
        line = _row(table, run)
        return "RUNNING" in line and re.search(rf"\b([3-9]|\d\d+)/{STEPS}\b", line) and table

    table = _wait(running_with_steps, 240, "the run to be RUNNING with steps in `r1lab status`")
    stopped = _cli("stop", run, env=env).stdout
    assert "STOPPED" in stopped, stopped
    assert re.search(rf"│ {plain} +│ RUNNING +│ python -c 'import time; print\(1234 \* 1000, flush=True\); tim… +│ 20",
                     table), table
    assert "r1lab-stop-" not in _cli("status", env=env).stdout

    latest = json.loads((run_dir / "checkpoints" / "latest").read_text())
    state = json.loads((run_dir / "checkpoints" / latest["dir"] / "trainer_state.json").read_text())
    stopped_at = state["step"]
    assert stopped_at < STEPS, f"the run finished ({stopped_at} steps) before the stop reached it"
    assert (run_dir / "checkpoints" / f"step-{stopped_at}").is_dir()
    assert _steps(run_dir)[-1] == stopped_at
    log = _cli("logs", run, env=env).stdout
    assert re.search(rf"\[r1lab\] grpo {stopped_at}/{STEPS} reward", log), log[-2000:]
    assert f"[r1lab] run-name {run} stage grpo" in log

    assert "1234000" in _cli("logs", plain, env=env).stdout
    assert f"job {plain}: STOPPED" in _cli("stop", plain, env=env).stdout

    _cli("resume", run, env=env)
    metric_ports = [ports["metrics"] for ports in cluster.ports.per_node.values()]
    assert _wait(lambda: _metric(metric_ports, "ray_r1lab_rollout_tokens_per_second") > 0, 120,
                 "ray_r1lab_rollout_tokens_per_second > 0 on a node's metrics endpoint")
    def resumed_state():
        line = _row(_cli("status", env=env).stdout, run)
        assert "FAILED" not in line, f"the resumed run failed:\n{_cli('logs', run, env=env).stdout[-3000:]}"
        return "SUCCEEDED" in line and line

    assert f" {STEPS}/{STEPS} " in _wait(resumed_state, 300, "the resumed run to succeed")
    assert _steps(run_dir) == list(range(1, STEPS + 1))  # continued at stopped_at + 1, to the end
    for name in ("config.yaml", "final/model.safetensors", "final/config.json", "final/tokenizer.json",
                 f"checkpoints/step-{stopped_at}"):
        assert (run_dir / name).exists(), f"{name} is missing from {run_dir}"
    for node in cluster.nodes.values():
        strays = [p for p in node.work_dir.rglob("*") if run in str(p)]
        assert not strays, f"the run wrote into node {node.name}'s working directory: {strays[:5]}"


def test_a_plain_ray_job_submit_of_r1lab_run_is_listed_as_a_run(ray_two_nodes, env, tmp_path):
    """Named in its config only (no run.name= in the entrypoint): the job log's header names
    it. The run fails at once on a missing model, which is all this needs and costs seconds."""
    run = f"plain-r1lab-{uuid.uuid4().hex[:6]}"
    config = tmp_path / "plain.yaml"
    config.write_text((ROOT / "configs/demo/grpo.yaml").read_text().replace("name: demo-grpo", f"name: {run}"))
    job = f"raysubmit-{run}"
    subprocess.run([str(BIN / "ray"), "job", "submit", "--address", ray_two_nodes.dashboard_url, "--submission-id", job,
                    "--no-wait", "--", str(BIN / "r1lab"), "run", "grpo", "-c", str(config), "model.path=/nonexistent"],
                   env=env, check=True, capture_output=True, timeout=120)

    def ended():
        line = _row(_cli("status", env=env).stdout, run)
        return ("FAILED" in line or "SUCCEEDED" in line) and line

    line = _wait(ended, 120, f"the plain job {job} to end")
    assert re.search(rf"│ {run} +│ grpo +│ FAILED +│ - +│ +│ {job} +│ 20", line), line
    assert "model.path /nonexistent does not exist" in _cli("logs", run, env=env).stdout
    assert f"[r1lab] run-name {run} stage grpo" in _cli("logs", job, env=env).stdout
