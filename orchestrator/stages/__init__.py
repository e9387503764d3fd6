"""The stages of the R1 recipe. Each stage module exposes:

- ``Config``: its pydantic config model (frozen, ``extra="forbid"``);
- ``run(cfg, progress=None) -> Path``: run it in this process (against ``RAY_ADDRESS`` or an
  embedded local Ray cluster) and return the run directory; ``progress(done, total, info)``
  is called as work completes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

STAGES = {
    "grpo": "orchestrator.stages.grpo",
    "sft": "orchestrator.stages.sft",
    "sample": "orchestrator.stages.sample",
    "eval": "orchestrator.stages.eval",
    "distill": "orchestrator.stages.distill",
    "pipeline": "orchestrator.stages.pipeline",
}


Progress = Callable[[int, int, str], None]  # progress(done, total, info)


class StageError(ValueError):
    """A stage cannot start: the message says what is missing and how to fix it."""


def load_stage(name: str) -> ModuleType:
    if name not in STAGES:
        raise StageError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name])
