"""The DeepSpeed adapter: the only module of ours that touches DeepSpeed.

Written for DeepSpeed 0.19 (``pyproject.toml`` pins 0.19.8); ``tests/ray/test_learner_sharding.py``
and ``tests/ray/test_weight_push.py`` exercise it under ZeRO-2 and ZeRO-3. It owns joining the
process group, loading the model, the DeepSpeed config, optimizer and scheduler,
backward/step, gathering full parameters under ZeRO-3, and HF/DeepSpeed checkpoints.

Loss convention ("sum over micro-batches and ranks"): the learner's losses divide by
GLOBAL normalisers (``learner.grpo.aggregate``), so the full-batch gradient is the SUM
of every micro-batch's gradient on every rank. DeepSpeed instead averages gradients
over ranks and divides each loss by the accumulation steps; ``backward`` undoes both
(``loss * world_size``, ``scale_wrt_gas=False``).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from learner.batch import pad_token_id
from learner.config import LearnerConfig


@dataclass(frozen=True)
class EngineShape:
    """Where a rank sits and how DeepSpeed batches: ``micro_batch_sequences`` per forward,
    ``accumulation_steps`` forwards per optimizer step, on each of ``world_size`` ranks."""

    rank: int
    world_size: int
    micro_batch_sequences: int
    accumulation_steps: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")
        if self.micro_batch_sequences < 1 or self.accumulation_steps < 1:
            raise ValueError(f"need at least one sequence per micro-batch and one micro-batch per step, "
                             f"got {self.micro_batch_sequences} and {self.accumulation_steps}")


class Engine:
    """One data-parallel rank's DeepSpeed engine (all ranks build theirs at once)."""

    def __init__(self, model_path: str, config: LearnerConfig, shape: EngineShape, *, seed: int,
                 master_addr: str, master_port: int) -> None:
        self.config = config
        self.shape = shape
        cuda = torch.cuda.is_available()
        if config.attn_implementation == "flash_attention_2" and not cuda:  # GPU only: packed rows as varlen attention
            raise ValueError("learner.attn_implementation=flash_attention_2 needs a CUDA GPU; use default or sdpa")
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(shape.rank),
            WORLD_SIZE=str(shape.world_size), LOCAL_RANK="0",
        )
        if not cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.backend = config.backend if config.backend != "auto" else ("nccl" if cuda else "gloo")
        torch.manual_seed(seed)

        importlib.import_module("torch._dynamo")  # zero.Init needs it imported first
        import deepspeed
        from transformers import AutoModelForCausalLM

        deepspeed.init_distributed(dist_backend=self.backend)
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        dtype = torch.bfloat16 if config.dtype == "bf16" else torch.float32
        attn = config.attn_implementation
        attention = {} if attn == "default" else {"attn_implementation": attn}
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **attention)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.config.use_cache = False
        self.pad_id = pad_token_id(model.config)
        self.num_parameters = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
            betas=(config.adam_beta1, config.adam_beta2),
        )
        warmup = max(config.warmup_steps, 0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        self._ds, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self._ds_config()
        )

    def _ds_config(self) -> dict:
        cfg, shape = self.config, self.shape
        return {
            "train_micro_batch_size_per_gpu": shape.micro_batch_sequences,
            "gradient_accumulation_steps": shape.accumulation_steps,
            "train_batch_size": shape.micro_batch_sequences * shape.accumulation_steps * shape.world_size,
            "gradient_clipping": cfg.max_grad_norm,
            "zero_optimization": {"stage": cfg.zero_stage},
            "bf16": {"enabled": cfg.dtype == "bf16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    # -- compute --------------------------------------------------------------------------
    def __call__(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **model_kwargs):
        """The model's forward (its output has ``.logits``); callable like the model itself,
        ``model_kwargs`` (``position_ids``, ``output_hidden_states``, ...) passed through."""
        return self._ds(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)

    def get_output_embeddings(self) -> torch.nn.Module:
        """The model's LM head."""
        return self._ds.module.get_output_embeddings()

    def backward_step(self, loss: torch.Tensor, *, last: bool | None = None) -> None:
        """Backward one micro-batch's loss under the sum convention, then ``step``: DeepSpeed
        applies the optimizer at the accumulation boundary, every ``accumulation_steps``
        calls, or, when the caller says (``last``, for a step whose micro-batch count
        varies), after the call with ``last=True``. The caller then gives every rank the
        same number of calls: ZeRO-2 and -3 reduce gradients in each backward."""
        if last is not None:
            self._ds.set_gradient_accumulation_boundary(last)
        self._ds.backward(loss * self.shape.world_size, scale_wrt_gas=False)
        self._ds.step()

    def grad_norm(self) -> float:
        """The global gradient norm of the last optimizer step (nan before any)."""
        norm = self._ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def all_reduce_sum(self, value: float) -> float:
        """``value`` summed over all ranks (float64)."""
        return self._all_reduce(value, "SUM")

    def all_reduce_max(self, value: float) -> float:
        """The largest ``value`` of all ranks (float64)."""
        return self._all_reduce(value, "MAX")

    def _all_reduce(self, value: float, op: str) -> float:
        import torch.distributed as dist

        local = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(local, op=getattr(dist.ReduceOp, op))
        return float(local.item())

    # -- weights --------------------------------------------------------------------------
    def named_full_params(self) -> list[tuple[str, torch.Tensor]]:
        """Full parameters in HF names. Under ZeRO-3 they are gathered: a collective, so
        every rank must call it at the same time, and the tensors are copies."""
        params = list(self._ds.module.named_parameters())
        if self.config.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                return [(n, p.detach().clone()) for n, p in params]
        return [(n, p.detach()) for n, p in params]

    def save_hf(self, out_dir: str) -> None:
        """An HF-format checkpoint (safetensors) that vLLM and transformers load; collective
        under ZeRO-3, written by rank 0."""
        named = self.named_full_params()
        if self.shape.rank == 0:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            state = {n: t.detach().cpu().contiguous() for n, t in named}
            self._ds.module.save_pretrained(out, state_dict=state, safe_serialization=True)

    def save_checkpoint(self, ckpt_dir: str, tag: str, client_state: dict) -> None:
        """DeepSpeed checkpoint (weights, optimizer, scheduler) plus ``client_state``."""
        self._ds.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)

    def load_checkpoint(self, ckpt_dir: str, tag: str | None) -> dict:
        """Load a DeepSpeed checkpoint; returns its ``client_state``."""
        _, client = self._ds.load_checkpoint(ckpt_dir, tag=tag)
        return client or {}
