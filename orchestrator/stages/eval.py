"""The ``eval`` stage: pass@1, cons@k and pass@k of a checkpoint (DeepSeek-R1 §3).

Per benchmark, as the driver sees it:

    questions = benchmark rows, templated and tokenised
    groups    = rollout engines sample k completions per question (T = 0.6, top-p = 0.95)
    verdicts  = reward actors grade every completion with the benchmark's reward
    scores    = pass@1 (mean over samples, then questions), cons@k (majority vote over
                final answers, equivalent answers voting together), unbiased pass@k

The estimators are in ``evaluation/estimators.py``. ``evaluate_checkpoint`` is the
same work as a function for other callers (``r1lab demo``): it starts its own rollout
and reward actors on the connected cluster (``orchestrator.cluster.start``), evaluates
(``orchestrator.supervise.collect``), and kills them, so one driver can evaluate several
checkpoints without restarting Ray.

What votes in cons@k is each reward's own (``rewards.registry``: the final answer for
math rewards, equivalent answers voting together; the ``<answer>`` text for
``exact_answer``; the normalised program for ``code_tests``; otherwise the verdict);
``evaluation.vote`` applies it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from actors.config import RolloutConfig
from evaluation.estimators import consensus_correct, mean, mean_pass_at_k
from learner.batch import ScoredGroup
from orchestrator import cluster as cluster_mod
from orchestrator import inputs, preflight, storage, supervise
from orchestrator.config import (
    ClusterConfig,
    FrozenModel,
    LoggingConfig,
    ModelConfig,
    RunConfig,
    check_room_for_prompt,
)
from orchestrator.stages import Progress
from evaluation.vote import same_vote, vote_key
from rewards.config import RewardsConfig
from tasks.benchmarks import FORMATS, Benchmark, load_benchmark

log = logging.getLogger(__name__)


# -- configuration --------------------------------------------------------------------------


class BenchmarkSpec(FrozenModel):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    path: str = Field(description="a benchmark file: a path, or a URI pyarrow.fs opens (read on the driver)")
    format: Literal["task", "math500", "gsm8k", "humaneval", "mbpp"] | None = Field(
        default=None, description=f"one of {', '.join(FORMATS)}; None = detect from the fields")
    limit: int | None = Field(default=None, ge=1, description="evaluate the first N rows only")


class EvalConfig(FrozenModel):
    """Paper §3: k samples per question at T = 0.6, top-p = 0.95 (k = 64 in the paper's
    tables; 16 here, a quarter of the cost, still a low-variance pass@1)."""

    benchmarks: tuple[BenchmarkSpec, ...] = Field(min_length=1)
    samples_per_prompt: int = Field(default=16, ge=1, description="k")
    temperature: float = Field(default=0.6, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    max_new_tokens: int | None = Field(default=None, ge=1, description="None = rollout.max_new_tokens "
                                       "(the paper allows 32,768)")
    pass_at_k: tuple[int, ...] | None = Field(
        default=None, description="k values for unbiased pass@k; None = 1 and powers of 2 up to samples_per_prompt")
    template: Literal["r1zero", "plain", "chat"] = "r1zero"
    save_samples: bool = Field(default=True, description="write every completion and verdict to samples.jsonl")

    @field_validator("benchmarks")
    @classmethod
    def _unique(cls, specs: tuple[BenchmarkSpec, ...]) -> tuple[BenchmarkSpec, ...]:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"benchmark names must be unique, got {names}")
        return specs

    @model_validator(mode="after")
    def _k_values(self) -> EvalConfig:
        for k in self.pass_at_k or ():
            if not 1 <= k <= self.samples_per_prompt:
                raise ValueError(f"eval.pass_at_k has {k}, but pass@k needs 1 <= k <= "
                                 f"eval.samples_per_prompt ({self.samples_per_prompt})")
        return self

    @property
    def k_values(self) -> tuple[int, ...]:
        if self.pass_at_k is not None:
            return tuple(sorted(set(self.pass_at_k)))
        out, k = [], 1
        while k <= self.samples_per_prompt:
            out.append(k)
            k *= 2
        return tuple(out)


class EvalStageConfig(FrozenModel):
    """Everything the ``eval`` stage needs."""

    run: RunConfig = RunConfig(name="eval")
    model: ModelConfig
    eval: EvalConfig
    rollout: RolloutConfig = RolloutConfig()
    rewards: RewardsConfig = RewardsConfig()
    cluster: ClusterConfig = ClusterConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _fits(self) -> EvalStageConfig:
        check_room_for_prompt(self.eval.max_new_tokens or self.rollout.max_new_tokens, self.rollout, "max_new_tokens")
        return self


Config = EvalStageConfig


# -- results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleRecord:
    """One graded completion."""

    benchmark: str
    prompt_index: int
    sample_index: int
    correct: bool
    reward: float
    format_ok: float  # nan: no format reward configured
    answer: str | None  # what it votes for in cons@k (see the module docstring)
    response_tokens: int
    finish_reason: str
    text: str


@dataclass(frozen=True)
class BenchmarkResult:
    name: str
    format: str
    reward: str
    n_prompts: int
    k: int
    pass_at_1: float
    cons_at_k: float
    pass_at_k: dict[int, float]
    mean_response_tokens: float
    truncated: float  # share of completions cut off at max_new_tokens
    format_ok: float
    samples: tuple[SampleRecord, ...] = field(repr=False, default=())

    def summary(self) -> dict:
        return {"name": self.name, "format": self.format, "reward": self.reward,
                "n_prompts": self.n_prompts, "k": self.k, "pass@1": self.pass_at_1,
                "cons@k": self.cons_at_k,
                "pass@k": {str(k): v for k, v in self.pass_at_k.items()},
                "mean_response_tokens": self.mean_response_tokens, "truncated": self.truncated,
                "format_ok": self.format_ok}


@dataclass(frozen=True)
class EvalResult:
    model_path: str
    params: int | None
    temperature: float
    top_p: float
    max_new_tokens: int
    benchmarks: tuple[BenchmarkResult, ...]

    def summary(self) -> dict:
        return {"model": self.model_path, "params": self.params, "temperature": self.temperature,
                "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "benchmarks": [b.summary() for b in self.benchmarks]}

    def by_name(self, name: str) -> BenchmarkResult:
        for b in self.benchmarks:
            if b.name == name:
                return b
        raise KeyError(f"no benchmark {name!r}; have {[b.name for b in self.benchmarks]}")




# -- evaluation -------------------------------------------------------------------------------


def count_params(model_path: str) -> int | None:
    """Parameters in a local safetensors checkpoint, read from the headers (no weights
    loaded); None for a hub id or another format."""
    files = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                total += math.prod(st.get_slice(name).get_shape())
    return total


def score_benchmark(bench: Benchmark, groups: Sequence[ScoredGroup], settings: EvalConfig,
                    rewards: RewardsConfig) -> BenchmarkResult:
    """The benchmark's numbers from its graded groups."""
    k = settings.samples_per_prompt
    options = dict(next((s.options for s in rewards.rewards if s.name == bench.reward), {}))
    records: list[SampleRecord] = []
    answers: list[list[str | None]] = []
    verdicts: list[list[bool]] = []
    for sg in groups:
        correct = [a == 1.0 for a in sg.accuracy]
        keys = [vote_key(bench.reward, c.text, ok, options) for c, ok in zip(sg.group.completions, correct, strict=True)]
        answers.append(keys)
        verdicts.append(correct)
        for j, c in enumerate(sg.group.completions):
            records.append(SampleRecord(bench.name, sg.group.prompt_index, j, correct[j], sg.rewards[j],
                                        sg.format_ok[j], keys[j], len(c.token_ids), c.finish_reason, c.text))
    same = same_vote(bench.reward, answers, options, workers=rewards.workers, timeout_s=rewards.timeout_s)
    counts = [(len(v), sum(v)) for v in verdicts]
    fmt = [r.format_ok for r in records if not math.isnan(r.format_ok)]
    return BenchmarkResult(
        name=bench.name, format=bench.format, reward=bench.reward, n_prompts=len(groups), k=k,
        pass_at_1=mean_pass_at_k(counts, 1),
        cons_at_k=mean([float(consensus_correct(a, v, same=same)) for a, v in zip(answers, verdicts, strict=True)]),
        pass_at_k={kk: mean_pass_at_k(counts, kk) for kk in settings.k_values},
        mean_response_tokens=mean([r.response_tokens for r in records]),
        truncated=mean([float(r.finish_reason == "length") for r in records]),
        format_ok=mean(fmt),
        samples=tuple(records),
    )


