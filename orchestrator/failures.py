"""A stage's failure as at most three lines: what failed (role, actor, node, cause), what
was saved, and the command that continues. The traceback goes to the run's log file."""

from __future__ import annotations

import errno
import shlex
import tempfile
import time
import traceback
from pathlib import Path

LOG = "driver.log"  # in the run directory: the tracebacks of failed attempts


def what_failed(err: BaseException) -> str:
    """One sentence (or two lines at most) naming what failed and why."""
    import ray

    from orchestrator.config import ConfigError
    from orchestrator.jobs import TOKEN_HELP, _is_auth_failure
    from orchestrator.placement import PlacementError
    from orchestrator.stages import StageError
    from orchestrator.supervise import ActorGone, LearnerLost, first_line

    if isinstance(err, KeyboardInterrupt):
        return "interrupted at once (Ctrl-C twice, or before step 1): the step under way was not saved"
    if isinstance(err, (StageError, ConfigError, ActorGone, LearnerLost, PlacementError)):
        return str(err)
    from_ray = isinstance(err, ConnectionError) or type(err).__module__.startswith("ray")
    if from_ray and _is_auth_failure(err):
        return f"the Ray cluster refused this driver: it requires an auth token; {TOKEN_HELP}"
    if isinstance(err, ray.exceptions.RayTaskError):
        cause = err.cause if isinstance(err.cause, BaseException) else err
        return (f"{err.function_name} failed (pid {err.pid} on node {err.ip}): {type(cause).__name__}: "
                f"{first_line(cause)}")
    if isinstance(err, ray.exceptions.RayActorError):
        return f"an actor died: {_actor(err)}{first_line(err)}"
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        where = f" writing {err.filename}" if err.filename else ""
        return f"no space left on the device{where}: free space there, or choose another run.storage"
    if isinstance(err, ConnectionError) and "ray" in str(err).lower():
        return f"could not reach the Ray cluster ({first_line(err)}); check cluster.address or RAY_ADDRESS"
    return f"{type(err).__name__}: {first_line(err)}"


def _actor(err) -> str:
    """``name (pid P on node N): `` of the actor a RayActorError is about, when Ray knows."""
    actor_id = getattr(err, "actor_id", None)
    if not actor_id:
        return ""
    try:
        from orchestrator.supervise import whereabouts

        return f"{whereabouts(actor_id)}: "
    except Exception:  # noqa: BLE001 - Ray may be gone; the cause alone still says enough
        return ""


def written_since(run, since: float) -> bool:
    """Whether ``run`` (a ``RunStorage``) wrote its config.yaml at or after ``since`` (a
    ``time.time()``): a run this invocation started or resumed, not an earlier one."""
    from orchestrator import storage

    filesystem, path = storage.filesystem(run.location("config.yaml"))
    info = filesystem.get_file_info(path)
    return info.mtime is not None and info.mtime.timestamp() >= since


def saved_and_next(stage: str, config: Path, overrides: list[str], cfg,
                   since: float = 0.0) -> tuple[str, str] | None:
    """What the run left in storage and the command that continues it; None when the run
    directory holds no run this invocation wrote after ``since`` (the failure came before)."""
    from orchestrator import checkpoints, preflight, storage

    run_cfg = getattr(cfg, "run", None)
    if run_cfg is None:
        return None
    run = storage.RunStorage.of(run_cfg.storage, run_cfg.name)
    if not run.exists("config.yaml") or not written_since(run, since):
        return None
    kept = [o for o in overrides if not o.startswith(("run.resume=", "run.overwrite="))]
    base = shlex.join(["r1lab", "run", stage, "-c", str(config), *kept])
    resume = "run.resume=true" + (" run.overwrite=false" if run_cfg.overwrite else "")
    afresh = "run.overwrite=true" + (" run.resume=false" if run_cfg.resume else "")
    if stage in ("pipeline", "distill"):  # a recipe resumes at its first unfinished step
        done = sorted(p.parent.name for p in run.local.glob("*/DONE.json")) if not run.is_uri else []
        return (f"saved: the finished steps ({', '.join(done) or 'none yet'}) in {run.root}",
                f"continue: {base} {resume}")
    latest = checkpoints.CheckpointDir(run).latest() if stage == "grpo" else None
    if latest is not None:
        return (f"saved: checkpoint {run.location(latest.path)} (step {latest.step})",
                f"continue: {base} {resume}")
    rows = len((run.read_text("metrics.jsonl") or "").splitlines())
    kept = [*(["final/"] if run.exists("final") else []), *([f"the metrics of {rows} steps"] if rows else [])]
    return (f"saved: {' and '.join(kept) or 'only config.yaml'} in {run.root}, no checkpoint",
            f"start again: {base} {afresh} (moves this run aside to <name>{preflight.REPLACED}<time>)")


def log_to_run(run):
    """Also write the driver's log (INFO and up, every library) into the run's ``driver.log``;
    returns what stops it."""
    import logging

    handler = logging.FileHandler(run.local / LOG)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    before = root.level
    quieted = []  # handlers that now see INFO records: they keep showing what they showed
    if before == logging.NOTSET or before > logging.INFO:
        for other in root.handlers:
            if other.level == logging.NOTSET:
                other.setLevel(before or logging.WARNING)
                quieted.append(other)
        root.setLevel(logging.INFO)
    root.addHandler(handler)

    def stop() -> None:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(before)
        for other in quieted:
            other.setLevel(logging.NOTSET)
        if run.is_uri:
            run._publish(LOG)

    return stop


def log_traceback(err: BaseException, cfg, since: float = 0.0) -> Path:
    """Append ``err``'s traceback to the run's log file (a temp file when the run has no
    directory); returns its path."""
    from orchestrator import storage

    run_cfg = getattr(cfg, "run", None)
    path = None
    if run_cfg is not None:
        run = storage.RunStorage.of(run_cfg.storage, run_cfg.name)
        if (run.local / "config.yaml").exists() and written_since(run, since):
            path = run.local / LOG
    if path is None:
        name = run_cfg.name if run_cfg is not None else "r1lab"
        path = Path(tempfile.gettempdir()) / f"r1lab-{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    with path.open("a") as f:
        f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.write("".join(traceback.format_exception(err)))
    if run_cfg is not None and path.name == LOG:
        run._publish(LOG)
    return path
