"""What every learner role shares: one data-parallel rank holding an ``Engine``.

The roles (``grpo_role.GRPOLearner``, ``sft_role.SFTLearner``) subclass ``LearnerRank``
and say how DeepSpeed batches (``_engine_shape``). Start-up, as the driver runs it:
``address()`` on rank 0, then ``setup(addr, port)`` on all ranks at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from learner.config import LearnerConfig
from learner.engine import Engine, EngineShape
from learner.startup import gc_paused
from learner.weight_sync import free_port, node_ip


class LearnerRank:
    """One data-parallel rank; ``engine`` exists once ``setup`` has run."""

    def __init__(self, model_path: str, config: LearnerConfig, *, rank: int, world_size: int, seed: int) -> None:
        self.model_path = model_path
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.version = 0  # optimizer steps taken (restored from checkpoints)
        self._engine: Engine | None = None

    def _engine_shape(self) -> EngineShape:
        raise NotImplementedError(f"{type(self).__name__} must say how DeepSpeed batches (_engine_shape)")

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the learner has no engine yet: call setup(master_addr, master_port) on every rank")
        return self._engine

    def address(self) -> tuple[str, int]:
        """An address for the rank-0 rendezvous (call on rank 0 before ``setup``)."""
        return node_ip(), free_port()

    @gc_paused(freeze=False)  # DeepSpeed's imports and the model build (learner.startup)
    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the DeepSpeed group and build the engine (all ranks at once); returns the
        number of parameters."""
        self._engine = Engine(self.model_path, self.config, self._engine_shape(), seed=self.seed,
                              master_addr=master_addr, master_port=master_port)
        return self._engine.num_parameters

    def collective_backend(self) -> str:
        return self.engine.backend

    def parameter_vector(self) -> torch.Tensor:
        """All parameters flattened into one CPU tensor (collective under ZeRO-3)."""
        return torch.cat([t.detach().float().reshape(-1).cpu() for _, t in self.engine.named_full_params()])

    def save_hf(self, out_dir: str, publish: Callable[[], None] | None = None) -> str:
        """Write an HF-format checkpoint (safetensors) that vLLM and transformers load, to the
        absolute ``out_dir`` on this node; rank 0 writes it, then calls ``publish`` (which
        copies it to the run's storage) if given."""
        _check_absolute(out_dir)
        self.engine.save_hf(out_dir)
        if publish is not None and self.rank == 0:
            publish()
        return out_dir

    def save_checkpoint(self, ckpt_dir: str, tag: str, publish: Callable[[], None] | None = None) -> str:
        """DeepSpeed checkpoint (weights, optimizer, scheduler), for resuming: every rank
        writes its shards to the absolute ``ckpt_dir``, then calls ``publish`` if given."""
        _check_absolute(ckpt_dir)
        self.engine.save_checkpoint(ckpt_dir, tag, {"version": self.version})
        if publish is not None:
            publish()
        return tag

    def load_checkpoint(self, ckpt_dir: str, tag: str | None = None, fetch: Callable[[], None] | None = None) -> int:
        """Load a checkpoint from the absolute ``ckpt_dir``, after ``fetch`` (which stages it
        there from the run's storage) if given."""
        _check_absolute(ckpt_dir)
        if fetch is not None:
            fetch()
        self.version = int(self.engine.load_checkpoint(ckpt_dir, tag).get("version", 0))
        return self.version


def _check_absolute(path: str) -> None:
    """An actor's working directory is its node's, not the driver's: never write relative to it."""
    if not os.path.isabs(path):
        raise ValueError(f"{path!r} is relative: it would land in this actor's working directory on its "
                         "node; pass an absolute path (the driver resolves run.storage)")