def evaluate_checkpoint(model_path: str, settings: EvalConfig, benchmarks: Sequence[Benchmark], *,
                        rollout: RolloutConfig, rewards: RewardsConfig, cluster: ClusterConfig,
                        progress: Progress | None = None) -> EvalResult:
    """Evaluate one checkpoint on ``benchmarks`` on the connected Ray cluster (or an
    embedded one): starts rollout and reward actors, evaluates, kills them."""
    from transformers import AutoTokenizer

    cluster_mod.connect(cluster.address, num_cpus=cluster.num_cpus)
    max_new = settings.max_new_tokens or rollout.max_new_tokens
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = {b.name: inputs.tokenize([r.prompt for r in b.rows], [r.reference for r in b.rows], tokenizer,
                                       settings.template) for b in benchmarks}
    for b in benchmarks:
        inputs.check_lengths(prompts[b.name], max_new, rollout.max_model_len, f"benchmark {b.name}")
    reward_sets = {b.reward: inputs.rewards_for(b.reward, rewards) for b in benchmarks}
    total, done = sum(len(b.rows) for b in benchmarks), 0
    parts = cluster_mod.StageParts(model_path, cluster, rollout=rollout, reward_sets=reward_sets)
    actors = cluster_mod.start(parts, roles=("rollout", "reward"))
    results = []
    try:
        for slot, b in enumerate(benchmarks):
            def tick(name: str = b.name) -> None:
                nonlocal done
                done += 1
                if progress is not None:
                    progress(done, total, f"{name}: sampling")

            keeper = supervise.sampling_keeper(actors, prompts=len(prompts[b.name]),
                                               samples=settings.samples_per_prompt, max_new_tokens=max_new,
                                               max_model_len=rollout.max_model_len, rewards=reward_sets[b.reward])
            groups = supervise.collect(actors, keeper, prompts[b.name], settings.samples_per_prompt,
                                       rewards=actors.reward_sets[b.reward], on_group=tick,
                                       seed=(rollout.seed, slot), temperature=settings.temperature,
                                       top_p=settings.top_p, max_new_tokens=max_new)
            result = score_benchmark(b, groups, settings, reward_sets[b.reward])
            log.info("%s: pass@1 %.3f cons@%d %.3f", b.name, result.pass_at_1, result.k, result.cons_at_k)
            if progress is not None:
                progress(done, total, f"{b.name}: pass@1 {result.pass_at_1:.3f}")
            results.append(result)
    finally:
        actors.shutdown()
    return EvalResult(model_path, count_params(model_path), settings.temperature, settings.top_p, max_new,
                      tuple(results))


