"""The ``distill`` stage (§2.4): sample the teacher (the ``sample`` stage: k samples per
prompt, keep the correct and readable ones), then ``sft`` the student on what was kept.

A two-step pipeline whose steps are built from two stage configs; like any pipeline, a
completed step is skipped on rerun. Outputs: ``<run>/teacher_samples/sft.jsonl`` and the
student checkpoint ``<run>/student/final`` (also linked as ``<run>/final``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from orchestrator import recipes, storage
from orchestrator.config import ClusterConfig, FrozenModel, RunConfig


class DistillSection(FrozenModel):
    teacher: str = Field(description="teacher checkpoint (path or hub id)")
    student: str = Field(description="student base model (path or hub id)")
    sample_config: Path = Field(description="a `sample` stage config: prompts, k, filters, rewards")
    sft_config: Path = Field(description="an `sft` stage config: epochs, batch, learner")
    sample_overrides: tuple[str, ...] = ()
    sft_overrides: tuple[str, ...] = ()


class Config(FrozenModel):
    run: RunConfig = RunConfig(name="distill")
    distill: DistillSection
    cluster: ClusterConfig = ClusterConfig()


def as_pipeline(cfg: Config) -> recipes.PipelineConfig:
    d = cfg.distill
    steps = (
        recipes.PipelineStep(name="teacher_samples", stage="sample", config=d.sample_config,
                             overrides=(f"model.path={d.teacher}", *d.sample_overrides)),
        recipes.PipelineStep(name="student", stage="sft", config=d.sft_config,
                             overrides=(f"model.path={d.student}", "data.train_path=${teacher_samples.dataset}",
                                        "data.template=none", *d.sft_overrides)),
    )
    return recipes.PipelineConfig(run=cfg.run, pipeline=recipes.PipelineSection(steps=steps), cluster=cfg.cluster)


def run(cfg: Config, progress=None) -> Path:
    run_dir = recipes.run(as_pipeline(cfg), progress=progress)
    run = storage.for_run(cfg.run)
    final = run_dir / "final"
    if run.is_uri:  # an object store has no links: the student's final model, copied
        storage.copy_dir(run.location("student", "final"), run.location("final"))
    elif not final.exists():
        final.symlink_to(Path("student") / "final", target_is_directory=True)
    return run_dir
