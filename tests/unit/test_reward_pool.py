"""ScoringPool: parallel scoring, deadlines off the main thread, errors and crashes counted."""

from __future__ import annotations

import os
import threading
import time

import pytest

from rewards.config import RewardSpec
from rewards.isolation.pool import PoolStats, RewardStats, ScoringPool
from rewards.registry import RewardEntry, RewardFn, register
from rewards.types import RewardResult, RewardStatus

pytestmark = pytest.mark.unit

TIMEOUT_S = 1.0
SLACK_S = 0.5  # the bound: a timeout returns within the limit plus 0.5 s


# Rewards that misbehave on purpose. The workers import this module (``imports=``),
# which registers them there too.
def _sleep_factory() -> RewardFn:
    def reward(response: str, reference: str) -> RewardResult:
        time.sleep(float(reference))
        return RewardResult(1.0, RewardStatus.CORRECT, "slept")

    return reward


def _spin_factory() -> RewardFn:
    def reward(response: str, reference: str) -> RewardResult:
        while True:  # pure Python, never yields: only a process kill stops it
            pass

    return reward


def _misbehave_factory() -> RewardFn:
    def reward(response: str, reference: str) -> RewardResult:
        if response == "raise":
            raise ValueError(f"boom on {reference!r}")
        if response == "crash":
            os._exit(3)  # what a segfault in native code looks like from outside
        if response == "allocate":
            bytearray(2**31)
        if response == "not a result":
            return 1.0  # type: ignore[return-value]
        return RewardResult(1.0, RewardStatus.CORRECT, f"echo {response}")

    return reward


register("_test_sleep", RewardEntry(_sleep_factory))
register("_test_spin", RewardEntry(_spin_factory))
register("_test_misbehave", RewardEntry(_misbehave_factory))


def _pool(*names: str, workers: int = 2, **kwargs) -> ScoringPool:
    specs = [RewardSpec(name=n) for n in names]
    return ScoringPool(specs, workers=workers, timeout_s=TIMEOUT_S, imports=[__name__], **kwargs)


@pytest.fixture(scope="module")
def misbehave():
    with _pool("_test_misbehave", memory_limit_mb=1024) as pool:
        yield pool


@pytest.fixture(scope="module")
def spinning():
    with _pool("_test_misbehave", "_test_spin") as pool:
        yield pool


def test_scores_every_item_with_every_reward_in_order():
    items = [
        ("<think>a</think><answer>\\frac12</answer>", "0.5"),
        ("<answer>7</answer>", "8"),
        ("<think>a</think> \\boxed{3}", "3"),
    ]
    specs = [RewardSpec(name="format_r1zero"), RewardSpec(name="math_accuracy")]
    with ScoringPool(specs, workers=2, timeout_s=10.0) as pool:
        results = pool.score(items)
        assert pool.score([]) == []
        stats = pool.stats()
    assert [list(r) for r in results] == [["format_r1zero", "math_accuracy"]] * 3
    assert [r["format_r1zero"].score for r in results] == [1.0, 0.0, 0.0]
    assert [r["math_accuracy"].status for r in results] == [
        RewardStatus.CORRECT,
        RewardStatus.WRONG,
        RewardStatus.CORRECT,
    ]
    assert isinstance(stats, PoolStats)
    assert stats.rewards["math_accuracy"].calls == 3
    assert stats.rewards["math_accuracy"].seconds > 0
    assert stats.worker_restarts == 0
    with pytest.raises(AttributeError):
        stats.worker_restarts = 1  # type: ignore[misc]  # frozen


def test_items_run_in_parallel_across_workers():
    with _pool("_test_sleep", workers=2) as pool:
        start = time.monotonic()
        results = pool.score([("", "0.4")] * 4)
        elapsed = time.monotonic() - start
    assert all(r["_test_sleep"].status is RewardStatus.CORRECT for r in results)
    # 4 × 0.4 s on 2 workers: about 0.8 s, not 1.6 s.
    assert elapsed < 1.4


