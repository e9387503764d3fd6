"""Stages as Ray jobs: start, list, follow, stop gracefully and resume, over the Ray Jobs
API — the same API ``ray job submit`` uses, against a local head or a KubeRay cluster.

The Jobs API is the cluster's dashboard. Its address comes from ``--address`` or
``RAY_ADDRESS``: a dashboard URL (``http://head:8265``) is used as given; a GCS address
(``head:6379``, ``ray://head:10001``, ``auto``) is asked for the dashboard URL the cluster
itself reports. No port is ever guessed.

Every submission job on the cluster is listed. A job is an r1lab run when it carries
metadata ``r1lab_run`` / ``r1lab_stage`` (``r1lab start``), or when its entrypoint runs
``r1lab run STAGE`` (a plain ``ray job submit``): then its log names the run, since
``r1lab run`` prints ``[r1lab] run-name NAME stage STAGE`` first and one
``[r1lab] STAGE i/n …`` line per step when its output is not a terminal.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

PROGRESS = re.compile(r"\[r1lab\] (\w+) (\d+)/(\d+) ?(.*)")
RUN_HEADER = re.compile(r"\[r1lab\] run-name (\S+) stage (\S+)")
ACTIVE = ("PENDING", "RUNNING")
ENDED = ("SUCCEEDED", "FAILED", "STOPPED")
CONNECT_TIMEOUT_S = 5.0
NAMING_HELP = ("pass --address (the dashboard, http://HEAD:8265, or the GCS, HEAD:6379) or set RAY_ADDRESS "
               "to the same")
TOKEN_HELP = ("set RAY_AUTH_TOKEN to the cluster's token (the content of ~/.ray/auth_token on its head, "
              "or of the Kubernetes secret that holds it) or RAY_AUTH_TOKEN_PATH to a file holding it")


class JobsError(RuntimeError):
    """The Jobs API cannot be reached or asked; the message names the address and the fix."""


def header_line(run: str, stage: str) -> str:
    """The first line ``r1lab run`` prints into a job log: it names the run for ``status``."""
    return f"[r1lab] run-name {run} stage {stage}"


# -- where the Jobs API is -------------------------------------------------------------------


def _token() -> str | None:
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path and Path(path).is_file():
        token = Path(path).read_text().strip()
    return token or None


def client(url: str):
    """A Jobs client of the dashboard at ``url``; raises JobsError naming the fix."""
    from ray.job_submission import JobSubmissionClient

    token = _token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except Exception as err:  # noqa: BLE001 - requests, ConnectionError, RuntimeError: all one answer
        raise JobsError(_why_unreachable(url, err)) from None


def _why_unreachable(url: str, err: Exception) -> str:
    text = str(err).replace(url, "URL")  # a port such as 4011 is no status code
    if "401" in text or "Authentication required" in text:
        return f"the Ray cluster at {url} requires an auth token and none was sent: {TOKEN_HELP}"
    if "403" in text or "Authentication failed" in text:
        return f"the Ray cluster at {url} refused the auth token in RAY_AUTH_TOKEN as invalid: {TOKEN_HELP}"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"no Ray Jobs API answers at {url} ({first}); check the address: {NAMING_HELP}"


def _is_auth_failure(err: Exception) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return "unauthenticated" in text or "authentication" in text or "auth token" in text


def _probe(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def _host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``ray://host:port`` as (host, port); raises JobsError when neither."""
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    try:
        port = parsed.port
    except ValueError:
        port = None
    if not parsed.hostname or port is None:
        raise JobsError(f"cannot read {address!r} as a Ray address: {NAMING_HELP}")
    return parsed.hostname, port


def local_gcs() -> str | None:
    """The GCS address of the Ray head last started on this machine, if it is still up."""
    # Private in Ray (written for 2.60): the file `ray start` writes, which ray.init("auto") reads.
    from ray._private.services import find_bootstrap_address

    found = find_bootstrap_address(None)
    if not found:
        return None
    host, port = _host_port(found)
    return found if _probe(host, port) else None


