"""Reference actor: log-probs of sampled completions under the frozen π_ref (eq. 2)."""

from __future__ import annotations

import torch

from actors.config import ReferenceConfig
from learner import grpo
from learner.batch import ScoredGroup


class ReferenceActor:
    """Holds the initial policy, frozen, and scores groups with its token log-probs."""

    def __init__(self, model_path: str, config: ReferenceConfig, *, temperature: float) -> None:
        from transformers import AutoModelForCausalLM

        self.config = config
        self.temperature = temperature
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        dtype = torch.bfloat16 if config.dtype == "bf16" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device)
        self.model.eval()
        self.model.requires_grad_(False)
        self.pad_id = int(self.model.config.pad_token_id or self.model.config.eos_token_id or 0)

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
            width = len(prompt) + max(len(c.token_ids) for c in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)  # [n, T]
            attn = torch.zeros((len(chunk), width), dtype=torch.long)  # [n, T]
            for i, c in enumerate(chunk):
                seq = prompt + c.token_ids
                ids[i, : len(seq)] = torch.tensor(seq)
                attn[i, : len(seq)] = 1
            ids, attn = ids.to(self.device), attn.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # [n, T-1, V]
            lp = grpo.token_logprobs(logits, ids[:, 1:], temperature=self.temperature).cpu()  # [n, T-1]
            for i, c in enumerate(chunk):
                first = len(prompt) - 1  # logits at t predict token t+1
                out.append(lp[i, first : first + len(c.token_ids)].tolist())
        return scored.with_ref_logprobs(out)
