"""Weight push seconds vs one raw broadcast of a flat tensor of the same bytes.

Push: learner rank 0 (DeepSpeed) → a vLLM rollout engine, in buckets, including the
engine's in-place reload and prefix-cache reset. Baseline: two bare actors broadcasting
one flat float32 tensor of the same size over the same kind of standalone gloo group.
Rounds alternate; prints both and the bandwidth ratio raw_s / push_s (goal ≥ 0.8).

    python benchmarks/weight_push.py [--hidden 512 --layers 4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import local_ray, tiny_model  # noqa: E402


class RawPeer:
    """One end of the baseline: a standalone gloo group and a flat tensor."""

    def __init__(self, rank: int, nbytes: int) -> None:
        import torch

        self.rank = rank
        self.flat = torch.ones(nbytes // 4, dtype=torch.float32)

    def join(self, host: str, port: int) -> None:
        from learner.weight_sync import create_group

        self.group = create_group(host, port, self.rank, 2, backend="gloo")

    def broadcast(self) -> float:
        import torch.distributed as dist

        t0 = time.monotonic()
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([self.flat], opts).wait()
        return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--bucket-mib", type=int, default=16)
    args = ap.parse_args()

    ray = local_ray()
    from actors.config import RolloutConfig
    from actors.rollout import RolloutActor
    from learner.config import GRPOLossConfig, LearnerConfig
    from learner.weight_sync import free_port
    from learner.grpo_role import GRPOLearner
    from orchestrator.cluster import StageActors, init_weight_push

    model = str(tiny_model(args.hidden, args.layers))
    learner = ray.remote(GRPOLearner).options(num_cpus=0.5, max_concurrency=4).remote(
        model, LearnerConfig(weight_push_bucket_bytes=args.bucket_mib * 2**20), loss=GRPOLossConfig(), rank=0, world_size=1,
        temperature=1.0, groups_per_rank=1, samples_per_prompt=2, max_new_tokens=8)
    params = ray.get(learner.setup.remote(*ray.get(learner.address.remote())))
    engine = ray.remote(RolloutActor).options(num_cpus=0.5).remote(
        model, RolloutConfig(max_new_tokens=8, max_model_len=128, kv_cache_bytes=64 * 2**20, dtype="float32"))
    init_weight_push(StageActors(pg=None, learners=[learner], rollouts=[engine]), "gloo", 1)
    nbytes = ray.get(learner.weight_spec.remote()).total_bytes

    peers = [ray.remote(RawPeer).options(num_cpus=0.5).remote(r, nbytes) for r in (0, 1)]
    port = free_port()
    ray.get([p.join.remote("127.0.0.1", port) for p in peers])

    def push(load: bool = True) -> float:
        t0 = time.monotonic()
        ray.get([learner.push_weights.remote(1), engine.receive_weights.remote(1, load)])
        return time.monotonic() - t0

    def raw() -> float:
        t0 = time.monotonic()
        ray.get([p.broadcast.remote() for p in peers])
        return time.monotonic() - t0

    push(), push(load=False), raw()  # warm-up
    push_s, wire_s, raw_s = [], [], []
    for _ in range(args.rounds):
        push_s.append(push())
        wire_s.append(push(load=False))
        raw_s.append(raw())
    p, w, r = (statistics.median(x) for x in (push_s, wire_s, raw_s))
    mb = nbytes / 2**20
    print(f"model: {params / 1e6:.1f} M parameters, {mb:.1f} MiB per push, buckets of {args.bucket_mib} MiB")
    print(f"weight push, end to end (vLLM in-place reload included): {p:.3f} s  ({mb / p:.0f} MiB/s)")
    print(f"weight push, transport only (engine receives, no reload): {w:.3f} s  ({mb / w:.0f} MiB/s)")
    print(f"raw flat broadcast of the same bytes                    : {r:.3f} s  ({mb / r:.0f} MiB/s)")
    print(f"bandwidth ratio end-to-end/raw: {r / p:.3f}   transport/raw: {r / w:.3f}  (goal >= 0.8)")


if __name__ == "__main__":
    main()
