"""Code reward: run the response's program against test cases (DeepSeek-R1 §2.2.2).

"For LeetCode problems, a compiler can be used to generate feedback based on predefined
test cases." The response's last fenced code block (after ``</think>`` when there is
one) runs in ``rewards.isolation.sandbox``; the reward is 1 only if every test passes (the
paper's rule), or, with ``pass_fraction``, the share of tests passed.

The reference is a JSON string naming the tests. Kinds (unknown keys are an error):

``{"kind": "stdio", "language": "python"|"cpp", "cases": [{"stdin": "...", "stdout": "..."}]}``
    Competitive programming. ``"inputs": [...], "outputs": [...]`` may replace
    ``cases``; a null stdin is empty. Each case is one run. Output must match line for
    line: every expected line compared, trailing whitespace and trailing blank lines
    ignored, nothing else (no float tolerance, no alternative answers).
``{"kind": "assert", "setup": "imports", "tests": ["assert f(1) == 2", ...]}``
    MBPP ``test_list``. Each assert is one test.
``{"kind": "check", "setup": "...", "test": "def check(candidate): ...", "entry_point": "f"}``
    HumanEval: the harness calls ``check(f)``. With ``entry_point`` null the test code
    calls ``check`` itself (LeetCode-style ``check(Solution().method)``). One test.
``{"kind": "functional", "setup": "...", "fn_name": "f", "cases": [{"input": "[1, 2]\\n3", "output": "4"}]}``
    LiveCodeBench "functional": one JSON argument per input line, the result compared
    with the JSON output after a JSON round trip (tuples read as lists). A method of a
    ``Solution`` class is called on a fresh instance per case.
``{"kind": "test_functions", "setup": "...", "test": "from solution import f\\ndef test_a(): ..."}``
    A pytest-style file (KodCode): each zero-argument ``test_*`` function is one test.

``setup`` (default empty) runs before the program in its namespace: the imports a
data set assumes (``LEETCODE_IMPORTS`` for LeetCode/LiveCodeBench). In all but
``stdio`` the program is imported as module ``solution`` (so its ``__main__`` block
does not run) and the tests run in the same interpreter, as HumanEval, MBPP and
LiveCodeBench do: a program written to defeat its own checks from inside (an object
whose ``__eq__`` is always true, say) can pass them. Forged reports and ``sys.exit(0)``
cannot: results travel under a per-run token, and a test counts only when reported.
"""

from __future__ import annotations

import json
import re
import secrets
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rewards.isolation.sandbox import Limits, RunResult, RunStatus, SandboxConfig, Tier, configure, run_program
from rewards.types import RewardFn, RewardResult, RewardStatus

# What LeetCode's judge and LiveCodeBench's harness put before a Python solution.
LEETCODE_IMPORTS = """\
import sys, os, re, math, copy, heapq, bisect, random, string, functools, itertools, operator, collections
from typing import *
from collections import *
from heapq import *
from bisect import *
from itertools import *
from functools import *
from math import *
from string import *
from operator import *
sys.setrecursionlimit(10 ** 6)
try:
    from sortedcontainers import SortedList, SortedDict, SortedSet
except ImportError:
    pass
inf = float("inf")
"""


class BadReferenceError(ValueError):
    """The reference does not describe tests we can run (the data's fault, not the model's)."""


# ------------------------------------------------------------------ test specs


@dataclass(frozen=True)
class StdioSpec:
    language: str
    cases: tuple[tuple[str, str], ...]  # (stdin, expected stdout)

    @property
    def total(self) -> int:
        return len(self.cases)


@dataclass(frozen=True)
class HarnessSpec:
    """Tests run by the in-sandbox Python harness: kinds assert, check, functional,
    test_functions. ``tests`` holds one entry per test (for ``check`` the test code,
    for ``functional`` an (input, output) pair, for ``test_functions`` the file)."""

    kind: str
    setup: str
    tests: tuple[Any, ...]
    entry_point: str | None = None
    total_hint: int | None = None  # test_functions: how many test_* functions

    @property
    def total(self) -> int:
        return self.total_hint if self.total_hint is not None else len(self.tests)


TestSpec = StdioSpec | HarnessSpec

