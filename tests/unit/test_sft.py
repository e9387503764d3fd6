"""SFT loss (learner/sft.py): hand computation, float64 loop reference, sharding invariance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from learner.grpo import AGG_MODES, token_logprobs
from learner.sft import SFTMetrics, sft_loss, sft_loss_from_logprobs

pytestmark = pytest.mark.unit

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-3}


def close(actual: torch.Tensor, expected, tol: float) -> None:
    expected_t = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.detach().to(torch.float64), expected_t, rtol=tol, atol=tol)


def ref_sft(logits, targets, mask, mode, n_seq, n_tok, max_tokens):
    """Float64 loops: masked NLL aggregated as in grpo.aggregate."""
    total = 0.0
    for l_row, t_row, m_row in zip(logits, targets, mask, strict=True):
        nll_sum, count = 0.0, 0
        for scores, target, m in zip(l_row, t_row, m_row, strict=True):
            if not m:
                continue
            top = max(scores)
            lse = top + math.log(sum(math.exp(s - top) for s in scores))
            nll_sum += lse - scores[target]
            count += 1
        if mode == "seq_mean_token_mean":
            total += nll_sum / max(count, 1) / n_seq
        elif mode == "token_mean":
            total += nll_sum / n_tok
        else:
            total += nll_sum / (n_seq * max_tokens)
    return total


def test_sft_loss_by_hand():
    # one sequence, 3 positions, every position's softmax = [1/6, 2/6, 3/6]
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0]] * 3], dtype=torch.float64))  # [N=1, T=3, V=3]
    targets = torch.tensor([[0, 2, 1]])
    mask = torch.tensor([[0, 1, 1]])  # position 0 is prompt
    loss, metrics = sft_loss(logits, targets, mask, agg_mode="token_mean", num_sequences=1, num_tokens=2)
    # position 1: -log(3/6) = 0.6931; position 2: -log(2/6) = 1.0986; mean (0.6931 + 1.0986)/2 = 0.8959
    close(loss, 0.8958797, 1e-6)
    final = metrics.finalize()
    close(final["nll"], 0.8958797, 1e-6)
    close(final["perplexity"], math.exp(0.8958797), 1e-6)
    # argmax is token 2 everywhere: right at position 1, wrong at position 2 -> accuracy 1/2
    close(final["token_accuracy"], 0.5, 0)
    # seq_mean_token_mean with 2 sequences in the optimizer batch: 0.8959 / 2 = 0.4479
    loss, _ = sft_loss(logits, targets, mask, agg_mode="seq_mean_token_mean", num_sequences=2, num_tokens=None)
    close(loss, 0.4479399, 1e-6)


def test_sft_loss_equals_torch_cross_entropy_for_token_mean():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 9, generator=gen, dtype=torch.float64)  # [N, T, V]
    targets = torch.randint(0, 9, (4, 6), generator=gen)  # [N, T]
    mask = torch.rand(4, 6, generator=gen) > 0.3  # [N, T]
    loss, _ = sft_loss(logits, targets, mask, agg_mode="token_mean", num_sequences=4, num_tokens=int(mask.sum()))
    ce = F.cross_entropy(logits.reshape(-1, 9), torch.where(mask, targets, -100).reshape(-1), ignore_index=-100)
    close(loss, ce, 1e-12)


def test_prompt_tokens_get_zero_gradient():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)  # [N, T, V]
    targets = torch.randint(0, 7, (2, 5), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)  # prompt, response, padding
    loss, _ = sft_loss(logits, targets, mask, agg_mode="seq_mean_token_mean", num_sequences=2, num_tokens=None)
    loss.backward()
    assert torch.equal(logits.grad[~mask], torch.zeros(int((~mask).sum()), 7, dtype=torch.float64))
    assert (logits.grad[mask].abs() > 0).all()


def test_sft_from_logprobs_matches_and_marks_accuracy_unmeasured():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 5, (3, 4), generator=gen)
    mask = torch.ones(3, 4)
    kw = dict(agg_mode="token_mean", num_sequences=3, num_tokens=12)
    a, ma = sft_loss(logits, targets, mask, **kw)
    b, mb = sft_loss_from_logprobs(token_logprobs(logits, targets), mask, **kw)
    assert torch.equal(a, b)
    assert torch.equal(ma.nll_sum, mb.nll_sum)
    assert torch.isnan(mb.finalize()["token_accuracy"])


def test_sft_metrics_are_detached():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    _, m = sft_loss(logits, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), agg_mode="token_mean",
                    num_sequences=2, num_tokens=6)  # fmt: skip
    assert all(not v.requires_grad for v in m.finalize().values())
    with pytest.raises(ValueError, match="detached"):
        SFTMetrics(token_count=torch.ones((), requires_grad=True), nll_sum=torch.ones(()), correct_count=torch.ones(()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (6, 13)])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_sft_loss_matches_loop(dtype, shape, mode):
    gen = torch.Generator().manual_seed(3)
    n, t = shape
    logits = (2 * torch.randn(n, t, 10, generator=gen, dtype=torch.float64)).to(dtype)  # [N, T, V]
    targets = torch.randint(0, 10, shape, generator=gen)  # [N, T]
    mask = torch.arange(t).unsqueeze(0) < torch.randint(1, t + 1, (n,), generator=gen).unsqueeze(1)  # [N, T]
    n_tok, max_tokens = int(mask.sum()), t + 1
    loss, _ = sft_loss(
        logits, targets, mask, agg_mode=mode, num_sequences=n, num_tokens=n_tok, max_tokens=max_tokens
    )
    want = ref_sft(logits.double().tolist(), targets.tolist(), mask.tolist(), mode, n, n_tok, max_tokens)
    close(loss, want, TOL[dtype])


@pytest.mark.parametrize("mode", AGG_MODES)
def test_sft_micro_batch_and_rank_splits_give_the_full_batch_gradient(mode):
    gen = torch.Generator().manual_seed(4)
    lengths = [4, 1, 6, 3, 2, 5]  # response tokens per sequence
    n, t, vocab = len(lengths), 8, 7
    logits = torch.randn(n, t, vocab, generator=gen, dtype=torch.float64)  # [N, T, V]
    targets = torch.randint(0, vocab, (n, t), generator=gen)  # [N, T]
    pos = torch.arange(t).unsqueeze(0)  # [1, T]
    prompt = 2
    mask = (pos >= prompt) & (pos < prompt + torch.tensor(lengths).unsqueeze(1))  # [N, T]
    kw = dict(agg_mode=mode, num_sequences=n, num_tokens=int(mask.sum()), max_tokens=6)

    full = logits.clone().requires_grad_(True)
    full_loss, full_metrics = sft_loss(full, targets, mask, **kw)
    full_loss.backward()

    for ranks in ([[[0], [1, 2, 3], [4, 5]]], [[[0, 1], [2]], [[3], [4, 5]]]):
        grads, total_loss, metrics = [], torch.zeros((), dtype=torch.float64), []
        for micro_batches in ranks:
            leaf = logits.clone().requires_grad_(True)
            for rows in micro_batches:
                width = prompt + max(lengths[i] for i in rows)  # trim to this micro-batch
                idx = torch.tensor(rows)
                loss, m = sft_loss(leaf[idx, :width], targets[idx, :width], mask[idx, :width], **kw)
                loss.backward()
                total_loss = total_loss + loss.detach()
                metrics.append(m)
            grads.append(leaf.grad)
        torch.testing.assert_close(sum(grads), full.grad, rtol=0, atol=1e-6)
        torch.testing.assert_close(total_loss, full_loss.detach(), rtol=0, atol=1e-6)
        summed = metrics[0]
        for m in metrics[1:]:
            summed = summed + m
        torch.testing.assert_close(summed.to_tensor(), full_metrics.to_tensor(), rtol=0, atol=1e-9)


def test_sft_reads_extra_data_files_and_names_a_missing_one(tiny_model, tmp_path):
    """§2.3.3: the SFT set is reasoning samples plus non-reasoning data, from two files."""
    import json

    from transformers import AutoTokenizer

    from orchestrator.stages import StageError
    from orchestrator.stages.sft import Config, load_examples

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({"prompt": "What is 1+2", "response": " 3"}) + "\n")
    b.write_text("".join(json.dumps({"prompt": f"Tell me about {n}", "response": " odd"}) + "\n" for n in (11, 13)))
    cfg = Config.model_validate({"model": {"path": str(tiny_model)},
                                 "data": {"train_path": str(a), "extra_train_paths": [str(b)]}})
    tok = AutoTokenizer.from_pretrained(tiny_model)
    examples, too_long = load_examples(cfg, tok)
    assert len(examples) == 3 and too_long == 0
    assert tok.decode(examples[2][0]) == "Tell me about 13"
    missing = cfg.model_copy(update={"data": cfg.data.model_copy(update={"extra_train_paths": (tmp_path / "no.jsonl",)})})
    with pytest.raises(StageError, match="no.jsonl does not exist"):
        load_examples(missing, tok)
