"""Configuration of the rollout engines and the reference model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RolloutConfig(BaseModel):
    """Sampling and engine settings; how many engines is ``cluster.rollout_engines``.
    Training samples at temperature 1 (the policy's own distribution); evaluation uses the
    paper's T = 0.6, top-p = 0.95 (``EvalConfig``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    engine: Literal["vllm"] = "vllm"
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=1024, ge=1)
    max_model_len: int = Field(default=4096, ge=16)
    kv_cache_bytes: int = Field(
        default=2 * 2**30, ge=2**20,
        description="KV cache per engine; always capped (vLLM on CPU otherwise takes ~all RAM)",
    )
    gpu_memory_utilization: float = Field(default=0.5, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    enforce_eager: bool = True
    dtype: Literal["float32", "bfloat16", "auto"] = "auto"
    seed: int = 0
    sleep_level: Literal[1, 2] = Field(default=1, description="cluster.colocate_rollout_with_learner: what an "
                                       "engine frees while the ranks train; 1: weights to host memory and the KV "
                                       "cache dropped, 2: both dropped (the push brings the weights back)")


class ReferenceConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    micro_batch_sequences: int = Field(default=16, ge=1)
    dtype: Literal["fp32", "bf16"] = "fp32"
    logprob_chunk_tokens: int = Field(
        default=0, ge=0, description="as learner.logprob_chunk_tokens: 0 takes the full logits, > 0 the LM head "
        "this many positions at a time")


@dataclass(frozen=True)
class EngineBundles:
    """Where a tensor-parallel engine's vLLM workers go: worker ``i`` on bundle
    ``bundle_indices[i]`` of the engine actor's own placement group, each taking
    ``gpus_per_worker`` GPUs of it (``orchestrator.placement`` decides both)."""

    bundle_indices: tuple[int, ...]
    gpus_per_worker: float