def load_benchmarks(settings: EvalConfig, rewards: RewardsConfig) -> list[Benchmark]:
    """The configured benchmarks; a ``task`` file is graded by ``rewards.accuracy_reward``."""
    return [load_benchmark(s.path, name=s.name, format=s.format, limit=s.limit,
                           task_reward=rewards.accuracy_reward) for s in settings.benchmarks]


def results_table(result: EvalResult):
    """A rich table: one row per benchmark."""
    from rich.table import Table

    ks = sorted({k for b in result.benchmarks for k in b.pass_at_k if k > 1})
    table = Table(title=f"{result.model_path}  (T={result.temperature}, top-p={result.top_p})")
    table.add_column("benchmark", no_wrap=True)
    for col in ("prompts", "k", "pass@1", "cons@k", *(f"pass@{k}" for k in ks), "tokens"):
        table.add_column(col, justify="right")
    for b in result.benchmarks:
        table.add_row(b.name, str(b.n_prompts), str(b.k), f"{b.pass_at_1:.3f}", f"{b.cons_at_k:.3f}",
                      *(f"{b.pass_at_k[k]:.3f}" if k in b.pass_at_k else "" for k in ks),
                      f"{b.mean_response_tokens:.0f}")
    return table


def write_results(result: EvalResult, run: storage.RunStorage, *, samples: bool = True) -> Path:
    path = run.write_text("results.json", json.dumps(result.summary(), indent=2) + "\n")
    if samples:
        lines = []
        for b in result.benchmarks:
            for r in b.samples:
                row = asdict(r)
                row["format_ok"] = None if math.isnan(r.format_ok) else r.format_ok
                lines.append(json.dumps(row) + "\n")
        run.write_text("samples.jsonl", "".join(lines))
    return path


def run(cfg: EvalStageConfig, progress: Progress | None = None) -> Path:
    """Run the stage; returns the run directory (``results.json``, ``samples.jsonl``)."""
    prepared = storage.prepare(cfg, models=("model.path",), data=("eval.benchmarks.*.path",))
    cfg, run = prepared.local, prepared.run
    inputs.check_model(cfg.model.path)
    inputs.check_files([s.path for s in cfg.eval.benchmarks], "benchmark file")
    claim = preflight.fresh_run(run, cfg.run, stage="eval")
    try:
        benchmarks = load_benchmarks(cfg.eval, cfg.rewards)
    except ValueError as err:  # a bad row, named in the message
        raise preflight.PreflightError(str(err)) from None
    claim.take()
    prepared.write_config()
    cluster_mod.connect(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus, dashboard=cfg.cluster.dashboard)
    prepared.check_cluster()
    result = evaluate_checkpoint(cfg.model.path, cfg.eval, benchmarks, rollout=cfg.rollout, rewards=cfg.rewards,
                                 cluster=cfg.cluster, progress=progress)
    write_results(result, run, samples=cfg.eval.save_samples)
    if cfg.logging.progress:
        from rich.console import Console

        Console().print(results_table(result))
    return run.local
