"""The ``sample`` stage: rejection sampling into an SFT dataset (DeepSeek-R1 §2.3.3).

    questions = data.train_path rows (the first ``sample.limit_prompts``), templated
    groups    = rollout engines sample k completions per question
    verdicts  = reward actors grade each completion (``rewards.accuracy_reward``)
    kept      = correct, readable (no language mixing, no overlong paragraph, no code
                block in the CoT), not a duplicate, at most ``sample.max_per_prompt``
    output    = sft.jsonl (prompt, response, source_index) and stats.json (why each
                dropped sample was dropped; the counts add up)

The rules are pure functions in ``evaluation/filters.py``. Actors are started and
groups generated with the eval stage's helpers.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from actors.config import RolloutConfig
from tasks.benchmarks import Benchmark, BenchmarkRow, load_benchmark
from orchestrator.config import FrozenModel, ClusterConfig, DataConfig, LoggingConfig, ModelConfig, RunConfig, check_room_for_prompt, dump_config
from evaluation.filters import REASONS, ReadabilityRules, select
from orchestrator.stages.eval import (
    Progress,
    check_inputs,
    check_lengths,
    generate_scored,
    rewards_for,
    start_inference_actors,
    tokenize,
)
from tasks.data_files import load_rows
from tasks.templates import render_prompt
from rewards.config import RewardsConfig

log = logging.getLogger(__name__)


class SampleConfig(FrozenModel):
    """Sampling uses the paper's recommended T = 0.6, top-p = 0.95 (§3 and the R1 model
    card), not the RL temperature 1: this stage exists to collect *readable* data, and
    hotter samples from a small checkpoint are more often incoherent or mixed-language,
    only to be filtered out. Diversity comes from k and de-duplication."""

    samples_per_prompt: int = Field(default=16, ge=1, description="k")
    temperature: float = Field(default=0.6, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    max_new_tokens: int | None = Field(default=None, ge=1, description="None = rollout.max_new_tokens")
    max_paragraph_chars: int = Field(default=2000, ge=1, description="longer paragraphs in the CoT are dropped")
    max_per_prompt: int | None = Field(default=None, ge=1, description="keep at most this many per prompt; None = all")
    limit_prompts: int | None = Field(default=None, ge=1, description="sample from the first N prompts only")
    language: str = Field(default="en", description="the CoT's target language (rewards.language.SCRIPTS)")
    min_language_share: float = Field(default=1.0, gt=0, le=1, description="below it the CoT mixes languages")
    format: Literal["task", "math500", "gsm8k", "humaneval", "mbpp"] | None = Field(
        default=None, description="read data.train_path as a benchmark format (its own reward); "
        "None = data.prompt_key / data.answer_key rows graded by rewards.accuracy_reward")

    @property
    def rules(self) -> ReadabilityRules:
        return ReadabilityRules(language=self.language, min_language_share=self.min_language_share,
                                max_paragraph_chars=self.max_paragraph_chars)


class SampleStageConfig(FrozenModel):
    """Everything the ``sample`` stage needs."""

    run: RunConfig = RunConfig(name="sample")
    model: ModelConfig
    data: DataConfig
    sample: SampleConfig = SampleConfig()
    rollout: RolloutConfig = RolloutConfig()
    rewards: RewardsConfig = RewardsConfig()
    cluster: ClusterConfig = ClusterConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _consistent(self) -> SampleStageConfig:
        self.sample.rules  # noqa: B018 - raises on an unknown language
        check_room_for_prompt(self.sample.max_new_tokens or self.rollout.max_new_tokens, self.rollout,
                              "max_new_tokens")
        return self


Config = SampleStageConfig


def load_prompts(cfg: SampleStageConfig) -> Benchmark:
    s, d = cfg.sample, cfg.data
    if s.format is not None:
        return load_benchmark(d.train_path, name="train", format=s.format, limit=s.limit_prompts,
                              task_reward=cfg.rewards.accuracy_reward, split=d.split)
    rows = load_rows(d.train_path, prompt_key=d.prompt_key, answer_key=d.answer_key, split=d.split)[: s.limit_prompts]
    return Benchmark("train", "task", tuple(BenchmarkRow(r.prompt, r.answer, cfg.rewards.accuracy_reward)
                                            for r in rows))


def run(cfg: SampleStageConfig, progress: Progress | None = None) -> Path:
    """Run the stage; returns the run directory (``sft.jsonl``, ``stats.json``)."""
    from transformers import AutoTokenizer

    check_inputs(cfg.model.path, [cfg.data.train_path])
    s = cfg.sample
    try:
        bench = load_prompts(cfg)
    except ValueError as err:  # a bad row, named in the message
        from orchestrator.stages import StageError

        raise StageError(str(err)) from None
    run_dir = cfg.run.dir
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    texts = [render_prompt(r.prompt, cfg.data.template, tokenizer) for r in bench.rows]
    items = tokenize([r.prompt for r in bench.rows], [r.reference for r in bench.rows], tokenizer, cfg.data.template)
    max_new = s.max_new_tokens or cfg.rollout.max_new_tokens
    check_lengths(items, max_new, cfg.rollout.max_model_len, f"data {cfg.data.train_path}")
    grading = rewards_for(bench.reward, cfg.rewards)

    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, len(items), "sampling")

    actors, graders = start_inference_actors(cfg.model.path, cfg.rollout, {bench.reward: grading}, cfg.cluster)
    try:
        groups = generate_scored(actors.rollouts, graders[bench.reward], items, s.samples_per_prompt,
                                 temperature=s.temperature, top_p=s.top_p, max_new_tokens=max_new, on_group=tick)
    finally:
        actors.shutdown()

    dropped: Counter[str] = Counter({r: 0 for r in REASONS})
    kept = prompts_kept = 0
    with (run_dir / "sft.jsonl").open("w") as f:
        for sg in groups:
            responses = [c.text for c in sg.group.completions]
            reasons = select(responses, [a == 1.0 for a in sg.accuracy], s.rules, max_per_prompt=s.max_per_prompt)
            dropped.update(r for r in reasons if r is not None)
            n = 0
            for text, reason in zip(responses, reasons, strict=True):
                if reason is None:
                    i = sg.group.prompt_index
                    f.write(json.dumps({"prompt": texts[i], "response": text, "source_index": i}) + "\n")
                    n += 1
            kept += n
            prompts_kept += n > 0
    total = sum(g.group.size for g in groups)
    stats = {
        "model": cfg.model.path, "data": str(cfg.data.train_path), "reward": bench.reward,
        "prompts": len(groups), "samples": total, "kept": kept, "prompts_with_kept": prompts_kept,
        "dropped": dict(dropped), "accuracy": sum(sum(g.accuracy) for g in groups) / total if total else 0.0,
        "temperature": s.temperature, "top_p": s.top_p, "max_new_tokens": max_new,
    }
    (run_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("kept %d of %d samples (%s)", kept, total, dict(dropped))
    if progress is not None:
        progress(done, len(items), f"kept {kept}/{total}")
    return run_dir
