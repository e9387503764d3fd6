"""The scoring pool inside a Ray actor: a verification timeout fires off the main thread.

Other systems lost their whole reward signal here: Math-Verify's ``signal.alarm`` timeout
cannot run outside the main thread, so inside Ray workers every score became 0. The pool
kills and replaces a worker process instead.
"""

from __future__ import annotations

import threading
import time

import pytest

from rewards.config import RewardSpec
from rewards.isolation.pool import ScoringPool
from rewards.types import RewardStatus

pytestmark = pytest.mark.ray

TIMEOUT_S = 2.0


def _pool_actor_class() -> type:
    # Defined in a function so that Ray ships the class by value: this test module is
    # not importable in Ray's worker processes.
    class PoolActor:
        """A minimal reward actor: a ScoringPool, called from a thread of its own."""

        def __init__(self, timeout_s: float) -> None:
            self.pool = ScoringPool([RewardSpec(name="math_accuracy")], workers=2, timeout_s=timeout_s)

        def score_off_main_thread(self, items: list[tuple[str, str]]) -> dict:
            out: dict = {}

            def run() -> None:
                from math_verify import parse

                out["main_thread"] = threading.current_thread() is threading.main_thread()
                try:  # Math-Verify's own alarm-based timeout, for contrast
                    parse("$1$")
                    out["math_verify_alarm"] = "ok"
                except ValueError as err:
                    out["math_verify_alarm"] = str(err)
                start = time.monotonic()
                out["results"] = self.pool.score(items)
                out["elapsed"] = time.monotonic() - start

            thread = threading.Thread(target=run)
            thread.start()
            thread.join()
            return out

        def stats(self):
            return self.pool.stats()

        def close(self) -> None:
            self.pool.close()

    return PoolActor


def test_timeout_fires_in_a_ray_actor_off_the_main_thread(ray_local):
    ray = ray_local
    actor = ray.remote(_pool_actor_class()).options(num_cpus=0.5).remote(TIMEOUT_S)
    items = [("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{9!!!!!!!!}", "1")]
    out = ray.get(actor.score_off_main_thread.remote(items), timeout=120)

    assert out["main_thread"] is False
    assert "signal.alarm" in out["math_verify_alarm"]  # it refuses to run here
    fine, adversarial = (r["math_accuracy"] for r in out["results"])
    assert fine.status is RewardStatus.CORRECT
    assert (adversarial.score, adversarial.status) == (0.0, RewardStatus.TIMEOUT)
    assert out["elapsed"] <= TIMEOUT_S + 0.5

    stats = ray.get(actor.stats.remote())
    assert stats.rewards["math_accuracy"].calls == 2
    assert stats.rewards["math_accuracy"].timeouts == 1
    assert stats.worker_restarts == 1
    # The actor and its pool survive: the next group scores normally.
    again = ray.get(actor.score_off_main_thread.remote([("\\boxed{3}", "3")]), timeout=120)
    assert again["results"][0]["math_accuracy"].status is RewardStatus.CORRECT
    ray.get(actor.close.remote())
    ray.kill(actor)
