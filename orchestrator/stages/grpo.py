"""The ``grpo`` stage: reasoning RL with GRPO (DeepSeek-R1 §2.2, §2.3.2, §2.3.4).

One step, as the driver sees it (``GRPOTrainer.step``):

    prompts  = sample B prompts
    streams  = rollout engines sample G completions per prompt, yielding groups as they finish
    each group → reward actor → reference actor (if β > 0) → a learner rank, as it arrives
    stats    = learner ranks update (DeepSpeed) on the groups they were fed
    push     = learner rank 0 broadcasts the new weights to every engine

Generation may run ``grpo.max_staleness_steps`` steps ahead of learning (0: on-policy).
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import ray

from actors.rollout import PromptItem
from learner.worker import StepStats
from orchestrator import cluster
from orchestrator.config import GRPOStageConfig, dump_config
from orchestrator.metrics import MetricsLogger
from orchestrator.tasks import TaskRow, load_rows
from orchestrator.templates import render_prompt

log = logging.getLogger(__name__)


class PromptSampler:
    """Epochs over the training prompts, shuffled with the run's seed."""

    def __init__(self, items: list[PromptItem], *, seed: int, shuffle: bool) -> None:
        self.items, self.shuffle = items, shuffle
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def next(self, n: int) -> list[PromptItem]:
        out = []
        while len(out) < n:
            if not self.order:
                self.order = list(range(len(self.items)))
                if self.shuffle:
                    self.rng.shuffle(self.order)
            out.append(self.items[self.order.pop()])
        return out


def tokenize_prompts(rows: list[TaskRow], tokenizer, template: str) -> list[PromptItem]:
    items = []
    for i, row in enumerate(rows):
        text = render_prompt(row.prompt, template, tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        items.append(PromptItem(i, tuple(ids), row.answer))
    return items


@dataclass
class _Launch:
    """One step's generation, in flight."""

    streams: list
    started: float


class GRPOTrainer:
    def __init__(self, cfg: GRPOStageConfig) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.run_dir = cfg.run.dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, self.run_dir / "config.yaml")
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        rows = load_rows(cfg.data.train_path, prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key)
        self.sampler = PromptSampler(tokenize_prompts(rows, self.tokenizer, cfg.data.template),
                                     seed=cfg.run.seed, shuffle=cfg.data.shuffle)
        cluster.connect(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus)
        self.actors = cluster.start_grpo_actors(cfg, cfg.model.path)
        backend = ray.get(self.actors.learners[0].collective_backend.remote())
        cluster.init_weight_push(self.actors, backend, cfg.rollout.tensor_parallel_size)
        self.version = 0
        self.launched: deque[_Launch] = deque()
        self._fed = 0

    # -- the algorithm --------------------------------------------------------------------
    def step(self, step: int) -> dict:
        t0 = time.monotonic()
        self.launch_generation(up_to_ahead=self.cfg.grpo.max_staleness_steps)
        learning = [w.train_step.remote(step) for w in self.actors.learners]
        rollout_s = self.stream_into_learners(self.launched.popleft())
        stats = self.merge(ray.get(learning))
        self.version += 1
        push_s = self.push_weights(self.version)
        return self.record(step, stats, rollout_s, push_s, time.monotonic() - t0)

    def launch_generation(self, up_to_ahead: int) -> None:
        """Start generation for this step and up to ``up_to_ahead`` steps beyond it."""
        while len(self.launched) <= up_to_ahead:
            prompts = self.sampler.next(self.cfg.grpo.prompts_per_step)
            engines = self.actors.rollouts
            chunks = [prompts[i :: len(engines)] for i in range(len(engines))]
            streams = [
                e.stream_groups.options(num_returns="streaming").remote(c, self.cfg.grpo.samples_per_prompt)
                for e, c in zip(engines, chunks, strict=True) if c
            ]
            self.launched.append(_Launch(streams, time.monotonic()))

    def stream_into_learners(self, launch: _Launch) -> float:
        """Route each finished group through reward (and reference) to a learner rank."""
        a = self.actors
        pending = list(launch.streams)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            stream = ready[0]
            try:
                group_ref = next(stream)
            except StopIteration:
                continue
            pending.append(stream)
            scored = a.rewards[self._fed % len(a.rewards)].score.remote(group_ref)
            if a.reference is not None:
                scored = a.reference.add_ref_logprobs.remote(scored)
            a.learners[self._fed % len(a.learners)].feed.remote([scored])
            self._fed += 1
        return time.monotonic() - launch.started

    def push_weights(self, version: int) -> float:
        t0 = time.monotonic()
        refs = [w.push_weights.remote(version) for w in self.actors.learners]
        refs += [e.receive_weights.remote(version) for e in self.actors.rollouts]
        ray.get(refs)
        return time.monotonic() - t0

    @staticmethod
    def merge(per_rank: list[StepStats]) -> StepStats:
        total = per_rank[0]
        for s in per_rank[1:]:
            total = total.merge(s)
        return total

    def record(self, step: int, stats: StepStats, rollout_s: float, push_s: float, step_s: float) -> dict:
        m = stats.finalize()
        return {
            "step": step,
            "policy_version": self.version,
            **m,
            "rollout_tokens_per_s": stats.response_tokens / rollout_s if rollout_s > 0 else float("nan"),
            "weight_push_s": push_s,
            "step_s": step_s,
        }

    # -- outputs ----------------------------------------------------------------------------
    def save_final(self) -> Path:
        out = self.run_dir / "final"
        ray.get([w.save_hf.remote(str(out)) for w in self.actors.learners])
        self.tokenizer.save_pretrained(out)
        return out

    def shutdown(self) -> None:
        self.actors.shutdown()


Config = GRPOStageConfig


def check_inputs(cfg: GRPOStageConfig) -> None:
    """Fail before any actor starts when the model or data is missing."""
    from orchestrator.stages import StageError

    model = Path(cfg.model.path)
    # A hub id is "org/name"; anything else that names no existing path is a mistake.
    looks_local = model.is_absolute() or cfg.model.path.startswith(".") or cfg.model.path.count("/") != 1
    if looks_local and not model.exists():
        raise StageError(f"model.path {model} does not exist; build a tiny one with `r1lab init-model {model}`")
    for key in ("train_path", "test_path"):
        path = getattr(cfg.data, key)
        if path is not None and not Path(path).exists():
            raise StageError(f"data.{key} {path} does not exist; make one with "
                             f"`r1lab data make addition --out {Path(path).parent}`")


def progress_line(r: dict) -> str:
    return (f"reward {r['reward_mean']:.3f}  acc {r['accuracy']:.3f}  fmt {r['format_ok']:.2f}  "
            f"kl {r['kl']:.4f}  {r['step_s']:.1f}s/step")


def run(cfg: GRPOStageConfig, progress=None) -> Path:
    """Run the stage; returns the run directory."""
    check_inputs(cfg)
    trainer = GRPOTrainer(cfg)
    metrics = MetricsLogger(trainer.run_dir, config=cfg.model_dump(mode="json"),
                            mode=cfg.logging.wandb_mode, project=cfg.logging.wandb_project,
                            name=cfg.run.name)
    try:
        for step in range(1, cfg.grpo.steps + 1):
            record = trainer.step(step)
            metrics.log(record)
            if progress is not None:
                progress(step, cfg.grpo.steps, progress_line(record))
        trainer.save_final()
    finally:
        metrics.close()
        trainer.shutdown()
    return trainer.run_dir
