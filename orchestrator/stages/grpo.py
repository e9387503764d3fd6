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

import dataclasses
import json
import logging
import os
import pickle
import random
import signal
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import ray

from actors.rollout import PromptItem
from actors.telemetry import Telemetry
from learner.batch import deal_by_tokens
from learner.grpo_role import StepStats
from learner.startup import gc_paused
from learner.weight_sync import EnginePushFailed
from orchestrator import checkpoints, cluster, failures, inputs, placement, preflight, storage, streaming, supervise
from orchestrator.config import GRPOStageConfig
from orchestrator.metrics import MetricsLogger, keep_through
from tasks.data_files import BadRows, DataError, TaskRow, load_rows
from tasks.templates import render_prompt

log = logging.getLogger(__name__)

PROMPTS = "prompts.jsonl"  # per step: the indices of the prompts it trained on
LEARNER_TAG = "learner"  # the DeepSpeed tag inside a checkpoint folder
PENDING = "ahead.pkl"  # in a checkpoint: the groups generated for later steps
FAULTS = "faults.jsonl"  # one row per actor lost, hung or restarted
STARTUP = "startup.json"  # where the first attempt's start-up went
ROLES = ("learner", "rollout", "reward", "reference", "reward_model")


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
    texts = [render_prompt(row.prompt, template, tokenizer) for row in rows]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # one batched call
    return [PromptItem(i, tuple(x), row.answer, kind=row.kind, question=row.prompt)
            for i, (row, x) in enumerate(zip(rows, ids, strict=True))]


@dataclass(frozen=True)
class Inputs:
    """What pre-flight read once for every attempt: the tokenizer and the usable prompts;
    ``report`` records the rows skipped (``data.skip_bad_rows``), None when none were."""

    tokenizer: object
    items: list[PromptItem]
    claim: preflight.Claim
    report: dict | None = None
    marks: dict[str, float] = dataclasses.field(default_factory=dict)  # when Ray was ready, pre-flight done


