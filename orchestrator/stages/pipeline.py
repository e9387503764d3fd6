"""The ``pipeline`` stage: a YAML recipe chaining stages, each one's outputs feeding the
next; ``${STEP.model}``, ``${STEP.dataset}`` and ``${STEP.dir}`` name an earlier step's
outputs, and completed steps are skipped on rerun. The machinery is ``orchestrator.recipes``
(shared with the ``distill`` stage)."""

from __future__ import annotations

from orchestrator.recipes import PipelineConfig, PipelineSection, PipelineStep, completed_steps, run, step_config

Config = PipelineConfig

__all__ = ["Config", "PipelineSection", "PipelineStep", "completed_steps", "run", "step_config"]