def _timed(pool: ScoringPool, item: tuple[str, str]) -> tuple[dict[str, RewardResult], float]:
    pool.wait_ready()  # a worker replaced after the last timeout may still be starting
    start = time.monotonic()
    (result,) = pool.score([item])
    return result, time.monotonic() - start


def test_overrun_is_a_counted_timeout_and_the_worker_is_replaced(spinning):
    before = spinning.stats()
    result, elapsed = _timed(spinning, ("anything", "x"))
    assert result["_test_spin"] == RewardResult(
        0.0, RewardStatus.TIMEOUT, f"no result within {TIMEOUT_S:g} s; worker restarted"
    )
    assert result["_test_misbehave"].status is RewardStatus.CORRECT
    assert TIMEOUT_S <= elapsed <= TIMEOUT_S + SLACK_S
    after = spinning.stats()
    assert after.rewards["_test_spin"].timeouts == before.rewards["_test_spin"].timeouts + 1
    assert after.worker_restarts == before.worker_restarts + 1


def test_timeout_fires_when_called_off_the_main_thread(spinning):
    seen: dict[str, object] = {}

    def call() -> None:
        seen["main"] = threading.current_thread() is threading.main_thread()
        seen["result"], seen["elapsed"] = _timed(spinning, ("x", "y"))

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(timeout=60)
    assert seen["main"] is False
    assert seen["result"]["_test_spin"].status is RewardStatus.TIMEOUT
    assert seen["elapsed"] <= TIMEOUT_S + SLACK_S


@pytest.mark.parametrize(
    "response, status, reason",
    [
        ("raise", RewardStatus.ERROR, "ValueError: boom on 'ref'"),
        ("not a result", RewardStatus.ERROR, "TypeError: reward '_test_misbehave' returned float"),
        ("allocate", RewardStatus.ERROR, "MemoryError"),
        ("crash", RewardStatus.ERROR, "worker process died (exit code 3)"),
    ],
)
def test_failures_are_errors_with_reasons_never_silent_zeros(misbehave, response, status, reason):
    before = misbehave.stats().rewards["_test_misbehave"]
    (result,) = misbehave.score([(response, "ref")])
    got = result["_test_misbehave"]
    assert (got.score, got.status) == (0.0, status)
    assert got.reason.startswith(reason)
    after = misbehave.stats().rewards["_test_misbehave"]
    assert after.errors == before.errors + 1
    # And the pool goes on working.
    (again,) = misbehave.score([("fine", "ref")])
    assert again["_test_misbehave"].reason == "echo fine"


@pytest.mark.parametrize(
    "name, response, status",
    [
        # Parsing or evaluating these never ends: the deadline stops them.
        ("tower", "\\boxed{10^{10^{10}}}", RewardStatus.TIMEOUT),
        ("factorials", "\\boxed{9!!!!!!!!}", RewardStatus.TIMEOUT),
        ("400 nested braces", "\\boxed{" + "{" * 400 + "1" + "}" * 400 + "}", RewardStatus.TIMEOUT),
        # Too long to be an answer: wrong at once, no worker spent on it.
        ("10,000 nested braces", "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", RewardStatus.WRONG),
        ("1 MB boxed", "\\boxed{" + "1+" * 500_000 + "1}", RewardStatus.WRONG),
        # A megabyte of text around a short answer is read in linear time.
        ("1 MB of prose", "so " * 350_000 + "\\boxed{7}", RewardStatus.WRONG),
    ],
)
def test_adversarial_math_inputs_return_within_the_limit(name, response, status, math_pool):
    result, elapsed = _timed(math_pool, (response, "5"))
    got = result["math_accuracy"]
    assert (got.score, got.status) == (0.0, status), (name, got)
    assert elapsed <= TIMEOUT_S * 2 + SLACK_S, name


