"""Reference actor: log-probs of sampled completions under the frozen π_ref (eq. 2)."""

from __future__ import annotations

import torch

from actors.config import ReferenceConfig
from learner.batch import ScoredGroup, pad_rows, pad_token_id
from learner.logprobs import model_logprobs
from learner.startup import gc_paused


class ReferenceActor:
    """Holds the initial policy, frozen, and scores groups with its token log-probs."""

    @gc_paused(freeze=False)  # transformers' imports and the model load (learner.startup)
    def __init__(self, model_path: str, config: ReferenceConfig, *, temperature: float) -> None:
        from transformers import AutoModelForCausalLM

        self.config = config
        self.temperature = temperature
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        dtype = torch.bfloat16 if config.dtype == "bf16" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device)
        self.model.eval()
        self.model.requires_grad_(False)
        self.pad_id = pad_token_id(self.model.config)

    def ready(self) -> bool:
        return True

    @torch.no_grad()
    def add_ref_logprobs(self, scored: ScoredGroup) -> ScoredGroup:
        """``scored`` with ``ref_logprobs`` filled in (Ray resolves the ObjectRef argument)."""
        prompt = scored.group.prompt_ids
        out: list[list[float]] = []
        completions = scored.group.completions
        step = self.config.micro_batch_sequences
        for start in range(0, len(completions), step):
            chunk = completions[start : start + step]
            ids, attn, _ = pad_rows([(prompt, c.token_ids) for c in chunk], self.pad_id)  # [n, T] each
            ids, attn = ids.to(self.device), attn.to(self.device)
            lp = model_logprobs(self.model, ids, attn, temperature=self.temperature,
                                chunk_tokens=self.config.logprob_chunk_tokens).cpu()  # [n, T]
            for i, c in enumerate(chunk):
                out.append(lp[i, len(prompt) : len(prompt) + len(c.token_ids)].tolist())
        return scored.with_ref_logprobs(out)

    def add_ref_logprobs_groups(self, *scored: ScoredGroup) -> tuple[ScoredGroup, ...]:
        """``add_ref_logprobs`` of several groups in one call, one result each."""
        return tuple(self.add_ref_logprobs(s) for s in scored)
