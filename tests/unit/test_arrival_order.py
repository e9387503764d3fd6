"""Same inputs, same float sums: what a step trains on does not depend on which thread or
engine step happened to deliver a group first."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from actors import vllm_adapter
from learner.config import GRPOLossConfig, LearnerConfig
from learner.grpo_role import GRPOLearner

pytestmark = pytest.mark.unit


def learner() -> GRPOLearner:
    return GRPOLearner("unused", LearnerConfig(micro_batch_groups=1), loss=GRPOLossConfig(), rank=0,
                       world_size=1, temperature=1.0, groups_per_rank=3, samples_per_prompt=2, max_new_tokens=8)


def test_groups_are_taken_in_feed_number_order_not_call_order():
    w = learner()
    assert w.feed(["g2"], 2) == 1
    assert w.feed(["g0"], 0) == 2
    w.feed(["g1"], 1)
    assert [w._next_group()[0] for _ in range(3)] == ["g0", "g1", "g2"]
    w.feed(["g3", "g4"])  # unnumbered feeds continue after the highest number so far
    assert [w._next_group()[0] for _ in range(2)] == ["g3", "g4"]


def test_a_missing_number_is_waited_for_while_later_ones_queue():
    w = learner()
    w.feed(["g1"], 1)
    taken = []
    reader = threading.Thread(target=lambda: taken.extend(w._next_group()[0] for _ in range(2)))
    reader.start()
    reader.join(timeout=0.3)
    assert reader.is_alive() and taken == []  # g1 is there, but g0 comes first
    w.feed(["g0"], 0)
    reader.join(timeout=10)
    assert not reader.is_alive() and taken == ["g0", "g1"]


class _Engine:
    """Finishes the requests in ``steps`` (lists of ids, in the engine's own order)."""

    def __init__(self, steps):
        self.steps = list(steps)
        self.added = []

    def add_request(self, request_id, prompt, params):
        self.added.append(request_id)

    def has_unfinished_requests(self):
        return bool(self.steps)

    def step(self):
        return [SimpleNamespace(request_id=r, finished=True) for r in self.steps.pop(0)] + [
            SimpleNamespace(request_id="running", finished=False)]


def test_requests_finishing_in_one_engine_step_come_out_in_submission_order():
    engine = _Engine([["c", "a"], ["d"], ["e", "b"]])
    llm = SimpleNamespace(llm_engine=engine)
    out = vllm_adapter.stream_generate(llm, [(r, [1], None) for r in "abcde"])
    assert [o.request_id for o in out] == ["a", "c", "d", "b", "e"]
    assert engine.added == list("abcde")


def test_cpu_engines_schedule_whole_prompts_so_seeded_sampling_never_rewinds():
    """vLLM rewinds a seeded request's generator after a partial prefill; a CPU generator
    cannot be rewound, so CPU engines never split a prompt over steps."""
    args = dict(max_model_len=8192, kv_cache_bytes=1 << 26, dtype="float32", enforce_eager=True, seed=0,
                gpu_memory_utilization=0.5, tensor_parallel_size=1)
    cpu = vllm_adapter.engine_kwargs("m", cuda=False, **args)
    assert cpu["enable_chunked_prefill"] is False and cpu["max_num_batched_tokens"] == 8192
    gpu = vllm_adapter.engine_kwargs("m", cuda=True, **args)
    assert "enable_chunked_prefill" not in gpu and "max_num_batched_tokens" not in gpu