_KEYS = {
    "stdio": {"kind", "language", "cases", "inputs", "outputs"},
    "assert": {"kind", "setup", "tests"},
    "check": {"kind", "setup", "test", "entry_point"},
    "functional": {"kind", "setup", "fn_name", "cases"},
    "test_functions": {"kind", "setup", "test"},
}
_TEST_FUNCTION = re.compile(r"^def (test\w*)\s*\(", re.MULTILINE)


def _text(obj: dict[str, Any], key: str, *, default: str | None = None, allow_null: bool = False) -> str:
    value = obj.get(key, default)
    if value is None and allow_null:
        return ""
    if not isinstance(value, str):
        raise BadReferenceError(f"{key!r} must be a string, got {type(value).__name__}")
    return value


def parse_tests(reference: str) -> TestSpec:
    """Parse a reference JSON string into a test spec; raises BadReferenceError saying why not."""
    try:
        obj = json.loads(reference)
    except (json.JSONDecodeError, TypeError) as err:
        raise BadReferenceError(f"reference is not JSON: {err}") from None
    if not isinstance(obj, dict) or obj.get("kind") not in _KEYS:
        raise BadReferenceError(f'reference needs "kind", one of {sorted(_KEYS)}')
    kind = obj["kind"]
    unknown = set(obj) - _KEYS[kind]
    if unknown:
        raise BadReferenceError(f"unknown keys for kind {kind!r}: {sorted(unknown)}; allowed: {sorted(_KEYS[kind])}")
    setup = _text(obj, "setup", default="")
    if kind == "stdio":
        language = _text(obj, "language", default="python")
        if language not in ("python", "cpp"):
            raise BadReferenceError(f'"language" must be "python" or "cpp", got {language!r}')
        if "cases" in obj and ("inputs" in obj or "outputs" in obj):
            raise BadReferenceError('give either "cases" or "inputs"/"outputs", not both')
        if "cases" in obj:
            if not isinstance(obj["cases"], list) or not all(isinstance(c, dict) for c in obj["cases"]):
                raise BadReferenceError('"cases" must be a list of {"stdin": ..., "stdout": ...}')
            for case in obj["cases"]:
                if set(case) != {"stdin", "stdout"}:
                    raise BadReferenceError(f'each case has exactly "stdin" and "stdout", got {sorted(case)}')
            cases = tuple((_text(c, "stdin", allow_null=True), _text(c, "stdout")) for c in obj["cases"])
        else:
            inputs, outputs = obj.get("inputs"), obj.get("outputs")
            if not isinstance(inputs, list) or not isinstance(outputs, list):
                raise BadReferenceError('stdio tests need "cases", or both "inputs" and "outputs" lists')
            if len(inputs) != len(outputs):
                raise BadReferenceError(f"{len(inputs)} inputs but {len(outputs)} outputs")
            cases = tuple(
                (_text({"stdin": i}, "stdin", allow_null=True), _text({"stdout": o}, "stdout"))
                for i, o in zip(inputs, outputs, strict=True)
            )
        if not cases:
            raise BadReferenceError("no test cases")
        return StdioSpec(language, cases)
    if kind == "assert":
        tests = obj.get("tests")
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
            raise BadReferenceError('"tests" must be a non-empty list of assert statements')
        return HarnessSpec(kind, setup, tuple(tests))
    if kind == "check":
        entry = obj.get("entry_point")
        if entry is not None and not (isinstance(entry, str) and entry.isidentifier()):
            raise BadReferenceError(f'"entry_point" must be a function name or null, got {entry!r}')
        return HarnessSpec(kind, setup, (_text(obj, "test"),), entry_point=entry)
    if kind == "functional":
        fn_name = _text(obj, "fn_name")
        if not fn_name.isidentifier():
            raise BadReferenceError(f'"fn_name" must be an identifier, got {fn_name!r}')
        cases = obj.get("cases")
        if not isinstance(cases, list) or not cases:
            raise BadReferenceError('"cases" must be a non-empty list of {"input": ..., "output": ...}')
        pairs = []
        for case in cases:
            if not isinstance(case, dict) or set(case) != {"input", "output"}:
                raise BadReferenceError('each functional case has exactly "input" and "output"')
            raw_in, raw_out = _text(case, "input"), _text(case, "output")
            try:
                args = [json.loads(line) for line in raw_in.split("\n") if line.strip()]
                expected = json.loads(raw_out)
            except json.JSONDecodeError as err:
                raise BadReferenceError(f"functional case is not JSON lines: {err}") from None
            pairs.append((args, expected))
        return HarnessSpec(kind, setup, tuple(pairs), entry_point=fn_name)
    test = _text(obj, "test")  # test_functions
    names = _TEST_FUNCTION.findall(test)
    if not names:
        raise BadReferenceError("test file defines no top-level test_* function")
    return HarnessSpec(kind, setup, (test,), total_hint=len(names))


