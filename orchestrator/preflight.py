"""Pre-flight: what a stage checks before it creates its run directory or starts an actor,
so that a mistake ends in seconds with one sentence naming it and its fix.

- **model paths**: a local path must be a model directory; a hub id is used only when it
  looks like one and the hub has it cached here or answers (``check_model``);
- **the run directory**: a name that already holds a run is refused unless the config
  says to resume it or to move it aside (``claim_run``; ``Claim.take`` acts once every
  check passed, so a refused run leaves nothing behind);
- **storage**: it can be written, and has room for a checkpoint and the final model
  (``check_storage``, sized by ``checkpoint_bytes``);
- **rows**: every data row is read and checked (``tasks.data_files`` names bad rows by
  file and line); prompts longer than the engine can take are named too
  (``check_prompt_lengths``); ``data.skip_bad_rows`` skips them, counted in
  ``data_report.json`` (``bad_rows``).

Placement feasibility is checked against the cluster's nodes in
``orchestrator.placement.check_fits``, once Ray is connected and before any actor starts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator import storage
from orchestrator.stages import StageError

log = logging.getLogger(__name__)

HUB_TIMEOUT_S = 5.0
# One checkpoint (fp32 weights and Adam's two moments: 12 bytes a parameter) plus the final
# model (fp32: 4 bytes): what a run must have room for.
CHECKPOINT_BYTES_PER_PARAM = 16
DATA_REPORT = "data_report.json"
REPLACED = ".replaced-"  # an earlier run moved aside: <name>.replaced-<YYYYmmdd-HHMMSS>


class PreflightError(StageError):
    """An input, the storage or the run name is wrong; the message names it and the fix."""


# -- models -------------------------------------------------------------------------------------


def check_model(path: str, setting: str = "model.path") -> None:
    """``path`` (as ``storage.prepare`` resolved it: absolute, a staged URI, or a hub id) is a
    model directory, or a hub id the hub serves here."""
    if storage.looks_like_hub_id(path):
        problem = _hub_problem(path)
        if problem is not None:
            local = storage.absolute(path)
            raise PreflightError(f"{setting} {path} is no local directory (nothing at {local}) and {problem}; "
                                 f"give the path of a model directory (build a tiny one with `r1lab init-model "
                                 f"{path}`) or a hub id this machine can download")
        return
    local = Path(path)
    if not local.exists():
        raise PreflightError(f"{setting} {path} does not exist; give the path of a model directory (build a "
                             f"tiny one with `r1lab init-model {path}`)")
    if not local.is_dir() or not (local / "config.json").is_file():
        raise PreflightError(f"{setting} {path} is not a Hugging Face model directory (no config.json in it); "
                             "give the folder save_pretrained wrote")


def _hub_problem(repo_id: str) -> str | None:
    """None when the hub id can be loaded here (cached, or the hub answers and has it);
    otherwise why not."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set and the hub cache here does not hold it"
    from huggingface_hub import HfApi
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return "it is a gated model on the hub: accept its terms and set HF_TOKEN"
    except RepositoryNotFoundError:
        return "the hub has no model of that name (or it is private: set HF_TOKEN)"
    except Exception as err:  # noqa: BLE001 - a network failure of any kind means the same here
        return (f"the hub (huggingface.co) did not answer within {HUB_TIMEOUT_S:.0f} s "
                f"({type(err).__name__}) and the hub cache here does not hold it")
    return None


def model_parameters(path: str) -> int | None:
    """About how many parameters the model directory holds (from its weight files and the
    dtype they are stored in); None when unknown (a hub id not cached, no weight files)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    size = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".pt"))
    if not size:
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    except (OSError, ValueError):
        dtype = "float32"
    return size // (2 if dtype in ("bfloat16", "float16") else 4)


def checkpoint_bytes(model_path: str) -> int | None:
    params = model_parameters(model_path)
    return None if params is None else params * CHECKPOINT_BYTES_PER_PARAM


# -- storage ------------------------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_storage(run: storage.RunStorage, need: int | None,
                  what: str = f"a checkpoint and final/ ({CHECKPOINT_BYTES_PER_PARAM} bytes a parameter)") -> None:
    """``run``'s storage can be written and (for a local path) has ``need`` bytes free."""
    if run.is_uri:
        _check_uri_writable(run)
        return
    root = Path(run.root)
    base = _nearest_existing(root)
    if not base.is_dir():
        raise PreflightError(f"run.storage: {root} cannot be created: {base} is a file, not a directory; "
                             "choose another run.storage")
    try:
        fd, probe = tempfile.mkstemp(prefix=".r1lab-write-check-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PreflightError(f"run.storage: cannot write under {base} ({err.strerror}); choose a writable "
                             "run.storage or fix the folder's permissions") from None
    free = shutil.disk_usage(base).free
    if need is not None and free < need:
        raise PreflightError(f"run.storage: {base} has {human(free)} free but this run needs about {human(need)} "
                             f"for {what}; free space there or choose another run.storage")


