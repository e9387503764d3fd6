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
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.data_files import TaskRow


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


@dataclass(frozen=True)
class GeneralTask:
    """General prompts with no verifiable answer (§2.3.4), scored by reward models.

    "Tell me about 47" is answered by a short thought and a one-line summary::

        <think> 47 ends in 7 , 7 is odd </think> 47 is an odd number.

    The pretraining corpus (``noisy_response``) also holds the two faults the paper's reward
    models are there for: a rude remark, which may sit in the reasoning or the summary
    (harmlessness reads the whole response), and an unhelpful summary (helpfulness reads the
    summary only).
    """

    REMARK = "ugh , what a dull question"
    UNHELPFUL = ("Whatever.", "I will not say.", "Go figure.")

    numbers: range = range(10, 100)

    def question(self, n: int) -> str:
        return f"Tell me about {n}"

    @staticmethod
    def parity(n: int) -> str:
        return "even" if n % 2 == 0 else "odd"

    def thought(self, n: int) -> str:
        d = n % 10
        return f"{n} ends in {d} , {d} is {self.parity(n)}"

    def summary(self, n: int) -> str:
        return f"{n} is an {self.parity(n)} number."

    def near_miss(self, n: int, rng: random.Random) -> int:
        """Another number with one of ``n``'s two digits changed."""
        tens, units = divmod(n, 10)
        if rng.random() < 0.5:
            return 10 * rng.choice([d for d in range(1, 10) if d != tens]) + units
        return 10 * tens + rng.choice([d for d in range(10) if d != units])

    def response(self, n: int, *, remark: str | None = None, summary: str | None = None) -> str:
        """The response text; ``remark``: None, "thought" or "summary" (where the rude
        remark goes); ``summary``: replaces the helpful one."""
        thought = f"{self.REMARK} , {self.thought(n)}" if remark == "thought" else self.thought(n)
        end = self.summary(n) if summary is None else summary
        if remark == "summary":
            end = f"{self.REMARK.capitalize()} . {end}"
        return f" <think> {thought} </think> {end}"

    def noisy_response(self, n: int, rng: random.Random, *, remark_noise: float, unhelpful_noise: float) -> str:
        remark = rng.choice(("thought", "thought", "summary")) if rng.random() < remark_noise else None
        summary = rng.choice(self.UNHELPFUL) if rng.random() < unhelpful_noise else None
        return self.response(n, remark=remark, summary=summary)

    def split_of(self, n: int, *, test_share: float, seed: int) -> str:
        h = hashlib.sha256(f"{seed}:about {n}".encode()).digest()
        return "test" if int.from_bytes(h[:8], "big") / 2**64 < test_share else "train"

    def rows(self, split: str, *, test_share: float, seed: int) -> list[TaskRow]:
        """General rows; ``answer`` holds the helpful summary, for evaluation only."""
        return [TaskRow(self.question(n), self.summary(n), "general") for n in self.numbers
                if self.split_of(n, test_share=test_share, seed=seed) == split]

    def judged_examples(self, aspect: str, n: int, rng: random.Random) -> list[tuple[str, str, float]]:
        """``n`` labelled ``(question, judged text, label)`` examples for a reward model:
        ``helpfulness`` judges summaries (1: the informative one), ``harmlessness`` whole
        responses (1: no rude remark anywhere)."""
        out = []
        for i in range(n):
            k = rng.choice(self.numbers)
            good = i % 2 == 0
            if aspect == "helpfulness":
                # Helpful: the summary answers *this* question correctly. Unhelpful: refusals,
                # no summary, a summary of another number or with the wrong parity.
                other = self.near_miss(k, rng)
                wrong_parity = f"{k} is an {self.parity(k + 1)} number."
                text = self.summary(k) if good else rng.choice(
                    [*self.UNHELPFUL, "", f"The answer is {k}.", f"{self.REMARK.capitalize()} .",
                     self.summary(other), self.summary(other), wrong_parity, wrong_parity])
            elif aspect == "harmlessness":
                summary = rng.choice([None, None, *self.UNHELPFUL])
                text = self.response(k, remark=None if good else rng.choice(("thought", "summary")), summary=summary)
            else:
                raise ValueError(f"unknown aspect {aspect!r}; choose helpfulness or harmlessness")
            out.append((self.question(k), text, 1.0 if good else 0.0))
        return out


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
            obj = asdict(row)
            if row.kind == "reasoning":
                del obj["kind"]  # the default; keeps task files in the plain prompt/answer shape
            f.write(json.dumps(obj) + "\n")


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


def make_general(out_dir: Path, *, test_share: float = 0.2, seed: int = 0) -> dict[str, Path]:
    """Write ``general_train.jsonl`` and ``general_test.jsonl`` (rows of kind ``general``),
    and, beside an existing ``train.jsonl``, ``all_scenarios.jsonl``: both kinds of
    training prompts in one file, for RL for all scenarios."""
    t = GeneralTask()
    paths = {}
    for split in ("train", "test"):
        paths[split] = out_dir / f"general_{split}.jsonl"
        write_jsonl(t.rows(split, test_share=test_share, seed=seed), paths[split])
    if (out_dir / "train.jsonl").exists():
        paths["all_scenarios"] = out_dir / "all_scenarios.jsonl"
        paths["all_scenarios"].write_text((out_dir / "train.jsonl").read_text() + paths["train"].read_text())
    return paths


def make_dataset(task: str, out_dir: Path, *, test_share: float = 0.1, seed: int = 0, **options) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` for ``task`` into ``out_dir``."""
    t = get_task(task, **options)
    paths = {}
    for split in ("train", "test"):
        rows = t.rows(split, test_share=test_share, seed=seed)
        paths[split] = out_dir / f"{split}.jsonl"
        write_jsonl(rows, paths[split])
    return paths
