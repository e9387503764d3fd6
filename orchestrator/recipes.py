"""Recipes: stages chained, each one's outputs feeding the next (the ``pipeline`` and
``distill`` stages run them).

Every step runs one stage with its own config file plus overrides, as run
``<pipeline run>/<step name>`` in the pipeline's ``run.storage``. Overrides may refer to earlier steps' outputs:

- ``${STEP.model}``: the checkpoint a ``grpo``/``sft``/``distill`` step wrote (``STEP/final``);
- ``${STEP.dataset}``: the SFT data a ``sample`` step wrote (``STEP/sft.jsonl``);
- ``${STEP.dir}``: the step's run directory.

A step that completed writes ``STEP/DONE.json``. A pipeline run again with
``run.resume=true`` skips those steps, resumes a ``grpo`` step that stopped from its
checkpoint, and starts any other unfinished step afresh (its earlier attempt moved aside).
All steps share one Ray connection.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import yaml
from pydantic import Field, field_validator

from orchestrator import storage
from orchestrator.config import ClusterConfig, FrozenModel, RunConfig, load_config

log = logging.getLogger(__name__)
REF = re.compile(r"\$\{([A-Za-z0-9_-]+)\.(model|dataset|dir)\}")
OUTPUTS = {"model": "final", "dataset": "sft.jsonl", "dir": ""}


class PipelineStep(FrozenModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    stage: str
    config: Path
    overrides: tuple[str, ...] = ()


class PipelineSection(FrozenModel):
    steps: tuple[PipelineStep, ...]

    @field_validator("steps")
    @classmethod
    def _valid_references(cls, steps: tuple[PipelineStep, ...]) -> tuple[PipelineStep, ...]:
        seen: list[str] = []
        for step in steps:
            if step.stage == "pipeline":
                raise ValueError(f"step {step.name!r}: pipelines do not nest")
            if step.name in seen:
                raise ValueError(f"step name {step.name!r} is used twice")
            for o in step.overrides:
                for ref, _ in REF.findall(o):
                    if ref not in seen:
                        raise ValueError(f"step {step.name!r} refers to ${{{ref}…}}, which is not an earlier step")
            seen.append(step.name)
        if not steps:
            raise ValueError("pipeline.steps is empty")
        return steps


class PipelineConfig(FrozenModel):
    """Everything the ``pipeline`` stage needs."""

    run: RunConfig = RunConfig(name="pipeline")
    pipeline: PipelineSection
    cluster: ClusterConfig = ClusterConfig()


def resolve(overrides: tuple[str, ...], root: str) -> list[str]:
    """Fill ``${STEP.output}`` references with locations under ``root`` (a path or URI)."""
    def sub(m: re.Match) -> str:
        return storage.join(root, m.group(1), OUTPUTS[m.group(2)])

    return [REF.sub(sub, o) for o in overrides]


def step_config(cfg: PipelineConfig, step: PipelineStep, again: str | None = None):
    """The validated config of ``step`` with references, run name and output dir filled in;
    ``again``: "resume" or "overwrite" for a step an earlier attempt left unfinished."""
    from orchestrator.stages import load_stage

    module = load_stage(step.stage)
    root = storage.RunStorage.of(cfg.run.storage, cfg.run.name).root
    overrides = [*resolve(step.overrides, root), f"run.storage={root}", f"run.name={step.name}"]
    if again is not None:  # and the other off, whatever the step's own config says
        overrides += [f"run.{again}=true", f"run.{'overwrite' if again == 'resume' else 'resume'}=false"]
    if cfg.cluster.address and "cluster" in module.Config.model_fields:
        overrides.append(f"cluster.address={cfg.cluster.address}")
    return module, load_config(step.config, overrides, model=module.Config)


def run(cfg: PipelineConfig, progress=None) -> Path:
    """Run every step not completed before; returns the recipe's run directory."""
    from orchestrator import cluster

    from orchestrator import checkpoints, preflight

    root = storage.for_run(cfg.run)
    # Validate every step's config before anything is written or moved.
    for step in cfg.pipeline.steps:
        step_config(cfg, step)
    if cfg.run.resume:
        if not root.exists("config.yaml"):
            raise preflight.PreflightError(f"run.resume is set but {root.root} holds no pipeline: nothing to resume; "
                                           "start without run.resume")
    else:
        preflight.claim_run(root, stage="pipeline", resume=False, overwrite=cfg.run.overwrite).take()
    root.write_text("config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    cluster.connect(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus, dashboard=cfg.cluster.dashboard)
    total = len(cfg.pipeline.steps)
    for i, step in enumerate(cfg.pipeline.steps, 1):
        done = f"{step.name}/DONE.json"
        if root.exists(done):
            log.warning("step %s already completed: skipped", step.name)
            if progress is not None:
                progress(i, total, f"{step.name} ({step.stage}): done before, skipped")
            continue
        again = None
        step_run = storage.RunStorage.of(root.root, step.name)
        if preflight.holds_run(step_run):  # an earlier attempt did not finish
            resumable = step.stage == "grpo" and checkpoints.CheckpointDir(step_run).latest() is not None
            again = "resume" if resumable else "overwrite"
        module, step_cfg = step_config(cfg, step, again)
        if progress is not None:
            progress(i - 1, total, f"{step.name} ({step.stage}) running")
        t0 = time.monotonic()
        module.run(step_cfg)
        if step.stage in ("grpo", "sft", "distill") and not step_run.exists("final"):
            # Stopped (Ctrl-C, SIGTERM, `r1lab stop`) with a checkpoint: the pipeline stops too.
            log.warning("step %s stopped before its end; continue the pipeline with run.resume=true", step.name)
            if progress is not None:
                progress(i - 1, total, f"{step.name} ({step.stage}) stopped: continue with run.resume=true")
            return root.local
        root.write_text(done, json.dumps({"stage": step.stage, "seconds": time.monotonic() - t0}))
        if progress is not None:
            progress(i, total, f"{step.name} ({step.stage}) done in {time.monotonic() - t0:.0f}s")
    return root.local


def completed_steps(run_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in Path(run_dir).glob("*/DONE.json"))
