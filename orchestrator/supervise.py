"""Keeping a stage going when actors die or stall: deadlines, the watchdog, restarts.

A launch's prompts travel

    rollout engine (a stream)  →  reward actor → reward-model actor → reference actor  →  destination

and ``Flight.run`` watches every hop of every group:

- each engine's stream must finish within ``Deadlines.generation_s``, each group must get
  from generated to delivered within ``Deadlines.scoring_s``;
- a hop that fails because its actor died, or that passes its deadline (``Keeper.late``
  names the actor and its node, dumps its stack, and kills it), is redone once the actor
  is back. Ray restarts rollout, reward, reference and reward-model actors (up to
  ``run.max_restarts`` times each) in their own placement bundle, which Ray moves to
  another node when theirs is gone;
- a lost group is generated again on its engine with its own seed (the same completions
  when the engine holds the same weights); a group whose scoring failed is scored again;
- every group is delivered once, under its position in the launch, whatever failed. A
  learner rank that dies or stalls ends the flight with ``LearnerLost``: the grpo stage
  restarts the learner group from its latest checkpoint.

Every restart is one ``Keeper.events`` row: role, actor, node, cause, time to recover.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import ray

from orchestrator import streaming

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often actor state is read while waiting for a restart
SETTLE_S = 30.0  # an actor error with no restart after this long was a passing outage
STACK_TIMEOUT_S = 20.0
RESTART_S = 120.0  # on top of twice the grace: an engine rebuilt and its weights loaded


class LearnerLost(RuntimeError):
    """A learner rank died or stalled: the learner group restarts from a checkpoint."""


class ActorGone(RuntimeError):
    """An actor that cannot be brought back: out of restarts, or it fails its work itself."""


# -- deadlines --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deadlines:
    """Seconds each remote result may take before its actor counts as hung.

    Each is ``grace_s`` plus the work at the slowest speed that is not a hang
    (``run.min_tokens_per_s`` per actor, the reward's own time limit)."""

    generation_s: float  # one engine's share of a launch, first group to last
    scoring_s: float  # one group, from generated to delivered (reward, reward model, reference)
    restart_s: float  # an actor back after it died
    learner_s: float  # a learner step after its last group, or a weight push

    @classmethod
    def of(cls, *, grace_s: float, tokens_per_s: float, prompts_per_engine: int, samples: int,
           max_new_tokens: int, max_model_len: int, reward_timeout_s: float, reward_calls_per_worker: int,
           learner_tokens: int = 0) -> Deadlines:
        generation = prompts_per_engine * samples * max_new_tokens / tokens_per_s
        scoring = reward_calls_per_worker * reward_timeout_s + samples * max_model_len / tokens_per_s
        return cls(generation_s=grace_s + generation, scoring_s=grace_s + scoring, restart_s=2 * grace_s + RESTART_S,
                   learner_s=grace_s + learner_tokens / tokens_per_s)

    @classmethod
    def for_grpo(cls, cfg) -> Deadlines:
        """From a ``GRPOStageConfig``."""
        g = cfg.grpo
        rules = max(1, len(cfg.rewards.rewards))
        calls = math.ceil(g.samples_per_prompt * rules / cfg.rewards.workers)
        tokens = g.prompts_per_step * g.samples_per_prompt * cfg.rollout.max_model_len
        return cls.of(grace_s=cfg.run.hang_grace_s, tokens_per_s=cfg.run.min_tokens_per_s,
                      prompts_per_engine=math.ceil(g.prompts_per_step / cfg.cluster.rollout_engines),
                      samples=g.samples_per_prompt, max_new_tokens=cfg.rollout.max_new_tokens,
                      max_model_len=cfg.rollout.max_model_len, reward_timeout_s=cfg.rewards.timeout_s,
                      reward_calls_per_worker=calls,
                      learner_tokens=tokens * (1 + cfg.loss.updates_per_batch) // cfg.cluster.learner_workers)


# -- who is who -------------------------------------------------------------------------------


@dataclass
class Member:
    """One actor of the stage: its role, index within the role, and handle."""

    role: str
    index: int
    handle: object
    restarts_seen: int = 0  # Ray's restart count when this member was last accounted for
    back_at: float = -math.inf  # when it last came back from a restart (monotonic)

    @property
    def actor_id(self) -> str:
        return self.handle._actor_id.hex()

    @property
    def label(self) -> str:
        return self.role if self.role in ("reference", "reward_model") else f"{self.role} {self.index}"


@dataclass(frozen=True)
class Whereabouts:
    """What Ray's control store says about an actor."""

    state: str
    node_id: str
    ip: str
    pid: int
    restarts: int
    death_cause: str = ""

    def __str__(self) -> str:
        return f"pid {self.pid} on node {self.ip} ({self.node_id[:12]})"


def whereabouts(actor_id: str) -> Whereabouts:
    from ray._private import state as ray_state  # the GCS table: works without the dashboard

    return _whereabouts(ray_state.actors(actor_id=actor_id) or {})


def whereabouts_all(actor_ids: Sequence[str]) -> dict[str, Whereabouts]:
    """``whereabouts`` of many actors of this job in one read of the control store (one
    read an actor cost about 1 ms of the driver's CPU each, every step, at 256 engines)."""
    from ray._private import state as ray_state

    table = ray_state.actors(job_id=ray.JobID.from_hex(ray.get_runtime_context().get_job_id()))
    return {a: _whereabouts(table.get(a) or {}) for a in actor_ids}


def _whereabouts(info: dict) -> Whereabouts:
    address = info.get("Address") or {}
    return Whereabouts(str(info.get("State", "UNKNOWN")), str(address.get("NodeID", "?")),
                       str(address.get("IPAddress", "?")), int(info.get("Pid") or 0),
                       int(info.get("NumRestarts") or 0), str(info.get("DeathCause") or "")[:300])


class Roster:
    """The stage's actors by role, found by actor id."""

    def __init__(self, actors) -> None:
        members = [Member("learner", i, h) for i, h in enumerate(actors.learners)]
        members += [Member("rollout", i, h) for i, h in enumerate(actors.rollouts)]
        members += [Member("reward", i, h) for i, h in enumerate(actors.rewards)]
        members += [Member(role, 0, h) for role, h in (("reference", actors.reference),
                                                         ("reward_model", actors.reward_model)) if h is not None]
        self.members = members
        self.by_id = {m.actor_id: m for m in members}

    def of(self, handle) -> Member:
        return self.by_id[handle._actor_id.hex()]

    def who(self, err: BaseException) -> Member | None:
        """The member whose death or outage ``err`` reports (None: not an actor fault)."""
        actor_id = getattr(err, "actor_id", None)
        return self.by_id.get(actor_id) if actor_id else None


def stack_of(where: Whereabouts) -> str:
    """The Python stacks of the process at ``where`` (py-spy, without pausing it: a stopped
    process still shows where it stopped); why not, when it cannot be had."""
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")  # ray[default] installs it beside python
    spy = spy if os.path.exists(spy) else (shutil.which("py-spy") or spy)
    if not where.pid or not os.path.exists(spy):
        return "(no stack: py-spy is not installed)"
    if where.ip not in (ray.util.get_node_ip_address(), "127.0.0.1"):
        return f"(no stack: the process is on node {where.ip}; run `py-spy dump --pid {where.pid}` there)"
    try:
        out = subprocess.run([spy, "dump", "--nonblocking", "--pid", str(where.pid)], capture_output=True,
                             text=True, timeout=STACK_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"(no stack: py-spy failed: {err})"
    return (out.stdout or out.stderr).strip()[-4000:]


# -- the keeper -------------------------------------------------------------------------------


@dataclass
class Keeper:
    """Accounts for restarts and runs the watchdog for one stage.

    ``max_restarts``: 0 means actors are not restarted (eval, sample): any actor fault
    ends the stage with a sentence naming the actor. ``step``: the step being worked on,
    for the event rows."""

    roster: Roster
    deadlines: Deadlines
    max_restarts: int = 0
    on_event: Callable[[dict], None] | None = None
    step: int = 0
    restarts: Counter = field(default_factory=Counter)
    events: list[dict] = field(default_factory=list)

    def late(self, member: Member, what: str, waited_s: float) -> None:
        """``member`` has not finished ``what`` within its deadline: say who and where it is,
        dump its stack, and kill it (Ray restarts it where restarts are on)."""
        where = whereabouts(member.actor_id)
        log.error("%s (actor %s, %s) is late: %s, not done after %.0f s; its stack:\n%s", member.label,
                  member.actor_id[:12], where, what, waited_s, stack_of(where))
        self._event(member, cause=f"hung: {what} not done after {waited_s:.0f} s", where=where, recovered_s=None)
        if member.role == "learner":
            raise LearnerLost(f"learner rank {member.index} ({where}) did not finish {what} within {waited_s:.0f} s")
        if self.max_restarts <= 0:
            raise ActorGone(f"{member.label} ({where}) did not finish {what} within {waited_s:.0f} s; rerun, or "
                            f"raise run.hang_grace_s if it is only slow")
        ray.kill(member.handle, no_restart=False)

    def failed(self, member: Member, err: BaseException, submitted_at: float) -> None:
        """``member`` failed work submitted at ``submitted_at`` with an actor error: return
        once it is back (restarted or the outage passed), so the work can be redone.
        Several failures from one death count one restart."""
        if member.role == "learner":
            raise LearnerLost(f"learner rank {member.index} was lost: {first_line(err)}")
        if submitted_at < member.back_at:
            return  # failed by the death already recovered from
        t0 = time.monotonic()
        where = whereabouts(member.actor_id)
        if self.max_restarts <= 0:
            raise ActorGone(f"{member.label} ({where}) was lost: {first_line(err)}")
        while True:
            where = whereabouts(member.actor_id)
            if where.state == "DEAD":
                raise ActorGone(f"{member.label} died and is out of restarts (run.max_restarts="
                                f"{self.max_restarts}): {where.death_cause or first_line(err)}")
            if where.state == "ALIVE" and where.restarts > member.restarts_seen:
                break
            waited = time.monotonic() - t0
            if where.state == "ALIVE" and waited > SETTLE_S:
                log.warning("%s was unavailable (%s) and is back without a restart", member.label, first_line(err))
                member.back_at = time.monotonic()
                return
            if waited > self.deadlines.restart_s:
                raise ActorGone(f"{member.label} was lost ({first_line(err)}) and was not back within "
                                f"{self.deadlines.restart_s:.0f} s (state {where.state}); the cluster may lack room "
                                f"for it on another node")
            time.sleep(POLL_S)
        ray.get(member.handle.ready.remote(), timeout=max(1.0, self.deadlines.restart_s - (time.monotonic() - t0)))
        count = where.restarts - member.restarts_seen
        member.restarts_seen = where.restarts
        member.back_at = time.monotonic()
        self.restarts[member.role] += count
        recovered = member.back_at - t0
        log.warning("%s was lost (%s) and restarted: %s, back in %.1f s", member.label, first_line(err), where,
                    recovered)
        self._event(member, cause=first_line(err), where=where, recovered_s=recovered)

    def sweep(self) -> None:
        """Count the restarts nothing failed on (an actor killed while idle: Ray restarted
        it before its next call)."""
        members = [m for m in self.roster.members if m.role != "learner"]
        table = whereabouts_all([m.actor_id for m in members])
        for member in members:
            where = table[member.actor_id]
            if where.restarts > member.restarts_seen:
                self.restarts[member.role] += where.restarts - member.restarts_seen
                member.restarts_seen = where.restarts
                member.back_at = time.monotonic()
                log.warning("%s was restarted while idle: %s (%s)", member.label, where,
                            where.death_cause or "no cause recorded")
                self._event(member, cause=f"restarted while idle: {where.death_cause or 'no cause recorded'}",
                            where=where, recovered_s=None)

    def _event(self, member: Member, *, cause: str, where: Whereabouts, recovered_s: float | None) -> None:
        now = time.time()
        row = {"time": now, "detected_at": now - (recovered_s or 0.0), "step": self.step, "role": member.role,
               "index": member.index,
               "actor": member.actor_id, "node": where.node_id, "ip": where.ip, "pid": where.pid,
               "cause": cause, "recovered_s": recovered_s}
        self.events.append(row)
        if self.on_event is not None:
            self.on_event(row)


def first_line(err: BaseException) -> str:
    """The first line of what ``err`` says; for an error passed on by Ray from another
    task, what the original error says."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300].rstrip(".")


# -- one launch in flight ---------------------------------------------------------------------


@dataclass
class Hop:
    """One call on a group's way: who runs it, and its result."""

    member: Member
    ref: ray.ObjectRef


@dataclass
class _Group:
    position: int
    group: ray.ObjectRef
    hops: list[Hop]
    deadline: float
    submitted: float


Chain = Callable[[Sequence[int], Sequence[ray.ObjectRef]], list[list[Hop]]]

GROUPS_PER_CHAIN = 16  # the most groups one chain call carries (see ``_chunks``)


class Flight:
    """One launch's groups, generated, scored and delivered exactly once each.

    ``chain(positions, group_refs)`` submits the hops of several groups, one call per actor
    (``streaming.each``), and returns each group's; its last hop delivers it (the grpo
    stage: a learner rank's ``put``); None: generation only. The groups generated by one
    pass over the streams go to ``chain`` in chunks of 1, 2, 4, ... up to
    ``GROUPS_PER_CHAIN``: few calls, yet the first group of a pass is not held back by
    the others. ``catch_up(engine)`` runs before engine ``engine`` samples again after a
    failure, and returns the policy version it then holds (the grpo stage loads the current
    weights into a restarted engine). ``run`` returns each position's last result."""

    def __init__(self, launch: streaming.Launch, engines: Sequence, keeper: Keeper, chain: Chain | None = None,
                 catch_up: Callable[[int], int | None] | None = None) -> None:
        self.launch = launch
        self.engines = list(engines)
        self.keeper = keeper
        self.chain = chain
        self.catch_up = catch_up
        self.groups: dict[int, _Group] = {}
        self.done: dict[int, ray.ObjectRef] = {}
        self.fresh: list[tuple[int, ray.ObjectRef]] = []  # generated, not yet chained: (position, group)

    def run(self) -> dict[int, ray.ObjectRef]:
        launch = self.launch
        ready, launch.ready = launch.ready, {}
        for position in sorted(ready):
            self._generated(position, ready[position])
        self._chain_fresh()
        while launch.streams or self.groups:
            self._step()
        return self.done

    def _step(self) -> None:
        launch, d = self.launch, self.keeper.deadlines
        for s in launch.streams:
            if s.deadline == math.inf:
                s.deadline = time.monotonic() + d.generation_s
        waits = [s.gen for s in launch.streams] + [g.hops[-1].ref for g in self.groups.values()]
        due = min([s.deadline for s in launch.streams] + [g.deadline for g in self.groups.values()])
        ready, _ = ray.wait(waits, num_returns=1, timeout=max(0.0, min(due - time.monotonic(), 5.0)))
        if ready:
            # Take everything ready by now in one pass: a wait costs the driver time in
            # proportion to what it watches (hundreds of engines, thousands of groups).
            if len(waits) > 1:
                ready, _ = ray.wait(waits, num_returns=len(waits), timeout=0)
            streams = {id(s.gen): s for s in launch.streams}
            groups = {g.hops[-1].ref: g for g in self.groups.values()}
            self._finish_all([groups[item] for item in ready if id(item) not in streams])
            for item in ready:
                stream = streams.get(id(item))
                if stream is not None:
                    self._read(stream)
            self._chain_fresh()
            return
        now = time.monotonic()
        for s in list(launch.streams):
            if now >= s.deadline:
                member = self.keeper.roster.of(self.engines[s.engine])
                self.keeper.late(member, f"generating {len(s.left)} groups", now - s.started)
                s.deadline = now + d.restart_s + d.generation_s
        for g in list(self.groups.values()):
            if now >= g.deadline:
                late = _first_unfinished(g.hops)
                self.keeper.late(late.member, f"the group of prompt position {g.position}", now - g.submitted)
                g.deadline = now + d.restart_s + d.scoring_s

    def _read(self, stream: streaming.Stream) -> None:
        """The next (k, group) pair of ``stream`` (the last group alone), or its end, or its
        failure."""
        if stream.lone:  # its group's ref: an engine's failure reaches the first hop, as below
            self.launch.streams.remove(stream)
            position = stream.positions[0]
            stream.left.discard(position)
            self._generated(position, stream.gen)
            return
        try:
            k_ref = next(stream.gen)
        except StopIteration:
            self.launch.streams.remove(stream)
            if stream.left:
                raise ActorGone(f"rollout {stream.engine} ended its stream without the groups of prompt positions "
                                f"{sorted(stream.left)}") from None
            return
        if len(stream.left) == 1:  # the last group comes alone (actors.rollout.stream_items)
            position, group_ref = next(iter(stream.left)), k_ref
            self.launch.streams.remove(stream)  # nothing more to read: its end is not awaited
        else:
            try:
                k = ray.get(k_ref, timeout=self.keeper.deadlines.generation_s)
                ray.wait([stream.gen], timeout=self.keeper.deadlines.generation_s)
                group_ref = next(stream.gen)
            except (ray.exceptions.RayError, StopIteration) as err:
                self._stream_failed(stream, err)
                return
            position = stream.positions[k]
        stream.left.discard(position)
        self._generated(position, group_ref)

    def _stream_failed(self, stream: streaming.Stream, err: BaseException) -> None:
        from actors.rollout import EngineBehind

        behind = isinstance(getattr(err, "cause", None), EngineBehind)
        member = self.keeper.roster.of(self.engines[stream.engine]) if behind else self.keeper.roster.who(err)
        if member is None or member.role != "rollout":
            raise ActorGone(f"rollout {stream.engine} failed: {first_line(err)}") from None
        self.launch.streams.remove(stream)
        if behind:  # restarted while idle, before this stream reached it
            self.keeper.sweep()
        else:
            self.keeper.failed(member, err, stream.started)
        self._regenerate(stream.engine, sorted(stream.left))

    def _regenerate(self, engine: int, positions: Sequence[int]) -> None:
        if not positions:
            return
        version = self.catch_up(engine) if self.catch_up is not None else None
        streaming.start_stream(self.launch, self.engines[engine], engine, positions, version=version)
        log.info("re-issued %d prompts to rollout %d", len(positions), engine)

    def _generated(self, position: int, group_ref: ray.ObjectRef) -> None:
        """Group ``position`` is generated (again): chained at the end of the pass."""
        if self.chain is None:
            self.done[position] = group_ref
        else:
            self.fresh.append((position, group_ref))

    def _chain_fresh(self) -> None:
        fresh, self.fresh = self.fresh, []
        for chunk in _chunks(fresh, GROUPS_PER_CHAIN):
            positions, refs = [p for p, _ in chunk], [g for _, g in chunk]
            now = time.monotonic()
            for (position, group_ref), hops in zip(chunk, self.chain(positions, refs), strict=True):
                self.groups[position] = _Group(position, group_ref, hops, now + self.keeper.deadlines.scoring_s, now)

    def _finish_all(self, done: list[_Group]) -> None:
        """Groups whose last hop is ready: delivered, in one read when none failed."""
        if not done:
            return
        try:
            ray.get([g.hops[-1].ref for g in done], timeout=self.keeper.deadlines.scoring_s)
        except ray.exceptions.RayError:
            for g in done:  # one by one: redo what failed
                self._finish(g)
            return
        for g in done:
            del self.groups[g.position]
            self.done[g.position] = g.hops[-1].ref

    def _finish(self, g: _Group) -> None:
        """The last hop of ``g`` is ready: delivered, or redo what failed."""
        del self.groups[g.position]
        try:
            ray.get(g.hops[-1].ref, timeout=self.keeper.deadlines.scoring_s)
        except ray.exceptions.RayError as err:
            self._hop_failed(g, err)
            return
        self.done[g.position] = g.hops[-1].ref

    def _hop_failed(self, g: _Group, err: BaseException) -> None:
        from actors.rollout import EngineBehind

        if isinstance(getattr(err, "cause", None), EngineBehind):
            # A stream's last group comes without its k (actors.rollout.stream_items), so an
            # engine's refusal to sample reaches the first hop: as in ``_stream_failed``.
            self.keeper.sweep()
            self._regenerate(g.position % len(self.engines), [g.position])
            return
        member = self.keeper.roster.who(err)
        lost = isinstance(err, ray.exceptions.ObjectLostError)  # the group went with its node
        if member is None and not lost:
            try:  # a lone last group carries its engine's error to the first hop (stream_items)
                ray.get(g.group, timeout=self.keeper.deadlines.scoring_s)
                where = getattr(err, "function_name", None) or "scoring"
            except ray.exceptions.RayError:
                where = f"rollout {g.position % len(self.engines)}"
            raise ActorGone(f"the group of prompt position {g.position} failed in {where}: "
                            f"{first_line(err)}") from None
        if member is not None:
            self.keeper.failed(member, err, g.submitted)
        if lost or member.role == "rollout":
            self._regenerate(g.position % len(self.engines), [g.position])
        else:
            self._generated(g.position, g.group)


def _chunks(items: list, most: int) -> list[list]:
    """``items`` in order, in chunks of 1, 2, 4, ... up to ``most`` items."""
    out, size = [], 1
    while items:
        out.append(items[:size])
        items, size = items[size:], min(2 * size, most)
    return out


def _first_unfinished(hops: Sequence[Hop]) -> Hop:
    for hop in hops:
        ready, _ = ray.wait([hop.ref], timeout=0)
        if not ready:
            return hop
    return hops[-1]


def scoring_chain(scoring: streaming.Scoring, roster: Roster, first_number: int = 0) -> Chain:
    """A ``Flight`` chain that scores group ``position`` as number ``first_number + position``."""
    def chain(positions: Sequence[int], group_refs: Sequence[ray.ObjectRef]) -> list[list[Hop]]:
        scored = scoring.score([first_number + p for p in positions], group_refs)
        return [[Hop(roster.of(actor), ref) for actor, ref in calls] for calls in scored]
    return chain


def sampling_keeper(actors, *, prompts: int, samples: int, max_new_tokens: int, max_model_len: int, rewards,
                    grace_s: float = 300.0, tokens_per_s: float = 50.0) -> Keeper:
    """The keeper of a stage that only samples and scores (eval, sample): deadlines from
    its sizes, no restarts (a lost actor ends the stage with a sentence naming it)."""
    calls = math.ceil(samples * max(1, len(rewards.rewards)) / rewards.workers)
    deadlines = Deadlines.of(grace_s=grace_s, tokens_per_s=tokens_per_s,
                             prompts_per_engine=math.ceil(prompts / max(1, len(actors.rollouts))), samples=samples,
                             max_new_tokens=max_new_tokens, max_model_len=max_model_len,
                             reward_timeout_s=rewards.timeout_s, reward_calls_per_worker=calls)
    return Keeper(Roster(actors), deadlines)


def collect(actors, keeper: Keeper, prompts: Sequence, samples_per_prompt: int, *, rewards: Sequence | None = None,
            on_group: Callable[[], None] | None = None, seed: tuple[int, int] | None = None, **sampling) -> list:
    """``samples_per_prompt`` completions per prompt, each group scored (by ``rewards``,
    default the stage's reward actors) as it finishes; returned in prompt order.
    ``on_group()`` is called as each group is scored. ``seed``: (run seed, slot): prompt p
    is sampled with ``streaming.prompt_seed(*seed, p.index)``."""
    seeds = None if seed is None else [streaming.prompt_seed(*seed, p.index) for p in prompts]
    scoring = streaming.Scoring(actors.rewards if rewards is None else rewards)
    base = scoring_chain(scoring, keeper.roster)

    def chain(positions: Sequence[int], group_refs: Sequence[ray.ObjectRef]) -> list[list[Hop]]:
        hops = base(positions, group_refs)
        for _ in positions if on_group is not None else ():
            on_group()
        return hops

    started = streaming.launch(actors.rollouts, prompts, samples_per_prompt, seeds=seeds, **sampling)
    done = Flight(started, actors.rollouts, keeper, chain).run()
    scored = ray.get([done[p] for p in range(len(prompts))], timeout=keeper.deadlines.scoring_s)
    return sorted(scored, key=lambda s: s.group.prompt_index)


def await_all(calls: Sequence[tuple[str, object, ray.ObjectRef]], what: str, timeout_s: float,
              done_at: dict[str, float] | None = None) -> list:
    """The results of ``calls`` ((label, actor, result) each) within ``timeout_s``; past it,
    ``ActorGone`` names each late actor with its node and pid, after logging its stack.
    ``done_at``: receives the time (``time.monotonic``) each label's call finished."""
    refs = [ref for _, _, ref in calls]
    labels = {ref: label for label, _, ref in calls}
    deadline, late = time.monotonic() + timeout_s, list(refs)
    while late:  # one at a time: an error (one member died) ends the wait at once
        done, late = ray.wait(late, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            break
        ray.get(done[0])
        if done_at is not None:
            done_at[labels[done[0]]] = time.monotonic()
    if late:
        names = []
        for label, actor, ref in calls:
            if ref in late:
                where = whereabouts(actor._actor_id.hex())
                log.error("%s (%s) did not finish %s within %.0f s; its stack:\n%s", label, where, what, timeout_s,
                          stack_of(where))
                names.append(f"{label} ({where})")
        raise ActorGone(f"{', '.join(names)} did not finish {what} within {timeout_s:.0f} s")
    return ray.get(refs)
