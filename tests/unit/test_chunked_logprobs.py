"""Log-probs from hidden states, the LM head applied a chunk of positions at a time
(``learner.logprobs.chunked_input_logprobs``): equal to the full-logits path, gradients
included, for any chunk size."""

from __future__ import annotations

import pytest
import torch

from learner.logprobs import chunked_input_logprobs, input_logprobs

pytestmark = pytest.mark.unit


def _case(bias: bool):
    torch.manual_seed(0)
    n, t, h, v = 3, 7, 16, 50
    hidden = torch.randn(n, t, h, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float32, requires_grad=True)
    b = torch.randn(v, requires_grad=True) if bias else None
    ids = torch.randint(0, v, (n, t))
    return hidden, weight, b, ids


@pytest.mark.parametrize("chunk", [1, 4, 18, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_equal_to_the_full_logits_path_with_gradients(chunk, bias):
    hidden, weight, b, ids = _case(bias)
    logits = torch.nn.functional.linear(hidden, weight, b)  # [N, T, V]
    want = input_logprobs(logits, ids, temperature=0.7)
    weights = torch.randn_like(want)
    (want * weights).sum().backward()
    grads_want = [x.grad.clone() for x in (hidden, weight, *([b] if bias else []))]
    for x in (hidden, weight, *([b] if bias else [])):
        x.grad = None

    got, entropy = chunked_input_logprobs(hidden, weight, ids, temperature=0.7, chunk_tokens=chunk, head_bias=b)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-6)  # fp32: a [1, H] matmul rounds apart from [C, H]
    (got * weights).sum().backward()
    for g, w in zip([x.grad for x in (hidden, weight, *([b] if bias else []))], grads_want, strict=True):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-5)
    probs = torch.softmax(logits.detach()[:, :-1] / 0.7, -1)
    expect = -(probs * torch.log(probs)).sum(-1)
    assert torch.allclose(entropy[:, 1:], expect, atol=1e-5) and (entropy[:, 0] == 0).all()


def test_no_grad_and_bad_arguments():
    hidden, weight, _, ids = _case(False)
    with torch.no_grad():
        got, _ = chunked_input_logprobs(hidden, weight, ids, temperature=1.0, chunk_tokens=5)
    want = input_logprobs(torch.nn.functional.linear(hidden, weight), ids, temperature=1.0)
    assert torch.allclose(got, want, atol=1e-6) and not got.requires_grad
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        chunked_input_logprobs(hidden, weight, ids, temperature=1.0, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"expected hidden \[N, T, H\]"):
        chunked_input_logprobs(hidden[0], weight, ids, temperature=1.0, chunk_tokens=4)