@pytest.fixture(scope="module")
def math_pool():
    with ScoringPool([RewardSpec(name="math_accuracy")], workers=2, timeout_s=TIMEOUT_S * 2) as pool:
        yield pool


def test_loose_search_on_a_megabyte_is_bounded():
    spec = RewardSpec(name="math_accuracy", options={"extraction": "loose"})
    with ScoringPool([spec], workers=1, timeout_s=TIMEOUT_S * 2) as pool:
        result, elapsed = _timed(pool, ("x = 1 + " * 130_000, "5"))
    # Math-Verify searches only the last 4,000 characters: a fast, wrong verdict.
    assert result["math_accuracy"].status is RewardStatus.WRONG
    assert elapsed <= TIMEOUT_S * 2 + SLACK_S


@pytest.mark.parametrize(
    "specs, kwargs, message",
    [
        ([RewardSpec(name="no_such_reward")], {}, "unknown reward 'no_such_reward'"),
        ([RewardSpec(name="math_accuracy", options={"extraction": "x"})], {}, "extraction must be"),
        ([RewardSpec(name="format_r1"), RewardSpec(name="format_r1")], {}, "once"),
        ([], {}, "at least one"),
        ([RewardSpec(name="format_r1")], {"workers": 0}, "workers must be"),
        ([RewardSpec(name="format_r1")], {"timeout_s": 0}, "timeout_s must be"),
    ],
)
def test_bad_configuration_fails_at_construction(specs, kwargs, message):
    args = {"workers": 1, "timeout_s": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        ScoringPool(specs, **args)


def test_items_must_be_pairs_of_strings(misbehave):
    with pytest.raises(TypeError, match="item 0 must be two str"):
        misbehave.score([("a", 1)])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="item 1 must be a"):
        misbehave.score([("a", "b"), "ab"])  # type: ignore[list-item]


def test_close_stops_the_workers():
    pool = _pool("_test_misbehave", workers=2)
    processes = [w.process for w in pool._workers]
    pool.close()
    pool.close()  # idempotent
    assert all(p.poll() is not None for p in processes)
    with pytest.raises(RuntimeError, match="closed"):
        pool.score([("a", "b")])


def test_stats_start_at_zero():
    with _pool("_test_misbehave", workers=1) as pool:
        assert pool.stats() == PoolStats(rewards={"_test_misbehave": RewardStats()}, worker_restarts=0)


def test_workers_exit_when_their_parent_dies(tmp_path):
    # A parent killed mid-call must not leave a worker spinning in sympy for ever.
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import os, sys, threading, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
from rewards.config import RewardSpec
from rewards.isolation.pool import ScoringPool
pool = ScoringPool([RewardSpec(name="_test_spin")], workers=1, timeout_s=600, imports=[{__name__!r}])
threading.Thread(target=pool.score, args=([("x", "y")],), daemon=True).start()
time.sleep(0.5)
print(pool._workers[0].process.pid, flush=True)
os._exit(0)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[-1])
    deadline = time.monotonic() + 10
    status = Path(f"/proc/{pid}/status")
    while time.monotonic() < deadline:
        try:
            if "\nState:\tZ" in status.read_text():  # exited, not yet reaped by init
                return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    pytest.fail(f"worker {pid} outlived its parent")


def test_a_worker_killed_mid_call_changes_no_score():
    """kill -9 from outside (the OOM killer, an operator): the call is tried again on a
    fresh worker, so the score is the one it would have had; not an ERROR."""
    import signal

    with ScoringPool([RewardSpec(name="_test_sleep")], workers=1, timeout_s=10.0, imports=[__name__]) as pool:
        victim = pool._workers[0].process.pid
        threading.Timer(0.5, os.kill, (victim, signal.SIGKILL)).start()
        (result,) = pool.score([("any", "1.5")])
        assert result["_test_sleep"].status is RewardStatus.CORRECT
        assert pool._workers[0].process.pid != victim
        assert pool.stats().rewards["_test_sleep"].errors == 0
