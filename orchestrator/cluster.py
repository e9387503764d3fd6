"""Connecting to Ray and starting the actors of any stage, as placement decides.

``start(parts, roles)`` is the one way a stage gets actors: ``parts`` is what they are built
from (the stage's config, cut to what actors read), ``roles`` which of them the stage
needs. Resources and co-location come from ``orchestrator.placement``; nothing here sizes
an actor.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import ray

from actors.config import EngineBundles, ReferenceConfig, RolloutConfig
from learner.config import GRPOLossConfig, LearnerConfig
from orchestrator import placement
from orchestrator.config import ClusterConfig
from rewards.config import RewardModelSpec, RewardsConfig

log = logging.getLogger(__name__)
VERBOSE = "R1LAB_VERBOSE"  # "1": the actors' library output is shown on the console too (r1lab -v)


def connect(address: str | None, *, num_cpus: int | None = None, dashboard: bool = True) -> None:
    """Join ``address`` / ``RAY_ADDRESS``, or start an embedded local cluster (with Ray's
    dashboard unless ``dashboard`` is false)."""
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS")
    env = placement.actor_env()
    if not _cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    runtime_env = {"env_vars": env} if env else None
    # The actors' own output (vLLM, DeepSpeed, torch) stays in Ray's logs (the dashboard's
    # Logs tab, `ray logs`) unless -v: the console shows r1lab's progress. Their failures
    # still reach the driver as errors, which r1lab names.
    verbose = os.environ.get(VERBOSE) == "1"
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    if target:
        from orchestrator.jobs import init_quietly

        init_quietly(address=target, runtime_env=runtime_env, **quiet)
    else:
        # Ray starts an idle worker per CPU as the driver connects. r1lab's actors each get a
        # worker of their own, so on a small machine those only compete with the engines'
        # build (about 0.6 s of the first generation on 2 cores).
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        ray.init(address="local", num_cpus=placement.local_cpus(num_cpus), runtime_env=runtime_env,
                 include_dashboard=dashboard, **quiet)


def embedded_node(num_cpus: int | None) -> dict[str, float]:
    """The resources of the one node ``connect`` starts when no cluster is named."""
    import torch

    return {"CPU": float(placement.local_cpus(num_cpus)), "GPU": float(torch.cuda.device_count())}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# -- what the actors are built from -----------------------------------------------------------


@dataclass(frozen=True)
class GRPOLearners:
    """Learner ranks that train GRPO steps on groups fed to them while a step runs."""

    config: LearnerConfig
    loss: GRPOLossConfig
    temperature: float  # the rollout's sampling temperature (log-probs are taken at it)
    groups_per_rank: int
    samples_per_prompt: int
    max_new_tokens: int  # the generation budget: Dr. GRPO's loss normaliser
    group_wait_s: float = 3600.0  # train_step's deadline for its next group
    max_concurrency: int = 4  # feed() must run while train_step() waits for groups

    def actor_class(self) -> type:
        from learner.grpo_role import GRPOLearner

        return GRPOLearner

    def kwargs(self) -> dict:
        return {"loss": self.loss, "temperature": self.temperature, "groups_per_rank": self.groups_per_rank,
                "samples_per_prompt": self.samples_per_prompt, "max_new_tokens": self.max_new_tokens,
                "group_wait_s": self.group_wait_s}


@dataclass(frozen=True)
class SFTLearners:
    """Learner ranks that take supervised steps of fixed-size micro-batches."""

    config: LearnerConfig
    micro_batch_sequences: int
    micro_batches_per_step: int
    max_concurrency: int | None = None

    def actor_class(self) -> type:
        from learner.sft_role import SFTLearner

        return SFTLearner

    def kwargs(self) -> dict:
        return {"micro_batch_sequences": self.micro_batch_sequences,
                "micro_batches_per_step": self.micro_batches_per_step}


@dataclass(frozen=True)
class StageParts:
    """What a stage's actors are built from. ``reward_sets``: one pool of
    ``cluster.reward_actors`` reward actors per named reward set."""

    model_path: str
    cluster: ClusterConfig
    run_name: str = ""
    seed: int = 0
    trust_remote_code: bool = False
    rollout: RolloutConfig | None = None
    reference: ReferenceConfig | None = None
    learners: GRPOLearners | SFTLearners | None = None
    reward_sets: Mapping[str, RewardsConfig] = field(default_factory=dict)
    reward_models: tuple[RewardModelSpec, ...] = ()
    max_restarts: int = 0  # Ray restarts of each actor but the learner ranks
    partial_rollout: bool = False  # rollout engines take weight pushes mid-generation (actors.partial)
    launches_ahead: int = 0  # grpo.max_staleness_steps: streams an engine holds at once, less one
    colocated: bool = False  # rollout engines share the learner ranks' devices and sleep while they train

    @classmethod
    def for_grpo(cls, cfg, *, group_wait_s: float = 3600.0) -> StageParts:
        """From a ``GRPOStageConfig``: rollout, reward, reference and reward-model actors
        are restarted by Ray up to ``run.max_restarts`` times (``orchestrator.supervise``
        redoes their lost work); learner ranks are not (the group restarts as a whole)."""
        loss = cfg.loss.model_copy(update={"off_policy_correction": cfg.off_policy_correction})
        learners = GRPOLearners(cfg.learner, loss, cfg.rollout.temperature, cfg.groups_per_rank,
                                cfg.grpo.samples_per_prompt, cfg.rollout.max_new_tokens, group_wait_s=group_wait_s)
        return cls(cfg.model.path, cfg.cluster, run_name=cfg.run.name, seed=cfg.run.seed,
                   trust_remote_code=cfg.model.trust_remote_code, rollout=cfg.rollout, reference=cfg.reference,
                   learners=learners, reward_sets={"policy": cfg.rewards}, reward_models=cfg.rewards.reward_models,
                   max_restarts=cfg.run.max_restarts, partial_rollout=cfg.grpo.partial_rollout,
                   launches_ahead=cfg.grpo.max_staleness_steps,
                   colocated=cfg.cluster.colocate_rollout_with_learner)

    def plan(self, roles: Sequence[str]) -> placement.PlacementPlan:
        tp = self.rollout.tensor_parallel_size if self.rollout is not None else 1
        return placement.plan(self.cluster, roles, tensor_parallel_size=tp, reward_sets=max(1, len(self.reward_sets)))

    def reward_set(self, index: int) -> str:
        """The reward set of reward actor ``index``: consecutive pools of ``cluster.reward_actors``."""
        return list(self.reward_sets)[index // self.cluster.reward_actors]


# -- the actors -------------------------------------------------------------------------------


@dataclass
class StageActors:
    """Handles of a stage's actors. The driver holds handles and ObjectRefs, no weights."""

    pg: placement.Placement | None  # the stage's placement groups
    learners: list = field(default_factory=list)
    rollouts: list = field(default_factory=list)
    rewards: list = field(default_factory=list)
    reward_sets: dict[str, list] = field(default_factory=dict)  # set name -> its reward actors
    reference: object | None = None
    reward_model: object | None = None
    ready_at: dict[str, float] = field(default_factory=dict)  # label -> when it was ready (monotonic)

    def shutdown(self) -> None:
        for a in self.rewards:
            try:
                ray.get(a.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        optional = [a for a in (self.reference, self.reward_model) if a is not None]
        for a in self.learners + self.rollouts + self.rewards + optional:
            ray.kill(a)
        placement.release(self.pg)


def start(parts: StageParts, roles: Sequence[str], *, check_fits: bool = True, wait: bool = True) -> StageActors:
    """Start the actors of ``roles`` where ``placement`` puts them (connecting to Ray first
    if need be); learner ranks form their group and every actor is ready on return. On
    failure, what started is stopped.

    ``wait=False``: return once the rollout engines are ready, the other actors still
    building; ``wait_ready`` finishes the start (a stage can send its first generation
    request in between: the engines load the model on disk themselves)."""
    if "reward" in roles and not parts.reward_sets:
        raise ValueError("the reward role needs at least one reward set (StageParts.reward_sets)")
    connect(parts.cluster.address, num_cpus=parts.cluster.num_cpus, dashboard=parts.cluster.dashboard)
    p = parts.plan(roles)
    if check_fits:  # off where pre-flight checked it, and on restarts (a lost node may come back)
        placement.check_fits(p, autoscaling=parts.cluster.autoscaling)
    actors = StageActors(pg=placement.create_placement_groups(p))
    try:
        env = placement.actor_env()
        first, rest = _engines_first(p.actors)
        for batch in (first, rest):
            for a in batch:
                _start_actor(parts, a, placement.options_for(actors.pg, a, env=env), actors,
                             bundles=placement.engine_bundles(p, a, parts.cluster))
            if batch is first and first:
                _await_ready(_ready_calls(actors, ("rollout",)), actors)
        if wait:
            _wait_all(actors)
    except BaseException:
        actors.shutdown()
        raise
    return actors


def _engines_first(plans: Sequence[placement.ActorPlan]) -> tuple[list, list]:
    """(actors to build first, the rest). Engines that run on CPUs share the cores with
    every other actor's start-up (imports, model loads, DeepSpeed): built alone first, they
    are ready to sample in about a third of the time, and the others' start-up overlaps the
    first generation instead of delaying it. The CPU work is the same either way. Engines on
    GPUs start with the rest (what they share with the others is the host's CPUs only)."""
    engines = [a for a in plans if a.role == "rollout"]
    if not engines or any(a.num_gpus for a in engines):
        return [], list(plans)
    return engines, [a for a in plans if a.role != "rollout"]


@functools.cache
def _remote(cls: type):
    return ray.remote(cls)


def _start_actor(parts: StageParts, a: placement.ActorPlan, opts: dict, actors: StageActors, *,
                 bundles: EngineBundles | None = None) -> None:
    from actors.reference import ReferenceActor
    from actors.reward import RewardActor
    from actors.reward_model import RewardModelActor
    from actors.rollout import RolloutActor

    if a.role != "learner" and parts.max_restarts:
        opts = {**opts, "max_restarts": parts.max_restarts}
    if a.role == "learner":
        spec = parts.learners
        if spec.max_concurrency is not None:
            opts = {**opts, "max_concurrency": spec.max_concurrency}
        actors.learners.append(_remote(spec.actor_class()).options(**opts).remote(
            parts.model_path, spec.config, rank=a.index, world_size=parts.cluster.learner_workers,
            seed=parts.seed, **spec.kwargs()))
    elif a.role == "rollout":
        if parts.partial_rollout:  # streams of several launches, a push and queries run at once
            opts = {**opts, "max_concurrency": partial_rollout_calls(parts.launches_ahead)}
        actors.rollouts.append(_remote(RolloutActor).options(**opts).remote(
            parts.model_path, parts.rollout, a.index, run_name=parts.run_name, bundles=bundles,
            partial_rollout=parts.partial_rollout, colocated=parts.colocated))
    elif a.role == "reference":
        actors.reference = _remote(ReferenceActor).options(**opts).remote(
            parts.model_path, parts.reference, temperature=parts.rollout.temperature)
    elif a.role == "reward_model":
        actors.reward_model = _remote(RewardModelActor).options(**opts).remote(
            parts.reward_models, run_name=parts.run_name, trust_remote_code=parts.trust_remote_code)
    else:  # reward
        name = parts.reward_set(a.index)
        handle = _remote(RewardActor).options(**opts).remote(parts.reward_sets[name], run_name=parts.run_name,
                                                             index=a.index)
        actors.rewards.append(handle)
        actors.reward_sets.setdefault(name, []).append(handle)


PARTIAL_ROLLOUT_CALLS = 32  # threads of an interruptible rollout actor (calls; one thread drives the engine)


def partial_rollout_calls(launches_ahead: int) -> int:
    """Threads for an interruptible rollout actor: every stream holds one until it ends (the
    launches in flight, each possibly re-issued after a failure), and a push or a query must
    never queue behind them."""
    return max(PARTIAL_ROLLOUT_CALLS, 8 + 4 * (launches_ahead + 1))

READY_S = 1800.0  # an actor built and its model loaded (a large checkpoint from slow storage)
GROUP_S = 600.0  # a process group formed (every member has to join)


def _ready_calls(actors: StageActors, roles: Sequence[str]) -> list[tuple[str, object, ray.ObjectRef]]:
    """A ``ready`` call on each actor of ``roles`` (but the learner ranks) not yet known ready."""
    named = [(f"rollout {i}", a) for i, a in enumerate(actors.rollouts) if "rollout" in roles]
    named += [(f"reward {i}", a) for i, a in enumerate(actors.rewards) if "reward" in roles]
    named += [(role, a) for role, a in (("reference", actors.reference), ("reward_model", actors.reward_model))
              if a is not None and role in roles]
    return [(label, a, a.ready.remote()) for label, a in named if label not in actors.ready_at]


def _await_ready(calls: list, actors: StageActors, what: str = "starting") -> list:
    from orchestrator.supervise import await_all

    return await_all(calls, what, READY_S, done_at=actors.ready_at)


def wait_ready(actors: StageActors) -> None:
    """Every actor built and the learner ranks in their group; ``actors.ready_at`` records
    when each was (all wait at once: each is timed on its own). Stops every actor on failure."""
    try:
        _wait_all(actors)
    except BaseException:
        actors.shutdown()
        raise


def _wait_all(actors: StageActors) -> None:
    from orchestrator.supervise import await_all

    others = _ready_calls(actors, ("rollout", "reward", "reference", "reward_model"))
    setups = []
    if actors.learners:
        (master,) = await_all([("learner 0", actors.learners[0], actors.learners[0].address.remote())],
                              "starting", READY_S)
        setups = [(f"learner {i}", w, w.setup.remote(*master)) for i, w in enumerate(actors.learners)]
    done = _await_ready(setups + others, actors, "starting (learner ranks: joining their group)")
    if setups:
        log.info("learner group of %d ranks ready (%d parameters)", len(setups), done[0])


def init_weight_push(actors: StageActors, backend: str, tensor_parallel_size: int, *,
                     timeout_s: float = GROUP_S) -> None:
    """Form the weight-push group: learner rank 0 plus every worker of every engine (rank 0
    is handed the engines: it asks them to receive each push, ``GRPOLearner.push_weights``)."""
    from orchestrator.supervise import await_all

    rank0 = actors.learners[0]
    host, port = await_all([("learner 0", rank0, rank0.address.remote())], "answering", timeout_s)[0]
    spec = await_all([("learner 0", rank0, rank0.weight_spec.remote())], "describing its weights", timeout_s)[0]
    world = 1 + len(actors.rollouts) * tensor_parallel_size
    calls = [("learner 0", rank0, rank0.init_weight_group.remote(host, port, world, backend, list(actors.rollouts)))]
    for i, engine in enumerate(actors.rollouts):
        calls.append((f"rollout {i}", engine,
                      engine.init_weight_group.remote(host, port, 1 + i * tensor_parallel_size, world, backend, spec)))
    await_all(calls, "forming the weight-push group", timeout_s)


def save_final(run, learners: Sequence, tokenizer) -> str:
    """Learner rank 0 writes the weights, the driver the tokenizer, both into a temp folder
    of ``run`` (a ``RunStorage``) that becomes ``final/`` once complete: a crash or a full
    disk leaves no half-written ``final/`` (and the temp folder is removed)."""
    import uuid

    from orchestrator import supervise

    partial = f"final.partial-{uuid.uuid4().hex[:8]}"
    where, publish = run.writer(partial)
    try:
        supervise.await_all([(f"learner {i}", w, w.save_hf.remote(where, publish)) for i, w in enumerate(learners)],
                            "saving final/", READY_S)
        run.save_pretrained(tokenizer, partial)
        run.replace_dir(partial, "final")
    except BaseException:
        run.remove(partial)
        raise
    return run.location("final")
