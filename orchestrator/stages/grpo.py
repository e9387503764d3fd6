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
import random
import signal
import threading
import time
from collections import deque
from pathlib import Path

import ray

from actors.rollout import PromptItem
from actors.telemetry import Telemetry
from learner.grpo_role import StepStats
from orchestrator import cluster, inputs, placement, storage, streaming
from orchestrator.config import GRPOStageConfig
from orchestrator.metrics import MetricsLogger
from tasks.data_files import TaskRow, load_rows
from tasks.templates import render_prompt

log = logging.getLogger(__name__)


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
        self.launched: deque[streaming.Launch] = deque()

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
            self.launched.append(streaming.launch(self.actors.rollouts, prompts, self.cfg.grpo.samples_per_prompt))

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
    STATE = "checkpoints/trainer_state.json"

    def save_checkpoint(self, step: int) -> str:
        """Learner states (DeepSpeed: weights, optimizer, scheduler) and the driver's own
        state (step, policy version, prompt order), enough to continue at ``step + 1``.
        Every rank writes (and for a URI uploads) its shards before the state is written."""
        tag = f"step-{step}"
        writers = [self.storage.writer("checkpoints", rank=i) for i in range(len(self.actors.learners))]
        ray.get([w.save_checkpoint.remote(where, tag, publish)
                 for w, (where, publish) in zip(self.actors.learners, writers, strict=True)])
        state = {"step": step, "version": self.version, "tag": tag, "sampler": self.sampler.state()}
        self.storage.write_text(self.STATE, json.dumps(state))  # atomic: never a half-written state
        return self.storage.location("checkpoints", tag)

    def restore(self) -> int:
        """Load the last checkpoint; returns the step it was taken at."""
        from orchestrator.stages import StageError

        text = self.storage.read_text(self.STATE)
        if text is None:
            raise StageError(f"run.resume is set but {self.storage.location(self.STATE)} does not exist: nothing "
                             f"to resume (start without run.resume, or pick the run name that was stopped)")
        state = json.loads(text)
        readers = [self.storage.reader(f"checkpoints/{state['tag']}", rank=i) for i in range(len(self.actors.learners))]
        versions = ray.get([w.load_checkpoint.remote(str(Path(where).parent), state["tag"], fetch)
                            for w, (where, fetch) in zip(self.actors.learners, readers, strict=True)])
        self.version = int(state["version"])
        if any(v != self.version for v in versions):
            raise StageError(f"checkpoint {state['tag']} holds learner versions {versions}, expected {self.version}")
        try:
            self.sampler.set_state(state["sampler"])
        except (KeyError, ValueError) as err:
            raise StageError(f"{self.storage.location(self.STATE)}: cannot restore the prompt order ({err}); "
                             "resume with the config the run was started with") from None
        self.push_weights(self.version)  # engines start from the restored policy
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

    Stops gracefully at a step boundary when asked (``r1lab stop``, or SIGTERM from
    ``ray job stop``): saves a checkpoint that ``run.resume=true`` continues from.
    """
    from orchestrator import control

    prepared = storage.prepare(cfg, models=MODEL_INPUTS, data=DATA_INPUTS)
    cfg = prepared.local
    check_inputs(cfg)
    trainer = GRPOTrainer(prepared)
    ctl = control.start_control(cfg.run.name)
    term = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: term.set())
    metrics = None
    try:
        first = trainer.restore() + 1 if cfg.run.resume else 1
        metrics = MetricsLogger(trainer.storage, config=cfg.model_dump(mode="json"),
                                mode=cfg.logging.wandb_mode, project=cfg.logging.wandb_project,
                                name=cfg.run.name, resume=cfg.run.resume)
        every = cfg.grpo.checkpoint_every_steps
        for step in range(first, cfg.grpo.steps + 1):
            record = trainer.step(step)
            metrics.log(record)
            if progress is not None:
                progress(step, cfg.grpo.steps, progress_line(record))
            if term.is_set() or ray.get(ctl.should_stop.remote()):
                saved = trainer.save_checkpoint(step)
                log.warning("stopped at step %d; checkpoint %s (resume with run.resume=true)", step, saved)
                ray.get(ctl.mark.remote("stopped", str(saved)))
                if not term.is_set():
                    # `r1lab stop` stops the Ray job next, so the job ends as STOPPED
                    # rather than SUCCEEDED; do not outwait it for long.
                    term.wait(timeout=120)
                return trainer.run_dir
            if every and step % every == 0 and step < cfg.grpo.steps:
                trainer.save_checkpoint(step)
        trainer.save_final()
        ray.get(ctl.mark.remote("finished"))
    finally:
        if metrics is not None:
            metrics.close()
        trainer.shutdown()
        ray.kill(ctl)
    return trainer.run_dir
