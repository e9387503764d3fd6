"""Checkpoint folder logic (atomic rename, latest, keep last N, crash leftovers ignored),
per-prompt sampling seeds, and trimming records on resume."""

from __future__ import annotations

import json

import pytest

from orchestrator import checkpoints
from orchestrator.checkpoints import CheckpointDir
from orchestrator.metrics import keep_through
from orchestrator.storage import RunStorage
from orchestrator.streaming import SEED_BITS, prompt_seed

pytestmark = pytest.mark.unit


@pytest.fixture(params=["path", "file-uri"])
def run(request, tmp_path) -> RunStorage:
    where = str(tmp_path / "store") if request.param == "path" else f"file://{tmp_path}/store"
    return RunStorage.of(where, "r")


def _write(run: RunStorage, ckpts: CheckpointDir, step: int) -> str:
    temp = ckpts.begin(step)
    run.write_text(f"{temp}/learner/rank0.pt", f"weights {step}")
    run.write_text(f"{temp}/{checkpoints.STATE}", json.dumps({"step": step}))
    return temp


def test_commit_renames_points_latest_and_keeps_last_two(run):
    ckpts = CheckpointDir(run, keep=2)
    assert ckpts.latest() is None
    for step in (1, 2, 3):
        temp = _write(run, ckpts, step)
        assert temp.startswith("checkpoints/.step-") and ".tmp-" in temp
        done = ckpts.commit(step, temp)
        assert done.name == f"step-{step}" and not run.exists(temp)
        assert run.read_text(f"{done.path}/learner/rank0.pt") == f"weights {step}"
    assert sorted(c.name for c in ckpts.listed()) == ["step-2", "step-3"]
    assert ckpts.latest() == checkpoints.Checkpoint(3, "step-3")
    assert json.loads(run.read_text("checkpoints/latest")) == {"step": 3, "dir": "step-3"}


def test_commit_refuses_a_checkpoint_without_its_state(run):
    ckpts = CheckpointDir(run)
    temp = ckpts.begin(1)
    run.write_text(f"{temp}/learner/rank0.pt", "weights")
    with pytest.raises(RuntimeError, match="trainer_state.json"):
        ckpts.commit(1, temp)
    assert ckpts.latest() is None


def test_crash_leftovers_are_ignored_then_removed(run):
    ckpts = CheckpointDir(run, keep=2)
    ckpts.commit(2, _write(run, ckpts, 2))
    # A crash while writing step 3 (temp folder) and a half-copied step 4 (no state).
    run.write_text("checkpoints/.step-3.tmp-deadbeef/learner/rank0.pt", "half")
    run.write_text("checkpoints/step-4/learner/rank0.pt", "half")
    assert ckpts.latest() == checkpoints.Checkpoint(2, "step-2")
    ckpts.commit(5, _write(run, ckpts, 5))
    assert not run.exists("checkpoints/.step-3.tmp-deadbeef")
    assert sorted(c.name for c in ckpts.listed()) == ["step-2", "step-5"]  # the newest two complete ones
    assert ckpts.latest() == checkpoints.Checkpoint(5, "step-5")


def test_latest_falls_back_to_newest_complete_when_its_target_is_gone(run):
    ckpts = CheckpointDir(run, keep=3)
    ckpts.commit(1, _write(run, ckpts, 1))
    ckpts.commit(2, _write(run, ckpts, 2))
    run.write_text("checkpoints/latest", json.dumps({"step": 9, "dir": "step-9"}))
    assert ckpts.latest() == checkpoints.Checkpoint(2, "step-2")
    run.write_text("checkpoints/latest", "{not json")
    assert ckpts.latest() == checkpoints.Checkpoint(2, "step-2")


def test_recommitting_a_step_replaces_it(run):
    ckpts = CheckpointDir(run)
    ckpts.commit(2, _write(run, ckpts, 2))
    temp = ckpts.begin(2)
    run.write_text(f"{temp}/learner/rank0.pt", "again")
    run.write_text(f"{temp}/{checkpoints.STATE}", "{}")
    ckpts.commit(2, temp)
    assert run.read_text("checkpoints/step-2/learner/rank0.pt") == "again"


def test_keep_must_be_positive(run):
    with pytest.raises(ValueError, match="keep_checkpoints"):
        CheckpointDir(run, keep=0)


def test_prompt_seeds_are_stable_distinct_and_fit_vllm():
    assert prompt_seed(0, 3, 5) == prompt_seed(0, 3, 5)
    seeds = {prompt_seed(r, s, p) for r in range(3) for s in range(20) for p in range(20)}
    assert len(seeds) == 3 * 20 * 20
    assert all(0 <= s < 2**SEED_BITS for s in seeds)


def test_vllm_seeds_child_k_with_seed_plus_k():
    """The rule ``actors.vllm_adapter.child_seed`` relies on (vLLM v1 ParentRequest)."""
    from vllm import SamplingParams
    from vllm.v1.engine.parallel_sampling import ParentRequest

    from actors.vllm_adapter import child_seed

    parent = ParentRequest.__new__(ParentRequest)
    parent.sampling_params = SamplingParams(n=4, seed=1234)
    parent.cached_child_sampling_params = None
    assert [parent._get_child_sampling_params(k).seed for k in range(4)] == [child_seed(1234, k) for k in range(4)]


def test_keep_through_drops_rows_after_the_checkpoint(tmp_path):
    run = RunStorage.of(str(tmp_path), "r")
    run.write_text("metrics.jsonl", "".join(json.dumps({"step": s, "x": s}) + "\n" for s in (1, 2, 3, 4)))
    keep_through(run, "metrics.jsonl", 2)
    assert [json.loads(x)["step"] for x in run.read_text("metrics.jsonl").splitlines()] == [1, 2]
    keep_through(run, "absent.jsonl", 2)  # nothing recorded yet: nothing to do
