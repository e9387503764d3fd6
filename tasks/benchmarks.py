"""Benchmark files → rows of (question, reference) and the reward that grades them.

Formats (JSONL as in ``../shared/data``, or any data path of ``tasks/data_files.py``:
parquet, ``save_to_disk`` folders; detected from the first row's fields unless named):

| format     | fields                                   | reference                    | reward         |
|------------|------------------------------------------|------------------------------|----------------|
| task       | prompt, answer (``r1lab data make``)     | the answer                   | configurable (exact_answer) |
| math500    | problem, answer (+ level, subject, …)    | the answer                   | math_accuracy  |
| gsm8k      | problem or question, answer              | the number (after ``####``)  | math_accuracy  |
| humaneval  | prompt, test, entry_point                | code_tests ``check`` spec    | code_tests     |
| mbpp       | prompt, test_list, test_imports          | code_tests ``assert`` spec   | code_tests     |

The question is the bare problem plus the instruction a benchmark needs (where to put
the answer, what code to write); the stage applies the chat or R1-Zero template after.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tasks.data_files import DataError, read_records

Format = Literal["task", "math500", "gsm8k", "humaneval", "mbpp"]
FORMATS: tuple[str, ...] = ("task", "math500", "gsm8k", "humaneval", "mbpp")

# DeepSeek-R1's recommended evaluation prompt for math (model card, "Usage Recommendations").
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = "Write the complete program in one ```python code block."

_REQUIRED: dict[str, tuple[str, ...]] = {
    "task": ("prompt", "answer"),
    "math500": ("problem", "answer"),
    "gsm8k": ("answer",),  # plus problem or question
    "humaneval": ("prompt", "test", "entry_point"),
    "mbpp": ("prompt", "test_list"),
}


@dataclass(frozen=True)
class BenchmarkRow:
    """One problem: the question (before templating), what grading needs, and the
    reward that grades it."""

    prompt: str
    reference: str
    reward: str


@dataclass(frozen=True)
class Benchmark:
    name: str
    format: str
    rows: tuple[BenchmarkRow, ...]

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError(f"benchmark {self.name!r} has no rows")
        rewards = {r.reward for r in self.rows}
        if len(rewards) != 1:
            raise ValueError(f"benchmark {self.name!r} mixes rewards {sorted(rewards)}; split it")

    @property
    def reward(self) -> str:
        return self.rows[0].reward


def detect_format(obj: dict[str, Any]) -> str:
    """The format of a row, from its fields; raises saying which fields were seen."""
    keys = set(obj)
    if {"prompt", "test", "entry_point"} <= keys:
        return "humaneval"
    if {"prompt", "test_list"} <= keys:
        return "mbpp"
    if {"problem", "answer"} <= keys and keys & {"unique_id", "level", "subject"}:
        return "math500"
    if "answer" in keys and keys & {"problem", "question"}:
        return "gsm8k"
    if {"prompt", "answer"} <= keys:
        return "task"
    raise ValueError(
        f"cannot tell the benchmark format from fields {sorted(keys)}; "
        f"set format to one of {', '.join(FORMATS)} (see tasks/benchmarks.py)"
    )


def to_row(obj: dict[str, Any], fmt: str, *, task_reward: str = "exact_answer") -> BenchmarkRow:
    """One JSON object of format ``fmt`` as a ``BenchmarkRow``."""
    # A null counts as absent: parquet columns that only some rows fill hold nulls.
    missing = [k for k in _REQUIRED[fmt] if obj.get(k) is None]
    if fmt == "gsm8k" and obj.get("problem") is None and obj.get("question") is None:
        missing.append("problem|question")
    if missing:
        raise ValueError(f"{fmt} row lacks {missing} (has {sorted(k for k, v in obj.items() if v is not None)}); "
                         "fix the row, or name the benchmark's format")
    _check_types(obj)
    if fmt == "task":
        return BenchmarkRow(str(obj["prompt"]), str(obj["answer"]), task_reward)
    if fmt == "math500":
        return BenchmarkRow(f"{obj['problem']}\n{MATH_INSTRUCTION}", str(obj["answer"]), "math_accuracy")
    if fmt == "gsm8k":
        question = obj["problem"] if obj.get("problem") is not None else obj["question"]
        # The original GSM8K answer is a worked solution ending "#### 42".
        answer = str(obj["answer"]).rpartition("####")[2].strip()
        return BenchmarkRow(f"{question}\n{MATH_INSTRUCTION}", answer, "math_accuracy")
    if fmt == "humaneval":
        # The prompt (imports, helpers, signature, docstring) runs as setup, so a program
        # that restates only the function still sees the helpers it may call.
        question = ("Complete the following Python function.\n\n```python\n"
                    f"{obj['prompt']}```\n{CODE_INSTRUCTION}")
        spec = {"kind": "check", "setup": obj["prompt"], "test": obj["test"], "entry_point": obj["entry_point"]}
        return BenchmarkRow(question, json.dumps(spec), "code_tests")
    if fmt == "mbpp":
        tests = list(obj["test_list"])
        question = (f"{obj['prompt']}\nYour code should pass these tests:\n\n" + "\n".join(tests)
                    + f"\n\n{CODE_INSTRUCTION}")
        spec = {"kind": "assert", "setup": "\n".join(obj.get("test_imports") or []), "tests": tests}
        return BenchmarkRow(question, json.dumps(spec), "code_tests")
    raise ValueError(f"unknown benchmark format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _check_types(obj: dict[str, Any]) -> None:
    """Texts are strings (an answer may be a number); test lists are lists of strings."""
    for key in ("prompt", "problem", "question", "test", "entry_point"):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"field {key!r} must be text, got {type(value).__name__} {value!r:.60}; fix the row")
    answer = obj.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, str | int | float)):
        raise ValueError(f"field 'answer' must be text or a number, got {type(answer).__name__} {answer!r:.60}; fix the row")
    for key in ("test_list", "test_imports"):
        value = obj.get(key)
        if value is not None and (not isinstance(value, list) or not all(isinstance(t, str) for t in value)):
            raise ValueError(f"field {key!r} must be a list of strings, got {value!r:.60}; fix the row")


def load_benchmark(path: Path, *, name: str | None = None, format: str | None = None,  # noqa: A002
                   limit: int | None = None, task_reward: str = "exact_answer",
                   split: str | None = None) -> Benchmark:
    """Read a benchmark (the first ``limit`` rows) from a data path (a JSONL file, parquet,
    a ``save_to_disk`` folder; ``split`` for one with splits). ``format`` None: detect it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"benchmark file {path} does not exist")
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown benchmark format {format!r}; choose one of {', '.join(FORMATS)}")
    rows: list[BenchmarkRow] = []
    fmt = format
    for rec in read_records(path, split=split):
        if limit is not None and len(rows) >= limit:
            break
        try:
            fmt = fmt or detect_format(rec.fields)
            rows.append(to_row(rec.fields, fmt, task_reward=task_reward))
        except ValueError as err:
            raise DataError(f"{rec.where}: {err}") from None
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return Benchmark(name or path.stem, str(fmt), tuple(rows))
