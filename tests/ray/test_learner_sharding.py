"""The learner's update does not depend on how a step's groups are split: one rank with
gradient accumulation, two ZeRO-2 ranks and two ZeRO-3 ranks give the same weights, in
every loss-aggregation mode.

The groups have unequal prompt and response lengths. One rank packs them in pairs
(two micro-batches), the ZeRO-2 ranks one per micro-batch, the ZeRO-3 ranks in the same
pairs as the single rank: so a normaliser taken from a micro-batch's padded width (the
Dr. GRPO bug this guards against) changes the ZeRO-2 weights, while the ZeRO-3 layout
checks the sharded optimizer alone. The packings differ only in float rounding, which
Adam's first step amplifies for the few weights whose gradient is near its eps: up to
~1.3e-5 here, within the 2e-5 tolerance; the bug moves thousands of weights by ~2e-3.

Two more layouts pack each rank's sequences into rows of at most 30 tokens
(``learner.max_tokens_per_micro_batch``): the ranks cut 3 and 2 rows, so one of them
makes an idle call and DeepSpeed's accumulation boundary is set by the learner. The
ZeRO-2 one also takes log-probs 5 positions at a time (``learner.logprob_chunk_tokens``;
ZeRO-3 refuses chunks).
"""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.ray

MAX_NEW_TOKENS = 16  # the generation budget: Dr. GRPO's normaliser
# (ranks, ZeRO stage, groups per micro-batch, other learner settings); 4 groups in all,
# split over the ranks.
PACKED = {"max_tokens_per_micro_batch": 30}
LAYOUTS = {"1 rank, 2 micro-batches": (1, 2, 2, {}), "2 ZeRO-2 ranks": (2, 2, 1, {}),
           "2 ZeRO-3 ranks": (2, 3, 2, {}),
           "2 ZeRO-2 ranks, packed rows, chunked log-probs": (2, 2, 1, {**PACKED, "logprob_chunk_tokens": 5}),
           "2 ZeRO-3 ranks, packed rows": (2, 3, 1, PACKED)}


def _groups(prompt_lengths=(3, 9, 5, 12), g=2, seed=0):
    from learner.batch import Completion, Group, ScoredGroup

    rng = random.Random(seed)
    out = []
    for k, prompt_len in enumerate(prompt_lengths):
        comps = []
        for _ in range(g):
            ids = tuple(rng.randrange(5, 300) for _ in range(rng.randrange(2, 11)))
            comps.append(Completion(ids, tuple(-rng.uniform(1, 6) for _ in ids), "x", "stop"))
        rewards = tuple(float(i == k % g) for i in range(g))  # unequal in every group
        group = Group(k, tuple(rng.randrange(5, 300) for _ in range(prompt_len)), "a", tuple(comps), 0)
        out.append(ScoredGroup(group, rewards, rewards, (1.0,) * g))
    return out


def _host_class() -> type:
    # Defined in a function so that Ray ships the class by value: this test module is
    # not importable in Ray's worker processes.
    class Host:
        """One learner process that builds a fresh GRPOLearner per configuration, so the
        three loss modes share processes (and their process group) instead of starting
        new ones: starting an actor costs more than the step itself."""

        def address(self) -> tuple[str, int]:
            from learner.weight_sync import free_port, node_ip

            return node_ip(), free_port()

        def start(self, model: str, config, loss, rank: int, world_size: int, groups_per_rank: int,
                  samples_per_prompt: int, addr: tuple[str, int]) -> None:
            from learner.grpo_role import GRPOLearner

            self.learner = GRPOLearner(model, config, loss=loss, rank=rank, world_size=world_size, temperature=1.0,
                                       groups_per_rank=groups_per_rank, samples_per_prompt=samples_per_prompt,
                                       max_new_tokens=MAX_NEW_TOKENS)
            self.learner.setup(*addr)

        def feed(self, groups) -> int:
            return self.learner.feed(groups)

        def train_step(self, step: int):
            return self.learner.train_step(step)

        def parameter_vector(self) -> torch.Tensor:
            return self.learner.parameter_vector()

    return Host


@pytest.fixture(scope="module")
def hosts(ray_local):
    ray = ray_local
    Host = ray.remote(_host_class()).options(num_cpus=0.25, max_concurrency=4)  # 9 hosts on 4 CPUs
    made = {name: [Host.remote() for _ in range(ranks)] for name, (ranks, *_) in LAYOUTS.items()}
    addresses = {name: ray.get(workers[0].address.remote()) for name, workers in made.items()}
    yield {name: (workers, addresses[name]) for name, workers in made.items()}
    for workers in made.values():
        for w in workers:
            ray.kill(w)


def _train(ray, model, hosts, *, mode, ranks, zero_stage, micro_batch_groups, settings, groups):
    from learner.config import GRPOLossConfig, LearnerConfig

    workers, addr = hosts
    cfg = LearnerConfig(zero_stage=zero_stage, learning_rate=1e-3, micro_batch_groups=micro_batch_groups, **settings)
    loss = GRPOLossConfig(kl_coef=0.0, loss_aggregation=mode)
    per_rank = len(groups) // ranks
    ray.get([w.start.remote(str(model), cfg, loss, r, ranks, per_rank, groups[0].group.size, addr)
             for r, w in enumerate(workers)])
    # Under ZeRO-3 gathering parameters is collective: every rank takes part.
    before = ray.get([w.parameter_vector.remote() for w in workers])[0]
    for i, g in enumerate(groups):  # rank 0 takes the first half, in order
        ray.get(workers[i // per_rank].feed.remote([g]))
    stats = ray.get([w.train_step.remote(1) for w in workers])
    after = ray.get([w.parameter_vector.remote() for w in workers])[0]
    return before, after, stats


@pytest.mark.parametrize("mode", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_same_update_for_any_split(ray_local, tiny_model, hosts, mode):
    ray = ray_local
    groups = _groups()
    assert len({len(g.group.prompt_ids) for g in groups}) == len(groups)  # unequal prompts
    assert len({len(c.token_ids) for g in groups for c in g.group.completions}) > 2  # and responses
    runs = {
        name: _train(ray, tiny_model, hosts[name], mode=mode, ranks=ranks, zero_stage=zero,
                     micro_batch_groups=micro, settings=settings, groups=groups)
        for name, (ranks, zero, micro, settings) in LAYOUTS.items()
    }
    (b1, one, s1), (_, two, s2), (_, three, _), (_, four, s4), (_, five, s5) = runs.values()
    moved = (one - b1).abs()
    assert moved.max() > 1e-4  # the step really changed the weights
    # Adam's first step is ~lr·sign(g); equal gradients give equal updates.
    assert torch.allclose(one, two, atol=2e-5), (one - two).abs().max()
    assert torch.allclose(one, three, atol=2e-5), (one - three).abs().max()
    # Packed rows run attention on other shapes, so the gradients round apart a little more;
    # Adam's first step amplifies that for the few weights whose gradient is near its eps
    # (here at most 1 of 508,032 weights past 2e-5, by 6.2e-5). A wrong normaliser or a lost
    # or doubled micro-batch moves thousands of weights by ~lr = 1e-3.
    for other in (four, five):
        diff = (one - other).abs()
        far = int((diff > 2e-5).sum())
        assert diff.max() < 2e-4 and far <= 10, (diff.max(), far)
    assert sum(s.sequences for s in s4) == sum(s.sequences for s in s5) == 8
    assert sum(s.sequences for s in s2) == s1[0].sequences == 8