# ------------------------------------------------------------------ extraction

_OPEN_FENCE = re.compile(r"[ \t]*```[ \t]*([^\s`]*)")
_CLOSE_FENCE = re.compile(r"[ \t]*```[ \t]*")
_TAGS = {"python": {"python", "py", "python3"}, "cpp": {"cpp", "c++", "cxx", "cc"}}


def extract_code(response: str, language: str = "python") -> str | None:
    """The last fenced code block of the final answer, dedented; None if there is none.

    Text up to the last ``</think>`` is reasoning, not answer, and is skipped. A block
    tagged with ``language`` wins over a later untagged one; a block tagged with another
    language never counts; an unclosed block is no block. One pass over the lines (a
    regex would go quadratic on a response of many unclosed fences).
    """
    tagged = untagged = None
    tag, lines = None, []
    for line in response.rsplit("</think>", 1)[-1].split("\n"):
        if tag is None:
            opening = _OPEN_FENCE.match(line)
            if opening:
                tag, lines = opening.group(1).lower(), []
        elif _CLOSE_FENCE.fullmatch(line):
            block = "".join(f"{text}\n" for text in lines)
            if tag in _TAGS[language]:
                tagged = block
            elif not tag:
                untagged = block
            tag = None
        else:
            lines.append(line)
    block = tagged if tagged is not None else untagged
    return None if block is None else textwrap.dedent(block)


# ------------------------------------------------------------------ grading


@dataclass(frozen=True)
class CaseOutcome:
    """One test's verdict. ``status``: passed, wrong_answer, runtime_error, timeout,
    memory, output_limit, compile_error, not_run, sandbox_error, bad_test."""

    index: int
    status: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Grade:
    """The verdict per test, and how each sandbox run behind them ended (one per stdio
    case run, one for the harness kinds)."""

    outcomes: tuple[CaseOutcome, ...]
    runs: tuple[RunStatus, ...] = ()

    @property
    def passed(self) -> int:
        return sum(o.passed for o in self.outcomes)

    @property
    def total(self) -> int:
        return len(self.outcomes)

    @property
    def all_passed(self) -> bool:
        return self.passed == self.total

    @property
    def first_failure(self) -> CaseOutcome | None:
        return next((o for o in self.outcomes if not o.passed), None)


def _norm_lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def compare_stdout(expected: str, actual: str) -> str | None:
    """None if ``actual`` matches ``expected`` line for line (trailing whitespace and
    trailing blank lines aside), else what differs."""
    want, got = _norm_lines(expected), _norm_lines(actual)
    for number, (w, g) in enumerate(zip(want, got), start=1):
        if w != g:
            return f"line {number}: expected {w[:60]!r}, got {g[:60]!r}"
    if len(want) != len(got):
        return f"expected {len(want)} lines, got {len(got)}"
    return None


def _run_failure(result: RunResult) -> str:
    tail = result.stderr.strip().splitlines()[-1][:160] if result.stderr.strip() else ""
    return "; ".join(part for part in (result.detail, tail) if part)


