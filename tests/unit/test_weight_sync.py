"""Weight-push protocol: bucketing, and a real gloo broadcast between two ranks."""

from __future__ import annotations

import threading

import pytest
import torch

from learner.weight_sync import WeightSpec, create_group, free_port, receive_weights, send_weights

pytestmark = pytest.mark.unit


def test_buckets_respect_size_and_dtype():
    named = [("a", torch.zeros(10)), ("b", torch.zeros(10)), ("c", torch.zeros(30)),
             ("d", torch.zeros(4, dtype=torch.bfloat16)), ("e", torch.zeros(2))]
    spec = WeightSpec.of(named, bucket_bytes=80)  # 20 float32 per bucket
    # a+b fill 80 bytes; c alone is larger than a bucket; d changes dtype; e starts anew.
    assert spec.buckets() == [(0, 1), (2,), (3,), (4,)]
    assert spec.total_bytes == 4 * 52 + 2 * 4
    with pytest.raises(TypeError, match="cannot push tensors of dtype"):
        WeightSpec.of([("i", torch.zeros(2, dtype=torch.int64))], 80)


def test_gloo_broadcast_round_trip():
    torch.manual_seed(0)
    sent = [("w1", torch.randn(3, 5)), ("w2", torch.randn(7)), ("h", torch.randn(2, 2).bfloat16())]
    spec = WeightSpec.of(sent, bucket_bytes=64)
    port = free_port()
    received: list[tuple[str, torch.Tensor]] = []
    errors: list[BaseException] = []

    def receiver():
        try:
            group = create_group("127.0.0.1", port, 1, 2, backend="gloo", timeout_s=30)
            for bucket in receive_weights(group, spec, "cpu"):
                received.extend((n, t.clone()) for n, t in bucket)
        except BaseException as err:  # noqa: BLE001 - surfaced below
            errors.append(err)

    thread = threading.Thread(target=receiver)
    thread.start()
    group = create_group("127.0.0.1", port, 0, 2, backend="gloo", timeout_s=30)
    nbytes = send_weights(group, spec, [t for _, t in sent])
    thread.join(30)
    assert not errors, errors
    assert nbytes == spec.total_bytes
    assert [n for n, _ in received] == ["w1", "w2", "h"]
    for (_, a), (_, b) in zip(sent, received, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(ValueError, match="2 tensors for a spec of 3"):
        send_weights(group, spec, [t for _, t in sent][:2])
