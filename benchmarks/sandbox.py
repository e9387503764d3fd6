"""Sandbox overhead: sandboxed runs/s ÷ plain ``subprocess.run`` runs/s (issue 4, goal ≥ 0.5).

Both run the same trivial program, ``print(input())``, with the same interpreter and
flags, one at a time. Rounds alternate between the two so that load from anything else
on the machine falls on both alike.

    .venv/bin/python benchmarks/sandbox.py [--runs 200] [--tier namespaces|restricted]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewards.isolation.sandbox import Limits, RunStatus, Sandbox, SandboxConfig, Tier  # noqa: E402

PROGRAM = "print(input())\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200, help="runs of each kind (default 200)")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds (default 10)")
    parser.add_argument("--tier", choices=[t.value for t in Tier], default=None,
                        help="sandbox tier (default: the strongest that works)")
    args = parser.parse_args()

    tier = Tier(args.tier) if args.tier else None
    sandbox = Sandbox(SandboxConfig(tier=tier, min_tier=Tier.RESTRICTED))
    python = sandbox.config.python
    script = Path(__file__).with_name("_sandbox_bench_program.py")
    script.write_text(PROGRAM)
    limits = Limits()
    per_round = max(1, args.runs // args.rounds)
    plain_s = sandboxed_s = 0.0
    try:
        for _ in range(args.rounds):
            start = time.perf_counter()
            for _ in range(per_round):
                done = subprocess.run([python, "-s", "-B", str(script)], input=b"hi\n", capture_output=True)
                assert done.stdout == b"hi\n", done
            plain_s += time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(per_round):
                result = sandbox.run(PROGRAM, stdin="hi\n", limits=limits)
                assert result.status is RunStatus.OK and result.stdout == "hi\n", result
            sandboxed_s += time.perf_counter() - start
    finally:
        script.unlink()
    n = per_round * args.rounds
    plain_rate, sandboxed_rate = n / plain_s, n / sandboxed_s
    print(f"tier: {sandbox.tier.value}   runs: {n} of each   program: {PROGRAM.strip()!r}")
    print(f"plain subprocess.run: {plain_rate:7.1f} runs/s ({1000 / plain_rate:.1f} ms/run)")
    print(f"sandboxed run:        {sandboxed_rate:7.1f} runs/s ({1000 / sandboxed_rate:.1f} ms/run)")
    print(f"ratio (goal >= 0.5):  {sandboxed_rate / plain_rate:.2f}")


if __name__ == "__main__":
    main()
