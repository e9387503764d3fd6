"""Helpers shared by the benchmarks: a local Ray cluster and a tiny model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def local_ray(num_cpus: int = 4):
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled"}})
    return ray


def tiny_model(hidden_size: int = 128, num_layers: int = 2, out: Path | None = None) -> Path:
    from tasks.tinymodel import TinyModelSpec, build_tiny_model

    out = out or Path(tempfile.mkdtemp(prefix="r1lab-bench-"))
    spec = TinyModelSpec(hidden_size=hidden_size, intermediate_size=3 * hidden_size, num_layers=num_layers,
                         num_heads=hidden_size // 32, num_kv_heads=max(1, hidden_size // 64))
    return build_tiny_model(out, spec=spec, pretrain_steps=0)
