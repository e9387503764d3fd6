"""Asynchronous GRPO against synchronous, at equal resources, under a long-tailed length
distribution: the real driver with simulated actors.

The driver is ``orchestrator.stages.grpo.GRPOTrainer`` itself (launch, staleness bound,
streaming into the learner, ``supervise.Flight``, the weight push), given actors from
``benchmarks/sim_actors.py`` that sleep instead of computing: engines draw sample lengths
from a lognormal (median ``--median`` tokens, ``--sigma``, cut at ``--cap``), decode at
``--tokens-per-s`` per sample in ``--slots`` batch slots, and stop ``--load-s`` for a
weight load; the learner trains each group as it arrives at ``--train-tokens-per-s``.

    sync   grpo.max_staleness_steps=0, no partial rollout (each step waits for its
           longest sample, then trains, then pushes)
    async  grpo.max_staleness_steps=--staleness, grpo.partial_rollout=true

Both runs draw the same lengths (the samples are seeded per step and prompt as in a real
run). Prints, from the steady-state steps (the first ``staleness + 1`` are left out):

    async speedup   sync step time ÷ async step time                        (goal ≥ 2.0)
    overhead ratio  async step time ÷ max(generation, training) per step,   (goal ≤ 1.1)
                    generation = a sync step's launch-to-last-group time,
                    training = the learner's busy time per step
    throughput ratio async step time ÷ max(generation at full engine
                    throughput, training): above 1 by what the longest samples
                    still cost within the staleness bound
    driver share    the driver's CPU seconds per step ÷ step time, async,
                    with --overhead-engines engines (one prompt each)          (goal < 2 %)

    python benchmarks/async_pipeline.py [--steps 10] [--overhead-engines 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import local_ray  # noqa: E402


def config(args, *, engines: int, prompts: int, staleness: int, partial: bool, storage: str):
    from orchestrator.config import load_config

    root = Path(__file__).resolve().parents[1]
    return load_config(root / "configs/demo/grpo.yaml", [
        f"model.path={storage}", f"data.train_path={storage}/none.jsonl", f"run.storage={storage}",
        f"run.name=sim-{engines}-{staleness}-{int(partial)}", f"grpo.steps={args.steps}",
        f"grpo.prompts_per_step={prompts}", f"grpo.samples_per_prompt={args.samples}",
        f"grpo.max_staleness_steps={staleness}", f"grpo.partial_rollout={str(partial).lower()}",
        f"cluster.rollout_engines={engines}", "cluster.learner_workers=1", "cluster.reward_actors=2",
        "loss.kl_coef=0", "learner.micro_batch_groups=1", f"rollout.max_new_tokens={args.cap}",
        f"rollout.max_model_len={args.cap + 64}", "logging.wandb_mode=disabled",
        # Generous deadlines: the simulated engines run at the benchmark's pace.
        "run.min_tokens_per_s=1",
    ])


def run(args, *, engines: int, prompts: int, staleness: int, partial: bool, processes: int | None = None) -> dict:
    """One simulated run: per-step wall time, generation time, learner time, driver CPU.
    ``processes``: host the ``engines`` engine handles in this many actor processes (each
    with the slots of ``engines // processes`` engines): the driver makes the same calls,
    one per engine, without a process per engine."""
    import ray

    from benchmarks.sim_actors import SimEngine, SimLearner, SimReward
    from orchestrator import storage
    from orchestrator.cluster import StageActors, partial_rollout_calls
    from orchestrator.stages import grpo

    with tempfile.TemporaryDirectory(prefix="r1lab-sim-") as tmp:
        cfg = config(args, engines=engines, prompts=prompts, staleness=staleness, partial=partial, storage=tmp)
        prepared = storage.prepare(cfg)
        prepared.run.write_text(grpo.PROMPTS, "")
        items = [grpo.PromptItem(i, (1, 2, 3), "0") for i in range(4 * prompts)]
        hosts = processes or engines
        # A process hosting several engines takes the calls of all of them at once.
        calls = partial_rollout_calls(staleness) * engines // hosts if partial else 1
        engine = ray.remote(SimEngine).options(num_cpus=0, max_concurrency=calls)
        started = [engine.remote(i, slots=args.slots * engines // hosts, tokens_per_s=args.tokens_per_s,
                                 load_s=args.load_s, median=args.median, sigma=args.sigma, cap=args.cap)
                   for i in range(hosts)]
        actors = StageActors(
            pg=None,
            rollouts=[started[i % hosts] for i in range(engines)],
            rewards=[ray.remote(SimReward).options(num_cpus=0).remote() for _ in range(2)],
            learners=[ray.remote(SimLearner).options(num_cpus=0, max_concurrency=4).remote(
                groups_per_rank=prompts, tokens_per_s=args.train_tokens_per_s, optimizer_s=args.optimizer_s,
                push_s=args.push_s)])
        ray.get([a.ready.remote() for a in started + actors.rewards + actors.learners])
        trainer = grpo.GRPOTrainer(prepared, grpo.Inputs(None, items, claim=None), actors=actors)
        rows, cpu, busy = [], [], []
        try:
            for step in range(1, args.steps + 1):
                c0 = time.process_time()
                rows.append(trainer.step(step))
                cpu.append(time.process_time() - c0)
                busy.append(sum(ray.get([e.busy.remote() for e in started])))
        finally:
            for a in started + actors.rewards + actors.learners:
                ray.kill(a)
    steady = slice(staleness + 1, None)
    return {
        "step_s": statistics.mean(r["step_s"] for r in rows[steady]),
        "rollout_s": statistics.mean(r["rollout_s"] for r in rows[steady]),
        "learner_s": statistics.mean(r["learner_s"] for r in rows[steady]),
        "push_s": statistics.mean(r["weight_push_s"] for r in rows[steady]),
        "staleness_mean": statistics.mean(r["staleness_mean"] for r in rows[steady]),
        "staleness_max": max(r["staleness_max"] for r in rows),
        "driver_cpu_s": statistics.mean(cpu[steady]),
        # The engines' decoding per step with every slot of every engine busy: generation's
        # throughput bound (slot-seconds ÷ slots).
        "throughput_s": (busy[-1] - busy[staleness]) / (len(busy) - staleness - 1) / (engines * args.slots),
        "steps": len(rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--engines", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step")
    ap.add_argument("--samples", type=int, default=16, help="samples per prompt")
    ap.add_argument("--slots", type=int, default=64, help="samples an engine decodes at once")
    ap.add_argument("--tokens-per-s", type=float, default=4000.0, help="decode rate of one sample")
    ap.add_argument("--median", type=float, default=600.0, help="median response tokens")
    ap.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of the response length")
    ap.add_argument("--cap", type=int, default=8192, help="max_new_tokens")
    ap.add_argument("--train-tokens-per-s", type=float, default=400_000.0)
    ap.add_argument("--optimizer-s", type=float, default=0.05)
    ap.add_argument("--push-s", type=float, default=0.05)
    ap.add_argument("--load-s", type=float, default=0.05, help="an engine's pause to load a push")
    ap.add_argument("--staleness", type=int, default=2)
    ap.add_argument("--overhead-engines", type=int, default=256)
    ap.add_argument("--overhead-steps", type=int, default=6)
    ap.add_argument("--overhead-processes", type=int, default=16, help="actor processes hosting those engines")
    args = ap.parse_args()
    if min(args.steps, args.overhead_steps) <= args.staleness + 1:
        ap.error(f"--steps and --overhead-steps must exceed --staleness + 1 ({args.staleness + 1}): the first "
                 "steps fill the pipeline and are left out")

    local_ray(num_cpus=2)
    print(f"lengths lognormal(median {args.median:g}, sigma {args.sigma:g}) cut at {args.cap}; "
          f"{args.engines} engines x {args.slots} slots at {args.tokens_per_s:g} tokens/s a sample; "
          f"{args.prompts} prompts x {args.samples} samples a step; {args.steps} steps each")
    sync = run(args, engines=args.engines, prompts=args.prompts, staleness=0, partial=False)
    print(f"sync   step {sync['step_s']:.2f} s  generation {sync['rollout_s']:.2f} s  "
          f"training {sync['learner_s']:.2f} s  push {sync['push_s']:.3f} s")
    fast = run(args, engines=args.engines, prompts=args.prompts, staleness=args.staleness, partial=True)
    print(f"async  step {fast['step_s']:.2f} s  staleness mean {fast['staleness_mean']:.2f} "
          f"max {fast['staleness_max']:.0f} (bound {args.staleness})  push {fast['push_s']:.3f} s")
    bound = max(sync["rollout_s"], fast["learner_s"])
    print(f"async speedup {sync['step_s'] / fast['step_s']:.2f}  (goal >= 2.0)")
    print(f"overhead ratio {fast['step_s'] / bound:.2f}  (goal <= 1.1; async step {fast['step_s']:.2f} s / "
          f"max(generation {sync['rollout_s']:.2f} s, training {fast['learner_s']:.2f} s), each measured alone)")
    ideal = max(fast["throughput_s"], fast["learner_s"])
    print(f"throughput ratio {fast['step_s'] / ideal:.2f}  (async step / max(the engines' decoding per step with "
          f"every slot busy {fast['throughput_s']:.2f} s, training {fast['learner_s']:.2f} s): what the "
          f"staleness bound leaves of the long tail)")
    if args.overhead_engines:
        n = args.overhead_engines
        big = argparse.Namespace(**{**vars(args), "steps": args.overhead_steps})
        t0 = time.monotonic()
        many = run(big, engines=n, prompts=n, staleness=args.staleness, partial=True,
                   processes=min(n, args.overhead_processes))
        share = many["driver_cpu_s"] / many["step_s"]
        print(f"driver share {100 * share:.2f} % of step time at {n} engines in {min(n, args.overhead_processes)} "
              f"processes ({n} prompts x {args.samples} samples a step: {many['driver_cpu_s']:.3f} driver CPU s "
              f"a step of {many['step_s']:.2f} s; goal < 2 %; run took {time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
