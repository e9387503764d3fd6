"""Stages as Ray jobs: start, list, follow, stop gracefully and resume, over the Ray Jobs
API — the same API ``ray job submit`` uses, against a local head or a KubeRay cluster.

Each job carries metadata ``r1lab_run`` (the run name) and ``r1lab_stage``. Progress is
read from the job's own log, where ``r1lab run`` prints one ``[r1lab] STAGE i/n …`` line per
step when its output is not a terminal.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LOCAL = "http://127.0.0.1:8265"
PROGRESS = re.compile(r"\[r1lab\] (\w+) (\d+)/(\d+) ?(.*)")


def address() -> str | None:
    addr = os.environ.get("RAY_ADDRESS")
    if addr and not addr.startswith(("http://", "https://")):
        # RAY_ADDRESS may name the GCS (host:6379) for drivers; the Jobs API is on 8265.
        host = addr.split("://")[-1].split(":")[0]
        addr = f"http://{host}:8265"
    return addr


def is_local(addr: str) -> bool:
    """Whether the Jobs API address is on this machine (then jobs run here, in this venv)."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(addr).hostname or ""
    names = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
    try:
        names.add(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    return host in names


def client(addr: str):
    from ray.job_submission import JobSubmissionClient

    headers = {}
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:  # Ray's token authentication (on by default in Ray 2.60)
        headers["Authorization"] = f"Bearer {token}"
    return JobSubmissionClient(addr, headers=headers or None)


def ensure_local_head(num_cpus: int | None = None) -> str:
    """The Jobs API address: RAY_ADDRESS, a running local head, or a new local head."""
    addr = address()
    if addr:
        return addr
    try:
        client(DEFAULT_LOCAL).list_jobs()
        return DEFAULT_LOCAL
    except Exception:  # noqa: BLE001 - no head yet: start one
        pass
    from orchestrator import placement

    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--dashboard-host", "127.0.0.1",
           "--num-cpus", str(placement.local_cpus(num_cpus))]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    for _ in range(60):
        try:
            client(DEFAULT_LOCAL).list_jobs()
            return DEFAULT_LOCAL
        except Exception:  # noqa: BLE001
            time.sleep(1)
    raise RuntimeError("started a local Ray head but its dashboard (Jobs API) did not answer on 8265")


