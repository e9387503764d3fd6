"""What every learner role shares: one data-parallel rank holding an ``Engine``.

The roles (``grpo_role.GRPOLearner``, ``sft_role.SFTLearner``) subclass ``LearnerRank``
and say how DeepSpeed batches (``_engine_shape``). Start-up, as the driver runs it:
``address()`` on rank 0, then ``setup(addr, port)`` on all ranks at once.
"""

from __future__ import annotations

import torch

from learner.config import LearnerConfig
from learner.engine import Engine, EngineShape
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

    def save_hf(self, out_dir: str) -> str:
        """Write an HF-format checkpoint (safetensors) that vLLM and transformers load."""
        self.engine.save_hf(out_dir)
        return out_dir

    def save_checkpoint(self, ckpt_dir: str, tag: str) -> str:
        """DeepSpeed checkpoint (weights, optimizer, scheduler), for resuming."""
        self.engine.save_checkpoint(ckpt_dir, tag, {"version": self.version})
        return tag

    def load_checkpoint(self, ckpt_dir: str, tag: str | None = None) -> int:
        self.version = int(self.engine.load_checkpoint(ckpt_dir, tag).get("version", 0))
        return self.version
