"""Small stand-in actors for tests of the routing and supervision (``tests/ray/test_supervise.py``),
in a module of their own so that Ray workers can import them."""

from __future__ import annotations

import os
import time


class _Standin:
    """What every stand-in answers: ``ready`` and its process id; ``delay_s`` per item of work."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()


class Engine(_Standin):
    """Yields k, then a stand-in group, per prompt, one every ``delay_s`` (the last group alone)."""

    def stream_groups(self, prompts, samples_per_prompt, *, seeds=None, expect_version=None):
        for k, p in enumerate(prompts):
            time.sleep(self.delay_s)
            if k < len(prompts) - 1:  # the last group comes alone (actors.rollout.stream_items)
                yield k
            yield ("group", p.index, seeds[k])


class Reward(_Standin):
    """Scores a stand-in group after ``delay_s``, naming the process that scored it."""

    def score(self, group):
        time.sleep(self.delay_s)
        return ("scored", *group[1:], os.getpid())

    def score_groups(self, *groups):
        """``score`` of several groups in one call (``actors.reward.RewardActor.score_groups``)."""
        return tuple(self.score(g) for g in groups)


class BrokenEngine(Engine):
    """Fails with a ValueError where its last group would be (it comes without its k)."""

    def stream_groups(self, prompts, samples_per_prompt, *, seeds=None, expect_version=None):
        for k, p in enumerate(prompts):
            time.sleep(self.delay_s)
            if k == len(prompts) - 1:
                raise ValueError("the engine broke on its last prompt")
            yield k
            yield ("group", p.index, seeds[k])
