"""Simulated rollout engines, reward actors and learner ranks for the pipeline benchmark.

They answer the calls the grpo driver makes (``orchestrator.stages.grpo.GRPOTrainer``)
and take time instead of CPU: an engine draws each sample's length from a lognormal
distribution and "generates" it at a fixed rate in one of its batch slots (decoding is
memory-bound: a sample's speed does not depend on how many share the batch); a weight
load stops the engine for ``load_s``; a learner rank "trains" each group as it arrives,
for its tokens ÷ its rate. Nothing here imports torch, so many engines fit one machine.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SimGroup:
    """A finished group: each sample's length and the policy versions that drew it, as
    ``(version, tokens)`` segments."""

    prompt_index: int
    lengths: tuple[int, ...]
    segments: tuple[tuple[tuple[int, int], ...], ...]
    policy_version: int


def sample_lengths(seed: int | None, samples: int, *, median: float, sigma: float, cap: int) -> list[int]:
    """``samples`` lengths from lognormal(ln median, sigma), cut at ``cap``: the long tail of
    reasoning traces (a few samples run to the budget)."""
    rng = random.Random(seed)
    return [max(1, min(cap, int(rng.lognormvariate(math.log(median), sigma)))) for _ in range(samples)]


@dataclass
class _Sample:
    length: int
    done: threading.Event = field(default_factory=threading.Event)
    drawn: float = 0.0
    segments: list[list[int]] = field(default_factory=list)  # [version, tokens]


class SimEngine:
    """A rollout engine: ``slots`` samples at a time, each at ``tokens_per_s``."""

    def __init__(self, index: int, *, slots: int, tokens_per_s: float, load_s: float, median: float,
                 sigma: float, cap: int) -> None:
        self.index = index
        self.slots = slots
        self.rate = tokens_per_s
        self.load_s = load_s
        self.shape = {"median": median, "sigma": sigma, "cap": cap}
        self._version = 0
        self._cond = threading.Condition()
        self._active: list[_Sample] = []
        self._waiting: deque[_Sample] = deque()
        self._paused = False
        self._last = time.monotonic()
        self.busy_s = 0.0  # slot-seconds spent drawing tokens
        threading.Thread(target=self._loop, daemon=True).start()

    def ready(self) -> bool:
        return True

    def version(self) -> int:
        return self._version

    def first_request_at(self) -> float | None:
        return None

    def busy(self) -> float:
        with self._cond:
            self._advance()
            return self.busy_s

    def init_weight_group(self, host, port, rank_offset, world_size, backend, spec) -> list[int]:
        return [rank_offset]

    def receive_weights(self, version: int, load: bool = True) -> int:
        with self._cond:
            if version <= self._version or self._paused:  # several engine handles share this process
                return 0
            self._advance()
            self._paused = True
        time.sleep(self.load_s)
        with self._cond:
            self._last = time.monotonic()  # nothing was drawn while paused
            self._paused = False
            self._version = version
            self._cond.notify_all()
        return 0

    def load_weights(self, spec, buffers, version: int) -> int:
        return self.receive_weights(version)

    def stream_groups(self, prompts, samples_per_prompt: int, *, seeds=None, expect_version=None, **sampling):
        per_prompt = []
        with self._cond:
            for k, _ in enumerate(prompts):
                lengths = sample_lengths(None if seeds is None else seeds[k], samples_per_prompt, **self.shape)
                samples = [_Sample(n) for n in lengths]
                self._waiting.extend(samples)
                per_prompt.append(samples)
            self._cond.notify_all()
        left = set(range(len(prompts)))

        def finished() -> list[int]:
            return [k for k in sorted(left) if all(s.done.is_set() for s in per_prompt[k])]

        while left:
            with self._cond:
                self._cond.wait_for(finished, timeout=5.0)
                ready = finished()
            for k in ready:
                left.discard(k)
                samples = per_prompt[k]
                if left:  # the stream protocol (actors.rollout.stream_items): the last group comes alone
                    yield k
                yield SimGroup(prompts[k].index, tuple(s.length for s in samples),
                               tuple(tuple(tuple(x) for x in s.segments) for s in samples),
                               min(s.segments[0][0] for s in samples))

    def _advance(self) -> None:
        """Draw tokens for the time since the last call (under the lock)."""
        now = time.monotonic()
        dt, self._last = now - self._last, now
        if self._paused or dt <= 0:
            return
        for s in self._active:
            step = min(dt * self.rate, s.length - s.drawn)
            s.drawn += step
            self.busy_s += step / self.rate
            if s.segments and s.segments[-1][0] == self._version:
                s.segments[-1][1] += step
            else:
                s.segments.append([self._version, step])
        done = [s for s in self._active if s.drawn >= s.length - 1e-9]
        for s in done:
            self._active.remove(s)
            whole = [[v, round(n)] for v, n in s.segments if round(n) > 0]  # a sliver is no token
            s.segments = whole or [[s.segments[-1][0], s.length]]
            s.done.set()
        if done:
            self._cond.notify_all()  # the streams waiting for them
        while self._waiting and len(self._active) < self.slots:
            self._active.append(self._waiting.popleft())

    def _loop(self) -> None:
        with self._cond:
            while True:
                self._advance()
                if self._active and not self._paused:
                    timeout = min(s.length - s.drawn for s in self._active) / self.rate
                else:
                    timeout = None
                self._cond.wait(timeout)


class SimReward:
    def ready(self) -> bool:
        return True

    def score(self, group: SimGroup) -> SimGroup:
        return group

    def score_groups(self, *groups: SimGroup) -> tuple[SimGroup, ...]:
        return groups

    def close(self) -> None:
        pass


class SimLearner:
    """A learner rank: trains each group when it arrives (its tokens ÷ ``tokens_per_s``),
    then an optimizer step of ``optimizer_s``; a push takes ``push_s``."""

    def __init__(self, *, groups_per_rank: int, tokens_per_s: float, optimizer_s: float, push_s: float) -> None:
        self.groups_per_rank = groups_per_rank
        self.rate = tokens_per_s
        self.optimizer_s = optimizer_s
        self.push_s = push_s
        self.engines: list = []  # the weight-push group's engines
        self.version = 0
        self._cond = threading.Condition()
        self._queued: dict[int, SimGroup] = {}
        self._next = 0

    def ready(self) -> bool:
        return True

    def address(self) -> tuple[str, int]:
        return "127.0.0.1", 1

    def collective_backend(self) -> str:
        return "gloo"

    def weight_spec(self):
        return None

    def init_weight_group(self, host, port, world_size, backend, engines=()) -> int:
        self.engines = list(engines)
        return 0

    def last_pushed(self) -> list:
        return []

    def push_weights(self, version: int, engines_within_s: float | None = None) -> float:
        """As ``learner.grpo_role.GRPOLearner.push_weights``: with ``engines_within_s``, the
        engines are asked to receive from here."""
        import ray

        receiving = [e.receive_weights.remote(version) for e in self.engines] if engines_within_s is not None else []
        time.sleep(self.push_s)
        ray.get(receiving, timeout=engines_within_s)
        return self.push_s

    def put(self, index: int, group: SimGroup) -> int:
        with self._cond:
            self._queued[index] = group
            self._cond.notify_all()
            return len(self._queued)

    def put_groups(self, indices, *groups: SimGroup) -> tuple[int, ...]:
        return tuple(self.put(i, g) for i, g in zip(indices, groups, strict=True))

    def train_step(self, step: int):
        from learner.grpo_role import StepStats

        stats = StepStats()
        t0 = time.monotonic()
        for _ in range(self.groups_per_rank):
            waited = time.monotonic()
            with self._cond:
                while self._next not in self._queued:
                    if not self._cond.wait(600):
                        raise TimeoutError(f"no group {self._next} within 600 s")
                g = self._queued.pop(self._next)
                self._next += 1
            stats.wait_seconds += time.monotonic() - waited
            tokens = sum(g.lengths)
            time.sleep(tokens / self.rate)
            stats.groups += 1
            stats.sequences += len(g.lengths)
            stats.response_tokens += tokens
            for segments in g.segments:
                for version, n in segments:
                    stats.staleness_sum += (self.version - version) * n
                    stats.staleness_max = max(stats.staleness_max, float(self.version - version))
        time.sleep(self.optimizer_s)
        self.version += 1
        stats.learner_seconds = time.monotonic() - t0 - stats.wait_seconds
        return stats