def submit_job(c, *, retry_s: float = 300.0, **kwargs) -> str:
    """``JobSubmissionClient.submit_job``, retried while a freshly started head has no job
    agent yet ("No available agent to submit job")."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return c.submit_job(**kwargs)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


@dataclass(frozen=True)
class RunInfo:
    run: str
    stage: str
    job_id: str
    status: str
    step: int | None
    total: int | None
    info: str
    entrypoint: str


def _r1lab() -> str:
    exe = Path(sys.executable).with_name("r1lab")
    return str(exe) if exe.exists() else "r1lab"


def submit(addr: str, stage: str, config: Path, overrides: list[str], run: str, *,
           working_dir: bool, extra_env: dict[str, str] | None = None) -> str:
    """Submit ``r1lab run STAGE -c CONFIG`` as a job; returns the job id."""
    c = client(addr)
    args = [stage, "-c", str(config), *overrides]
    if not any(o.startswith("run.name=") for o in overrides):
        args.append(f"run.name={run}")
    if working_dir:
        # The cluster gets this directory (code and configs), not the local venv or runs.
        entry = "r1lab run " + shlex.join(args)
        runtime_env = {"working_dir": ".", "excludes": [".venv", "runs", ".git", "wandb"]}
    else:
        # A head on this machine: run where we are, with this venv.
        entry = f"cd {shlex.quote(os.getcwd())} && {shlex.quote(_r1lab())} run " + shlex.join(args)
        runtime_env = {}
    env = {"PYTHONUNBUFFERED": "1", **(extra_env or {})}
    runtime_env["env_vars"] = env
    job_id = f"r1lab-{run}-{uuid.uuid4().hex[:6]}"
    return submit_job(c, entrypoint=entry, submission_id=job_id, runtime_env=runtime_env,
                      metadata={"r1lab_run": run, "r1lab_stage": stage})


def list_runs(addr: str, *, with_progress: bool = True) -> list[RunInfo]:
    c = client(addr)
    out = []
    for job in sorted(c.list_jobs(), key=lambda j: j.start_time or 0):
        meta = job.metadata or {}
        if "r1lab_run" not in meta:
            continue
        step = total = None
        info = ""
        if with_progress and job.submission_id:
            for line in reversed(c.get_job_logs(job.submission_id).splitlines()):
                m = PROGRESS.search(line)
                if m:
                    step, total, info = int(m.group(2)), int(m.group(3)), m.group(4).strip()
                    break
        out.append(RunInfo(meta["r1lab_run"], meta.get("r1lab_stage", "?"), job.submission_id or job.job_id,
                           str(job.status), step, total, info, job.entrypoint))
    return out


def latest_job(addr: str, run: str, *, running_only: bool = False) -> RunInfo:
    runs = [r for r in list_runs(addr, with_progress=False) if r.run == run]
    if running_only:
        runs = [r for r in runs if r.status in ("RUNNING", "PENDING")]
    if not runs:
        known = sorted({r.run for r in list_runs(addr, with_progress=False)})
        state = "running " if running_only else ""
        raise LookupError(f"no {state}run named {run!r}; runs on this cluster: {', '.join(known) or 'none'}")
    return runs[-1]


def wait_status(addr: str, job_id: str, states: tuple[str, ...], timeout_s: float) -> str:
    c = client(addr)
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(c.get_job_status(job_id))
        if status in states or time.monotonic() > deadline:
            return status
        time.sleep(1.0)


def stop(addr: str, run: str, *, timeout_s: float = 600.0) -> tuple[RunInfo, str]:
    """Graceful stop: the stage checkpoints at its next step boundary, then the job is
    stopped. Returns the job and its final status."""
    job = latest_job(addr, run, running_only=True)
    c = client(addr)
    helper = submit_job(
        c,
        entrypoint=f"{shlex.quote(sys.executable)} -m orchestrator.control stop {shlex.quote(run)}"
        if job.entrypoint.startswith("cd ") else f"python -m orchestrator.control stop {shlex.quote(run)}",
        submission_id=f"r1lab-stop-{run}-{uuid.uuid4().hex[:6]}",
        runtime_env={} if job.entrypoint.startswith("cd ") else {"working_dir": ".", "excludes": [".venv", "runs", ".git"]},
        metadata={"r1lab_control": run},
    )
    done = wait_status(addr, helper, ("SUCCEEDED", "FAILED", "STOPPED"), timeout_s)
    if done != "SUCCEEDED":
        raise RuntimeError(f"the stop request for {run!r} ended {done}: {c.get_job_logs(helper)[-2000:]}")
    c.stop_job(job.job_id)
    final = wait_status(addr, job.job_id, ("STOPPED", "SUCCEEDED", "FAILED"), 120)
    return job, final


def resume(addr: str, run: str) -> str:
    """Submit the run's last job again with ``run.resume=true``; returns the new job id."""
    job = latest_job(addr, run)
    if job.status in ("RUNNING", "PENDING"):
        raise RuntimeError(f"run {run!r} is still {job.status}; stop it first with `r1lab stop {run}`")
    entry = job.entrypoint
    if "run.resume=true" not in entry:
        entry += " run.resume=true"
    c = client(addr)
    details = c.get_job_info(job.job_id)
    return submit_job(c, entrypoint=entry, submission_id=f"r1lab-{run}-{uuid.uuid4().hex[:6]}",
                      runtime_env=details.runtime_env or {},
                      metadata={"r1lab_run": run, "r1lab_stage": job.stage, "r1lab_resumed_from": job.job_id})
