"""Token-budget micro-batches (``learner.max_tokens_per_micro_batch``) and chunked
log-probs (``learner.logprob_chunk_tokens``) in the GRPO learner: the loss and the
gradients of a step equal those of the padded, full-logits path within 1e-6 (fp32), in
every aggregation mode; and the batch helpers behind them (``learner.batch``)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from learner.batch import (Completion, Group, ScoredGroup, collate, deal_by_tokens, pack_rows, select_rows,
                           token_budget_micro_batches, unpack_row)

pytestmark = pytest.mark.unit

MODES = ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"]


def _groups(prompt_lengths=(3, 9, 5, 12), g=3, seed=0, ref=True):
    rng = random.Random(seed)
    out = []
    for k, prompt_len in enumerate(prompt_lengths):
        comps = []
        for _ in range(g):
            ids = tuple(rng.randrange(5, 300) for _ in range(rng.randrange(2, 15)))
            comps.append(Completion(ids, tuple(-rng.uniform(1, 6) for _ in ids), "x",
                                    rng.choice(["stop", "length"])))
        rewards = tuple(float(i == k % g) + 0.1 * i for i in range(g))
        group = Group(k, tuple(rng.randrange(5, 300) for _ in range(prompt_len)), "a", tuple(comps), 0)
        sg = ScoredGroup(group, rewards, rewards, (1.0,) * g)
        if ref:
            sg = sg.with_ref_logprobs([[-rng.uniform(1, 6) for _ in c.token_ids] for c in comps])
        out.append(sg)
    return out


# -- the batch helpers ----------------------------------------------------------------------
def test_pack_rows_drops_padding_and_restarts_positions():
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]])
    attn = (ids != 0).long()
    packed, positions = pack_rows(attn, ids)
    assert packed.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # Back in the padded layout; each sequence's first value (predicted across the
    # boundary in the packed row) and the padding are 0.
    values = torch.arange(1.0, 10.0)[None]
    assert unpack_row(values, attn).tolist() == [[0, 2, 3, 0], [0, 5, 0, 0], [0, 7, 8, 9]]


def test_select_rows_cuts_to_the_longest_selected():
    groups = _groups()
    whole = collate(groups, [torch.arange(g.group.size, dtype=torch.float32) for g in groups], 0)
    lengths = whole.attention_mask.sum(1)
    part = select_rows(whole, [4, 1])
    assert part.input_ids.shape == (2, int(max(lengths[4], lengths[1])))
    for mine, theirs in ((0, 4), (1, 1)):
        k = int(lengths[theirs])
        assert torch.equal(part.input_ids[mine, :k], whole.input_ids[theirs, :k])
        assert torch.equal(part.loss_mask[mine, :k], whole.loss_mask[theirs, :k])
        assert torch.equal(part.ref_logprobs[mine, :k], whole.ref_logprobs[theirs, :k])
        assert part.advantages[mine] == whole.advantages[theirs]


def test_token_budget_micro_batches():
    # 5 + 4 = 9 fits in 10, + 3 does not; 12 alone is over budget and stands alone.
    assert token_budget_micro_batches([5, 4, 3, 12, 2, 2], 10) == [[0, 1], [2], [3], [4, 5]]
    assert token_budget_micro_batches([], 10) == []
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        token_budget_micro_batches([1], 0)


def test_deal_by_tokens_balances_and_is_deterministic():
    # Longest first: 9 → r0, 8 → r1, 5 → r1 (8 < 9), 4 → r0; ranks hold 13 and 13 tokens.
    assert deal_by_tokens([4, 9, 5, 8], 2) == [0, 0, 1, 1]
    # Ties go to the earlier group and the lower rank.
    assert deal_by_tokens([3, 3, 3, 3], 2) == [0, 1, 0, 1]
    # Each rank takes len/ranks groups even when one group outweighs the rest.
    assert sorted(deal_by_tokens([100, 1, 1, 1], 2)) == [0, 0, 1, 1]
    rng = random.Random(1)
    lengths = [rng.randrange(10, 4000) for _ in range(64)]
    dealt = deal_by_tokens(lengths, 8)
    assert dealt == deal_by_tokens(list(lengths), 8)
    counts = [dealt.count(r) for r in range(8)]
    tokens = [sum(n for n, r in zip(lengths, dealt, strict=True) if r == rank) for rank in range(8)]
    assert counts == [8] * 8
    assert max(tokens) - min(tokens) < max(lengths)  # a round-robin deal is off by far more
    assert sorted(deal_by_tokens([1, 2, 3], 2)) == [0, 0, 1]
    with pytest.raises(ValueError, match="ranks must be >= 1"):
        deal_by_tokens([1], 0)


# -- the learner ------------------------------------------------------------------------------
class _Engine:
    """``learner.engine.Engine`` without DeepSpeed, on one rank: the model's forward, and
    gradients summed over micro-batches (the engine's convention); records each loss."""

    def __init__(self, model):
        self.model = model
        self.device = torch.device("cpu")
        self.pad_id = 0
        self.losses: list[float] = []
        self.lasts: list[bool | None] = []

    def __call__(self, **inputs):
        return self.model(**inputs)

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def backward_step(self, loss, *, last=None):
        self.losses.append(float(loss.detach()))
        self.lasts.append(last)
        loss.backward()

    def grad_norm(self):
        return float("nan")

    def all_reduce_sum(self, value):
        return value

    all_reduce_max = all_reduce_sum


def _step(model_path, mode, **learner_settings):
    from transformers import AutoModelForCausalLM

    from learner.config import GRPOLossConfig, LearnerConfig
    from learner.grpo_role import GRPOLearner

    groups = _groups()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.config.use_cache = False
    cfg = LearnerConfig(**learner_settings)
    loss = GRPOLossConfig(kl_coef=0.04, loss_aggregation=mode, overlong="mask", updates_per_batch=2)
    learner = GRPOLearner(str(model_path), cfg, loss=loss, rank=0, world_size=1, temperature=0.9,
                          groups_per_rank=len(groups), samples_per_prompt=3, max_new_tokens=16)
    learner._engine = engine = _Engine(model)
    learner.feed(groups)
    stats = learner.train_step(1)
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return engine, grads, stats


@pytest.mark.parametrize("mode", MODES)
def test_packed_and_chunked_steps_equal_the_padded_full_logits_step(tiny_model, mode):
    base, want, s0 = _step(tiny_model, mode, micro_batch_groups=2)
    assert len(base.losses) == 4 and base.lasts == [None] * 4  # 2 micro-batches x 2 passes
    assert want.abs().max() > 1e-3  # the step has a gradient to compare
    variants = {
        "chunked": dict(micro_batch_groups=2, logprob_chunk_tokens=7),
        "packed": dict(max_tokens_per_micro_batch=40),
        "packed, chunked": dict(max_tokens_per_micro_batch=40, logprob_chunk_tokens=16),
    }
    for name, settings in variants.items():
        engine, got, stats = _step(tiny_model, mode, **settings)
        if "packed" in name:  # 12 sequences of 6 to 26 tokens: several rows, cut across groups
            per_pass = len(engine.lasts) // 2
            assert per_pass > 2 and engine.lasts == ([False] * (per_pass - 1) + [True]) * 2
        total, expect = sum(engine.losses), sum(base.losses)
        assert math.isclose(total, expect, abs_tol=1e-6), (name, total, expect)
        assert torch.allclose(got, want, atol=1e-6, rtol=0), (name, (got - want).abs().max())
        for key in ("kl", "clip_frac", "surrogate_loss", "logprob_gap"):
            assert math.isclose(stats.finalize()[key], s0.finalize()[key], rel_tol=1e-5, abs_tol=1e-7), key


def test_chunked_model_log_probs_equal_the_full_ones(tiny_model):
    """``model_logprobs`` with ``chunk_tokens``: the model's own head on its final hidden
    states. Not bitwise in general: on the x86 CPU this was written on, chunks of 1 to 3
    rows round apart from the full matrix product (by ~1e-6) and chunks of 4 or more are
    bitwise equal; cuBLAS may pick other kernels per shape. So ``logprob_chunk_tokens``
    defaults to 0 (the demo's numbers stay those of the full path) and the GPU recipes set it."""
    from transformers import AutoModelForCausalLM

    from learner.logprobs import model_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = torch.randint(5, 300, (4, 40), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[1, 30:] = 0
    with torch.no_grad():
        full = model_logprobs(model, ids, attn, temperature=0.8)
        for chunk in (1, 16, 4096):
            got = model_logprobs(model, ids, attn, temperature=0.8, chunk_tokens=chunk)
            assert torch.allclose(got, full, atol=1e-6, rtol=0), (chunk, (got - full).abs().max())


def test_chunked_log_probs_are_refused_under_zero3():
    from learner.config import LearnerConfig

    LearnerConfig(zero_stage=2, logprob_chunk_tokens=1024, max_tokens_per_micro_batch=8192)
    LearnerConfig(zero_stage=3, max_tokens_per_micro_batch=8192)
    with pytest.raises(ValueError, match="logprob_chunk_tokens needs zero_stage <= 2"):
        LearnerConfig(zero_stage=3, logprob_chunk_tokens=1024)


def test_reference_actor_and_sequence_logprobs_take_the_chunked_path(tiny_model):
    """The other two callers of ``model_logprobs``: π_ref's log-probs of a group and the
    learner's ``sequence_logprobs`` agree with and without chunks (1e-6)."""
    from transformers import AutoModelForCausalLM

    from actors.config import ReferenceConfig
    from actors.reference import ReferenceActor
    from learner.config import GRPOLossConfig, LearnerConfig
    from learner.grpo_role import GRPOLearner

    group = _groups(ref=False)[1]
    full, chunked = (ReferenceActor(str(tiny_model), ReferenceConfig(micro_batch_sequences=2, logprob_chunk_tokens=c),
                                    temperature=0.9).add_ref_logprobs(group) for c in (0, 5))
    for a, b in zip(full.ref_logprobs, chunked.ref_logprobs, strict=True):
        assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    prompt, response = group.group.prompt_ids, group.group.completions[0].token_ids
    got = []
    for chunk in (0, 3):
        learner = GRPOLearner(str(tiny_model), LearnerConfig(logprob_chunk_tokens=chunk), loss=GRPOLossConfig(),
                              rank=0, world_size=1, temperature=0.9, groups_per_rank=1, samples_per_prompt=3,
                              max_new_tokens=16)
        learner._engine = _Engine(model)
        got.append(learner.sequence_logprobs(prompt, response))
    assert len(got[0]) == len(response) and max(abs(x - y) for x, y in zip(*got, strict=True)) < 1e-6
    # π_ref is the same function of the same weights: the reference actor's numbers.
    assert max(abs(x - y) for x, y in zip(got[0], full.ref_logprobs[0], strict=True)) < 1e-6


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_flash_attention_is_refused_without_a_gpu():
    from learner.config import LearnerConfig
    from learner.engine import Engine, EngineShape

    with pytest.raises(ValueError, match="flash_attention_2 needs a CUDA GPU"):
        Engine("unused", LearnerConfig(attn_implementation="flash_attention_2"), EngineShape(0, 1, 1, 1), seed=0,
               master_addr="127.0.0.1", master_port=1)