class GRPOTrainer:
    """One attempt at the stage: the actors, and the driver's state between steps.
    ``restarts``: restarts per role so far in this run (shared across attempts).
    ``actors``: actors already started with the methods of the stage's roles (the
    pipeline benchmark's simulated ones); None starts the real ones."""

    def __init__(self, prepared: storage.Prepared, inputs_: Inputs, restarts: Counter | None = None,
                 actors: cluster.StageActors | None = None, *, launch_first: bool = False) -> None:
        cfg = prepared.local
        self.cfg = cfg
        self.storage = prepared.run
        self.run_dir = prepared.run.local
        self.tokenizer = inputs_.tokenizer
        self.items = inputs_.items
        self.sampler = PromptSampler(self.items, seed=cfg.run.seed, shuffle=cfg.data.shuffle,
                                     kind_weights=cfg.data.kind_weights)
        # When start-up reached each point (STARTUP); the first attempt has pre-flight's own.
        self.marks = {"attempt": inputs_.marks.get("preflight", time.monotonic())}
        cluster.connect(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus, dashboard=cfg.cluster.dashboard)
        self.marks["ray"] = inputs_.marks.get("ray", time.monotonic())
        self.deadlines = supervise.Deadlines.for_grpo(cfg)
        self.version = 0
        self.launched: deque[StepLaunch] = deque()  # generation for this step and those ahead
        self.next_launch = 1  # the step the next launch is for
        self.colocated = cfg.cluster.colocate_rollout_with_learner
        self.actors = actors or cluster.start(stage_parts(cfg), placement.grpo_roles(cfg), check_fits=False,
                                              wait=False)
        # A classic engine takes one call at a time: generating ahead, it would join the
        # push group only after its streams for later steps, so there the group forms first.
        idle_at_first_push = cfg.grpo.partial_rollout or cfg.grpo.max_staleness_steps == 0
        if launch_first and idle_at_first_push and not self.colocated:
            # The engines hold policy version 0, the model on disk: step 1's generation
            # needs neither the learner ranks nor the push group, and runs while they start.
            self.launch_generation(up_to_ahead=0)
        if actors is None:
            cluster.wait_ready(self.actors)
        self.backend = ray.get(self.actors.learners[0].collective_backend.remote(), timeout=cluster.GROUP_S)
        if cfg.cluster.colocate_rollout_with_learner:
            # NCCL refuses two ranks on one GPU (learner rank 0 and engine 0): the push
            # goes through host memory over gloo. Not yet device-to-device (CUDA IPC).
            self.backend = "gloo"
        self.marks["actors"] = time.monotonic()
        self.scoring = streaming.Scoring(self.actors.rewards, self.actors.reward_model, self.actors.reference)
        self.roster = supervise.Roster(self.actors)
        self.keeper = supervise.Keeper(self.roster, self.deadlines, cfg.run.max_restarts, on_event=self.log_fault,
                                       restarts=restarts if restarts is not None else Counter())
        self.telemetry = Telemetry(cfg.run.name, "driver")
        self.fed = 0  # groups delivered to the learner ranks by this attempt
        # Each engine's restarts when the push group formed; None: not yet. With step 1
        # launched early it forms at the first push, once that generation is over: a
        # non-threaded engine joins it only after its streams end, and learner rank 0 would
        # wait on it (bounded by GROUP_S).
        self.grouped_at: list[int] | None = None
        if not self.launched:  # nothing sampling yet: the group forms now
            cluster.init_weight_push(self.actors, self.backend, cfg.rollout.tensor_parallel_size)
            self.marks["weight_push_group"] = time.monotonic()
            self.grouped_at = [0] * len(self.actors.rollouts)
        self.checkpoints = checkpoints.CheckpointDir(self.storage, keep=cfg.grpo.keep_checkpoints)
        self.launched_at = time.monotonic()  # the run's start (set by `run`)
        self.startup_s = float("nan")

    def log_fault(self, row: dict) -> None:
        self.storage.append(FAULTS, json.dumps(row) + "\n")

    # -- the algorithm --------------------------------------------------------------------
    def step(self, step: int) -> dict:
        t0 = time.monotonic()
        self.keeper.step = step
        self.launch_generation(up_to_ahead=self.cfg.grpo.max_staleness_steps)
        # Co-located, the ranks train once generation is over and the engines sleep.
        learning = [] if self.colocated else self.train_async(step)
        current = self.launched.popleft()
        if current.step != step:
            raise RuntimeError(f"step {step} would train on the prompts launched for step {current.step}")
        sampling: dict = {}
        if self.cfg.grpo.filter_zero_variance:
            rollout_s = self.filter_into_learners(current.launch, step, sampling)
        elif self.cfg.learner.max_tokens_per_micro_batch and len(self.actors.learners) > 1:
            rollout_s = self.deal_into_learners(current.launch)
        else:
            rollout_s = self.stream_into_learners(current.launch)
        if self.colocated:
            self.await_engines([e.sleep.remote(self.cfg.rollout.sleep_level) for e in self.actors.rollouts], "sleep")
            learning = self.train_async(step)
        stats = self.merge(self.await_learners(learning, "train_step"))
        self.version += 1
        push_s = self.push_weights(self.version)
        self.keeper.sweep()
        if "step" not in self.marks:
            self.marks["step"] = time.monotonic()
            if not self.storage.exists(STARTUP):  # the first attempt's; a restart's start-up is in faults.jsonl
                self.write_startup()
        extra = {"extra_prompt_indices": sampling.pop("extra_prompt_indices")} if sampling else {}
        self.storage.append(PROMPTS, json.dumps({"step": step, "prompt_indices": list(current.prompt_indices),
                                                 **extra}) + "\n")
        return {**self.record(step, stats, rollout_s, push_s, time.monotonic() - t0), **sampling}

    def train_async(self, step: int) -> list[ray.ObjectRef]:
        return [w.train_step.remote(step) for w in self.actors.learners]

    def await_engines(self, refs: list[ray.ObjectRef], what: str) -> None:
        """One call on every engine (co-located mode: ``sleep``, ``wake_up``)."""
        self.await_learners(refs, f"the engines' {what}", self.actors.rollouts)
        log.info("engines' %s done (version %d)", what, self.version)

    def write_startup(self) -> None:
        """``STARTUP``: seconds from ``r1lab run`` to each point of start-up, each actor
        built, and the first generation request reaching an engine."""
        since = lambda t: round(t - self.launched_at, 2)  # noqa: E731
        wall_launch = time.time() - (time.monotonic() - self.launched_at)
        try:
            asked = [t for t in ray.get([e.first_request_at.remote() for e in self.actors.rollouts],
                                        timeout=self.deadlines.restart_s) if t is not None]
        except (ray.exceptions.RayError, TimeoutError) as err:  # timing is not worth a step
            log.warning("start-up timing without the engines' first request: %s", supervise.first_line(err))
            asked = []
        parts = {"preflight_done_s": since(self.marks["attempt"]), "ray_ready_s": since(self.marks["ray"]),
                 "actors_ready_s": {k: since(t) for k, t in sorted(self.actors.ready_at.items())},
                 "all_actors_ready_s": since(self.marks["actors"]),
                 "weight_push_group_s": since(self.marks["weight_push_group"]),
                 "first_generation_s": round(min(asked) - wall_launch, 2) if asked else None,
                 "first_step_done_s": since(self.marks["step"])}
        self.storage.write_text(STARTUP, json.dumps(parts, indent=2) + "\n")
        log.info("start-up: %s", parts)

    def launch_generation(self, up_to_ahead: int) -> None:
        """Start generation for this step and up to ``up_to_ahead`` steps beyond it. Prompt
        p of step s is sampled with seed ``streaming.prompt_seed(run.seed, s, p)``."""
        while len(self.launched) <= up_to_ahead:
            step, prompts = self.next_launch, self.sampler.next(self.cfg.grpo.prompts_per_step)
            started = streaming.launch(self.actors.rollouts, prompts, self.cfg.grpo.samples_per_prompt,
                                       seeds=self.seeds(step, prompts), version=self.version)
            self.launched.append(StepLaunch(step, tuple(p.index for p in prompts), started))
            self.next_launch += 1

    def seeds(self, step: int, prompts: list[PromptItem]) -> list[int]:
        return [streaming.prompt_seed(self.cfg.run.seed, step, p.index) for p in prompts]

    def stream_into_learners(self, launch: streaming.Launch) -> float:
        """Score each group as it finishes and queue it at a learner rank: the group at
        position k of the launch is number ``fed + k``, for rank (number mod L) as its
        (number div L)-th group, whatever order the groups finish or fail in."""
        learners, base = self.actors.learners, self.fed

        def chain(positions: list[int], group_refs: list[ray.ObjectRef]) -> list[list[supervise.Hop]]:
            numbers = [base + p for p in positions]
            scored = self.scoring.score(numbers, group_refs)
            puts = streaming.deliver(learners, numbers, [calls[-1][1] for calls in scored])
            return [[supervise.Hop(self.roster.of(a), ref) for a, ref in [*calls, put]]
                    for calls, put in zip(scored, puts, strict=True)]

        done = supervise.Flight(launch, self.actors.rollouts, self.keeper, chain, catch_up=self.catch_up).run()
        self.fed += len(launch.prompts)
        # Groups queued at the learners when generation finished (not yet trained on).
        self.telemetry.set("buffer_groups", max(ray.get(list(done.values()), timeout=self.deadlines.learner_s), default=0))
        return time.monotonic() - launch.started

    def deal_into_learners(self, launch: streaming.Launch) -> float:
        """With packed micro-batches (a rank's backward waits for all its groups anyway):
        score the whole launch, then deal the groups to the ranks by tokens
        (``learner.batch.deal_by_tokens``), so the ranks finish together. Each rank takes
        its groups in launch order; the dealing depends on the lengths alone, so a run
        stays reproducible."""
        learners = self.actors.learners

        chain = supervise.scoring_chain(self.scoring, self.roster, self.fed)
        done = supervise.Flight(launch, self.actors.rollouts, self.keeper, chain, catch_up=self.catch_up).run()
        refs = [done[p] for p in range(len(launch.prompts))]
        lengths = ray.get([_group_tokens.remote(ref) for ref in refs], timeout=self.deadlines.learner_s)
        ranks = deal_by_tokens(lengths, len(learners))
        first = self.fed // len(learners)
        puts, owners = [], []  # each rank's groups in launch order, one call a rank
        for r, rank in enumerate(learners):
            mine = [ref for ref, dealt in zip(refs, ranks, strict=True) if dealt == r]
            if mine:
                puts += streaming.put_all(rank, range(first, first + len(mine)), mine)
                owners += [rank] * len(mine)
        self.fed += len(refs)
        queued = self.await_learners(puts, "handing the step's groups to the learners", owners)
        self.telemetry.set("buffer_groups", max(queued, default=0))
        return time.monotonic() - launch.started

    def filter_into_learners(self, launch: streaming.Launch, step: int, sampling: dict) -> float:
        """DAPO's dynamic sampling: score every group of the launch, and while fewer than
        ``prompts_per_step`` are informative (rewards not all equal), sample more prompts,
        up to ``grpo.max_sampling_rounds`` rounds. The learners get the first
        ``prompts_per_step`` informative groups in sampling order (zero-variance ones fill
        the rest when the rounds run out), numbered as in ``stream_into_learners``. The
        choice depends on the rewards only, not on arrival order, so a run stays
        reproducible; the price is that groups reach the learners once the step's
        generation is scored, not as each finishes. ``sampling`` receives the step's
        counts (and the extra prompts' indices)."""
        want, learners = self.cfg.grpo.prompts_per_step, self.actors.learners
        pool: list[tuple[ray.ObjectRef, bool]] = []  # (scored group, informative), in sampling order
        extra: list[int] = []
        current, rounds = launch, 0
        while True:
            chain = supervise.scoring_chain(self.scoring, self.roster, self.fed + len(pool))
            done = supervise.Flight(current, self.actors.rollouts, self.keeper, chain, catch_up=self.catch_up).run()
            refs = [done[p] for p in range(len(current.prompts))]
            groups = ray.get(refs, timeout=self.deadlines.learner_s)
            pool += [(ref, informative(g)) for ref, g in zip(refs, groups, strict=True)]
            rounds += 1
            found = sum(ok for _, ok in pool)
            if found >= want or rounds >= self.cfg.grpo.max_sampling_rounds:
                break
            prompts = self.sampler.next(want - found)
            extra += [p.index for p in prompts]
            seeds = [streaming.prompt_seed(self.cfg.run.seed, step, p.index + rounds * len(self.items))
                     for p in prompts]
            current = streaming.launch(self.actors.rollouts, prompts, self.cfg.grpo.samples_per_prompt,
                                       seeds=seeds, version=self.version)
        chosen = ([ref for ref, ok in pool if ok] + [ref for ref, ok in pool if not ok])[:want]
        put = streaming.deliver(learners, range(self.fed, self.fed + len(chosen)), chosen)
        self.fed += want
        queued = self.await_learners([ref for _, ref in put], "handing the step's groups to the learners",
                                     [rank for rank, _ in put])
        self.telemetry.set("buffer_groups", max(queued, default=0))
        sampling.update({"sampled_groups": len(pool), "zero_variance_groups": len(pool) - found,
                         "sampling_rounds": rounds, "extra_prompt_indices": extra})
        return time.monotonic() - launch.started

    def catch_up(self, engine: int) -> int:
        """Before engine ``engine`` samples again after a failure: if it holds another
        policy version (restarted: the initial weights), load the current one from learner
        rank 0's last push. Returns the version it holds. An engine that does not answer in
        time is late (killed, so Ray restarts it) and one that dies is waited for; either is
        caught up once back, up to ``run.max_restarts`` times."""
        handle = self.actors.rollouts[engine]
        member = self.roster.of(handle)
        for _ in range(self.cfg.run.max_restarts + 1):
            asked = time.monotonic()
            try:
                return self._catch_up(engine, handle)
            except ray.exceptions.GetTimeoutError:
                self.keeper.late(member, "catching up to the current policy", time.monotonic() - asked)
                self.keeper.failed(member, TimeoutError("killed as late while catching up"), asked)
            except ray.exceptions.RayActorError as err:
                if self.roster.who(err) is not member:
                    raise
                self.keeper.failed(member, err, asked)
        raise supervise.ActorGone(f"{member.label} could not be caught up to policy version {self.version} after "
                                  f"{self.cfg.run.max_restarts + 1} tries")

    def _catch_up(self, engine: int, handle) -> int:
        # An interruptible engine answers at once (a thread of its own); a classic one may
        # first finish a stream for a launch ahead.
        ask_s = self.cfg.run.hang_grace_s if self.cfg.grpo.partial_rollout else self.deadlines.restart_s
        held = ray.get(handle.version.remote(), timeout=ask_s)
        if held != self.version:
            try:
                spec = ray.get(self.actors.learners[0].weight_spec.remote(), timeout=self.deadlines.learner_s)
            except ray.exceptions.GetTimeoutError:
                raise supervise.LearnerLost(f"learner rank 0 did not give its weight layout within "
                                            f"{self.deadlines.learner_s:.0f} s") from None
            buffers = self.actors.learners[0].last_pushed.remote()
            ray.get(handle.load_weights.remote(spec, buffers, self.version), timeout=self.deadlines.learner_s)
            log.info("rollout %d caught up from policy version %d to %d", engine, held, self.version)
        return self.version

    def await_learners(self, refs: list, what: str, actors: list | None = None, within_s: float | None = None) -> list:
        """The results of ``what`` (``refs``, one per actor of ``actors``, default the
        learner ranks) within ``within_s`` (default ``Deadlines.learner_s``) after their
        last group; an actor that died or is late ends the attempt (``LearnerLost``: the
        learner group restarts from its checkpoint), as does an engine that failed a weight
        push (``EnginePushFailed``)."""
        actors = self.actors.learners if actors is None else actors
        within = self.deadlines.learner_s if within_s is None else within_s
        _, late = ray.wait(refs, num_returns=len(refs), timeout=within)
        if late:
            self.keeper.late(self.roster.of(actors[refs.index(late[0])]), what, within)
            raise supervise.LearnerLost(f"{what} was not done within {within:.0f} s")
        try:
            return ray.get(refs)
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as err:
            member = self.roster.who(err)
            who = f"{member.label} ({supervise.whereabouts(member.actor_id)})" if member else "an actor"
            raise supervise.LearnerLost(f"{who} was lost during {what}: {supervise.first_line(err)}") from None
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, EnginePushFailed):
                member = self.roster.of(self.actors.rollouts[err.cause.engine])
                if err.cause.late:
                    self.keeper.late(member, what, within)
                raise supervise.LearnerLost(f"{member.label} ({supervise.whereabouts(member.actor_id)}) failed "
                                            f"during {what}: {supervise.first_line(err.cause)}") from None
            if isinstance(err.cause, TimeoutError):
                raise supervise.LearnerLost(supervise.first_line(err.cause)) from None
            raise

    def push_weights(self, version: int) -> float:
        t0 = time.monotonic()
        if self.grouped_at is None or self.engine_restarts() != self.grouped_at:  # none yet, or an engine restarted since
            self.regroup()
        if self.colocated:  # room for the weights first; the KV cache once they are in
            self.await_engines([e.wake_up.remote(["weights"]) for e in self.actors.rollouts], "wake-up")
        # Learner rank 0 asks the engines to receive (one call here, not one per engine) and
        # names one that fails within the deadline; the driver's own is a grace later.
        within = self.deadlines.learner_s
        refs = [w.push_weights.remote(version, within) for w in self.actors.learners]
        self.await_learners(refs, f"the weight push of version {version}", within_s=within + self.cfg.run.hang_grace_s)
        if self.colocated:
            self.await_engines([e.wake_up.remote(["kv_cache"]) for e in self.actors.rollouts], "wake-up")
        return time.monotonic() - t0

    def engine_restarts(self) -> list[int]:
        ids = [self.roster.of(e).actor_id for e in self.actors.rollouts]
        table = supervise.whereabouts_all(ids)
        return [table[a].restarts for a in ids]

    def regroup(self) -> None:
        """Form the weight-push group anew, once every engine answers (an engine restarted
        since the group formed is not in it). A group that cannot be formed ends the
        attempt (``LearnerLost``: every actor restarts from the checkpoint)."""
        for engine in self.actors.rollouts:
            member = self.roster.of(engine)
            for _ in range(self.cfg.run.max_restarts + 1):
                asked = time.monotonic()
                try:
                    ray.get(engine.ready.remote(), timeout=self.deadlines.restart_s)
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                    self.keeper.failed(member, err, asked)
        try:
            cluster.init_weight_push(self.actors, self.backend, self.cfg.rollout.tensor_parallel_size,
                                     timeout_s=self.deadlines.learner_s)
        except (supervise.ActorGone, ray.exceptions.RayError) as err:
            raise supervise.LearnerLost(f"the weight-push group could not be formed again: "
                                        f"{supervise.first_line(err)}") from None
        first = self.grouped_at is None
        self.grouped_at = self.engine_restarts()
        self.marks.setdefault("weight_push_group", time.monotonic())
        log.info("weight-push group formed%s (engine restarts %s)", "" if first else " again", self.grouped_at)

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
            **{f"restarts/{role}": self.keeper.restarts[role] for role in ROLES},
            "rollout_tokens_per_s": stats.response_tokens / rollout_s if rollout_s > 0 else float("nan"),
            "rollout_s": rollout_s,  # from the launch of the step's generation to its last group
            "learner_s": stats.learner_seconds,  # the slowest rank's compute (waiting for groups left out)
            "weight_push_s": push_s,
            "step_s": step_s,
            "time_s": time.monotonic() - self.launched_at,  # since `run` was called: time to an accuracy
            "startup_s": self.startup_s,  # from `run` to this attempt's first step
        }

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> str:
        """Everything needed to continue exactly at ``step + 1``: learner states (DeepSpeed:
        weights, optimizer, scheduler), the policy version, the prompt sampler, and the
        groups generated for later steps (awaited, then stored: they were sampled by older
        policies). Written to a temp folder, renamed once complete (``checkpoints``)."""
        temp = self.checkpoints.begin(step)
        try:
            return self._save_checkpoint(step, temp)
        except BaseException:
            self.storage.remove(temp)  # a half-written checkpoint (a full disk) frees its space
            raise

    def _save_checkpoint(self, step: int, temp: str) -> str:
        writers = [self.storage.writer(temp, rank=i) for i in range(len(self.actors.learners))]
        saving = [w.save_checkpoint.remote(where, LEARNER_TAG, publish)
                  for w, (where, publish) in zip(self.actors.learners, writers, strict=True)]
        ahead = []
        for a in self.launched:  # generated by older policies: kept as they are
            done = supervise.Flight(a.launch, self.actors.rollouts, self.keeper, catch_up=self.catch_up).run()
            a.launch.ready = done
            groups = ray.get(list(done.values()), timeout=self.deadlines.learner_s)
            ahead.append((a.step, a.prompt_indices, dict(zip(done, groups, strict=True))))
        self.await_learners(saving, f"saving checkpoint step-{step}")
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
        versions = self.await_learners([w.load_checkpoint.remote(where, LEARNER_TAG, fetch)
                                        for w, (where, fetch) in zip(self.actors.learners, readers, strict=True)],
                                       f"loading checkpoint {found.name}")
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
            prompts = [self.items[i] for i in indices]
            launch = streaming.Launch(prompts, self.seeds(step, prompts), self.cfg.grpo.samples_per_prompt, {}, [],
                                      time.monotonic(), {k: ray.put(g) for k, g in groups.items()})
            self.launched.append(StepLaunch(step, tuple(indices), launch))
        self.push_weights(self.version)  # engines start from the restored policy
        log.info("resumed from %s (step %d)", self.storage.location(found.path), found.step)
        return int(state["step"])

    # -- outputs ----------------------------------------------------------------------------
    def save_final(self) -> str:
        return cluster.save_final(self.storage, self.actors.learners, self.tokenizer)

    def shutdown(self) -> None:
        self.actors.shutdown()


