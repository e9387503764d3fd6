"""Score rewards in worker processes, each call under a wall-clock deadline.

Verifiers run model output through sympy, which can be made to run for ever
(``9!!!!!!!!``) or to fill memory (``10^{10^{10}}``). ``signal.alarm`` cannot bound them:
it works only on the main thread, and Ray runs actor methods off it — Math-Verify's
alarm-based timeout once turned every score inside Ray workers into 0. So each call runs
in a worker process; a call past its deadline gets its worker killed and replaced, and
comes back as ``RewardStatus.TIMEOUT``. A reward that raises comes back as
``RewardStatus.ERROR`` with the exception in the reason. Both are counted in ``stats()``
and neither is a silent 0 that looks like "wrong".

Workers are fresh interpreters (``python -m rewards.isolation.pool``) started through
``subprocess`` — exec right after fork, no ``preexec_fn``, so safe from a threaded
caller — and talk over pipes with ``multiprocessing.connection``. Not
``multiprocessing.Process``: its spawn and forkserver methods re-import the caller's
``__main__`` in every worker (the ``r1lab`` CLI, Ray's worker script), which costs
seconds per restart and breaks scripts without a ``__main__`` guard.
"""

from __future__ import annotations

import importlib
import os
import resource
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from rewards.config import RewardSpec
from rewards.registry import build_reward
from rewards.types import RewardResult, RewardStatus

_STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded 2-core machine can take seconds
_REASON_CHARS = 300
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class RewardStats:
    """Cumulative counts for one reward. ``seconds`` is wall-clock time in calls."""

    calls: int = 0
    timeouts: int = 0
    errors: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class PoolStats:
    """Per-reward counts since the pool started, and how often a worker was replaced."""

    rewards: dict[str, RewardStats] = field(default_factory=dict)
    worker_restarts: int = 0


def _worker_main(task_fd: int, result_fd: int, lifeline_fd: int) -> None:
    """Worker loop: build the rewards, then answer (task, name, response, reference)."""
    tasks = Connection(task_fd, writable=False)
    results = Connection(result_fd, readable=False)
    threading.Thread(target=_exit_with_parent, args=(lifeline_fd,), daemon=True).start()
    specs, imports, sys_path, memory_limit_bytes = tasks.recv()
    try:
        sys.path.extend(p for p in sys_path if p not in sys.path)
        if memory_limit_bytes is not None:
            # Beyond this, allocation raises MemoryError (reported as ERROR) instead of
            # the kernel's OOM killer picking a process on a shared machine.
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
        for module in imports:
            importlib.import_module(module)
        fns = {name: build_reward(name, **options) for name, options in specs}
    except Exception:
        results.send(("failed", traceback.format_exc(limit=5)))
        return
    results.send(("ready", None))
    while True:
        try:
            task = tasks.recv()
        except EOFError:  # the parent closed the pool or went away
            return
        if task is None:
            return
        task_id, name, response, reference = task
        start = time.perf_counter()
        try:
            result = fns[name](response, reference)
            if not isinstance(result, RewardResult):
                raise TypeError(f"reward {name!r} returned {type(result).__name__}, not RewardResult")
        except Exception as err:  # reported as ERROR and counted, never a silent 0
            reason = f"{type(err).__name__}: {err}"[:_REASON_CHARS]
            result = RewardResult(0.0, RewardStatus.ERROR, reason)
        results.send((task_id, result, time.perf_counter() - start))


def _exit_with_parent(lifeline_fd: int) -> None:
    """Exit when the parent's end of the lifeline closes (it exited or was killed).

    Workers run in their own session (Ctrl-C in a terminal goes to the parent only), so
    nothing else would stop one stuck in sympy after its parent died.
    """
    while os.read(lifeline_fd, 1):
        pass
    os._exit(1)


class _Worker:
    """One worker process, its pipes, and the task it is running, if any."""

    def __init__(self, init: tuple[Any, ...]) -> None:
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        life_r, life_w = os.pipe()
        child_fds = (task_r, result_w, life_r)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rewards.isolation.pool", *map(str, child_fds)],
                pass_fds=child_fds,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": _pythonpath()},
                start_new_session=True,
            )
        finally:
            for fd in child_fds:
                os.close(fd)
        self.tasks = Connection(task_w, readable=False)
        self.conn = Connection(result_r, writable=False)
        self._lifeline = life_w
        self.tasks.send(init)
        self.ready = False
        self.task: tuple[int, str] | None = None
        self.started_at = time.monotonic()  # process start, then when the task was sent
        self.deadline = 0.0

    @property
    def exitcode(self) -> int | None:
        return self.process.poll()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10.0)
        self.tasks.close()
        self.conn.close()
        if self._lifeline >= 0:
            os.close(self._lifeline)
            self._lifeline = -1


