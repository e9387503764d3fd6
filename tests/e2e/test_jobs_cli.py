"""Operate a stage as a Ray job: start, status, dashboard metric, graceful stop, resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _cli(*args: str, env: dict, timeout: float = 600) -> str:
    proc = subprocess.run([str(BIN / "r1lab"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"r1lab {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _wait(predicate, timeout: float, what: str, interval: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


DASHBOARD_PORT, METRICS_PORT, GCS_PORT = 8277, 8099, 6391  # worker ports are 10002-19999
# The job agent's ports too: on the defaults it cannot start beside another Ray cluster on
# this machine (an embedded one of an earlier test), and every submission then fails with
# "No available agent to submit job".
AGENT_HTTP_PORT, AGENT_GRPC_PORT, RUNTIME_ENV_AGENT_PORT = 52391, 52392, 52393


@pytest.fixture()
def head(tmp_path):
    """A Ray head of this test's own (its own ports, temp dir and process group), so that
    tearing it down touches no other Ray cluster on the machine."""
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray's socket paths must stay under 108 bytes: a short temp dir of its own.
    short = tempfile.mkdtemp(prefix="r1j-", dir="/tmp")
    base.update(RAY_AUTH_MODE="disabled", TMPDIR=short, COLUMNS="200")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--port", str(GCS_PORT), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(DASHBOARD_PORT), "--metrics-export-port", str(METRICS_PORT), "--num-cpus", "4",
         "--dashboard-agent-listen-port", str(AGENT_HTTP_PORT), "--dashboard-agent-grpc-port", str(AGENT_GRPC_PORT),
         "--runtime-env-agent-port", str(RUNTIME_ENV_AGENT_PORT),
         "--temp-dir", short, "--disable-usage-stats"],
        env=base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {**base, "RAY_ADDRESS": f"http://127.0.0.1:{DASHBOARD_PORT}"}

    def up():
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{DASHBOARD_PORT}/api/version", timeout=2)
            return True
        except OSError:
            return proc.poll() is not None  # exited: fail below instead of waiting
    _wait(up, 120, "the Ray head's dashboard", interval=1.0)
    assert proc.poll() is None, "ray start --head exited early"
    yield env
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=30)
            break
        except subprocess.TimeoutExpired:
            continue
    shutil.rmtree(short, ignore_errors=True)


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _metric(name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)]
    return max(values, default=0.0)


def test_start_status_metrics_stop_resume(head, tiny_model, tmp_path):
    env = head
    data = tmp_path / "data"
    _cli("data", "make", "addition", "--out", str(data), env=env)
    run = "jobs-e2e"
    out = tmp_path / "runs"
    run_dir = out / run
    _cli("start", "grpo", "-c", "configs/demo/grpo.yaml", f"model.path={tiny_model}",
         f"data.train_path={data / 'train.jsonl'}", f"run.storage={out}",
         f"run.name={run}", "grpo.steps=400", "grpo.prompts_per_step=2", "grpo.samples_per_prompt=4",
         "cluster.learner_workers=1", "loss.kl_coef=0", "learner.micro_batch_groups=1",
         "rollout.max_new_tokens=16", "logging.wandb_mode=disabled", env=env)

    def running_with_steps():
        table = _cli("status", env=env)
        line = next((ln for ln in table.splitlines() if run in ln), "")
        return "RUNNING" in line and re.search(r"\b([3-9]|\d\d+)/400\b", line)

    _wait(running_with_steps, 240, "the run to be RUNNING with steps in `r1lab status`")
    assert _wait(lambda: _metric("ray_r1lab_rollout_tokens_per_second") > 0, 90,
                 "ray_r1lab_rollout_tokens_per_second > 0 on the metrics endpoint")

    stopped = _cli("stop", run, env=env)
    assert "STOPPED" in stopped
    state = json.loads((run_dir / "checkpoints" / "trainer_state.json").read_text())
    stopped_at = state["step"]
    assert (run_dir / "checkpoints" / f"step-{stopped_at}").is_dir()
    assert _steps(run_dir)[-1] == stopped_at

    _cli("resume", run, env=env)
    _wait(lambda: len(_steps(run_dir)) >= stopped_at + 2, 240, "the resumed run to log two more steps")
    steps = _steps(run_dir)
    assert steps[: stopped_at + 2] == list(range(1, stopped_at + 3))  # continues at stopped_at + 1
    assert "STOPPED" in _cli("stop", run, env=env)
