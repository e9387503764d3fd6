"""Math verification throughput: the scoring pool against in-process Math-Verify.

    python benchmarks/rewards_math.py [--workers 2] [--timeout-s 5] [--pairs N]

Both sides grade the same (response, gold) pairs — every distinct MATH-500 and GSM8K
gold answer against itself written differently inside a boxed response — in one run:

- baseline: ``math_verify.verify(parse(f"${gold}$"), parse(response))`` in this process, one
  pair after another, no isolation (Math-Verify's own alarm timeouts, main thread only);
- pool: ``ScoringPool([math_accuracy]).score(pairs)``, what the reward actor runs: worker
  processes, a wall-clock deadline per call, extraction and r1lab's conventions.

It prints both rates and their ratio (goal: >= 0.5). Pool start-up is reported apart: a
reward actor pays it once per run. Data from ../shared/data (see its README).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

from math_verify import parse, verify

from rewards.config import RewardSpec
from rewards.isolation.pool import ScoringPool
from rewards.types import RewardStatus

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def rewrite(answer: str) -> str:
    """The same answer written differently: \\dfrac for \\frac, thousands commas."""
    out = answer.replace("\\dfrac", "\\frac") if "\\dfrac" in answer else answer.replace("\\frac", "\\dfrac")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+", out):
        return out.replace(",", "")
    if re.fullmatch(r"-?\d{4,}", out):
        return f"{int(out):,}"
    return out


def load_pairs() -> list[tuple[str, str]]:
    golds = []
    for name in ("math500.jsonl", "gsm8k_test.jsonl"):
        path = DATA / name
        if not path.exists():
            sys.exit(f"{path} is absent: the benchmark reads ../shared/data beside the project")
        golds += [json.loads(line)["answer"] for line in path.open(encoding="utf-8")]
    # Distinct answers only: Math-Verify caches parses, a repeated one would flatter it.
    golds = list(dict.fromkeys(golds))
    return [(f"<think>…</think> The answer is $\\boxed{{{rewrite(g)}}}$.", g) for g in golds]


def baseline(pairs: list[tuple[str, str]]) -> tuple[float, int]:
    """Seconds and number correct for Math-Verify in this process."""
    start = time.perf_counter()
    # Gold answers are bare LaTeX; Math-Verify reads LaTeX between delimiters.
    correct = sum(verify(parse(f"${gold}$"), parse(response)) for response, gold in pairs)
    return time.perf_counter() - start, correct


def pooled(pairs: list[tuple[str, str]], workers: int, timeout_s: float) -> tuple[float, float, int, object]:
    """Start-up seconds, scoring seconds, number correct, and the pool's stats."""
    start = time.perf_counter()
    with ScoringPool([RewardSpec(name="math_accuracy")], workers=workers, timeout_s=timeout_s) as pool:
        started = time.perf_counter()
        results = pool.score(pairs)
        done = time.perf_counter()
        stats = pool.stats()
    correct = sum(r["math_accuracy"].status is RewardStatus.CORRECT for r in results)
    return started - start, done - started, correct, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--pairs", type=int, default=None, help="use the first N pairs")
    args = parser.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    pairs = load_pairs()[: args.pairs]
    base_s, base_ok = baseline(pairs)
    startup_s, pool_s, pool_ok, stats = pooled(pairs, args.workers, args.timeout_s)
    base_rate, pool_rate = len(pairs) / base_s, len(pairs) / pool_s
    print(f"pairs: {len(pairs)} (distinct MATH-500 + GSM8K golds vs themselves rewritten)")
    print(f"in-process math_verify.verify: {base_rate:8.1f} /s  ({base_ok} equal)")
    print(f"ScoringPool, {args.workers} workers:      {pool_rate:8.1f} /s  ({pool_ok} correct; "
          f"start-up {startup_s:.1f} s, not counted)")
    reward = stats.rewards["math_accuracy"]
    print(f"pool stats: {reward.calls} calls, {reward.timeouts} timeouts, {reward.errors} errors, "
          f"{stats.worker_restarts} restarts, {1000 * reward.seconds / reward.calls:.1f} ms per call "
          f"in the workers (in-process: {1000 * base_s / len(pairs):.1f} ms)")
    print(f"ratio (pool / in-process): {pool_rate / base_rate:.2f}  (goal >= 0.5)")


if __name__ == "__main__":
    main()