def _grade_stdio(code: str, spec: StdioSpec, budget_s: float, test_timeout_s: float | None,
                 memory_bytes: int, keep_going: bool) -> Grade:
    outcomes: list[CaseOutcome] = []
    runs: list[RunStatus] = []
    spent_s = 0.0  # wall clock of the runs themselves: C++ compilation does not count
    for index, (stdin, expected) in enumerate(spec.cases):
        remaining = budget_s - spent_s
        if remaining <= 0.05:
            outcomes += [CaseOutcome(i, "timeout", "problem time budget spent")
                         for i in range(index, len(spec.cases))]
            break
        limit = min(remaining, test_timeout_s or remaining)
        result = run_program(code, language=spec.language, stdin=stdin,
                             limits=Limits(cpu_s=limit, wall_s=limit, memory_bytes=memory_bytes))
        runs.append(result.status)
        spent_s += result.wall_s
        if result.status is RunStatus.OK:
            diff = compare_stdout(expected, result.stdout)
            outcome = CaseOutcome(index, "passed" if diff is None else "wrong_answer", diff or "")
        else:
            outcome = CaseOutcome(index, result.status.value, _run_failure(result))
        outcomes.append(outcome)
        if outcome.status in ("compile_error", "sandbox_error"):  # the same for every case
            outcomes += [CaseOutcome(i, outcome.status, outcome.detail) for i in range(index + 1, len(spec.cases))]
            break
        if not outcome.passed and not keep_going:
            outcomes += [CaseOutcome(i, "not_run") for i in range(index + 1, len(spec.cases))]
            break
    return Grade(tuple(outcomes), tuple(runs))


# The in-sandbox harness. Its job (program, setup, tests, token) arrives on stdin and is
# erased from it before the program runs, so the program sees an empty stdin and cannot
# reread the job through /proc/self/fd/0. Reports go to a duplicate of fd 1, each on its
# own line behind the token; the program's own output is ignored. Everything lives in
# one function's locals: nothing for ``import __main__`` to find.
_HARNESS = r"""
def _harness():
    import inspect, json, linecache, os, sys, traceback, types

    job = json.loads(sys.stdin.read())
    try:
        os.ftruncate(0, 0)
    except OSError:
        pass
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    token = job.pop("token")
    out = os.dup(1)

    def report(**event):
        os.write(out, ("\n" + token + " " + json.dumps(event) + "\n").encode())

    def why(err):
        where = ""
        for frame in reversed(traceback.extract_tb(err.__traceback__)):
            if frame.filename == "<test>" and frame.line:
                where = " at: " + frame.line.strip()
                break
        text = (type(err).__name__ + ": " + str(err)).strip().rstrip(":")
        return text[:200] + where[:200]

    def compile_test(source):
        # Registered so that a failing line can be quoted in the report.
        linecache.cache["<test>"] = (len(source), None, source.splitlines(True), "<test>")
        return compile(source, "<test>", "exec")

    def verdict(err):
        if isinstance(err, AssertionError):
            return "wrong_answer"
        if isinstance(err, MemoryError):
            return "memory"
        return "runtime_error"

    module = types.ModuleType("solution")
    module.__file__ = "solution.py"
    sys.modules["solution"] = module
    ns = module.__dict__
    try:
        exec(compile(job["setup"], "<setup>", "exec"), ns)
    except BaseException as err:
        report(event="bad_test", detail="setup failed: " + why(err))
        os._exit(0)
    try:
        code = compile(job["program"], "solution.py", "exec")
    except (SyntaxError, ValueError) as err:
        report(event="compile_error", detail=(type(err).__name__ + ": " + str(err))[:300])
        os._exit(0)
    try:
        exec(code, ns)
    except BaseException as err:
        report(event="load_error", status=verdict(err), detail="importing the program: " + why(err))
        os._exit(0)
    report(event="loaded")

    def run_test(index, body):
        try:
            body()
        except BaseException as err:
            report(event="test", index=index, status=verdict(err), detail=why(err))
        else:
            report(event="test", index=index, status="passed")

    def function(name):
        solution = ns.get("Solution")
        if isinstance(solution, type) and hasattr(solution, name):
            return getattr(solution(), name)
        if callable(ns.get(name)):
            return ns[name]
        raise NameError("the program defines no function or Solution method " + repr(name))

    kind = job["kind"]
    if kind == "assert":
        for index, test in enumerate(job["tests"]):
            run_test(index, lambda: exec(compile_test(test), ns))
    elif kind == "check":
        def check():
            exec(compile_test(job["tests"][0]), ns)
            if job["entry_point"] is not None:
                if job["entry_point"] not in ns:
                    raise NameError("the program defines no " + repr(job["entry_point"]))
                ns["check"](ns[job["entry_point"]])
        run_test(0, check)
    elif kind == "functional":
        def case(args, expected):
            got = function(job["entry_point"])(*args)
            try:
                got = json.loads(json.dumps(got))
            except (TypeError, ValueError):
                raise AssertionError("result is not JSON-like: " + repr(got)[:100]) from None
            if got != expected:
                raise AssertionError("expected " + repr(expected)[:80] + ", got " + repr(got)[:80])
        for index, (args, expected) in enumerate(job["tests"]):
            run_test(index, lambda: case(args, expected))
    elif kind == "test_functions":
        tests_ns = {"__name__": "test_solution"}
        try:
            exec(compile_test(job["tests"][0]), tests_ns)
        except ImportError as err:
            if getattr(err, "name", None) == "solution":  # the program lacks a name the tests import
                report(event="load_error", status="runtime_error", detail=why(err))
            else:
                report(event="bad_test", detail="test file imports fail: " + why(err))
            os._exit(0)
        except BaseException as err:
            report(event="bad_test", detail="test file fails: " + why(err))
            os._exit(0)
        fns = [f for n, f in tests_ns.items() if n.startswith("test") and inspect.isfunction(f)]
        for f in fns:
            if any(p.default is p.empty for p in inspect.signature(f).parameters.values()):
                report(event="bad_test", detail=f.__name__ + " needs pytest fixtures")
                os._exit(0)
        report(event="count", count=len(fns))
        for index, f in enumerate(fns):
            run_test(index, f)
    report(event="done")
    os._exit(0)


_harness()
"""


