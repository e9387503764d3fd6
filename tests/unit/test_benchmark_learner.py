"""The learner benchmark's helpers (benchmarks/learner.py): a demo-like step, its padding
share and its packed rows, the rows the plain-torch baseline trains on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.unit


def test_demo_like_step_padding_and_packed_rows(tiny_model):
    from transformers import AutoTokenizer

    from benchmarks import learner as bench

    groups = bench.demo_like_groups(AutoTokenizer.from_pretrained(tiny_model))
    assert len(groups) == bench.GROUPS and all(g.group.size == bench.SAMPLES for g in groups)
    assert max(len(c.token_ids) for g in groups for c in g.group.completions) == bench.MAX_NEW_TOKENS
    padded, packed = bench.padding_share(groups)
    assert padded > 0.01 and packed == 0.0
    lengths = bench.sequence_lengths(groups)
    rows = bench._packed_rows(groups)
    assert sum(ids.shape[1] for ids, *_ in rows) == sum(map(sum, lengths))  # every real token, no padding
    assert all(ids.shape[1] <= bench.PACK_TOKENS for ids, *_ in rows)

    def group(prompt, *responses):
        completions = [SimpleNamespace(token_ids=(0,) * r) for r in responses]
        return SimpleNamespace(group=SimpleNamespace(prompt_ids=(0,) * prompt, completions=completions))

    # Sequences of (1 + 2, 1 + 4) and (2 + 2, 2 + 2) tokens padded two groups at a time:
    # 4 rows x 5 = 20 slots for 16 real tokens, 4 padded: a share of 4 / 16 = 0.25.
    assert bench.padding_share([group(1, 2, 4), group(2, 2, 2)]) == (0.25, 0.0)
