"""Reward-model actor (DeepSeek-R1 §2.3.4): learned rewards for general prompts.

Reasoning prompts are scored by rules; general prompts by reward models, Hugging Face
sequence-classification models. The paper judges helpfulness on the final summary only
(so the reward does not reach into the reasoning) and harmlessness on the whole response,
reasoning included. Each ``RewardModelSpec`` names a model, a ``scope`` (``summary`` or
``response``), the logit that is its score and the prompt types it scores; its weighted
score is added to the group's rule rewards and kept as a named component for metrics.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from actors.telemetry import Telemetry
from learner.batch import ScoredGroup
from learner.startup import gc_paused
from rewards.basic import summary_of
from rewards.config import RewardModelSpec
from rewards.model_input import model_input


class RewardModelActor:
    """Holds the reward models (one copy per distinct path) and scores groups with them.

    Groups of a prompt type no reward model scores pass through unchanged, so the driver
    can send every group here after the rule rewards.
    """

    @gc_paused(freeze=False)  # transformers' imports and the models' load (learner.startup)
    def __init__(self, specs: Sequence[RewardModelSpec], run_name: str = "", *,
                 device: str = "auto", trust_remote_code: bool = False) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not specs:
            raise ValueError("RewardModelActor needs at least one RewardModelSpec")
        self.specs = {s.name: s for s in specs}
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if device == "auto" else device))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.telemetry = Telemetry(run_name, "reward-model")
        self._models: dict[str, tuple[object, object]] = {}
        for spec in specs:
            if spec.path in self._models:
                continue
            try:
                tokenizer = AutoTokenizer.from_pretrained(spec.path, trust_remote_code=trust_remote_code)
                model = AutoModelForSequenceClassification.from_pretrained(
                    spec.path, dtype=dtype, trust_remote_code=trust_remote_code)
            except (OSError, ValueError) as err:
                raise ValueError(f"reward model {spec.name!r}: cannot load {spec.path} as a sequence-"
                                 f"classification model ({err}); build a tiny one with "
                                 f"`r1lab init-reward-model`") from None
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            tokenizer.truncation_side = "left"  # an overlong input keeps its end (the summary)
            self._models[spec.path] = (tokenizer, model.to(self.device).eval())
        for spec in specs:
            labels = self._models[spec.path][1].config.num_labels
            if spec.label >= labels:
                raise ValueError(f"reward model {spec.name!r}: label {spec.label} but {spec.path} "
                                 f"has {labels} output(s); set label below {labels}")

    def ready(self) -> bool:
        return True

    def score_texts(self, name: str, questions: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Raw scores of reward model ``name`` (its scope applied) for question/response pairs."""
        import torch

        spec = self.specs[name]
        tokenizer, model = self._models[spec.path]
        segments = [summary_of(r) if spec.scope == "summary" else r for r in responses]
        texts = [model_input(tokenizer, q, s, spec.input_format) for q, s in zip(questions, segments, strict=True)]
        scores: list[float] = []
        with torch.no_grad():
            for i in range(0, len(texts), spec.batch_size):
                enc = tokenizer(texts[i:i + spec.batch_size], return_tensors="pt", padding=True,
                                truncation=True, max_length=spec.max_input_tokens).to(self.device)
                logits = model(**enc).logits.float()
                scores.extend(logits[:, spec.label].tolist())
        return scores

    def score(self, scored: ScoredGroup) -> ScoredGroup:
        """``scored`` with every applicable reward model's weighted score added."""
        g = scored.group
        specs = [s for s in self.specs.values() if g.kind in s.kinds]
        if not specs:
            return scored
        start = time.monotonic()
        responses = [c.text for c in g.completions]
        for spec in specs:
            raw = self.score_texts(spec.name, [g.question] * len(responses), responses)
            scored = scored.with_added(spec.name, [spec.weight * x for x in raw], raw)
        self.telemetry.observe("reward_model_seconds", time.monotonic() - start)
        return scored

    def score_groups(self, *scored: ScoredGroup) -> tuple[ScoredGroup, ...]:
        """``score`` of several groups in one call, one result each."""
        return tuple(self.score(s) for s in scored)
