"""Fault injection: the processes of a run's actors, found the way an operator would (Ray's
actor table, then the process tree), and killed or stopped from outside the run."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil


def actor_pids(class_name: str) -> list[int]:
    """The pids of the live actors of ``class_name`` (Ray's actor table)."""
    from ray._private import state

    return [int(a["Pid"]) for a in state.actors().values()
            if a["ActorClassName"] == class_name and a["State"] == "ALIVE" and a.get("Pid")]


def pool_worker_pids(reward_actor_pid: int) -> list[int]:
    """The scoring workers (``python -m rewards.isolation.pool``) of a reward actor."""
    return [p.pid for p in psutil.Process(reward_actor_pid).children(recursive=True)
            if "rewards.isolation.pool" in " ".join(p.cmdline())]


class Faults:
    """Faults to inject after given steps: ``plan`` maps a step to (fault, delay) pairs; each
    fault lands ``delay`` seconds after the step's progress line (0: before the next step
    starts; a few tenths: while it generates). ``progress`` is the run's progress callback."""

    def __init__(self, plan: dict[int, list[tuple]]) -> None:
        self.plan = plan
        self.done: list[tuple[str, int, float]] = []  # (what, pid, unix time)
        self.errors: list[BaseException] = []

    def progress(self, step: int, total: int, line: str) -> None:
        for fault, delay in self.plan.pop(step, []):  # once: a restarted run passes the step again
            if delay <= 0:
                self._inject(fault)
            else:
                threading.Timer(delay, self._inject, (fault,)).start()

    def _inject(self, fault) -> None:
        try:
            what, pid, sig = fault()
            os.kill(pid, sig)
            self.done.append((what, pid, time.time()))
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.errors.append(err)


def kill(class_name: str, sig: int = signal.SIGKILL):
    def fault():
        pids = actor_pids(class_name)
        assert pids, f"no live {class_name} to signal"
        return class_name, pids[0], sig
    return fault


def kill_pool_worker():
    def fault():
        workers = pool_worker_pids(actor_pids("RewardActor")[0])
        assert workers, "the reward actor has no scoring workers"
        return "scoring worker", workers[0], signal.SIGKILL
    return fault


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def addition_data(tmp_path_factory):
    from tasks.synthetic import make_dataset

    return make_dataset("addition", tmp_path_factory.mktemp("addition"))["train"]


@pytest.fixture(scope="package")
def ray_local():
    """A local Ray cluster for this package only: shut down before the cluster tier, whose
    tests connect this process to clusters of their own."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="package")
def straight_runs(ray_local, tiny_model, addition_data, tmp_path_factory):
    """Outcome of the uninterrupted run, per staleness (computed once per package)."""
    from orchestrator.stages import grpo
    from tests.chaos import runs

    store = tmp_path_factory.mktemp("straight")
    cache: dict[int, tuple] = {}

    def get(staleness: int) -> tuple:
        if staleness not in cache:
            cache[staleness] = runs.outcome(grpo.run(runs.config(tiny_model, addition_data, store,
                                                                 f"straight-{staleness}", staleness)))
        return cache[staleness]
    return get


ROLE_OF = {"RolloutActor": "rollout", "RewardActor": "reward", "ReferenceActor": "reference",
           "GRPOLearner": "learner", "scoring worker": "reward"}


def report(faults: Faults, events: list[dict]) -> list[str]:
    """One line per injected fault: when the run noticed it and how long it took to
    recover, from the run's faults.jsonl (printed with ``pytest -s``)."""
    lines = []
    for what, pid, at in faults.done:
        seen = [e for e in events if e["role"] == ROLE_OF.get(what) and e.get("detected_at", e["time"]) >= at - 1]
        if what == "scoring worker" or not seen:
            lines.append(f"{what} (pid {pid}): no actor restart (handled inside its actor)")
            continue
        e = seen[0]
        recovered = e.get("recovered_s")
        back = "" if recovered is None else f", back in {recovered:.1f} s"
        lines.append(f"{what} (pid {pid}): noticed after {e.get('detected_at', e['time']) - at:.1f} s "
                     f"at step {e['step']} ({e['cause'][:60]}){back}")
    for line in lines:
        print(line)
    return lines