def _grade_harness(code: str, spec: HarnessSpec, budget_s: float, memory_bytes: int) -> Grade:
    # A token the program cannot guess, so it cannot print fake results. It never
    # changes a verdict: an honest run is graded the same whatever the token.
    token = secrets.token_hex(16)
    job = {
        "token": token, "kind": spec.kind, "setup": spec.setup, "program": code,
        "tests": list(spec.tests), "entry_point": spec.entry_point,
    }
    result = run_program(_HARNESS, language="python", stdin=json.dumps(job),
                         limits=Limits(cpu_s=budget_s, wall_s=budget_s, memory_bytes=memory_bytes))
    events = []
    for line in result.stdout.split("\n"):
        if line.startswith(token + " "):
            try:
                events.append(json.loads(line[len(token) + 1:]))
            except json.JSONDecodeError:
                continue
    return Grade(_harness_outcomes(result, events, spec), (result.status,))


def _harness_outcomes(result: RunResult, events: list[dict[str, Any]], spec: HarnessSpec
                      ) -> tuple[CaseOutcome, ...]:
    """One outcome per test from the harness's reports (``events``) and how its run ended."""
    total = next((e["count"] for e in events if e["event"] == "count"), spec.total)
    if result.status is RunStatus.SANDBOX_ERROR:
        return tuple(CaseOutcome(i, "sandbox_error", result.detail) for i in range(total))
    for event in events:
        if event["event"] == "bad_test":
            return tuple(CaseOutcome(i, "bad_test", event["detail"]) for i in range(total))
        if event["event"] == "compile_error":
            return tuple(CaseOutcome(i, "compile_error", event["detail"]) for i in range(total))
        if event["event"] == "load_error":
            return tuple(CaseOutcome(i, event["status"], event["detail"]) for i in range(total))
    reported = {e["index"]: CaseOutcome(e["index"], e["status"], e.get("detail", ""))
                for e in events if e["event"] == "test"}
    finished = any(e["event"] == "done" for e in events)
    outcomes = []
    for index in range(total):
        if index in reported:
            outcomes.append(reported[index])
        elif index == len(reported) and not finished:  # the test that was running
            if result.status is RunStatus.OK:
                why = "the program ended the process during the test"
                outcomes.append(CaseOutcome(index, "runtime_error", why))
            else:
                outcomes.append(CaseOutcome(index, result.status.value, _run_failure(result)))
        else:
            outcomes.append(CaseOutcome(index, "not_run"))
    return tuple(outcomes)


