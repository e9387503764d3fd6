"""The run's checkpoint folder: written atomically, the last N kept, ``latest`` naming one.

    checkpoints/.step-7.tmp-1a2b3c4d/   being written (learner ranks, then the trainer state)
    checkpoints/step-7/                 renamed from its temp name once complete
    checkpoints/latest                  {"step": 7, "dir": "step-7"}, written atomically last

A crash while writing leaves a temp folder (or, on a store without a directory rename, a
``step-N`` folder without ``STATE``); neither is ever picked on resume, and the next
checkpoint removes them. Works on a local path and on any URI ``pyarrow.fs`` opens.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass

from orchestrator.storage import RunStorage, filesystem, move

log = logging.getLogger(__name__)

ROOT = "checkpoints"
LATEST = "latest"
STATE = "trainer_state.json"  # written into a checkpoint last: its presence means complete
_STEP = re.compile(r"^step-(\d+)$")
_TEMP = re.compile(r"^\.step-(\d+)\.tmp-[0-9a-f]+$")


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: taken after ``step``, in ``<ROOT>/<name>``."""

    step: int
    name: str

    @property
    def path(self) -> str:
        return f"{ROOT}/{self.name}"


class CheckpointDir:
    """``begin`` a checkpoint, write into its temp folder, ``commit`` it; ``latest`` finds
    the newest complete one."""

    def __init__(self, run: RunStorage, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (grpo.keep_checkpoints), got {keep}")
        self.run = run
        self.keep = keep

    def begin(self, step: int) -> str:
        """The temp folder (relative to the run) to write the checkpoint of ``step`` into."""
        return f"{ROOT}/.step-{step}.tmp-{uuid.uuid4().hex[:8]}"

    def commit(self, step: int, temp: str) -> Checkpoint:
        """``temp`` holds every rank's files and ``STATE``: rename it to ``step-N``, point
        ``latest`` at it, then drop all but the last ``keep`` checkpoints."""
        if not self.run.exists(f"{temp}/{STATE}"):
            raise RuntimeError(f"{self.run.location(temp)} has no {STATE}: write the trainer state last, then commit")
        done = Checkpoint(step, f"step-{step}")
        _move(self.run.location(temp), self.run.location(done.path))
        self.run.write_text(f"{ROOT}/{LATEST}", json.dumps({"step": step, "dir": done.name}))
        self.prune(done)
        return done

    def latest(self) -> Checkpoint | None:
        """The checkpoint ``latest`` names if complete, else the newest complete one."""
        text = self.run.read_text(f"{ROOT}/{LATEST}")
        if text:
            try:
                named = json.loads(text)
                pick = Checkpoint(int(named["step"]), str(named["dir"]))
            except (ValueError, KeyError, TypeError):
                log.warning("%s is unreadable; picking the newest complete checkpoint",
                            self.run.location(ROOT, LATEST))
            else:
                if self.run.exists(f"{pick.path}/{STATE}"):
                    return pick
        complete = [c for c in self.listed() if self.run.exists(f"{c.path}/{STATE}")]
        return max(complete, key=lambda c: c.step, default=None)

    def listed(self) -> list[Checkpoint]:
        """Every ``step-N`` folder, complete or not."""
        return [Checkpoint(int(m.group(1)), name) for name in self._names() if (m := _STEP.match(name))]

    def prune(self, current: Checkpoint) -> None:
        """Remove temp folders, incomplete ``step-N`` folders, and all complete ones but the
        newest ``keep`` (never ``current``)."""
        steps = sorted(self.listed(), key=lambda c: c.step, reverse=True)
        complete = [c for c in steps if c.name == current.name or self.run.exists(f"{c.path}/{STATE}")]
        doomed = [c.name for c in steps if c not in complete[:self.keep] and c.name != current.name]
        doomed += [name for name in self._names() if _TEMP.match(name)]
        filesystem_, _ = filesystem(self.run.root)
        for name in doomed:
            _, path = filesystem(self.run.location(ROOT, name))
            filesystem_.delete_dir(path)

    def _names(self) -> list[str]:
        from pyarrow import fs

        filesystem_, path = filesystem(self.run.location(ROOT))
        if filesystem_.get_file_info(path).type != fs.FileType.Directory:
            return []
        infos = filesystem_.get_file_info(fs.FileSelector(path))
        return [i.base_name for i in infos if i.type == fs.FileType.Directory]


def _move(source: str, destination: str) -> None:
    """Rename a folder (a store without directory renames: copy, then delete)."""
    from pyarrow import fs

    filesystem_, src = filesystem(source)
    _, dst = filesystem(destination)
    if filesystem_.get_file_info(dst).type != fs.FileType.NotFound:
        filesystem_.delete_dir(dst)  # a checkpoint of the same step from before a crash
    move(source, destination)