Config = GRPOStageConfig


MODEL_INPUTS = ("model.path", "rewards.reward_models.*.path")
DATA_INPUTS = ("data.train_path",)


def stage_parts(cfg: GRPOStageConfig) -> cluster.StageParts:
    """What the stage's actors are built from; a learner rank waits for its next group as
    long as the slowest sampling of it (every round) may take."""
    deadlines = supervise.Deadlines.for_grpo(cfg)
    rounds = cfg.grpo.max_sampling_rounds if cfg.grpo.filter_zero_variance else 1
    return cluster.StageParts.for_grpo(cfg, group_wait_s=3 * rounds * (deadlines.generation_s + deadlines.scoring_s
                                                                       + deadlines.restart_s))


def check_inputs(cfg: GRPOStageConfig) -> None:
    """Fail before any actor starts when the model or data is missing."""
    preflight.check_model(cfg.model.path)
    for i, spec in enumerate(cfg.rewards.reward_models):
        preflight.check_model(spec.path, f"rewards.reward_models.{i}.path")
    inputs.check_files([cfg.data.train_path], "data.train_path")


@gc_paused(freeze=False)  # transformers' import, tokenizing, Ray's start (learner.startup)
def prepare_run(prepared: storage.Prepared) -> Inputs:
    """Pre-flight (``orchestrator.preflight``), before the run directory is touched: the
    models, the run name, the storage, every data row and prompt length, and whether the
    cluster can hold the plan. Raises ``StageError`` naming the first problem.

    The prompts are tokenized (and their lengths checked) in a thread while Ray starts:
    importing transformers and tokenizing take seconds on a small machine, as Ray does. A
    row that cannot be read is named before Ray starts; a prompt too long, once it has."""
    cfg = prepared.local
    check_inputs(cfg)
    claim = preflight.claim_run(
        prepared.run, stage="grpo", resume=cfg.run.resume, overwrite=cfg.run.overwrite,
        has_checkpoint=lambda: checkpoints.CheckpointDir(prepared.run).latest() is not None)
    preflight.check_storage(prepared.run, preflight.checkpoint_bytes(cfg.model.path))
    bad = BadRows()
    try:
        rows = load_rows(cfg.data.train_path, prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key,
                         kind_key=cfg.data.kind_key, default_kind=cfg.data.default_kind, split=cfg.data.split, bad=bad)
    except DataError as err:
        raise preflight.PreflightError(str(err)) from None
    total = len(rows) + bad.count
    if not cfg.data.skip_bad_rows:
        preflight.bad_rows(bad, source=str(cfg.data.train_path), total=total, skip=False)
    check_kinds(rows, cfg.rewards)
    marks: dict[str, float] = {}
    tokenizing = Background(lambda: tokenized_prompts(cfg, rows, bad, total))
    plan = placement.grpo_plan(cfg)
    # The embedded cluster's one node is known before it starts (saves Ray's start-up).
    embedded = not (cfg.cluster.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())
    try:
        if embedded:
            placement.check_fits(plan, nodes=[cluster.embedded_node(cfg.cluster.num_cpus)])
        cluster.connect(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus, dashboard=cfg.cluster.dashboard)
        marks["ray"] = time.monotonic()
        placement.check_fits(plan, autoscaling=cfg.cluster.autoscaling)
        prepared.check_cluster()
        tokenizer, items, report = tokenizing.result()  # a prompt problem before a cluster one
    except BaseException as err:
        if embedded and ray.is_initialized():
            ray.shutdown()  # the cluster this run started: nothing will use it
        tokenizing.result()  # a prompt problem is named before a cluster one
        if isinstance(err, placement.PlacementError):
            raise preflight.PreflightError(str(err)) from None
        raise
    marks["preflight"] = time.monotonic()
    return Inputs(tokenizer, items, claim, report, marks=marks)