def grade(code: str, spec: TestSpec, *, time_budget_s: float = 4.0, test_timeout_s: float | None = None,
          memory_bytes: int = Limits().memory_bytes, keep_going: bool = False) -> Grade:
    """Run ``code`` against ``spec`` in the sandbox, within ``time_budget_s`` of wall
    clock for the whole problem. ``keep_going``: run every stdio case even after one
    fails (to count a pass fraction). Runs in this process's sandbox (``configure``)."""
    if isinstance(spec, StdioSpec):
        return _grade_stdio(code, spec, time_budget_s, test_timeout_s, memory_bytes, keep_going)
    return _grade_harness(code, spec, time_budget_s, memory_bytes)


# ------------------------------------------------------------------ the reward


class CodeRewardOptions(BaseModel):
    """Options of the ``code_tests`` reward (RewardSpec.options)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pass_fraction: bool = Field(
        default=False, description="score = share of tests passed; the paper (default) gives 1 only if all pass"
    )
    time_budget_s: float = Field(
        default=4.0, gt=0,
        description="wall clock for all tests of one problem; keep it under RewardsConfig.timeout_s",
    )
    test_timeout_s: float | None = Field(default=None, gt=0, description="per stdio case; None = what the budget has left")
    memory_bytes: int = Field(default=Limits().memory_bytes, ge=256 << 20)
    min_tier: Tier = Tier.NAMESPACES
    tier: Tier | None = None


def _summary(grade_: Grade) -> str:
    head = f"passed {grade_.passed}/{grade_.total} tests"
    failure = grade_.first_failure
    if failure is None:
        return head
    detail = f": {failure.detail}" if failure.detail else ""
    return f"{head}; test {failure.index + 1} {failure.status}{detail}"[:400]


def code_reward(response: str, reference: str, options: CodeRewardOptions) -> RewardResult:
    """Grade the response's last code block against the reference's tests."""
    try:
        spec = parse_tests(reference)
    except BadReferenceError as err:
        return RewardResult(0.0, RewardStatus.UNGRADABLE, f"bad tests: {err}")
    language = spec.language if isinstance(spec, StdioSpec) else "python"
    code = extract_code(response, language)
    if code is None or not code.strip():
        return RewardResult(0.0, RewardStatus.NO_ANSWER, f"no fenced {language} code block")
    result = grade(code, spec, time_budget_s=options.time_budget_s, test_timeout_s=options.test_timeout_s,
                   memory_bytes=options.memory_bytes, keep_going=options.pass_fraction)
    reason = _summary(result)
    statuses = {o.status for o in result.outcomes}
    if "bad_test" in statuses:
        return RewardResult(0.0, RewardStatus.UNGRADABLE, reason)
    if "sandbox_error" in statuses:
        return RewardResult(0.0, RewardStatus.ERROR, reason)
    if result.all_passed:
        return RewardResult(1.0, RewardStatus.CORRECT, reason)
    score = result.passed / result.total if options.pass_fraction else 0.0
    return RewardResult(score, RewardStatus.WRONG, reason)


def program_vote(response: str, options: Mapping[str, Any]) -> str | None:
    """What a response votes for in cons@k under ``code_tests``: its Python program as
    ``extract_code`` finds it, blank lines and trailing spaces dropped, so identical
    programs vote together (when every program differs the vote falls to the first
    sample: cons@k then measures one sample); None (no vote) without a program."""
    del options  # the program is read the same whatever the grading options
    code = extract_code(response)
    if code is None or not code.strip():
        return None
    return "\n".join(line.rstrip() for line in code.splitlines() if line.strip())


def build_code_tests(**options: Any) -> RewardFn:
    opts = CodeRewardOptions(**options)
    # Start-up: build and self-test the sandbox now, so a host that cannot contain
    # programs fails here, loudly, not at the first code problem.
    configure(SandboxConfig(min_tier=opts.min_tier, tier=opts.tier))

    def reward(response: str, reference: str) -> RewardResult:
        return code_reward(response, reference, opts)

    return reward
