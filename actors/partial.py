"""Interruptible generation: one vLLM engine that loads new weights between two engine
steps and carries on with the samples it was drawing (partial rollout).

    callers   = any number of ``stream_groups`` calls (one a launch, threads of the actor)
                add samples and read finished ones from their own queue
    one thread = the only one that touches the engine: add requests, step, route outputs
    a push    = at the next step boundary: abort the unfinished samples (their tokens so
                far are kept), load the weights, reset the prefix cache, and submit each
                sample again as prompt + its tokens so far, for the tokens it has left

Each sample is one vLLM request (n = 1; sample j of a seeded prompt is seeded with
``child_seed(seed, j)``, as vLLM seeds the children of an n > 1 request), so a sample can
be stopped and continued on its own. A continued sample is prefilled again under the new
weights: its earlier tokens stay as sampled (with their log-probs and the version that drew
them), and every later token is drawn, and scored, by the new policy. The per-token
versions go to the learner (``Completion.versions``), which corrects for the mix
(``learner.grpo.importance_weights``) and reports staleness per token.

AReaL (interruptible generation) and slime (abort and continue) stop and re-prefill in the
same way; PipelineRL keeps the stale KV cache instead, which is cheaper but leaves the
cached keys/values of the old policy under the new one.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from actors import vllm_adapter

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often a waiting caller checks that the engine thread is alive


@dataclass
class Sample:
    """One completion in flight: what it was asked for and what it has so far."""

    call: int  # the stream_groups call it belongs to
    prompt: int  # its prompt's position in that call
    index: int  # j: which of the prompt's samples
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: dict  # temperature, top_p, ignore_eos
    seed: int | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # the policy version that drew each token
    resumes: int = 0  # times it was stopped by a weight load and continued
    finish_reason: str | None = None

    @property
    def left(self) -> int:
        return self.max_new_tokens - len(self.token_ids)


class EngineStopped(RuntimeError):
    """The engine thread ended (an engine error, or ``close``)."""


class InterruptibleEngine:
    """Drives ``llm`` from one thread. ``params(sample)`` builds a sample's vLLM
    ``SamplingParams`` (n = 1, DELTA outputs, the sampled token's log-prob)."""

    def __init__(self, llm, params: Callable[[Sample], object], *, name: str) -> None:
        self.llm = llm
        self.params = params
        self.name = name
        self.version = 0  # the policy version the engine's weights are (set by loads)
        self.tokens_sampled = 0  # since start: tokens drawn, all samples together
        self.resumed = 0  # since start: samples continued after a load
        self._cond = threading.Condition()
        self._new: list[Sample] = []  # submitted, not yet added to the engine
        self._loads: list[_Load] = []
        self._queues: dict[int, queue.Queue] = {}
        self._active: dict[str, Sample] = {}  # request id -> sample
        self._ids = itertools.count()
        self._calls = itertools.count()
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"{name}-engine", daemon=True)
        self._thread.start()

    # -- callers ----------------------------------------------------------------------------
    def submit(self, samples: Sequence[Sample]) -> Iterator[Sample]:
        """Draw ``samples`` (their ``call`` is set here); yields each as it finishes."""
        call = next(self._calls)
        q: queue.Queue = queue.Queue()
        with self._cond:
            self._raise_if_stopped()
            self._queues[call] = q
            for s in samples:
                s.call = call
            self._new.extend(samples)
            self._cond.notify_all()
        try:
            for _ in range(len(samples)):
                yield self._get(q)
        finally:
            with self._cond:
                self._queues.pop(call, None)

    def load(self, fn: Callable[[], object], version: int | None, timeout_s: float) -> object:
        """Run ``fn`` (load new weights into the engine) on the engine thread between two
        steps, stopping and continuing the samples in flight; the engine then holds
        ``version`` (None: unchanged; ``fn`` may then run anything that needs the engine
        to itself). Returns what ``fn`` returned."""
        job = _Load(fn, version)
        with self._cond:
            self._raise_if_stopped()
            self._loads.append(job)
            self._cond.notify_all()
        if not job.done.wait(timeout_s):
            raise TimeoutError(f"{self.name}: loading weights version {version} did not finish within "
                               f"{timeout_s:.0f} s (the engine thread is stuck in a step)")
        if job.error is not None:
            raise job.error
        return job.result

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def _get(self, q: queue.Queue) -> Sample:
        while True:
            try:
                item = q.get(timeout=POLL_S)
            except queue.Empty:
                with self._cond:
                    self._raise_if_stopped()
                continue
            if isinstance(item, BaseException):
                raise EngineStopped(f"{self.name}: the engine failed: {item}") from item
            return item

    def _raise_if_stopped(self) -> None:
        if self._error is not None:
            raise EngineStopped(f"{self.name}: the engine failed: {self._error}") from self._error
        if self._closed:
            raise EngineStopped(f"{self.name} is closed")

    # -- the engine thread ------------------------------------------------------------------
    def _loop(self) -> None:
        loads: list[_Load] = []
        try:
            while True:
                with self._cond:
                    while not (self._closed or self._new or self._loads or self._active):
                        self._cond.wait()
                    if self._closed:
                        return
                    new, self._new = self._new, []
                    loads, self._loads = self._loads, []
                for s in new:
                    self._add(s)
                for job in loads:
                    self._run_load(job)
                if self._active:
                    self._step()
        except BaseException as err:  # noqa: BLE001 - handed to every waiting caller
            log.exception("%s: engine thread failed", self.name)
            with self._cond:
                self._error = err
                for q in self._queues.values():
                    q.put(err)
                for job in (*loads, *self._loads):  # taken this pass or still queued
                    if not job.done.is_set():
                        job.fail(err)
                self._loads = []

    def _add(self, s: Sample) -> None:
        """Hand ``s`` to the engine; a request the engine refuses fails its own call only."""
        rid = f"{self.name}-{next(self._ids)}"
        try:
            vllm_adapter.add_request(self.llm, rid, (*s.prompt_ids, *s.token_ids), self.params(s))
        except (ValueError, TypeError) as err:
            self._deliver(s, err)
            return
        self._active[rid] = s

    def _deliver(self, s: Sample, item: Sample | BaseException) -> None:
        """To the sample's caller, if it still waits (a closed stream's samples are dropped)."""
        q = self._queues.get(s.call)
        if q is not None:
            q.put(item)

    def _step(self) -> None:
        for out in vllm_adapter.step(self.llm):
            s = self._active.get(out.request_id)
            if s is None:  # aborted in this step
                continue
            ids, lps = vllm_adapter.delta_tokens(out)
            s.token_ids += ids
            s.logprobs += lps
            s.versions += [self.version] * len(ids)
            self.tokens_sampled += len(ids)
            if out.finished:
                del self._active[out.request_id]
                s.finish_reason = vllm_adapter.finish_reason(out)
                self._deliver(s, s)

    def _run_load(self, job: _Load) -> None:
        """Stop every sample in flight, load, and continue them under the new weights."""
        stopped = list(self._active.items())
        if stopped:
            vllm_adapter.abort(self.llm, [rid for rid, _ in stopped])
        self._active.clear()
        try:
            job.result = job.fn()
            if job.version is not None:
                self.version = job.version
        except BaseException as err:  # noqa: BLE001 - the caller raises it; the samples carry on
            job.fail(err)
        else:
            job.done.set()
        for _, s in stopped:
            if s.token_ids:  # one not started yet keeps its own seed
                s.resumes += 1
                self.resumed += 1
            self._add(s)


@dataclass
class _Load:
    fn: Callable[[], object]
    version: int | None
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None

    def fail(self, err: BaseException) -> None:
        self.error = err
        self.done.set()


def continuation_seed(seed: int | None, resumes: int) -> int | None:
    """The seed a sample continues with after ``resumes`` stops: its own stream again would
    repeat the draws it began with, so each continuation takes a fresh one."""
    if seed is None or resumes == 0:
        return seed
    return vllm_adapter.mixed_seed(seed, resumes)