class Background:
    """``fn()`` in a daemon thread; ``result`` waits for it and returns its value or raises
    what it raised."""

    def __init__(self, fn) -> None:
        self._done = threading.Event()
        self._got: object = None
        self._failed = False
        threading.Thread(target=self._run, args=(fn,), name="r1lab-preflight", daemon=True).start()

    def _run(self, fn) -> None:
        try:
            self._got = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller of result()
            self._got, self._failed = err, True
        self._done.set()

    def result(self):
        # Local work with no one else to wait on: it ends, in time proportional to the data,
        # so no deadline is set.
        self._done.wait()
        if self._failed:
            raise self._got
        return self._got


def tokenized_prompts(cfg: GRPOStageConfig, rows: list[TaskRow], bad: BadRows,
                      total: int) -> tuple[object, list[PromptItem], dict | None]:
    """(tokenizer, usable prompts, record of the rows skipped or None): the rows tokenized
    with the template, those over the generation budget refused (or skipped)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    items = tokenize_prompts(rows, tokenizer, cfg.data.template)
    keep = preflight.check_prompt_lengths(items, [r.where for r in rows], max_new_tokens=cfg.rollout.max_new_tokens,
                                          max_model_len=cfg.rollout.max_model_len, bad=bad)
    report = preflight.bad_rows(bad, source=str(cfg.data.train_path), total=total, skip=cfg.data.skip_bad_rows)
    if len(keep) < len(items):
        rows = [rows[i] for i in keep]
        items = [dataclasses.replace(items[i], index=j) for j, i in enumerate(keep)]
    if not items:
        raise preflight.PreflightError(f"{cfg.data.train_path}: no usable rows are left ({bad.count} bad)")
    try:
        PromptSampler(items, seed=cfg.run.seed, shuffle=cfg.data.shuffle, kind_weights=cfg.data.kind_weights)
    except ValueError as err:
        raise preflight.PreflightError(f"{cfg.data.train_path}: {err}") from None
    return tokenizer, items, report


@ray.remote(num_cpus=0)
def _group_tokens(g) -> int:
    """A scored group's tokens (each completion with its prompt), read where the group is."""
    return sum(len(g.group.prompt_ids) + len(c.token_ids) for c in g.group.completions)


