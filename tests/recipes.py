"""Loading the shipped GPU recipes in tests. The multi-node recipes name ``run.storage``
(where a run writes, on storage every node mounts); until the config loader knows that
key, it is read as ``run.output_dir``. Once ``RunConfig`` has ``storage`` this is
``load_config`` itself."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import GRPOStageConfig, RunConfig, apply_overrides, load_config, read_yaml, validate


def load_recipe(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> GRPOStageConfig:
    raw = read_yaml(path)
    if "storage" in RunConfig.model_fields or "storage" not in (raw.get("run") or {}):
        return load_config(path, list(overrides))
    raw["run"]["output_dir"] = raw["run"].pop("storage")
    renamed = [o.replace("run.storage=", "run.output_dir=", 1) for o in overrides]
    return validate(GRPOStageConfig, apply_overrides(raw, renamed), str(path))
