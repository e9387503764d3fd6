"""The ``sft`` stage: supervised fine-tuning on the DeepSpeed learner group.

Used for the cold start (§2.3.1), for the rejection-sampled data (§2.3.3) and for
distillation (§2.4). Rows are ``(prompt, response)`` pairs; the loss is taken on the
response tokens only (the prompt is conditioned on), as a token mean over each step's
global batch. Each step's sequences are split over learner ranks and into micro-batches
of ``micro_batch_sequences``, sorted by length within the step so that padding stays small.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from learner.config import LearnerConfig
from orchestrator import cluster, inputs, preflight, storage, supervise
from orchestrator.config import ClusterConfig, FrozenModel, LoggingConfig, ModelConfig, RunConfig
from orchestrator.metrics import MetricsLogger
from tasks.data_files import DataError, load_pairs
from tasks.templates import render_prompt

log = logging.getLogger(__name__)


class SFTDataConfig(FrozenModel):
    train_path: str = Field(description="a .jsonl, .json or .parquet file, or a datasets save_to_disk folder "
                            "(a path, or a URI pyarrow.fs opens: read on the driver)")
    extra_train_paths: tuple[str, ...] = Field(
        default=(), description="more files of the same shape, trained on together with train_path "
        "(e.g. the non-reasoning data of §2.3.3 beside the rejection-sampled reasoning data)")
    split: str | None = Field(default=None, description="the split to read from paths that hold several "
                              "(a saved DatasetDict, or a folder of train.parquet, test.jsonl, ...)")
    prompt_key: str = "prompt"
    response_key: str = "response"
    template: Literal["none", "r1zero", "plain", "chat"] = Field(
        default="none", description="none: the prompt field is already the full prompt text")


class SFTConfig(FrozenModel):
    epochs: int = Field(default=2, ge=1, description="paper §2.3.3: two epochs")
    sequences_per_step: int = Field(default=32, ge=1)
    micro_batch_sequences: int = Field(default=8, ge=1)
    max_seq_tokens: int = Field(default=1024, ge=8, description="longer examples are dropped and counted")
    shuffle: bool = True


class Config(FrozenModel):
    run: RunConfig = RunConfig(name="sft")
    model: ModelConfig
    data: SFTDataConfig
    sft: SFTConfig = SFTConfig()
    learner: LearnerConfig = LearnerConfig(learning_rate=1e-5)
    cluster: ClusterConfig = ClusterConfig()
    logging: LoggingConfig = LoggingConfig()

    def model_post_init(self, __context) -> None:
        per_rank, rem = divmod(self.sft.sequences_per_step, self.cluster.learner_workers)
        if rem or per_rank % self.sft.micro_batch_sequences:
            raise ValueError(
                f"sft.sequences_per_step ({self.sft.sequences_per_step}) must be a multiple of "
                f"cluster.learner_workers × sft.micro_batch_sequences "
                f"({self.cluster.learner_workers} × {self.sft.micro_batch_sequences})"
            )

    @property
    def micro_batches_per_rank(self) -> int:
        return self.sft.sequences_per_step // self.cluster.learner_workers // self.sft.micro_batch_sequences


def load_examples(cfg: Config, tokenizer) -> tuple[list[tuple[tuple[int, ...], tuple[int, ...]]], int]:
    """Tokenised (prompt, response + EOS) pairs, and how many were too long."""
    from orchestrator.preflight import PreflightError

    d = cfg.data
    for path in (d.train_path, *d.extra_train_paths):
        if not Path(path).exists():
            raise PreflightError(f"SFT data file {path} does not exist (an SFT JSONL with {d.prompt_key!r} and "
                             f"{d.response_key!r} fields, e.g. the sample stage's sft.jsonl)")
    out, too_long = [], 0
    eos = tokenizer.eos_token or ""
    try:
        pairs = [pair for path in (d.train_path, *d.extra_train_paths)
                 for pair in load_pairs(path, prompt_key=d.prompt_key, response_key=d.response_key, split=d.split)]
    except DataError as err:
        raise PreflightError(str(err)) from None
    for prompt, response in pairs:
        prompt = prompt if d.template == "none" else render_prompt(prompt, d.template, tokenizer)
        p = tuple(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        r = tuple(tokenizer(response + eos, add_special_tokens=False)["input_ids"])
        if len(p) + len(r) > cfg.sft.max_seq_tokens:
            too_long += 1
            continue
        out.append((p, r))
    if not out:
        raise PreflightError(f"{d.train_path} has no usable rows ({too_long} longer than sft.max_seq_tokens)")
    return out, too_long


def run(cfg: Config, progress=None) -> Path:
    from transformers import AutoTokenizer

    prepared = storage.prepare(cfg, models=MODEL_INPUTS, data=DATA_INPUTS)
    cfg, run = prepared.local, prepared.run
    inputs.check_model(cfg.model.path)
    params = preflight.model_parameters(cfg.model.path)
    claim = preflight.fresh_run(run, cfg.run, stage="sft", need=None if params is None else 4 * params,
                                what="final/ (fp32, 4 bytes a parameter)")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    examples, too_long = load_examples(cfg, tokenizer)
    steps_per_epoch = len(examples) // cfg.sft.sequences_per_step
    if steps_per_epoch == 0:
        raise preflight.PreflightError(f"{len(examples)} examples are fewer than sft.sequences_per_step="
                                       f"{cfg.sft.sequences_per_step}: lower it, or give more data")
    claim.take()
    prepared.write_config()
    if too_long:
        log.warning("dropped %d examples longer than sft.max_seq_tokens=%d", too_long, cfg.sft.max_seq_tokens)
    total = steps_per_epoch * cfg.sft.epochs

    learners = cluster.SFTLearners(cfg.learner, cfg.sft.micro_batch_sequences, cfg.micro_batches_per_rank)
    cluster.connect(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus, dashboard=cfg.cluster.dashboard)
    prepared.check_cluster()
    actors = cluster.start(cluster.StageParts(cfg.model.path, cfg.cluster, run_name=cfg.run.name, seed=cfg.run.seed,
                                              learners=learners), roles=("learner",))
    workers = actors.learners
    metrics = MetricsLogger(run, config=cfg.model_dump(mode="json"), mode=cfg.logging.wandb_mode,
                            project=cfg.logging.wandb_project, name=cfg.run.name)
    rng = random.Random(cfg.run.seed)
    try:
        step = 0
        for epoch in range(cfg.sft.epochs):
            order = list(range(len(examples)))
            if cfg.sft.shuffle:
                rng.shuffle(order)
            for k in range(steps_per_epoch):
                step += 1
                t0 = time.monotonic()
                batch = [examples[i] for i in order[k * cfg.sft.sequences_per_step:(k + 1) * cfg.sft.sequences_per_step]]
                shards = _split(batch, cfg.cluster.learner_workers, cfg.sft.micro_batch_sequences)
                tokens = sum(len(r) for _, r in batch)
                results = supervise.await_all(
                    [(f"learner {i}", w, w.sft_step.remote(s, tokens))
                     for i, (w, s) in enumerate(zip(workers, shards, strict=True))],
                    f"SFT step {step}", cfg.run.hang_grace_s + tokens / cfg.run.min_tokens_per_s)
                nll = sum(r.nll_sum for r in results) / tokens
                record = {"step": step, "epoch": epoch + 1, "loss": nll,
                          "token_accuracy": sum(r.correct for r in results) / tokens,
                          "tokens_per_s": tokens / max(r.seconds for r in results),
                          "step_s": time.monotonic() - t0}
                metrics.log(record)
                if progress is not None:
                    progress(step, total, f"epoch {epoch + 1}  loss {nll:.4f}  ppl {math.exp(min(nll, 50)):.2f}")
        cluster.save_final(run, workers, tokenizer)
    finally:
        metrics.close()
        actors.shutdown()
    return run.local


MODEL_INPUTS = ("model.path",)
DATA_INPUTS = ("data.train_path", "data.extra_train_paths")


def _split(batch, ranks: int, micro: int) -> list[list[list]]:
    """Length-sorted, dealt round-robin to ranks, then cut into micro-batches."""
    ordered = sorted(batch, key=lambda pr: len(pr[0]) + len(pr[1]))
    per_rank = [ordered[r::ranks] for r in range(ranks)]
    return [[rows[i:i + micro] for i in range(0, len(rows), micro)] for rows in per_rank]
