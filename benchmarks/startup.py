"""Seconds from ``r1lab run grpo`` to the first generation, and where they go, beside a
single process that loads the same model with transformers and samples one token.

Runs the demo config (``configs/demo/grpo.yaml``, one step) as a fresh process, reads the
run's ``startup.json`` (written by the grpo stage: pre-flight, Ray, each actor built, the
weight-push group, the first generation request, the first step done), and prints the
parts with the baseline's time to its first token and the ratio. The parts count from the
grpo stage's ``run`` (the process's own start-up before it, interpreter, imports and config,
is read off the run's ``driver.log`` and printed on its own line).

    python benchmarks/startup.py [--model DIR] [--data FILE] [key=value ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASELINE = """
import sys, time
t0 = time.monotonic()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
ids = tok("What is 12+34?", return_tensors="pt")["input_ids"]
model.generate(ids, max_new_tokens=1, do_sample=True)
print(time.monotonic() - t0)
"""


def inputs(args, tmp: Path) -> tuple[str, str]:
    model, data = args.model, args.data
    if not Path(model, "config.json").exists():
        from benchmarks._common import tiny_model

        model = str(tiny_model(out=tmp / "model"))  # start-up does not depend on the weights
    if not Path(data).exists():
        from tasks.synthetic import make_dataset

        data = str(make_dataset("addition", tmp / "data")["train"])
    return model, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "runs/models/tiny-addition"))
    ap.add_argument("--data", default=str(ROOT / "runs/data/addition/train.jsonl"))
    ap.add_argument("--config", default="configs/demo/grpo.yaml")
    ap.add_argument("overrides", nargs="*", help="more config overrides, e.g. cluster.dashboard=false")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="r1lab-startup-") as tmp:
        model, data = inputs(args, Path(tmp))
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TMPDIR": tmp}
        t0 = time.monotonic()
        base = subprocess.run([sys.executable, "-c", BASELINE, model], capture_output=True, text=True, env=env,
                              check=True)
        baseline_s = float(base.stdout.strip().splitlines()[-1])
        baseline_wall = time.monotonic() - t0
        t0, spawned = time.monotonic(), time.time()
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "grpo", "-c", args.config,
                               f"model.path={model}", f"data.train_path={data}", f"run.storage={tmp}",
                               "run.name=startup", "grpo.steps=1", "logging.wandb_mode=disabled", *args.overrides],
                              cwd=ROOT, capture_output=True, text=True, env=env)
        wall = time.monotonic() - t0
        if proc.returncode:
            sys.exit(f"the run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        parts = json.loads(Path(tmp, "startup", "startup.json").read_text())
        before_run = _before_run(Path(tmp, "startup", "driver.log"), spawned)
    if before_run is not None:
        print(f"the process before the stage's run (interpreter, imports, config): {before_run:.1f} s; the first "
              f"generation request came {before_run + parts['first_generation_s']:.1f} s after the process started")
    print(f"{args.config}, one step, on this machine ({os.cpu_count()} CPUs); seconds since the stage's run:")
    print(f"  pre-flight done (imports, config, tokenizer, every data row)  {parts['preflight_done_s']:6.1f}")
    print(f"  Ray started                                                  {parts['ray_ready_s']:6.1f}")
    for label, s in sorted(parts["actors_ready_s"].items(), key=lambda kv: kv[1]):
        print(f"    {label:<20} built                                    {s:6.1f}")
    print(f"  every actor built                                            {parts['all_actors_ready_s']:6.1f}")
    print(f"  weight-push group formed                                     {parts['weight_push_group_s']:6.1f}")
    print(f"  first generation request at an engine                        {parts['first_generation_s']:6.1f}")
    print(f"  first step done                                              {parts['first_step_done_s']:6.1f}")
    print(f"  the process ended                                            {wall:6.1f}")
    print(f"baseline: transformers in one process, first sampled token     {baseline_s:6.1f}  "
          f"({baseline_wall:.1f} with the interpreter)")
    first = parts["first_generation_s"] + (before_run or 0.0)  # from the process's start, as the baseline's
    print(f"startup ratio {first / baseline_wall:.2f}  (r1lab's first generation ÷ the "
          f"baseline's first token, both from a fresh process; goal: r1lab within 15 s)")


def _before_run(driver_log: Path, spawned: float) -> float | None:
    """Seconds from spawning the process to the grpo stage's ``run``: the log line "first
    step starts X s after launch" gives the launch's wall time to 0.1 s. None without it."""
    if not driver_log.exists():
        return None
    for line in driver_log.read_text().splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*first step starts ([\d.]+) s after launch", line)
        if m:
            logged = datetime.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            return logged - float(m[2]) - spawned
    return None


if __name__ == "__main__":
    main()