def _check_uri_writable(run: storage.RunStorage) -> None:
    """Write and delete a small object beside the run (in ``run.storage`` itself, so that
    no run folder is made before pre-flight passes)."""
    parent = run.root.rstrip("/").rsplit("/", 1)[0]
    filesystem, path = storage.filesystem(f"{parent}/.r1lab-write-check-{os.getpid()}")
    try:
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)  # a bucket prefix: nothing to make
        with filesystem.open_output_stream(path) as f:
            f.write(b"r1lab")
        filesystem.delete_file(path)
    except Exception as err:  # noqa: BLE001 - pyarrow maps every store's refusals to several types
        raise PreflightError(f"run.storage: cannot write to {parent} ({err}); check the bucket's name and "
                             "credentials, or choose another run.storage") from None


# -- the run directory --------------------------------------------------------------------------


def holds_run(run: storage.RunStorage) -> bool:
    """Whether ``run``'s location holds anything a run wrote."""
    if not run.is_uri:
        root = Path(run.root)
        return root.is_dir() and any(root.iterdir())
    return any(run.exists(name) for name in ("config.yaml", "metrics.jsonl", "final", "checkpoints"))


@dataclass(frozen=True)
class Claim:
    """What ``claim_run`` decided: start in a fresh directory, resume, or move the earlier
    run aside first (``take`` does it)."""

    run: storage.RunStorage
    resume: bool
    replace: bool

    def take(self) -> str | None:
        """Move the earlier run aside (when replacing); returns where it went."""
        if not self.replace:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        parent, name = self.run.root.rstrip("/").rsplit("/", 1)
        aside = f"{parent}/{name}{REPLACED}{stamp}"
        n = 1
        while storage.exists(aside):
            n += 1
            aside = f"{parent}/{name}{REPLACED}{stamp}-{n}"
        storage.move(self.run.root, aside)
        if self.run.is_uri:
            shutil.rmtree(self.run.local, ignore_errors=True)  # the driver's mirror of the old run
        log.warning("an earlier run %s was moved aside to %s (run.overwrite=true)", self.run.root, aside)
        return aside


def claim_run(run: storage.RunStorage, *, stage: str, resume: bool, overwrite: bool,
              has_checkpoint=None) -> Claim:
    """Refuse a run name that already holds a run, unless ``resume`` (then ``has_checkpoint()``
    must find what to resume from) or ``overwrite`` (moved aside at ``Claim.take``)."""
    held = holds_run(run)
    if resume:
        if has_checkpoint is None:
            raise PreflightError(f"run.resume is set but the {stage} stage does not resume; start it afresh with "
                                 f"run.overwrite=true (the run at {run.root} is moved aside) or a new run.name")
        if not held:
            raise PreflightError(f"run.resume is set but {run.root} does not exist: nothing to resume; start "
                                 "without run.resume, or give the run.name of the run that was stopped")
        if not has_checkpoint():
            raise PreflightError(f"run.resume is set but {run.root} holds no complete checkpoint: nothing to "
                                 "resume; start it afresh with run.overwrite=true instead of run.resume (the run "
                                 "is moved aside), or choose another run.name")
        return Claim(run, resume=True, replace=False)
    if held and not overwrite:
        raise PreflightError(f"{run.root} already holds a run; continue it with run.resume=true, move it aside "
                             f"and start afresh with run.overwrite=true, or choose another run.name")
    return Claim(run, resume=False, replace=held)


# -- rows -------------------------------------------------------------------------------------


def check_prompt_lengths(items: Sequence, wheres: Sequence[str], *, max_new_tokens: int, max_model_len: int,
                         bad) -> list[int]:
    """Indices of the prompts that fit ``max_model_len - max_new_tokens``; each that does not
    is added to ``bad`` (``tasks.data_files.BadRows``), named by ``wheres``."""
    room = max_model_len - max_new_tokens
    keep = []
    for i, (item, where) in enumerate(zip(items, wheres, strict=True)):
        n = len(item.prompt_ids)
        if n > room:
            bad.add(f"{where}: the prompt is {n} tokens, over the {room} that rollout.max_model_len "
                    f"({max_model_len}) minus rollout.max_new_tokens ({max_new_tokens}) leaves; shorten it, or "
                    "raise rollout.max_model_len")
        else:
            keep.append(i)
    return keep


def bad_rows(bad, *, source: str, total: int, skip: bool, setting: str = "data.skip_bad_rows") -> dict | None:
    """Refuse the data when it has bad rows (unless ``skip``); returns the record of what was
    skipped (for ``data_report.json``), None when nothing was."""
    if not bad.count:
        return None
    if not skip:
        more = f" (and {bad.count - 1} more bad rows of {total})" if bad.count > 1 else ""
        raise PreflightError(f"{bad.first[0]}{more}.\nFix the rows, or set {setting}=true to skip the bad "
                             "ones (they are counted in the run's data_report.json)")
    log.warning("%s: skipping %d bad rows of %d (%s=true); the first: %s", source, bad.count, total, setting,
                bad.first[0])
    return {"source": source, "rows": total, "skipped": bad.count, "first_skipped": bad.first}


def fresh_run(run: storage.RunStorage, run_cfg, *, stage: str, need: int | None = None,
              what: str = "its outputs") -> Claim:
    """``claim_run`` and ``check_storage`` (``need`` bytes for ``what``) for a stage that
    does not resume."""
    claim = claim_run(run, stage=stage, resume=run_cfg.resume, overwrite=run_cfg.overwrite)
    check_storage(run, need, what=what)
    return claim