def _pythonpath() -> str:
    # The worker must import ``rewards`` however the caller did (installed, or from a
    # checkout on sys.path); the caller's full sys.path follows in the init message.
    rest = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(p for p in (_PACKAGE_ROOT, rest) if p)


class ScoringPool:
    """Worker processes that score ``(response, reference)`` pairs with named rewards.

    ``score`` fans items × rewards out over ``workers`` processes; each call has
    ``timeout_s`` of wall-clock time from the moment a worker takes it. Safe to call
    from any thread (calls are serialised) and inside Ray actors.

    ``imports``: modules each worker imports before building the rewards, so that
    rewards registered outside r1lab (``@register("mine")``) can be named in specs.
    ``memory_limit_mb``: address-space limit per worker (None: unlimited).
    """

    def __init__(
        self,
        specs: Sequence[RewardSpec],
        *,
        workers: int,
        timeout_s: float,
        imports: Sequence[str] = (),
        memory_limit_mb: int | None = 4096,
    ) -> None:
        names = [s.name for s in specs]
        if not names:
            raise ValueError("ScoringPool needs at least one RewardSpec")
        if len(set(names)) != len(names):
            raise ValueError(f"each reward may appear once, got {names}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        # Build each reward here first, so a bad name or option fails now, with the
        # registry's message, rather than as a dead worker.
        for module in imports:
            importlib.import_module(module)
        for spec in specs:
            build_reward(spec.name, **spec.options)

        self._names = names
        self._timeout_s = float(timeout_s)
        limit = None if memory_limit_mb is None else memory_limit_mb * 2**20
        specs_payload = [(s.name, dict(s.options)) for s in specs]
        self._init = (specs_payload, list(imports), list(sys.path), limit)
        self._lock = threading.Lock()
        self._stats = {name: RewardStats() for name in names}
        self._restarts = 0
        self._closed = False
        self._pending: deque[tuple[int, str]] = deque()  # the calls of the score() under way
        self._retried: set[tuple[int, str]] = set()  # its calls whose worker died once
        self._workers: list[_Worker] = []
        try:
            self._workers = [_Worker(self._init) for _ in range(workers)]
            self._wait_until_ready()
        except BaseException:
            self._kill_all()
            raise

    # --- public ---------------------------------------------------------------

    def score(self, items: Sequence[tuple[str, str]],
              names: Sequence[str] | None = None) -> list[dict[str, RewardResult]]:
        """Per item, reward name -> result, for ``(response, reference)`` items.
        ``names``: only these rewards (default: all of the pool's)."""
        names = self._names if names is None else list(names)
        unknown = sorted(set(names) - set(self._names))
        if unknown:
            raise ValueError(f"rewards {unknown} are not in this pool ({self._names})")
        for i, item in enumerate(items):
            if not (isinstance(item, tuple | list) and len(item) == 2):
                raise TypeError(f"item {i} must be a (response, reference) pair, got {item!r:.80}")
            if not (isinstance(item[0], str) and isinstance(item[1], str)):
                kinds = f"({type(item[0]).__name__}, {type(item[1]).__name__})"
                raise TypeError(f"item {i} must be two str, got {kinds}")
        with self._lock:
            if self._closed:
                raise RuntimeError("ScoringPool is closed")
            return self._score(items, names)

    def wait_ready(self, timeout_s: float = _STARTUP_TIMEOUT_S) -> None:
        """Block until every worker slot holds a started worker (after a timeout, its
        replacement takes a moment to import the rewards)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("ScoringPool is closed")
            self._wait_until_ready(timeout_s)

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(rewards=dict(self._stats), worker_restarts=self._restarts)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for w in self._workers:
                try:
                    w.tasks.send(None)
                except OSError:
                    pass
            deadline = time.monotonic() + 2.0
            for w in self._workers:
                try:
                    w.process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            self._kill_all()

    def __enter__(self) -> ScoringPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Last resort for a pool never closed; workers also exit when we do (lifeline).
        if not getattr(self, "_closed", True):
            self._kill_all()

    # --- the dispatch loop (runs in the caller's thread) ---------------------

    def _score(self, items: Sequence[tuple[str, str]], names: list[str]) -> list[dict[str, RewardResult]]:
        results: list[dict[str, RewardResult]] = [{} for _ in items]
        pending = deque((i, name) for i in range(len(items)) for name in names)
        self._pending, self._retried = pending, set()
        while pending or any(w.task is not None for w in self._workers):
            for w in list(self._workers):
                if pending and w.ready and w.task is None:
                    self._send(w, pending.popleft(), items, pending)
            self._collect(results)
        return [{name: r[name] for name in names} for r in results]

    def _send(
        self,
        w: _Worker,
        task: tuple[int, str],
        items: Sequence[tuple[str, str]],
        pending: deque[tuple[int, str]],
    ) -> None:
        response, reference = items[task[0]]
        try:
            w.tasks.send((task[0], task[1], response, reference))
        except OSError:  # it died while idle: replace it, the task goes to another
            pending.appendleft(task)
            self._replace(w)
            return
        w.task = task
        w.started_at = time.monotonic()
        w.deadline = w.started_at + self._timeout_s

    def _collect(self, results: list[dict[str, RewardResult]]) -> None:
        """Wait for the next message or the nearest deadline; handle what came."""
        busy = [w for w in self._workers if w.task is not None]
        starting = [w for w in self._workers if not w.ready]
        now = time.monotonic()
        if busy:
            wait_s = min(w.deadline for w in busy) - now
        else:  # only replacements starting up
            wait_s = min(w.started_at for w in starting) + _STARTUP_TIMEOUT_S - now
            if wait_s <= 0:
                raise RuntimeError(f"no scoring worker became ready in {_STARTUP_TIMEOUT_S:g} s")
        by_conn = {w.conn: w for w in busy + starting}
        for conn in wait(list(by_conn), timeout=max(0.0, wait_s)):
            w = by_conn[conn]
            try:
                message = conn.recv()
            except (EOFError, OSError):
                self._died(w, results)
                continue
            if not w.ready:
                self._on_startup_message(w, message)
                continue
            task_id, result, seconds = message
            name = w.task[1]
            results[task_id][name] = result
            self._count(name, seconds, error=result.status is RewardStatus.ERROR)
            w.task = None
        now = time.monotonic()
        for w in list(self._workers):
            if w.task is not None and now >= w.deadline:
                task_id, name = w.task
                reason = f"no result within {self._timeout_s:g} s; worker restarted"
                results[task_id][name] = RewardResult(0.0, RewardStatus.TIMEOUT, reason)
                self._count(name, now - w.started_at, timeout=True)
                self._replace(w)

    def _died(self, w: _Worker, results: list[dict[str, RewardResult]]) -> None:
        """A worker exited without answering: killed from outside, a crash in native code,
        or the OOM killer. Its call is tried once more on a fresh worker (a lost worker
        changes no score); a second death on the same call makes it an ERROR."""
        w.kill()
        if not w.ready:
            raise RuntimeError(f"scoring worker exited during startup (exit code {w.exitcode})")
        if w.task is not None and w.task not in self._retried:
            self._retried.add(w.task)
            self._pending.appendleft(w.task)
        elif w.task is not None:
            task_id, name = w.task
            reason = f"worker process died (exit code {w.exitcode}); worker restarted"
            results[task_id][name] = RewardResult(0.0, RewardStatus.ERROR, reason)
            self._count(name, time.monotonic() - w.started_at, error=True)
        self._replace(w)

    def _on_startup_message(self, w: _Worker, message: tuple[str, Any]) -> None:
        kind, detail = message
        if kind == "failed":
            raise RuntimeError(f"scoring worker failed to start:\n{detail}")
        w.ready = True

    def _replace(self, w: _Worker) -> None:
        """Kill ``w`` and start a fresh worker in its slot; it takes tasks once ready."""
        w.kill()
        self._workers[self._workers.index(w)] = _Worker(self._init)
        self._restarts += 1

    def _wait_until_ready(self, timeout_s: float = _STARTUP_TIMEOUT_S) -> None:
        start = time.monotonic()
        while not all(w.ready for w in self._workers):
            left = start + timeout_s - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"scoring workers not ready after {timeout_s:g} s")
            starting = {w.conn: w for w in self._workers if not w.ready}
            for conn in wait(list(starting), timeout=left):
                w = starting[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    w.kill()
                    raise RuntimeError(
                        f"scoring worker exited during startup (exit code {w.exitcode})"
                    ) from None
                self._on_startup_message(w, message)

    def _kill_all(self) -> None:
        self._closed = True
        for w in self._workers:
            w.kill()

    def _count(self, name: str, seconds: float, *, timeout: bool = False, error: bool = False) -> None:
        s = self._stats[name]
        self._stats[name] = RewardStats(
            calls=s.calls + 1,
            timeouts=s.timeouts + int(timeout),
            errors=s.errors + int(error),
            seconds=s.seconds + seconds,
        )


if __name__ == "__main__":  # a worker: python -m rewards.isolation.pool TASK_FD RESULT_FD LIFELINE_FD
    _worker_main(*map(int, sys.argv[1:4]))
