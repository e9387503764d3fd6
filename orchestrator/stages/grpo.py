"""The ``grpo`` stage: reasoning RL with GRPO (DeepSeek-R1 §2.2, §2.3.2, §2.3.4).

One step, as the driver sees it (``GRPOTrainer.step``):

    prompts  = sample B prompts
    streams  = rollout engines sample G completions per prompt, yielding groups as they finish
    each group → reward actor → reward models (general prompts, §2.3.4) → reference actor
                 (if β > 0) → a learner rank, as it arrives
    stats    = learner ranks update (DeepSpeed) on the groups they were fed
    push     = learner rank 0 broadcasts the new weights to every engine

Generation may run ``grpo.max_staleness_steps`` steps ahead of learning (0: on-policy).
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import ray

from actors.rollout import PromptItem
from actors.telemetry import Telemetry
from learner.grpo_role import StepStats
from orchestrator import checkpoints, cluster, inputs, placement, storage, streaming
from orchestrator.config import GRPOStageConfig
from orchestrator.metrics import MetricsLogger, keep_through
from tasks.data_files import TaskRow, load_rows
from tasks.templates import render_prompt

log = logging.getLogger(__name__)

PROMPTS = "prompts.jsonl"  # per step: the indices of the prompts it trained on
LEARNER_TAG = "learner"  # the DeepSpeed tag inside a checkpoint folder
PENDING = "ahead.pkl"  # in a checkpoint: the groups generated for later steps


class PromptSampler:
    """Epochs over the training prompts, shuffled with the run's seed.

    With ``kind_weights`` (prompt type -> weight), each prompt slot first draws a type by
    weight, then the next prompt of that type from the type's own epoch, so a few general
    prompts can be mixed with many reasoning ones in a fixed proportion (§2.3.4).
    """

    def __init__(self, items: list[PromptItem], *, seed: int, shuffle: bool,
                 kind_weights: dict[str, float] | None = None) -> None:
        self.shuffle = shuffle
        self.rng = random.Random(seed)
        if kind_weights:
            missing = sorted(k for k, w in kind_weights.items() if w > 0 and not any(i.kind == k for i in items))
            if missing:
                raise ValueError(f"data.kind_weights names prompt kinds {missing} that the training data lacks")
            self.pools = {k: [i for i in items if i.kind == k] for k, w in kind_weights.items() if w > 0}
            self.weights = [kind_weights[k] for k in self.pools]
        else:
            self.pools, self.weights = {"*": list(items)}, [1.0]
        self.orders: dict[str, list[int]] = {k: [] for k in self.pools}

    def next(self, n: int) -> list[PromptItem]:
        out = []
        kinds = list(self.pools)
        for _ in range(n):
            kind = kinds[0] if len(kinds) == 1 else self.rng.choices(kinds, self.weights)[0]
            order = self.orders[kind]
            if not order:
                order.extend(range(len(self.pools[kind])))
                if self.shuffle:
                    self.rng.shuffle(order)
            out.append(self.pools[kind][order.pop()])
        return out

    def state(self) -> dict:
        return {"rng": _jsonable(self.rng.getstate()), "orders": {k: list(v) for k, v in self.orders.items()}}

    def set_state(self, state: dict) -> None:
        rng = state["rng"]
        self.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        if set(state["orders"]) != set(self.orders):
            raise ValueError(f"checkpoint samples prompt kinds {sorted(state['orders'])}, "
                             f"this config {sorted(self.orders)}")
        self.orders = {k: list(v) for k, v in state["orders"].items()}


@dataclass
class StepLaunch:
    """Generation under way for ``step``: its prompts (indices into the training data, in
    the sampler's order) and their groups' streams."""

    step: int
    prompt_indices: tuple[int, ...]
    launch: streaming.Launch


def tokenize_prompts(rows: list[TaskRow], tokenizer, template: str) -> list[PromptItem]:
    items = []
    for i, row in enumerate(rows):
        text = render_prompt(row.prompt, template, tokenizer)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        items.append(PromptItem(i, tuple(ids), row.answer, kind=row.kind, question=row.prompt))
    return items


class GRPOTrainer:
    def __init__(self, prepared: storage.Prepared) -> None:
        from transformers import AutoTokenizer

        from orchestrator.stages import StageError

        cfg = prepared.local
        self.cfg = cfg
        self.storage = prepared.run
        self.run_dir = prepared.run.local
        prepared.write_config()
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        try:
            rows = load_rows(cfg.data.train_path, prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key,
                             kind_key=cfg.data.kind_key, default_kind=cfg.data.default_kind, split=cfg.data.split)
        except ValueError as err:
            raise StageError(str(err)) from None
        check_kinds(rows, cfg.rewards)
        try:
            self.sampler = PromptSampler(tokenize_prompts(rows, self.tokenizer, cfg.data.template), seed=cfg.run.seed,
                                         shuffle=cfg.data.shuffle, kind_weights=cfg.data.kind_weights)
        except ValueError as err:
            raise StageError(f"{cfg.data.train_path}: {err}") from None
        cluster.connect(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus)
        prepared.check_cluster()
        self.actors = cluster.start(cluster.StageParts.for_grpo(cfg), placement.grpo_roles(cfg))
        backend = ray.get(self.actors.learners[0].collective_backend.remote())
        cluster.init_weight_push(self.actors, backend, cfg.rollout.tensor_parallel_size)
        self.scoring = streaming.Scoring(self.actors.rewards, self.actors.reward_model, self.actors.reference)
        self.telemetry = Telemetry(cfg.run.name, "driver")
        self.version = 0
        self.launched: deque[StepLaunch] = deque()  # generation for this step and those ahead
        self.next_launch = 1  # the step the next launch is for
        self.checkpoints = checkpoints.CheckpointDir(self.storage, keep=cfg.grpo.keep_checkpoints)

    # -- the algorithm --------------------------------------------------------------------
    def step(self, step: int) -> dict:
        t0 = time.monotonic()
        self.launch_generation(up_to_ahead=self.cfg.grpo.max_staleness_steps)
        learning = [w.train_step.remote(step) for w in self.actors.learners]
        current = self.launched.popleft()
        if current.step != step:
            raise RuntimeError(f"step {step} would train on the prompts launched for step {current.step}")
        rollout_s = self.stream_into_learners(current.launch)
        stats = self.merge(ray.get(learning))
        self.version += 1
        push_s = self.push_weights(self.version)
        self.storage.append(PROMPTS, json.dumps({"step": step, "prompt_indices": list(current.prompt_indices)}) + "\n")
        return self.record(step, stats, rollout_s, push_s, time.monotonic() - t0)

    def launch_generation(self, up_to_ahead: int) -> None:
        """Start generation for this step and up to ``up_to_ahead`` steps beyond it. Prompt
        p of step s is sampled with seed ``streaming.prompt_seed(run.seed, s, p)``."""
        while len(self.launched) <= up_to_ahead:
            step, prompts = self.next_launch, self.sampler.next(self.cfg.grpo.prompts_per_step)
            seeds = [streaming.prompt_seed(self.cfg.run.seed, step, p.index) for p in prompts]
            started = streaming.launch(self.actors.rollouts, prompts, self.cfg.grpo.samples_per_prompt, seeds=seeds)
            self.launched.append(StepLaunch(step, tuple(p.index for p in prompts), started))
            self.next_launch += 1

    def stream_into_learners(self, launch: streaming.Launch) -> float:
        """Route each finished group through scoring to a learner rank (round robin)."""
        learners = self.actors.learners
        depth = {}  # learner rank -> ObjectRef of its inbox size after the last feed

        def feed(i: int, scored: ray.ObjectRef) -> None:
            # Numbered per rank in routing order: the rank trains on them in that order.
            depth[i % len(learners)] = learners[i % len(learners)].feed.remote([scored], i // len(learners))

        streaming.route(launch, self.scoring, feed)
        # Groups queued at the learners when generation finished (not yet trained on).
        self.telemetry.set("buffer_groups", sum(ray.get(list(depth.values()))))
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
        for spec in self.cfg.rewards.reward_models:  # nan on a step that drew none of its prompts
            m.setdefault(f"reward/{spec.name}", float("nan"))
        self.telemetry.set("learner_tokens_per_second", m["learner_tokens_per_s"])
        self.telemetry.set("weight_push_seconds", push_s)
        self.telemetry.set("staleness_steps", m["staleness_mean"])
        return {
            "step": step,
            "policy_version": self.version,
            **m,
            "rollout_tokens_per_s": stats.response_tokens / rollout_s if rollout_s > 0 else float("nan"),
            "weight_push_s": push_s,
            "step_s": step_s,
        }

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> str:
        """Everything needed to continue exactly at ``step + 1``: learner states (DeepSpeed:
        weights, optimizer, scheduler), the policy version, the prompt sampler, and the
        groups generated for later steps (awaited, then stored: they were sampled by older
        policies). Written to a temp folder, renamed once complete (``checkpoints``)."""
        temp = self.checkpoints.begin(step)
        writers = [self.storage.writer(temp, rank=i) for i in range(len(self.actors.learners))]
        saving = [w.save_checkpoint.remote(where, LEARNER_TAG, publish)
                  for w, (where, publish) in zip(self.actors.learners, writers, strict=True)]
        for ahead in self.launched:
            streaming.drain(ahead.launch)
        ahead = [(a.step, a.prompt_indices, ray.get(a.launch.ready)) for a in self.launched]
        ray.get(saving)
        self.storage.write_bytes(f"{temp}/{PENDING}", pickle.dumps(ahead))
        state = {"step": step, "version": self.version, "next_launch": self.next_launch,
                 "sampler": self.sampler.state(), "ahead_steps": [a[0] for a in ahead]}
        self.storage.write_text(f"{temp}/{checkpoints.STATE}", json.dumps(state))  # last: marks it complete
        done = self.checkpoints.commit(step, temp)
        return self.storage.location(done.path)

    def restore(self) -> int:
        """Load the newest complete checkpoint; returns the step it was taken at."""
        from orchestrator.stages import StageError

        found = self.checkpoints.latest()
        if found is None:
            raise StageError(f"run.resume is set but {self.storage.location(checkpoints.ROOT)} holds no complete "
                             f"checkpoint: nothing to resume (start without run.resume, or pick the run name "
                             f"that was stopped)")
        state = json.loads(self.storage.read_text(f"{found.path}/{checkpoints.STATE}"))
        readers = [self.storage.reader(found.path, rank=i) for i in range(len(self.actors.learners))]
        versions = ray.get([w.load_checkpoint.remote(where, LEARNER_TAG, fetch)
                            for w, (where, fetch) in zip(self.actors.learners, readers, strict=True)])
        self.version = int(state["version"])
        if any(v != self.version for v in versions):
            raise StageError(f"checkpoint {found.name} holds learner versions {versions}, expected {self.version}")
        try:
            self.sampler.set_state(state["sampler"])
        except (KeyError, ValueError) as err:
            raise StageError(f"{self.storage.location(found.path, checkpoints.STATE)}: cannot restore the prompt "
                             f"order ({err}); resume with the config the run was started with") from None
        self.next_launch = int(state["next_launch"])
        for step, indices, groups in pickle.loads(self.storage.read_bytes(f"{found.path}/{PENDING}")):
            self.launched.append(StepLaunch(step, tuple(indices),
                                            streaming.Launch([], time.monotonic(), [ray.put(g) for g in groups])))
        self.push_weights(self.version)  # engines start from the restored policy
        log.info("resumed from %s (step %d)", self.storage.location(found.path), found.step)
        return int(state["step"])

    # -- outputs ----------------------------------------------------------------------------
    def save_final(self) -> str:
        """Learner rank 0 writes the weights, the driver the tokenizer, both into storage."""
        where, publish = self.storage.writer("final")
        ray.get([w.save_hf.remote(where, publish) for w in self.actors.learners])
        self.storage.save_pretrained(self.tokenizer, "final")
        return self.storage.location("final")

    def shutdown(self) -> None:
        self.actors.shutdown()


Config = GRPOStageConfig


MODEL_INPUTS = ("model.path", "rewards.reward_models.*.path")
DATA_INPUTS = ("data.train_path",)


def check_inputs(cfg: GRPOStageConfig) -> None:
    """Fail before any actor starts when the model or data is missing."""
    inputs.check_model(cfg.model.path)
    inputs.check_files([cfg.data.train_path], "data.train_path")


def check_kinds(rows: list[TaskRow], rewards) -> None:
    """Every prompt type in the data must be scored by some reward."""
    from orchestrator.stages import StageError

    for kind in sorted({r.kind for r in rows}):
        if not rewards.rules_for(kind) and not rewards.models_for(kind):
            raise StageError(f"prompts of kind {kind!r} are in the data but no reward scores them; give a "
                             f"rule reward `kinds: [{kind}]` or a reward model (rewards.reward_models) for it")


def progress_line(r: dict) -> str:
    models = "".join(f"  {k.removeprefix('reward/')} {v:.2f}" for k, v in r.items() if k.startswith("reward/"))
    return (f"reward {r['reward_mean']:.3f}  acc {r['accuracy']:.3f}  fmt {r['format_ok']:.2f}{models}  "
            f"kl {r['kl']:.4f}  {r['step_s']:.1f}s/step")


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def run(cfg: GRPOStageConfig, progress=None) -> Path:
    """Run the stage; returns the run directory.

    Stops gracefully at a step boundary when asked (``r1lab stop``, SIGTERM from ``ray job
    stop``, or Ctrl-C; a second Ctrl-C exits at once): saves a checkpoint that
    ``run.resume=true`` continues from. Checkpoints also every ``grpo.checkpoint_every_steps``
    steps and ``grpo.checkpoint_every_minutes`` minutes.
    """
    from orchestrator import control

    prepared = storage.prepare(cfg, models=MODEL_INPUTS, data=DATA_INPUTS)
    cfg = prepared.local
    check_inputs(cfg)
    trainer = GRPOTrainer(prepared)
    ctl = control.start_control(cfg.run.name)
    term = threading.Event()
    restore_signals = _stop_on_signals(term)
    metrics = None
    try:
        first = trainer.restore() + 1 if cfg.run.resume else 1
        metrics = MetricsLogger(trainer.storage, config=cfg.model_dump(mode="json"),
                                mode=cfg.logging.wandb_mode, project=cfg.logging.wandb_project,
                                name=cfg.run.name, resume=cfg.run.resume, resumed_at=first - 1)
        if cfg.run.resume:
            keep_through(trainer.storage, PROMPTS, first - 1)
        else:
            trainer.storage.write_text(PROMPTS, "")
        stopped = _train(trainer, cfg, first, metrics, progress,
                         lambda: term.is_set() or ray.get(ctl.should_stop.remote()))
        if stopped is not None:
            saved = trainer.save_checkpoint(stopped)
            log.warning("stopped at step %d; checkpoint %s (resume with run.resume=true)", stopped, saved)
            ray.get(ctl.mark.remote("stopped", str(saved)))
            if not term.is_set():
                # `r1lab stop` stops the Ray job next, so the job ends as STOPPED
                # rather than SUCCEEDED; do not outwait it for long.
                term.wait(timeout=120)
            return trainer.run_dir
        trainer.save_final()
        ray.get(ctl.mark.remote("finished"))
    finally:
        restore_signals()
        if metrics is not None:
            metrics.close()
        trainer.shutdown()
        ray.kill(ctl)
    return trainer.run_dir


def _train(trainer: GRPOTrainer, cfg: GRPOStageConfig, first: int, metrics: MetricsLogger, progress,
           stop_asked) -> int | None:
    """Steps ``first`` .. ``grpo.steps`` with the periodic checkpoints; the step it was asked
    to stop after, or None when it ran them all."""
    every, minutes = cfg.grpo.checkpoint_every_steps, cfg.grpo.checkpoint_every_minutes
    last_saved = time.monotonic()
    for step in range(first, cfg.grpo.steps + 1):
        record = trainer.step(step)
        metrics.log(record)
        if progress is not None:
            progress(step, cfg.grpo.steps, progress_line(record))
        if stop_asked():
            return step
        due = (every and step % every == 0) or (minutes and time.monotonic() - last_saved >= minutes * 60)
        if due and step < cfg.grpo.steps:
            trainer.save_checkpoint(step)
            last_saved = time.monotonic()
    return None


def _stop_on_signals(term: threading.Event):
    """SIGTERM and Ctrl-C set ``term`` (stop at the next step boundary, with a checkpoint);
    a second Ctrl-C raises ``KeyboardInterrupt`` at once. Returns what undoes this."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(*_) -> None:
        if term.is_set():
            raise KeyboardInterrupt
        term.set()
        log.warning("stopping after this step with a checkpoint (Ctrl-C again to exit at once, losing the step)")

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, lambda *_: term.set())
    signal.signal(signal.SIGINT, interrupt)

    def restore() -> None:
        for sig, handler in before.items():
            signal.signal(sig, handler)

    return restore
