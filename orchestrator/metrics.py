"""Run metrics: one JSON object per step in ``metrics.jsonl``, mirrored to wandb."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from orchestrator.storage import RunStorage

NAME = "metrics.jsonl"
log = logging.getLogger(__name__)


class MetricsLogger:
    """Appends step records to ``metrics.jsonl`` in the run's storage and logs them to wandb.

    wandb is offline unless ``mode="online"`` (then it needs ``WANDB_API_KEY``);
    ``mode="disabled"`` skips it. Its files stay in the driver's run directory (``run.local``).
    """

    def __init__(self, run: RunStorage, *, config: dict[str, Any], mode: str = "offline",
                 project: str = "r1lab", name: str | None = None, resume: bool = False,
                 resumed_at: int | None = None) -> None:
        """``resume``: append to the records so far; rows after step ``resumed_at`` (the
        checkpoint's) are dropped first, so no step is recorded twice."""
        self.run = run
        if resume:
            run.pull(NAME)  # a URI's records so far, to append to
            if resumed_at is not None:
                keep_through(run, NAME, resumed_at)
        else:
            run.write_text(NAME, "")
        self._wandb = None
        if mode != "disabled":
            wandb_dir = run.local / "wandb"
            wandb_dir.mkdir(parents=True, exist_ok=True)
            for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
                os.environ.setdefault(var, str(wandb_dir / sub))
            try:
                import wandb

                # wandb's own lines (run history, sync hints: 20 a stage) only with -v.
                quiet = os.environ.get("R1LAB_VERBOSE") != "1"
                self._wandb = wandb.init(project=project, name=name, config=config, mode=mode,
                                         dir=str(wandb_dir), reinit="finish_previous",
                                         settings=wandb.Settings(silent=quiet, console="off" if quiet else "auto"))
            except Exception as err:  # noqa: BLE001 - metrics.jsonl still records everything
                log.warning("wandb logging is off (%s); metrics.jsonl still records every step", err)

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.run.append(NAME, json.dumps(clean) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if v is not None}, step=int(record["step"]))

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def keep_through(run: RunStorage, name: str, step: int) -> None:
    """Drop the rows of the JSON-lines file ``name`` recorded after ``step``."""
    text = run.read_text(name)
    if text is None:
        return
    rows = [line for line in text.splitlines() if line.strip()]
    kept = [line for line in rows if int(json.loads(line)["step"]) <= step]
    if len(kept) != len(rows):
        log.info("%s: dropping %d rows after step %d (resumed from its checkpoint)", name, len(rows) - len(kept), step)
        run.write_text(name, "".join(line + "\n" for line in kept))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
