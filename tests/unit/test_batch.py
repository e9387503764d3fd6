"""The train-batch contract: construction checks and collation."""

from __future__ import annotations

import pytest
import torch

from learner.batch import Completion, Group, ScoredGroup, TrainBatch, collate, pad_rows

pytestmark = pytest.mark.unit


def _group(prompt=(1, 2, 3), responses=((4, 5), (6,)), version=0) -> Group:
    comps = tuple(Completion(tuple(r), tuple(-0.5 for _ in r), "t", "stop") for r in responses)
    return Group(0, tuple(prompt), "ans", comps, version)


def test_completion_and_group_checks():
    with pytest.raises(ValueError, match="2 tokens but 1 log-probs"):
        Completion((1, 2), (0.0,), "x", "stop")
    with pytest.raises(ValueError, match="empty completion"):
        Completion((), (), "", "stop")
    with pytest.raises(ValueError, match="tokenised to nothing"):
        Group(3, (), "a", _group().completions, 0)


def test_scored_group_checks():
    g = _group()
    with pytest.raises(ValueError, match="rewards has 1 values for 2 completions"):
        ScoredGroup(g, (1.0,), (1.0, 0.0), (1.0, 1.0))
    with pytest.raises(ValueError, match="non-finite reward"):
        ScoredGroup(g, (float("nan"), 0.0), (1.0, 0.0), (1.0, 1.0))
    sg = ScoredGroup(g, (1.0, 0.0), (1.0, 0.0), (1.0, 1.0))
    with pytest.raises(ValueError, match="ref_logprobs has 1 values for a 2-token completion"):
        sg.with_ref_logprobs([[0.1], [0.2]])


def test_collate_positions_and_masks():
    # prompt [1,2,3]; completions [4,5] and [6] → rows of width 5.
    sg = ScoredGroup(_group(), (1.0, 0.0), (1.0, 0.0), (1.0, 1.0)).with_ref_logprobs([[-1.0, -2.0], [-3.0]])
    b = collate([sg], [torch.tensor([0.7, -0.7])], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 6, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # Log-prob of token t sits at column t: the response starts at column 3.
    assert b.loss_mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]]
    assert b.old_logprobs[0, 3:].tolist() == [-0.5, -0.5]
    assert b.ref_logprobs.tolist()[1] == [0, 0, 0, -3.0, 0]
    assert b.advantages.tolist() == pytest.approx([0.7, -0.7])
    assert b.num_sequences == 2 and b.num_response_tokens == 3


def test_pad_rows_right_pads_and_marks_responses():
    ids, attn, response = pad_rows([((1, 2), (3,)), ((4,), (5, 6, 7))], pad_id=9)
    assert ids.tolist() == [[1, 2, 3, 9], [4, 5, 6, 7]] and ids.dtype == torch.int64
    assert attn.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]] and attn.dtype == torch.int64
    assert response.tolist() == [[0, 0, 1, 0], [0, 1, 1, 1]] and response.dtype == torch.float32


def test_collate_rejects_mixed_reference_and_count_mismatch():
    a = ScoredGroup(_group(), (1.0, 0.0), (1.0, 0.0), (1.0, 1.0))
    b = a.with_ref_logprobs([[-1.0, -2.0], [-3.0]])
    with pytest.raises(ValueError, match="some groups have reference"):
        collate([a, b], [torch.zeros(2), torch.zeros(2)], 0)
    with pytest.raises(ValueError, match="3 advantages for 2 sequences"):
        collate([a], [torch.zeros(3)], 0)


def test_train_batch_checks_shapes_and_dtypes():
    n, t = 2, 4
    ok = dict(input_ids=torch.zeros(n, t, dtype=torch.int64), attention_mask=torch.ones(n, t, dtype=torch.int64),
              loss_mask=torch.ones(n, t), old_logprobs=torch.zeros(n, t), ref_logprobs=None,
              advantages=torch.zeros(n), token_versions=torch.zeros((n, t), dtype=torch.int64))
    TrainBatch(**ok)
    with pytest.raises(ValueError, match="advantages has shape"):
        TrainBatch(**{**ok, "advantages": torch.zeros(n + 1)})
    with pytest.raises(TypeError, match="loss_mask must be torch.float32"):
        TrainBatch(**{**ok, "loss_mask": torch.ones(n, t, dtype=torch.float64)})


def test_token_versions_and_gap_by_lag_per_token():
    # Completion 0 was continued after a push: its first token drawn by version 0, its
    # second by version 1; completion 1 is the group's version (1) throughout.
    from types import SimpleNamespace

    from learner.grpo_role import GRPOLearner, StepStats

    comps = (Completion((4, 5), (-0.5, -0.5), "t", "stop", versions=(0, 1)), Completion((6,), (-0.5,), "t", "stop"))
    sg = ScoredGroup(Group(0, (1, 2, 3), "ans", comps, 1), (1.0, 0.0), (1.0, 0.0), (1.0, 1.0))
    b = collate([sg], [torch.zeros(2)], 0)
    assert b.token_versions.tolist() == [[0, 0, 0, 0, 1], [0, 0, 0, 1, 0]]
    logp = b.old_logprobs.clone()
    logp[0, 3] -= 0.25  # the version-0 token is off by 0.25
    logp[0, 4] -= 0.5  # the version-1 token by 0.5
    logp[1, 3] -= 0.125  # the other version-1 token by 0.125
    stats = StepStats()
    GRPOLearner._gap_by_lag(SimpleNamespace(version=2), stats, logp, b)  # learner at version 2
    assert stats.gap_by_lag == {2: [0.25, 1.0], 1: [0.625, 2.0]}
    assert stats.finalize()["logprob_gap/lag1"] == pytest.approx(0.3125)
