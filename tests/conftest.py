"""Shared fixtures: a tiny model built once per session, a local Ray cluster, data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Tests never reach a model hub, and Ray's token auth stays off for the local cluster.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def shared_data(name: str) -> Path:
    """A file of ../shared/data, or skip the test saying why."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is missing: third-party test data lives in ../shared/data beside the project")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-init tiny Qwen2 model and tokenizer (no pretraining)."""
    from tasks.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-random"), pretrain_steps=0)


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory) -> Path:
    """A tiny model briefly pretrained on the noisy addition corpus (a weak base policy)."""
    cached = os.environ.get("R1LAB_TEST_BASE_MODEL")
    if cached and Path(cached, "model.safetensors").exists():
        return Path(cached)
    from tasks.tinymodel import build_tiny_model

    # The demo's base: 600 steps (400 left it too weak for the learning threshold below).
    return build_tiny_model(tmp_path_factory.mktemp("tiny-base"), pretrain_steps=600)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled"}})
    yield ray
    ray.shutdown()
