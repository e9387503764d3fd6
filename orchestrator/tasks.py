"""Synthetic reasoning tasks with verifiable answers, for runs that fit on a laptop.

``addition``: add two n-digit numbers. The reference solution thinks column by column
with carries, R1-Zero style::

    <think> 7+5=12 , 4+8+1=13 </think> <answer> 132 </answer>

A tiny model is pretrained (``r1lab init-model``) on a *noisy* corpus of such solutions:
the final answer is corrupted in a share of the examples and the format broken in
another. The result is a base policy that knows the shape of the task but answers right
only part of the time: RL has something real to improve, and the held-out split (pairs
of operands never seen in training) tells whether it generalises.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class TaskRow:
    """One problem: the bare question (a template is applied later) and its answer."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class AdditionTask:
    digits: int = 2

    @property
    def operand_range(self) -> range:
        return range(10 ** (self.digits - 1), 10**self.digits)

    def question(self, a: int, b: int) -> str:
        return f"What is {a}+{b}"

    def reasoning(self, a: int, b: int) -> str:
        """Column-by-column sums, least significant first, with the carry written out."""
        steps, carry = [], 0
        xs, ys = str(a)[::-1], str(b)[::-1]
        for i in range(max(len(xs), len(ys))):
            x = int(xs[i]) if i < len(xs) else 0
            y = int(ys[i]) if i < len(ys) else 0
            total = x + y + carry
            steps.append(f"{x}+{y}+{carry}={total}" if carry else f"{x}+{y}={total}")
            carry = total // 10
        return " , ".join(steps)

    def solution(self, a: int, b: int, answer: int | None = None) -> str:
        """The response text (what follows ``Assistant:``)."""
        shown = a + b if answer is None else answer
        return f" <think> {self.reasoning(a, b)} </think> <answer> {shown} </answer>"

    def r1_solution(self, a: int, b: int) -> str:
        """The R1 output shape (§2.3.1): reasoning in ``<think>``, then a readable summary
        (worded with tokens the tiny tokenizer already has, so a short cold start learns it)."""
        return f" <think> {self.reasoning(a, b)} </think> The answer is {a + b}."

    def split_of(self, a: int, b: int, *, test_share: float, seed: int) -> str:
        """'train' or 'test', a fixed function of the operand pair (held-out pairs)."""
        h = hashlib.sha256(f"{seed}:{a}+{b}".encode()).digest()
        return "test" if int.from_bytes(h[:8], "big") / 2**64 < test_share else "train"

    def rows(self, split: str, *, test_share: float, seed: int) -> list[TaskRow]:
        out = []
        for a in self.operand_range:
            for b in self.operand_range:
                if self.split_of(a, b, test_share=test_share, seed=seed) == split:
                    out.append(TaskRow(self.question(a, b), str(a + b)))
        return out

    def noisy_response(
        self, a: int, b: int, rng: random.Random, *, answer_noise: float, format_noise: float
    ) -> str:
        """A pretraining response: right reasoning, but a wrong final answer with
        probability ``answer_noise`` and a broken format with probability ``format_noise``."""
        answer = a + b
        if rng.random() < answer_noise:
            digits = list(str(answer))
            i = rng.randrange(len(digits))
            digits[i] = rng.choice([d for d in "0123456789" if d != digits[i]])
            answer = int("".join(digits))
        text = self.solution(a, b, answer)
        if rng.random() < format_noise:
            broken = [
                text.replace(" </think>", ""),
                text.replace(" <answer>", " answer:").replace(" </answer>", ""),
                text.replace("<think>", "").replace("</think>", ""),
            ]
            text = rng.choice(broken)
        return text


def parse_addition(question: str) -> tuple[int, int]:
    left, right = question.removeprefix("What is ").split("+")
    return int(left), int(right)


TASKS = {"addition": AdditionTask}


def get_task(name: str, **options) -> AdditionTask:
    try:
        return TASKS[name](**options)
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}") from None


def write_jsonl(rows: list[TaskRow], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(asdict(row)) + "\n")


def read_jsonl(path: Path) -> Iterator[dict]:
    with Path(path).open() as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from None


def load_rows(path: Path, *, prompt_key: str = "prompt", answer_key: str = "answer") -> list[TaskRow]:
    """Rows of a JSONL file with a prompt and a reference answer field."""
    rows = []
    for n, obj in enumerate(read_jsonl(path), 1):
        if prompt_key not in obj or answer_key not in obj:
            raise ValueError(
                f"{path}:{n}: needs fields {prompt_key!r} and {answer_key!r}, has {sorted(obj)};"
                " set data.prompt_key / data.answer_key to the file's field names"
            )
        rows.append(TaskRow(str(obj[prompt_key]), str(obj[answer_key])))
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def make_cold_start(out_path: Path, *, n: int, test_share: float = 0.1, seed: int = 0, digits: int = 2) -> Path:
    """Cold-start SFT data (§2.3.1): ``n`` training prompts with readable R1-format
    solutions (``prompt`` is the bare question; the SFT stage applies the template)."""
    t = AdditionTask(digits=digits)
    rows = t.rows("train", test_share=test_share, seed=seed)
    random.Random(seed).shuffle(rows)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w") as f:
        for row in rows[:n]:
            a, b = parse_addition(row.prompt)
            f.write(json.dumps({"prompt": row.prompt, "response": t.r1_solution(a, b), "answer": row.answer}) + "\n")
    return out_path


def make_dataset(task: str, out_dir: Path, *, test_share: float = 0.1, seed: int = 0, **options) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` for ``task`` into ``out_dir``."""
    t = get_task(task, **options)
    paths = {}
    for split in ("train", "test"):
        rows = t.rows(split, test_share=test_share, seed=seed)
        paths[split] = out_dir / f"{split}.jsonl"
        write_jsonl(rows, paths[split])
    return paths
