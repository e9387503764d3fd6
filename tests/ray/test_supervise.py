"""supervise.Flight against small stand-in actors on a real local Ray cluster: an engine or a
reward actor killed (kill -9) or stopped (SIGSTOP) mid-flight; every group still arrives,
once, with the work of the lost actor redone. (The chaos tier does the same to real runs.)"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.ray

from tests.ray.standins import Engine, Reward

SAMPLES = 2


def _stage(ray, *, engine_delay=0.05, reward_delay=0.05, restarts=3, grace_s=60.0):
    from orchestrator import supervise

    opts = {"max_restarts": restarts, "num_cpus": 0}
    actors = SimpleNamespace(learners=[], rollouts=[ray.remote(Engine).options(**opts).remote(engine_delay)],
                             rewards=[ray.remote(Reward).options(**opts).remote(reward_delay)],
                             reference=None, reward_model=None)
    ray.get([a.ready.remote() for a in actors.rollouts + actors.rewards])
    deadlines = supervise.Deadlines(generation_s=grace_s, scoring_s=grace_s, restart_s=60.0, learner_s=grace_s)
    return actors, supervise.Keeper(supervise.Roster(actors), deadlines, max_restarts=restarts)


def _fly(ray, actors, keeper, n: int = 12, catch_up=None):
    from actors.rollout import PromptItem
    from orchestrator import streaming, supervise

    prompts = [PromptItem(i, (1, 2), "x") for i in range(n)]
    launch = streaming.launch(actors.rollouts, prompts, SAMPLES, seeds=[1000 + i for i in range(n)])
    chain = supervise.scoring_chain(streaming.Scoring(actors.rewards), keeper.roster)
    done = supervise.Flight(launch, actors.rollouts, keeper, chain, catch_up=catch_up).run()
    return {p: ray.get(r) for p, r in done.items()}


def _later(delay_s: float, fn) -> None:
    threading.Timer(delay_s, fn).start()


def _expect_all(out: dict, n: int = 12) -> None:
    assert sorted(out) == list(range(n))  # every position once
    assert all(out[p][:3] == ("scored", p, 1000 + p) for p in out)  # its own prompt and seed


def test_a_killed_reward_actor_is_restarted_and_its_groups_scored_again(ray_local):
    actors, keeper = _stage(ray_local, reward_delay=0.2)
    pid = ray_local.get(actors.rewards[0].pid.remote())
    _later(0.8, lambda: os.kill(pid, signal.SIGKILL))
    out = _fly(ray_local, actors, keeper)
    _expect_all(out)
    assert keeper.restarts["reward"] == 1
    assert {o[3] for o in out.values()} - {pid}  # a new process scored what was lost
    (event,) = keeper.events
    assert event["role"] == "reward" and event["recovered_s"] is not None and event["node"]


def test_a_killed_engine_is_restarted_and_its_prompts_reissued_once(ray_local):
    actors, keeper = _stage(ray_local, engine_delay=0.2)
    pid = ray_local.get(actors.rollouts[0].pid.remote())
    _later(1.0, lambda: os.kill(pid, signal.SIGKILL))
    caught_up = []
    _expect_all(_fly(ray_local, actors, keeper, catch_up=caught_up.append))
    assert keeper.restarts["rollout"] == 1 and caught_up == [0]


def test_one_prompt_per_engine_comes_back_as_a_plain_return_and_a_killed_engine_s_is_redone(ray_local):
    """An engine given a lone prompt returns its group as one ObjectRef (no Ray stream); a
    killed engine's group is generated again, once, on its restarted actor."""
    from actors.rollout import PromptItem
    from orchestrator import streaming, supervise

    actors, keeper = _stage(ray_local, engine_delay=1.5)
    opts = {"max_restarts": 3, "num_cpus": 0}
    actors.rollouts += [ray_local.remote(Engine).options(**opts).remote(1.5) for _ in range(2)]
    keeper = supervise.Keeper(supervise.Roster(actors), keeper.deadlines, max_restarts=3)
    ray_local.get([e.ready.remote() for e in actors.rollouts])
    pid = ray_local.get(actors.rollouts[1].pid.remote())
    prompts = [PromptItem(i, (1, 2), "x") for i in range(3)]
    launch = streaming.launch(actors.rollouts, prompts, SAMPLES, seeds=[1000 + i for i in range(3)])
    assert [s.lone for s in launch.streams] == [True] * 3
    _later(0.5, lambda: os.kill(pid, signal.SIGKILL))
    caught_up = []
    chain = supervise.scoring_chain(streaming.Scoring(actors.rewards), keeper.roster)
    done = supervise.Flight(launch, actors.rollouts, keeper, chain, catch_up=caught_up.append).run()
    _expect_all({p: ray_local.get(r) for p, r in done.items()}, n=3)
    assert keeper.restarts["rollout"] == 1 and caught_up == [1]


def test_a_stopped_reward_actor_is_named_killed_and_replaced(ray_local, caplog):
    actors, keeper = _stage(ray_local, reward_delay=0.1, grace_s=4.0)
    pid = ray_local.get(actors.rewards[0].pid.remote())
    _later(0.5, lambda: os.kill(pid, signal.SIGSTOP))
    with caplog.at_level("ERROR", logger="orchestrator.supervise"):
        out = _fly(ray_local, actors, keeper)
    _expect_all(out)
    assert keeper.restarts["reward"] == 1
    hung = keeper.events[0]
    assert hung["cause"].startswith("hung") and hung["pid"] == pid
    assert any("reward 0" in r.message and "is late" in r.message for r in caplog.records)


def test_without_restarts_a_lost_actor_is_one_sentence(ray_local):
    from orchestrator import supervise

    actors, keeper = _stage(ray_local, reward_delay=0.2, restarts=0)
    pid = ray_local.get(actors.rewards[0].pid.remote())
    _later(0.5, lambda: os.kill(pid, signal.SIGKILL))
    with pytest.raises(supervise.ActorGone, match=r"reward 0 \(pid \d+ on node .*\) was lost"):
        _fly(ray_local, actors, keeper)


def test_an_engine_error_on_a_lone_last_group_names_the_engine(ray_local):
    from orchestrator import supervise
    from tests.ray.standins import BrokenEngine

    actors, keeper = _stage(ray_local)
    actors.rollouts = [ray_local.remote(BrokenEngine).options(num_cpus=0).remote(0.01)]
    keeper = supervise.Keeper(supervise.Roster(actors), keeper.deadlines, max_restarts=3)
    # The error reaches the scoring hop as the group's value: the message still names the engine.
    with pytest.raises(supervise.ActorGone, match=r"position 2 failed in rollout 0: the engine broke on its last"):
        _fly(ray_local, actors, keeper, n=3)
    # A lone prompt's group is a plain return (``Stream.lone``): its error is named the same way.
    with pytest.raises(supervise.ActorGone, match=r"position 0 failed in rollout 0: the engine broke on its last"):
        _fly(ray_local, actors, keeper, n=1)
