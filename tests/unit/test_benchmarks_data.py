"""Benchmark loaders (tasks/benchmarks.py): format detection, rows, and that
the references they build grade the benchmarks' own reference solutions as correct."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.benchmarks import MATH_INSTRUCTION, detect_format, load_benchmark

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is missing: third-party data lives in ../shared/data beside the project")
    return path


def write(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("row", "fmt", "reward", "reference"),
    [
        ({"prompt": "What is 1+2", "answer": "3"}, "task", "exact_answer", "3"),
        ({"problem": "2+2?", "answer": "4", "level": "Level 1"}, "math500", "math_accuracy", "4"),
        ({"problem": "2+2?", "answer": "4", "index": 0}, "gsm8k", "math_accuracy", "4"),
        ({"question": "2+2?", "answer": "Two and two.\n#### 4"}, "gsm8k", "math_accuracy", "4"),
    ],
)
def test_text_formats(tmp_path, row, fmt, reward, reference):
    assert detect_format(row) == fmt
    bench = load_benchmark(write(tmp_path, [row]), name="b")
    assert (bench.name, bench.format, bench.reward) == ("b", fmt, reward)
    assert bench.rows[0].reference == reference
    if fmt != "task":
        assert bench.rows[0].prompt.endswith(MATH_INSTRUCTION)


def test_code_formats_build_code_tests_specs(tmp_path):
    he = {"task_id": "x", "prompt": "def f(a):\n    \"\"\"a+1\"\"\"\n", "canonical_solution": "    return a+1\n",
          "test": "def check(c):\n    assert c(1) == 2\n", "entry_point": "f"}
    spec = json.loads(load_benchmark(write(tmp_path, [he])).rows[0].reference)
    assert spec == {"kind": "check", "setup": he["prompt"], "test": he["test"], "entry_point": "f"}
    mbpp = {"prompt": "Add one.", "test_list": ["assert f(1) == 2"], "test_imports": ["import math"]}
    row = load_benchmark(write(tmp_path, [mbpp])).rows[0]
    assert json.loads(row.reference) == {"kind": "assert", "setup": "import math", "tests": ["assert f(1) == 2"]}
    assert "assert f(1) == 2" in row.prompt and row.reward == "code_tests"


def test_limit_named_format_and_errors(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(5)]
    assert len(load_benchmark(write(tmp_path, rows), limit=2).rows) == 2
    assert load_benchmark(write(tmp_path, rows), task_reward="math_accuracy").reward == "math_accuracy"
    with pytest.raises(ValueError, match="cannot tell the benchmark format"):
        load_benchmark(write(tmp_path, [{"q": 1}]))
    with pytest.raises(ValueError, match=r"bench.jsonl:2: task row lacks \['answer'\]"):
        load_benchmark(write(tmp_path, [rows[0], {"prompt": "x"}]))
    with pytest.raises(ValueError, match="unknown benchmark format"):
        load_benchmark(write(tmp_path, rows), format="nope")
    with pytest.raises(FileNotFoundError):
        load_benchmark(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    ("name", "fmt", "n"),
    [("math500.jsonl", "math500", 500), ("gsm8k_test.jsonl", "gsm8k", 1319),
     ("humaneval.jsonl", "humaneval", 164), ("mbpp_sanitized.jsonl", "mbpp", 427)],
)
def test_shared_benchmarks_load(name, fmt, n):
    bench = load_benchmark(shared(name))
    assert bench.format == fmt and len(bench.rows) == n
    assert all(r.prompt and r.reference for r in bench.rows)


@pytest.mark.parametrize("name", ["math500.jsonl", "gsm8k_test.jsonl"])
def test_math_references_grade_their_own_answers_correct(name):
    from rewards.math import math_accuracy

    path = shared(name)
    raw = [json.loads(line) for line in path.read_text().splitlines()[:25]]
    bench = load_benchmark(path, limit=25)
    for obj, row in zip(raw, bench.rows, strict=True):
        answer = str(obj["answer"]).rpartition("####")[2].strip()
        result = math_accuracy(f"<think> ok </think> <answer> {answer} </answer>", row.reference)
        assert result.score == 1.0, (answer, result)


@pytest.mark.parametrize(("name", "code_key"), [("humaneval.jsonl", "canonical_solution"), ("mbpp_sanitized.jsonl", "code")])
def test_code_references_pass_the_canonical_solutions(name, code_key):
    from rewards.registry import build_reward

    path = shared(name)
    try:
        reward = build_reward("code_tests")
    except Exception as err:  # noqa: BLE001 - a host without a usable sandbox
        pytest.skip(f"code sandbox unavailable here: {err}")
    raw = [json.loads(line) for line in path.read_text().splitlines()[:3]]
    bench = load_benchmark(path, limit=3)
    for obj, row in zip(raw, bench.rows, strict=True):
        program = obj["prompt"] + obj[code_key] if code_key == "canonical_solution" else obj[code_key]
        result = reward(f"<think> x </think>\n```python\n{program}\n```", row.reference)
        assert result.score == 1.0, result