def _is_dashboard(host: str, port: int) -> bool:
    """Whether ``host:port`` serves Ray's dashboard (a GCS port does not speak HTTP)."""
    import http.client
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{host}:{port}/api/version", timeout=CONNECT_TIMEOUT_S) as r:
            return "ray_version" in json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code in (401, 403)  # a dashboard that wants a token
    except (OSError, ValueError, http.client.HTTPException):
        return False


def init_quietly(**kwargs):
    """``ray.init(**kwargs)`` joining an existing cluster. Ray's C++ client logs every failed
    attempt to stderr (an auth failure: one line a second for 20 s): that is kept out of the
    console, and read for the cause: a refused token raises ConnectionError saying so."""
    import ray

    with tempfile.TemporaryFile() as caught:
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            return ray.init(**kwargs)
        except Exception as err:
            caught.seek(0)
            if b"Unauthenticated" in caught.read():
                raise ConnectionError(f"{err} (the cluster answered: Unauthenticated, auth token missing or "
                                      "wrong)") from None
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _driver_dashboard(address: str) -> str:
    """Connect a driver to ``address`` for a moment and return the dashboard URL the cluster
    reports (``RayContext.dashboard_url``), without a scheme."""
    import logging

    import ray

    context = init_quietly(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        return context.dashboard_url or ""
    finally:
        ray.shutdown()


def dashboard_from_gcs(address: str, *, ask=_driver_dashboard) -> str:
    """The Jobs API URL of the cluster whose GCS (or Ray Client server) is ``address``."""
    if address == "auto":
        found = local_gcs()
        if found is None:
            raise JobsError(f"the address is 'auto' but no Ray head is running on this machine: {NAMING_HELP}")
        address = found
    host, port = _host_port(address)
    if not _probe(host, port):
        raise JobsError(f"nothing answers at the Ray address {address} (no GCS on {host}:{port}): "
                        f"is the cluster up? {NAMING_HELP}")
    if not address.startswith("ray://") and _is_dashboard(host, port):
        return f"http://{host}:{port}"  # a dashboard named without its scheme
    try:
        reported = ask(address)
    except Exception as err:  # noqa: BLE001 - ray.init raises many types; say what matters
        if _is_auth_failure(err):
            raise JobsError(f"the Ray cluster at {address} requires an auth token: {TOKEN_HELP}") from None
        raise JobsError(f"could not connect to the Ray cluster at {address} ({type(err).__name__}: {err}). If it "
                        f"uses token authentication (Ray's default), {TOKEN_HELP}; otherwise {NAMING_HELP}") from None
    if not reported:
        raise JobsError(f"the Ray cluster at {address} runs no dashboard, so no Jobs API: start its head with "
                        "--include-dashboard=true")
    url = reported if "://" in reported else f"http://{reported}"
    # A dashboard bound to all interfaces (or loopback on the head) is reached by the head's name.
    dash = urlparse(url)
    if dash.hostname in ("0.0.0.0", "::") or (_loopback(dash.hostname) and not _loopback(host)):
        url = f"{dash.scheme}://{host}:{dash.port}"
    return url.rstrip("/")


def _loopback(host: str | None) -> bool:
    return host in ("127.0.0.1", "localhost", "::1")


def jobs_url(address: str | None, *, ask=_driver_dashboard) -> str:
    """The Jobs API URL for ``--address`` (else RAY_ADDRESS, else the head running on this
    machine). Raises JobsError when none is named and none runs here."""
    named = address or os.environ.get("RAY_ADDRESS")
    if not named:
        named = local_gcs()
        if named is None:
            raise JobsError(f"no Ray cluster: none is running on this machine and none is named; {NAMING_HELP}, "
                            "or `r1lab start` a stage to start a local head")
    if named.startswith(("http://", "https://")):
        return named.rstrip("/")
    return dashboard_from_gcs(named, ask=ask)


def connect(address: str | None):
    """(Jobs API URL, client) for ``address`` as ``jobs_url`` reads it; the client has answered."""
    url = jobs_url(address)
    return url, client(url)


def is_local(addr: str) -> bool:
    """Whether the Jobs API address is on this machine (then jobs run here, in this venv)."""
    host = urlparse(addr).hostname or ""
    names = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
    try:
        names.add(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    return host in names


def ensure_local_head(address: str | None, num_cpus: int | None = None) -> str:
    """The Jobs API URL: the cluster ``address`` / RAY_ADDRESS names, the head running on this
    machine, or a new local head."""
    if address or os.environ.get("RAY_ADDRESS") or local_gcs():
        return jobs_url(address)
    from orchestrator import placement

    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--dashboard-host", "127.0.0.1",
           "--num-cpus", str(placement.local_cpus(num_cpus))]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    url = jobs_url("auto")
    for _ in range(60):
        try:
            client(url).list_jobs()
            return url
        except Exception:  # noqa: BLE001 - the job agent is still starting
            time.sleep(1)
    raise JobsError(f"started a local Ray head but its dashboard (Jobs API) at {url} did not answer")


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


# -- what runs on the cluster ----------------------------------------------------------------


@dataclass(frozen=True)
class JobInfo:
    """One submission job. ``run`` and ``stage`` are set when it is an r1lab run, ``step``,
    ``total`` and ``info`` when its log shows progress."""

    job_id: str  # the submission id: what `ray job` and `r1lab logs/stop` take
    status: str
    entrypoint: str
    start_time_ms: int | None
    run: str | None = None
    stage: str | None = None
    step: int | None = None
    total: int | None = None
    info: str = ""
    submitted_by_r1lab: bool = False  # carries r1lab_run metadata (`r1lab start` or `resume`)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


_R1LAB_PROGRAMS = ("r1lab", "orchestrator.cli")
_SHELL_BREAKS = ("&&", "||", ";", "|")


def _status_text(status) -> str:
    return str(getattr(status, "value", status))


def r1lab_entrypoint(entrypoint: str) -> tuple[str, str | None] | None:
    """(stage, ``run.name=`` override or None) when the entrypoint runs ``r1lab run STAGE``."""
    try:
        words = shlex.split(entrypoint)
    except ValueError:
        return None
    for i, word in enumerate(words[:-1]):
        if Path(word).name in _R1LAB_PROGRAMS and words[i + 1] == "run":
            args = []
            for arg in words[i + 2:]:
                if arg in _SHELL_BREAKS:
                    break
                args.append(arg)
            return _stage_and_name(args)
    return None


def _stage_and_name(args: list[str]) -> tuple[str, str | None] | None:
    stage, name, skip = None, None, False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("-c", "--config"):
            skip = True
        elif arg.startswith("run.name="):
            name = arg.split("=", 1)[1]
        elif not arg.startswith("-") and "=" not in arg and stage is None:
            stage = arg
    return (stage, name) if stage else None


def read_log(log: str) -> tuple[tuple[str, str] | None, tuple[int, int, str] | None]:
    """The run header (run, stage) and the latest progress (step, total, info) of a job log."""
    header = next((m.groups() for m in map(RUN_HEADER.search, log.splitlines()) if m), None)
    progress = None
    for line in reversed(log.splitlines()):
        m = PROGRESS.search(line)
        if m:
            progress = (int(m.group(2)), int(m.group(3)), m.group(4).strip())
            break
    return header, progress


def describe(details, logs, *, with_progress: bool = True) -> JobInfo | None:
    """A JobInfo of one ``JobDetails``, or None for jobs that are not listed (drivers that
    were not submitted, and ``r1lab stop``'s own helper jobs). ``logs(job_id)`` reads a log."""
    job_id = details.submission_id
    meta = details.metadata or {}
    if not job_id or "r1lab_control" in meta:
        return None
    base = JobInfo(job_id=job_id, status=_status_text(details.status),
                   entrypoint=details.entrypoint or "", start_time_ms=details.start_time)
    parsed = r1lab_entrypoint(base.entrypoint)
    if "r1lab_run" in meta:
        run, stage, ours = meta["r1lab_run"], meta.get("r1lab_stage", "?"), True
    elif parsed is not None:
        (stage, run), ours = parsed, False
    else:
        return base
    header = progress = None
    if with_progress or run is None:
        header, progress = read_log(logs(job_id))
    if header is not None and not ours:
        run, stage = header
    step, total, info = progress or (None, None, "")
    return JobInfo(**{**base.__dict__, "run": run or job_id, "stage": stage, "step": step, "total": total,
                      "info": info, "submitted_by_r1lab": ours})


def list_jobs(c, *, with_progress: bool = True) -> list[JobInfo]:
    """Every submission job on the cluster, oldest first."""
    found = (describe(d, c.get_job_logs, with_progress=with_progress)
             for d in sorted(c.list_jobs(), key=lambda d: d.start_time or 0))
    return [j for j in found if j is not None]


def find_job(c, name: str, *, active_only: bool = False) -> JobInfo:
    """The job with submission id ``name``, else the latest job of the r1lab run ``name``."""
    listed = list_jobs(c, with_progress=False)
    matches = [j for j in listed if j.job_id == name] or [j for j in listed if j.run == name]
    if active_only:
        matches = [j for j in matches if j.active]
    if not matches:
        runs = sorted({j.run for j in listed if j.run})
        others = [j.job_id for j in listed if not j.run]
        state = "running " if active_only else ""
        raise LookupError(f"no {state}run or job named {name!r} on this cluster; runs: {', '.join(runs) or 'none'}; "
                          f"other jobs: {', '.join(others) or 'none'}")
    return matches[-1]


def wait_status(c, job_id: str, states: tuple[str, ...], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        status = _status_text(c.get_job_status(job_id))
        if status in states or time.monotonic() > deadline:
            return status
        time.sleep(1.0)


def _r1lab() -> str:
    exe = Path(sys.executable).with_name("r1lab")
    return str(exe) if exe.exists() else "r1lab"


def submit(c, stage: str, config: Path, overrides: list[str], run: str, *,
           working_dir: bool, extra_env: dict[str, str] | None = None) -> str:
    """Submit ``r1lab run STAGE -c CONFIG`` as a job; returns the job id."""
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


def stop(c, job: JobInfo, *, timeout_s: float = 600.0) -> str:
    """Stop a job; returns its final status. An r1lab run stops gracefully: it checkpoints
    at its next step boundary, then the job is stopped. Any other job is stopped by Ray."""
    if job.run is not None:
        _request_stop(c, job, timeout_s)
    c.stop_job(job.job_id)
    return wait_status(c, job.job_id, ENDED, 120)


def _request_stop(c, job: JobInfo, timeout_s: float) -> None:
    """Ask the run's control actor to stop, through a helper job in the run's own environment."""
    command = f"-m orchestrator.control stop {shlex.quote(job.run)}"
    if job.entrypoint.startswith("cd "):  # `r1lab start` to a head on this machine
        entry, runtime_env = f"{job.entrypoint.split('&&')[0]}&& {shlex.quote(sys.executable)} {command}", {}
    else:
        entry, runtime_env = f"python {command}", c.get_job_info(job.job_id).runtime_env or {}
    helper = submit_job(c, entrypoint=entry, submission_id=f"r1lab-stop-{job.run}-{uuid.uuid4().hex[:6]}",
                        runtime_env=runtime_env, metadata={"r1lab_control": job.run})
    done = wait_status(c, helper, ENDED, timeout_s)
    if done != "SUCCEEDED":
        raise RuntimeError(f"the stop request for run {job.run!r} (job {job.job_id}) ended {done}: "
                           f"{c.get_job_logs(helper)[-2000:]}")


def resume(c, job: JobInfo) -> str:
    """Submit the run's job again with ``run.resume=true``; returns the new job id."""
    if job.run is None:
        raise RuntimeError(f"job {job.job_id} is not an r1lab run (its entrypoint is {job.entrypoint!r}): "
                           "there is no checkpoint to resume from")
    if job.active:
        raise RuntimeError(f"run {job.run!r} is still {job.status}; stop it first with `r1lab stop {job.run}`")
    entry = re.sub(r"\s+run\.(overwrite|resume)=\S+", "", job.entrypoint)
    entry += " run.resume=true run.overwrite=false"  # whatever the config file says
    details = c.get_job_info(job.job_id)
    return submit_job(c, entrypoint=entry, submission_id=f"r1lab-{job.run}-{uuid.uuid4().hex[:6]}",
                      runtime_env=details.runtime_env or {},
                      metadata={"r1lab_run": job.run, "r1lab_stage": job.stage or "?",
                                "r1lab_resumed_from": job.job_id})
