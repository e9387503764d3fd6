"""One reward call under a deadline, from any thread, on pooled worker processes.

``score_within`` is for library functions that must return in bounded time when the
caller's own code calls them (``rewards.math.equivalent``): sympy holds the GIL while it
works on ``2^{2^{2^{2^{2^{2}}}}}``, so neither a thread nor ``signal.alarm`` (main thread
only) can stop it; only a process can. The processes are ``ScoringPool`` workers: each
pool has one worker, is lent to one call at a time and goes back to an idle list, so a
warm worker serves the next call; a worker past its deadline is killed and replaced by
the pool itself.

The caller waits for at most ``timeout_s`` in all, starting a pool included: the work
runs in a helper thread, which keeps a pool that was still starting for the calls after.
A forked child forgets its parent's pools (their workers belong to the parent) and
starts its own.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from rewards.config import RewardSpec
from rewards.isolation.pool import ScoringPool
from rewards.types import RewardResult, RewardStatus

# At most this many calls run at once in worker processes; more wait for a free one
# within their own deadline. Each worker holds a Python with sympy (~150 MB).
_MAX_POOLS = 4
_MEMORY_LIMIT_MB = 4096

_free_pool = threading.Condition()  # guards _idle and _live; notified when a pool frees
_idle: dict[tuple[str, float], list[ScoringPool]] = {}  # (spec key, timeout) -> idle ScoringPools
_live = 0  # pools idle, lent, or starting
_inherited: list[ScoringPool] = []  # a forked child's copy of its parent's pools: never used, never closed


def _forget_parent_pools() -> None:
    global _free_pool, _live
    _inherited.extend(p for pools in _idle.values() for p in pools)
    _idle.clear()
    _live = 0
    _free_pool = threading.Condition()  # the parent's may have been held at the fork


os.register_at_fork(after_in_child=_forget_parent_pools)


def score_within(spec: RewardSpec, response: str, reference: str, timeout_s: float) -> RewardResult:
    """``spec``'s reward of ``(response, reference)``, scored in a worker process.

    Returns within ``timeout_s`` (plus thread hand-over): a ``TIMEOUT`` result when no
    answer came by then, an ``ERROR`` result when the reward raised or no worker could
    start (its reason says why). Never raises for what the reward does.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    deadline = time.monotonic() + timeout_s
    result: Future[RewardResult] = Future()
    threading.Thread(
        target=_run, args=(spec, response, reference, timeout_s, deadline, result),
        name="rewards-bounded-call", daemon=True,
    ).start()
    try:
        return result.result(timeout=max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        return RewardResult(0.0, RewardStatus.TIMEOUT, f"no result within {timeout_s:g} s")


def _run(spec: RewardSpec, response: str, reference: str, timeout_s: float,
         deadline: float, result: Future[RewardResult]) -> None:
    """Helper thread: borrow a pool, score, give the pool back."""
    key = (repr((spec.name, sorted(spec.options.items()))), timeout_s)
    try:
        pool = _borrow(spec, key, deadline)
    except Exception as err:  # no worker could start: say so, as ERROR
        result.set_result(RewardResult(0.0, RewardStatus.ERROR, f"{type(err).__name__}: {err}"[:300]))
        return
    if pool is None:  # every pool busy until the caller's deadline
        return
    try:
        if time.monotonic() < deadline:  # the caller still waits
            result.set_result(pool.score([(response, reference)])[0][spec.name])
    except Exception as err:
        result.set_result(RewardResult(0.0, RewardStatus.ERROR, f"{type(err).__name__}: {err}"[:300]))
        _discard(pool)
        return
    _give_back(key, pool)


def _borrow(spec: RewardSpec, key: tuple[str, float], deadline: float) -> ScoringPool | None:
    """An idle pool for ``key``, a new one if fewer than ``_MAX_POOLS`` exist (an idle
    pool of another spec makes room), else wait for one until ``deadline`` (None then)."""
    global _live
    evicted = None
    with _free_pool:
        while True:
            if _idle.get(key):
                return _idle[key].pop()
            if _live < _MAX_POOLS:
                _live += 1
                break
            other = next((pools for pools in _idle.values() if pools), None)
            if other is not None:
                evicted = other.pop()  # our slot now: _live stays
                break
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            _free_pool.wait(timeout=left)
    if evicted is not None:
        evicted.close()
    try:
        return ScoringPool([spec], workers=1, timeout_s=key[1], memory_limit_mb=_MEMORY_LIMIT_MB)
    except BaseException:
        with _free_pool:
            _live -= 1
            _free_pool.notify()
        raise


def _give_back(key: tuple[str, float], pool: ScoringPool) -> None:
    with _free_pool:
        _idle.setdefault(key, []).append(pool)
        _free_pool.notify()


def _discard(pool: ScoringPool) -> None:
    global _live
    pool.close()
    with _free_pool:
        _live -= 1
        _free_pool.notify()
