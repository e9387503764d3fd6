"""The eval stage end to end on the synthetic addition task: k samples per question,
graded, and the numbers in results.json recounted by hand from samples.jsonl."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

K = 4
PROMPTS = 6


def addition_file(tmp_path: Path) -> Path:
    from tasks.synthetic import get_task, write_jsonl

    rows = get_task("addition").rows("test", test_share=0.1, seed=0)[:PROMPTS]
    path = tmp_path / "addition-test.jsonl"
    write_jsonl(rows, path)
    return path


def eval_config(model: Path, data: Path, out: Path, **eval_overrides):
    from orchestrator.config import load_config
    from orchestrator.stages import eval as eval_stage
    from tests.conftest import ROOT

    overrides = [f"model.path={model}", f"run.storage={out}", "run.name=ev",
                 f"eval.benchmarks=[{{name: add, path: {data}}}]", f"eval.samples_per_prompt={K}",
                 "eval.pass_at_k=[1, 2, 4]", "eval.max_new_tokens=48", "logging.progress=false"]
    overrides += [f"eval.{k}={v}" for k, v in eval_overrides.items()]
    return load_config(ROOT / "configs/demo/eval.yaml", overrides, model=eval_stage.Config)


def test_eval_results_match_a_recount_of_the_saved_verdicts(ray_local, tiny_base_model, tmp_path):
    from orchestrator.stages import eval as eval_stage
    from rewards.basic import exact_answer

    data = addition_file(tmp_path)
    calls = []
    run_dir = eval_stage.run(eval_config(tiny_base_model, data, tmp_path),
                             progress=lambda d, t, info: calls.append((d, t)))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["model"] == str(tiny_base_model) and results["params"] > 0
    assert (results["temperature"], results["top_p"], results["max_new_tokens"]) == (0.6, 0.95, 48)
    [bench] = results["benchmarks"]
    assert (bench["name"], bench["format"], bench["reward"], bench["n_prompts"], bench["k"]) == \
        ("add", "task", "exact_answer", PROMPTS, K)
    assert calls[-1] == (PROMPTS, PROMPTS)

    golds = [json.loads(line)["answer"] for line in data.read_text().splitlines()]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == PROMPTS * K
    by_prompt: dict[int, list[dict]] = {}
    for s in samples:
        # each saved verdict is the reward's verdict on the saved text
        assert s["correct"] == (exact_answer(s["text"], golds[s["prompt_index"]]).score == 1.0)
        assert 1 <= s["response_tokens"] <= 48
        by_prompt.setdefault(s["prompt_index"], []).append(s)
    assert sorted(by_prompt) == list(range(PROMPTS))

    # pass@1: mean over samples, then over prompts.
    pass1 = sum(sum(s["correct"] for s in g) / K for g in by_prompt.values()) / PROMPTS
    # cons@k: the most frequent <answer>; ties go to the answer seen first.
    def consensus(group: list[dict]) -> bool:
        group = sorted(group, key=lambda s: s["sample_index"])
        votes = Counter(s["answer"] for s in group if s["answer"] is not None)
        if not votes:
            return False
        top = max(votes.values())
        winner = next(s for s in group if s["answer"] is not None and votes[s["answer"]] == top)
        return winner["correct"]

    cons = sum(consensus(g) for g in by_prompt.values()) / PROMPTS
    assert bench["pass@1"] == pytest.approx(pass1)
    assert bench["cons@k"] == pytest.approx(cons)
    assert 0.0 <= bench["pass@1"] <= 1.0 and 0.0 <= bench["cons@k"] <= 1.0
    p = bench["pass@k"]
    assert p["1"] == pytest.approx(pass1)
    assert p["1"] <= p["2"] <= p["4"] <= 1.0
    # pass@k with k = n: the share of prompts with at least one correct sample
    assert p["4"] == pytest.approx(sum(any(s["correct"] for s in g) for g in by_prompt.values()) / PROMPTS)
    assert bench["mean_response_tokens"] == pytest.approx(sum(s["response_tokens"] for s in samples) / len(samples))
    # the tiny base model answers some, not all, questions right at T = 0.6
    assert 0.0 < bench["pass@1"] < 1.0


def _scored(index: int, reference: str, texts: list[str], correct: list[bool]):
    from learner.batch import Completion, Group, ScoredGroup

    completions = tuple(Completion((1, 2), (0.0, 0.0), t, "stop") for t in texts)
    acc = tuple(1.0 if c else 0.0 for c in correct)
    return ScoredGroup(Group(index, (5,), reference, completions, 0), acc, acc, (float("nan"),) * len(texts))


def test_cons_at_k_groups_equivalent_math_answers():
    """No cluster needed: score_benchmark on hand-made graded groups."""
    from tasks.benchmarks import Benchmark, BenchmarkRow
    from orchestrator.stages.eval import EvalConfig, score_benchmark
    from rewards.config import RewardsConfig, RewardSpec

    box = lambda a: f"<think> work </think> The answer is $\\boxed{{{a}}}$."  # noqa: E731
    bench = Benchmark("m", "math500", (BenchmarkRow("q0", "\\frac{1}{2}", "math_accuracy"),
                                       BenchmarkRow("q1", "3", "math_accuracy")))
    groups = [
        # gold 1/2: three notations of 1/2 (3 votes) beat "3" (2 votes): cons right
        _scored(0, "\\frac{1}{2}", [box("3"), box("\\frac12"), box("0.5"), box("3"), box("1/2")],
                [False, True, True, False, True]),
        # gold 3: by exact strings "3" (2 votes) would win; grouped, 1/2 wins: cons wrong
        _scored(1, "3", [box("3"), box("\\frac12"), box("0.5"), box("3"), box("1/2")],
                [True, False, False, True, False]),
    ]
    settings = EvalConfig(benchmarks=[{"name": "m", "path": "unused.jsonl"}], samples_per_prompt=5, pass_at_k=[1, 5])
    rewards = RewardsConfig(rewards=[RewardSpec(name="math_accuracy")], accuracy_reward="math_accuracy",
                            format_reward=None, workers=1)
    result = score_benchmark(bench, groups, settings, rewards)
    assert result.cons_at_k == pytest.approx(0.5)  # (1 + 0) / 2
    assert result.pass_at_1 == pytest.approx((3 / 5 + 2 / 5) / 2)
    assert result.pass_at_k == {1: pytest.approx(0.5), 5: pytest.approx(1.0)}
    assert [s.answer for s in result.samples[:3]] == ["3", "\\frac12", "0.5"]


def test_evaluate_checkpoint_twice_on_one_cluster_frees_its_resources(ray_local, tiny_base_model, tmp_path):
    """What `r1lab demo` does: evaluate several checkpoints without restarting Ray."""
    import time

    from ray.util import placement_group_table

    from orchestrator.stages import eval as eval_stage

    cfg = eval_config(tiny_base_model, addition_file(tmp_path), tmp_path, samples_per_prompt=2, pass_at_k=[1, 2])
    benchmarks = eval_stage.load_benchmarks(cfg.eval, cfg.rewards)

    def free_cpus_settle_to(expected: float) -> float:
        deadline = time.monotonic() + 30  # killed actors release their CPUs asynchronously
        while (free := ray_local.available_resources().get("CPU", 0.0)) < expected and time.monotonic() < deadline:
            time.sleep(0.5)
        return free

    before = ray_local.available_resources().get("CPU", 0.0)
    for _ in range(2):
        result = eval_stage.evaluate_checkpoint(str(tiny_base_model), cfg.eval, benchmarks, rollout=cfg.rollout,
                                                rewards=cfg.rewards, cluster=cfg.cluster)
        assert result.by_name("add").n_prompts == PROMPTS and result.by_name("add").k == 2
        assert free_cpus_settle_to(before) == before
    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())
