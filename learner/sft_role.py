"""The SFT learner role: one DeepSpeed data-parallel rank per ``SFTLearner`` actor.

Used for the cold start (§2.3.1), rejection-sampled data (§2.3.3) and distillation
(§2.4). A step is ``micro_batches_per_step`` micro-batches of at most
``micro_batch_sequences`` ``(prompt_ids, response_ids)`` rows on every rank; the loss is
the next-token NLL on response tokens, a token mean over the whole step (all ranks), so
any split of the step gives the same update (``learner.engine`` sums the gradients).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from learner.batch import pad_rows
from learner.config import LearnerConfig
from learner.engine import EngineShape
from learner.rank import LearnerRank
from learner.sft import sft_loss


@dataclass(frozen=True)
class SFTStepStats:
    """One rank's sums over its share of a step; the driver adds ranks and divides by
    the step's response tokens."""

    nll_sum: float  # Σ -log p(target) over this rank's response tokens
    tokens: float  # this rank's response tokens
    correct: float  # response tokens where argmax(logits) == target
    seconds: float  # wall-clock time of this rank's step


class SFTLearner(LearnerRank):
    """One data-parallel rank of supervised fine-tuning."""

    def __init__(self, model_path: str, config: LearnerConfig, *, rank: int, world_size: int,
                 micro_batch_sequences: int, micro_batches_per_step: int, seed: int = 0) -> None:
        super().__init__(model_path, config, rank=rank, world_size=world_size, seed=seed)
        self.micro_batch_sequences = micro_batch_sequences
        self.micro_batches_per_step = micro_batches_per_step

    def _engine_shape(self) -> EngineShape:
        return EngineShape(self.rank, self.world_size, micro_batch_sequences=self.micro_batch_sequences,
                           accumulation_steps=self.micro_batches_per_step)

    def sft_step(self, micro_batches: Sequence[Sequence[tuple[Sequence[int], Sequence[int]]]],
                 global_tokens: int) -> SFTStepStats:
        """One optimizer step on this rank's micro-batches of (prompt_ids, response_ids):
        next-token loss on response tokens only, token mean over ``global_tokens`` (the
        response tokens of the whole step, all ranks), so any split gives the same update."""
        if len(micro_batches) != self.micro_batches_per_step:
            raise ValueError(f"sft_step got {len(micro_batches)} micro-batches, "
                             f"the engine expects {self.micro_batches_per_step}")
        engine = self.engine
        nll_sum = tokens = correct = 0.0
        t0 = time.monotonic()
        for rows in micro_batches:
            ids, attn, mask = (x.to(engine.device) for x in pad_rows(rows, engine.pad_id))  # [n, T] each
            logits = engine(input_ids=ids, attention_mask=attn).logits[:, :-1]  # [n, T-1, V]
            loss, m = sft_loss(logits, ids[:, 1:], mask[:, 1:], agg_mode="token_mean",
                               num_sequences=None, num_tokens=global_tokens)
            engine.backward_step(loss)
            nll_sum += float(m.nll_sum)
            tokens += float(m.token_count)
            correct += float(m.correct_count)
        self.version += 1
        return SFTStepStats(nll_sum=nll_sum, tokens=tokens, correct=correct, seconds=time.monotonic() - t0)
