"""Ray dashboard metrics (``ray.util.metrics``), tagged by run and actor.

Ray exports them with a ``ray_`` prefix on each node's Prometheus endpoint, which the
Ray dashboard and its Grafana integration read: ``ray_r1lab_rollout_tokens_per_second``,
``ray_r1lab_rollout_groups_total``, ``ray_r1lab_reward_seconds``,
``ray_r1lab_reward_timeouts_total``, ``ray_r1lab_reward_model_seconds``, ``ray_r1lab_learner_tokens_per_second``,
``ray_r1lab_weight_push_seconds``, ``ray_r1lab_buffer_groups``, ``ray_r1lab_staleness_steps``.
"""

from __future__ import annotations

import functools

TAGS = ("run", "actor")
_SECONDS_BUCKETS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0]


@functools.cache
def _metrics():
    from ray.util import metrics as m

    return {
        "rollout_tokens_per_second": m.Gauge(
            "r1lab_rollout_tokens_per_second", "Tokens generated per second by a rollout engine", tag_keys=TAGS),
        "rollout_groups_total": m.Counter(
            "r1lab_rollout_groups_total", "Groups of completions sampled", tag_keys=TAGS),
        "reward_seconds": m.Histogram(
            "r1lab_reward_seconds", "Seconds to score one group", boundaries=_SECONDS_BUCKETS, tag_keys=TAGS),
        "reward_timeouts_total": m.Counter(
            "r1lab_reward_timeouts_total", "Reward calls that hit their time limit", tag_keys=TAGS),
        "reward_model_seconds": m.Histogram(
            "r1lab_reward_model_seconds", "Seconds for the reward models to score one group",
            boundaries=_SECONDS_BUCKETS, tag_keys=TAGS),
        "learner_tokens_per_second": m.Gauge(
            "r1lab_learner_tokens_per_second", "Response tokens trained on per second", tag_keys=TAGS),
        "weight_push_seconds": m.Gauge(
            "r1lab_weight_push_seconds", "Seconds of the last weight push", tag_keys=TAGS),
        "buffer_groups": m.Gauge(
            "r1lab_buffer_groups", "Scored groups waiting for the learner", tag_keys=TAGS),
        "staleness_steps": m.Gauge(
            "r1lab_staleness_steps", "Mean policy-version lag of trained samples", tag_keys=TAGS),
    }


class Telemetry:
    """Metric handles with this actor's tags filled in. Safe to create outside Ray
    (it then records nothing)."""

    def __init__(self, run: str, actor: str) -> None:
        import ray

        self.enabled = ray.is_initialized()
        self.tags = {"run": run, "actor": actor}

    def set(self, name: str, value: float) -> None:
        if self.enabled:
            _metrics()[name].set(float(value), tags=self.tags)

    def inc(self, name: str, value: float = 1.0) -> None:
        if self.enabled and value:
            _metrics()[name].inc(float(value), tags=self.tags)

    def observe(self, name: str, value: float) -> None:
        if self.enabled:
            _metrics()[name].observe(float(value), tags=self.tags)
