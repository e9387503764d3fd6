"""Rollout actor throughput ÷ bare ``vllm.LLM.generate``, same model, prompts and sampling.

Both run as Ray actors with the same engine settings; rounds alternate so both see the
same machine load. Prints tokens/s of each and the ratio (goal ≥ 0.95).

    python benchmarks/rollout.py [--rounds 4] [--prompts 32] [--samples 8] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import local_ray, tiny_model  # noqa: E402


class BareVLLM:
    """The baseline: ``LLM.generate`` on the same prompts, nothing else."""

    def __init__(self, model_path: str, max_model_len: int, kv_cache_bytes: int) -> None:
        import os

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.llm = LLM(model=model_path, dtype="float32", max_model_len=max_model_len, enforce_eager=True,
                       kv_cache_memory_bytes=kv_cache_bytes, seed=0)

    def run(self, prompts: list[list[int]], n: int, max_new_tokens: int) -> tuple[int, float]:
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=1.0, max_tokens=max_new_tokens, logprobs=0, ignore_eos=True)
        t0 = time.monotonic()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        dt = time.monotonic() - t0
        return sum(len(c.token_ids) for o in outs for c in o.outputs), dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--model", type=Path, default=None)
    args = ap.parse_args()

    ray = local_ray()
    from actors.config import RolloutConfig
    from actors.rollout import PromptItem, RolloutActor

    model = str(args.model or tiny_model())
    kv = 256 * 2**20
    cfg = RolloutConfig(max_new_tokens=args.max_new_tokens, max_model_len=256, kv_cache_bytes=kv, dtype="float32")
    actor = ray.remote(RolloutActor).options(num_cpus=1).remote(model, cfg)
    bare = ray.remote(BareVLLM).options(num_cpus=1).remote(model, 256, kv)
    prompts = [[(7 * i + j) % 300 + 1 for j in range(24)] for i in range(args.prompts)]
    items = [PromptItem(i, tuple(p), "") for i, p in enumerate(prompts)]

    def actor_round() -> tuple[int, float]:
        t0 = time.monotonic()
        groups = ray.get(actor.generate_groups.remote(items, args.samples, ignore_eos=True))
        return sum(len(c.token_ids) for g in groups for c in g.completions), time.monotonic() - t0

    def bare_round() -> tuple[int, float]:
        t0 = time.monotonic()
        tokens, _ = ray.get(bare.run.remote(prompts, args.samples, args.max_new_tokens))
        return tokens, time.monotonic() - t0

    actor_round(), bare_round()  # warm-up
    a_rates, b_rates = [], []
    for _ in range(args.rounds):
        tok, dt = actor_round()
        a_rates.append(tok / dt)
        tok, dt = bare_round()
        b_rates.append(tok / dt)
    a, b = statistics.median(a_rates), statistics.median(b_rates)
    print(f"rollout actor  : {a:10.0f} tokens/s (median of {args.rounds}, measured from the driver)")
    print(f"bare LLM.generate: {b:8.0f} tokens/s (same, in its own actor)")
    print(f"ratio actor/bare: {a / b:.3f}  (goal >= 0.95)")


if __name__ == "__main__":
    main()