def informative(g) -> bool:
    """Whether a scored group carries a learning signal: its gradable completions' rewards
    are not all equal (GRPO's advantages are zero otherwise)."""
    valid = [r for r, ok in zip(g.rewards, g.gradable, strict=True) if ok]
    return len(valid) > 1 and max(valid) != min(valid)


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
    steps and ``grpo.checkpoint_every_minutes`` minutes. A lost or hung learner rank (or a
    weight push that fails) restarts every actor from the latest checkpoint, up to
    ``run.max_restarts`` times; other actors are restarted in place (``supervise``).
    """
    from orchestrator import control
    from orchestrator.stages import StageError

    launched = time.monotonic()
    prepared = storage.prepare(cfg, models=MODEL_INPUTS, data=DATA_INPUTS)
    cfg = prepared.local
    ready = prepare_run(prepared)
    ready.claim.take()
    prepared.write_config()
    stop_log = failures.log_to_run(prepared.run)
    ctl = None  # the run's control actor, once connected (after the data checks)
    term, training = threading.Event(), threading.Event()
    restore_signals = lambda: None  # noqa: E731
    restarts: Counter = Counter()
    resume = cfg.run.resume
    try:
        if ready.report is not None:
            prepared.run.write_text(preflight.DATA_REPORT, json.dumps(ready.report, indent=2) + "\n")
        restore_signals = _stop_on_signals(term, training)
        lost_at = None  # when the learner group was last lost
        for attempt in range(cfg.run.max_restarts + 1):
            trainer = GRPOTrainer(prepared, ready, restarts, launch_first=not resume)
            trainer.launched_at = launched
            if lost_at is not None:
                back = time.monotonic() - lost_at
                trainer.log_fault({"time": time.time(), "role": "learner", "cause": "every actor started again",
                                   "recovered_s": back})
                log.warning("every actor started again in %.1f s; resuming", back)
            ctl = ctl or control.start_control(cfg.run.name)
            try:
                return _attempt(trainer, cfg, resume, ctl, term, training, progress)
            except (supervise.LearnerLost, ray.exceptions.RayActorError) as lost:
                err = _learner_lost(trainer, lost)
                latest = trainer.checkpoints.latest()
                where = trainer.storage.location(latest.path) if latest is not None else None
                if attempt == cfg.run.max_restarts:
                    raise StageError(f"gave up after {attempt} restarts of the learner group (run.max_restarts="
                                     f"{cfg.run.max_restarts}): {err}. "
                                     + (f"Resume from {where} with run.resume=true." if where else
                                        "No checkpoint was saved; start the run again.")) from None
                restarts["learner"] += 1
                trainer.log_fault({"time": time.time(), "step": trainer.keeper.step, "role": "learner",
                                   "cause": str(err), "resume_from": where})
                log.error("%s; restarting every actor from %s (restart %d of %d)", err,
                          where or "the start (no checkpoint yet)", attempt + 1, cfg.run.max_restarts)
                resume = latest is not None
                lost_at = time.monotonic()
            finally:
                trainer.shutdown()
    except supervise.ActorGone as err:
        raise StageError(f"{err}. Resume from the latest checkpoint with run.resume=true.") from None
    finally:
        restore_signals()
        stop_log()
        if ctl is not None:
            ray.kill(ctl)
    raise AssertionError("unreachable")


def _learner_lost(trainer: GRPOTrainer, err: BaseException) -> supervise.LearnerLost:
    """``err`` as a lost learner rank; re-raised when it is another actor's death that
    nothing handled."""
    if isinstance(err, supervise.LearnerLost):
        return err
    member = trainer.roster.who(err)
    if member is None or member.role != "learner":
        raise err
    where = supervise.whereabouts(member.actor_id)
    return supervise.LearnerLost(f"{member.label} ({where}) was lost: {supervise.first_line(err)}")


def _attempt(trainer: GRPOTrainer, cfg: GRPOStageConfig, resume: bool, ctl, term: threading.Event,
             training: threading.Event, progress) -> Path:
    """Train with ``trainer`` from its checkpoint (``resume``) or from step 1, to the end or
    to a stop; returns the run directory."""
    from orchestrator.stages import StageError

    metrics = None
    try:
        first = trainer.restore() + 1 if resume else 1
        metrics = MetricsLogger(trainer.storage, config=cfg.model_dump(mode="json"),
                                mode=cfg.logging.wandb_mode, project=cfg.logging.wandb_project,
                                name=cfg.run.name, resume=resume, resumed_at=first - 1)
        if resume:
            keep_through(trainer.storage, PROMPTS, first - 1)
        else:
            trainer.storage.write_text(PROMPTS, "")
        training.set()
        trainer.startup_s = time.monotonic() - trainer.launched_at
        log.info("first step starts %.1f s after launch", trainer.startup_s)
        stopped = _train(trainer, cfg, first, metrics, progress,
                         lambda: term.is_set() or ray.get(ctl.should_stop.remote(), timeout=cluster.GROUP_S))
        if stopped is not None:
            saved = trainer.save_checkpoint(stopped)
            log.warning("stopped at step %d; checkpoint %s (resume with run.resume=true)", stopped, saved)
            ray.get(ctl.mark.remote("stopped", str(saved)))
            if not term.is_set():
                # `r1lab stop` stops the Ray job next, so the job ends as STOPPED
                # rather than SUCCEEDED; do not outwait it for long.
                term.wait(timeout=120)
            return trainer.run_dir
        try:
            trainer.save_final()
        except (supervise.LearnerLost, ray.exceptions.RayActorError):
            raise  # the learner group restarts and saves again
        except Exception as err:  # noqa: BLE001 - a full disk, a store refusing: keep the trained state
            raise StageError(f"saving final/ failed: {supervise.first_line(err)}. "
                             f"{_keep_trained(trainer, cfg.grpo.steps)}") from None
        ray.get(ctl.mark.remote("finished"))
    finally:
        if metrics is not None:
            metrics.close()
    return trainer.run_dir


def _keep_trained(trainer: GRPOTrainer, last: int) -> str:
    """After ``final/`` failed: a checkpoint of the last step, if none is there yet and one
    can be written; says what holds the trained state and what a resume will do."""
    latest = trainer.checkpoints.latest()
    if latest is None or latest.step < last:
        try:
            trainer.save_checkpoint(last)
        except Exception as err:  # noqa: BLE001 - the same full disk, most likely
            log.error("the checkpoint of step %d could not be written either: %s", last, supervise.first_line(err))
        latest = trainer.checkpoints.latest()
    if latest is None:
        return "No checkpoint could be written: the trained weights are lost"
    where = trainer.storage.location(latest.path)
    if latest.step == last:
        return f"The trained state is in {where}; once there is room, run.resume=true writes final/ alone"
    again = f"step {last}" if latest.step + 1 == last else f"steps {latest.step + 1}-{last}"
    return (f"The newest checkpoint is {where} (step {latest.step} of {last}); once there is room, run.resume=true "
            f"trains {again} again and writes final/")


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


def _stop_on_signals(term: threading.Event, training: threading.Event):
    """SIGTERM and Ctrl-C set ``term`` (stop at the next step boundary, with a checkpoint);
    a second Ctrl-C, or one before training began (nothing to save yet), raises
    ``KeyboardInterrupt`` at once. Returns what undoes this."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(*_) -> None:
        if term.is_set() or not training.is_set():
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
