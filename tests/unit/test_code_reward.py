"""The code reward: extraction, comparison, the reference schema, upstream harness cases,
reference solutions of HumanEval / MBPP / LeetCode, broken solutions, and programs that
try to cheat the harness.

Data: ../shared/data (never copied here). The full reference sets run by default (about
40 s with three workers); broken-solution variants run on every third problem unless
R1LAB_FULL_CODE_SETS=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from rewards import code
from rewards.code import (
    LEETCODE_IMPORTS,
    CodeRewardOptions,
    StdioSpec,
    BadReferenceError,
    code_reward,
    compare_stdout,
    extract_code,
    grade,
    parse_tests,
)
from rewards.registry import build_reward
from rewards.isolation.sandbox import RunStatus, configure
from rewards.types import RewardStatus

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
FULL = os.environ.get("R1LAB_FULL_CODE_SETS") == "1"
WORKERS = 3


@pytest.fixture(scope="module", autouse=True)
def sandbox() -> None:
    configure()  # the default config: the namespaces tier, or fail loudly


def _rows(name: str) -> list[dict[str, Any]]:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (shared test data lives in ../shared/data, outside the repo)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _grade_all(jobs: list[tuple[str, str, dict]]) -> dict[str, code.Grade]:
    """Grade (id, program, reference) jobs in parallel; id -> Grade."""
    def one(job: tuple[str, str, dict]) -> tuple[str, code.Grade]:
        return job[0], grade(job[1], parse_tests(json.dumps(job[2])), time_budget_s=10.0)

    with ThreadPoolExecutor(WORKERS) as pool:
        return dict(pool.map(one, jobs))


def _fenced(program: str, language: str = "python") -> str:
    return f"Here is my solution.\n```{language}\n{program}\n```\n"


# ------------------------------------------------------------------ extraction

EXTRACTION = [
    ("last_block", "```python\na = 1\n```\ntext\n```python\nb = 2\n```", "python", "b = 2\n"),
    ("untagged", "```\nx = 1\n```", "python", "x = 1\n"),
    ("tagged_beats_later_untagged", "```python\ncode()\n```\n```\n5\n```", "python", "code()\n"),
    ("other_language_ignored", "```cpp\nint main(){}\n```", "python", None),
    ("indented_fence", "  ```python\n  x = 1\n  ```\n", "python", "x = 1\n"),
    ("closing_fence_indented", "```python\nx = 1\n    ```\n    ", "python", "x = 1\n"),
    ("after_think", "<think>```python\ndraft()\n```</think>\n```python\nfinal()\n```", "python", "final()\n"),
    ("only_in_think", "<think>```python\ndraft()\n```</think> the answer is above", "python", None),
    ("unclosed_fence", "```python\nx = 1\n", "python", None),
    ("no_block", "def f(): return 1", "python", None),
    ("cpp_tag", "```c++\nint main(){}\n```", "cpp", "int main(){}\n"),
    ("py_tag", "```py\nprint(1)\n```", "python", "print(1)\n"),
]


@pytest.mark.parametrize("response,language,expected", [c[1:] for c in EXTRACTION], ids=[c[0] for c in EXTRACTION])
def test_extract_code(response: str, language: str, expected: str | None) -> None:
    assert extract_code(response, language) == expected


def test_extract_code_is_linear_in_the_response() -> None:
    import time

    start = time.monotonic()
    assert extract_code("```text with words\n" * 50_000) is None  # 50k fences that never close
    assert time.monotonic() - start < 1.0


# ------------------------------------------------------------------ output comparison

COMPARISON = [
    ("exact", "1\n2\n", "1\n2\n", True),
    ("trailing_spaces", "1\n2\n", "1  \n2\t\n", True),
    ("trailing_blank_lines", "1\n2", "1\n2\n\n\n", True),
    ("crlf", "1\n2\n", "1\r\n2\r\n", True),
    ("missing_last_line", "1\n2\n3\n", "1\n2\n", False),
    ("only_first_line", "1\n2\n3\n", "1\n", False),
    ("extra_line", "1\n", "1\n2\n", False),
    ("leading_space", "1\n", " 1\n", False),
    ("joined_on_one_line", "1\n2\n", "1 2\n", False),
    ("inner_spacing", "1 2\n", "1  2\n", False),
    ("empty_expected_nonempty_output", "", "x\n", False),
    ("both_empty", "", "\n", True),
]


@pytest.mark.parametrize("expected,actual,same", [c[1:] for c in COMPARISON], ids=[c[0] for c in COMPARISON])
def test_compare_stdout(expected: str, actual: str, same: bool) -> None:
    assert (compare_stdout(expected, actual) is None) is same


# ------------------------------------------------------------------ reference schema

BAD_REFERENCES = [
    ("not_json", "{nope"),
    ("no_kind", json.dumps({"cases": []})),
    ("unknown_kind", json.dumps({"kind": "magic"})),
    ("unknown_key", json.dumps({"kind": "assert", "tests": ["assert 1"], "extra": 1})),
    ("no_cases", json.dumps({"kind": "stdio", "cases": []})),
    ("inputs_without_outputs", json.dumps({"kind": "stdio", "inputs": ["1"]})),
    ("length_mismatch", json.dumps({"kind": "stdio", "inputs": ["1"], "outputs": ["1", "2"]})),
    ("case_missing_stdout", json.dumps({"kind": "stdio", "cases": [{"stdin": "1"}]})),
    ("stdout_not_text", json.dumps({"kind": "stdio", "cases": [{"stdin": "1", "stdout": 1}]})),
    ("bad_language", json.dumps({"kind": "stdio", "language": "rust", "cases": [{"stdin": "", "stdout": ""}]})),
    ("empty_asserts", json.dumps({"kind": "assert", "tests": []})),
    ("bad_entry_point", json.dumps({"kind": "check", "test": "def check(c): pass", "entry_point": "a b"})),
    ("functional_not_json", json.dumps({"kind": "functional", "fn_name": "f", "cases": [{"input": "[1", "output": "1"}]})),
    ("no_test_functions", json.dumps({"kind": "test_functions", "test": "x = 1"})),
]


@pytest.mark.parametrize("reference", [c[1] for c in BAD_REFERENCES], ids=[c[0] for c in BAD_REFERENCES])
def test_bad_reference_is_ungradable_not_wrong(reference: str) -> None:
    with pytest.raises(BadReferenceError):
        parse_tests(reference)
    result = code_reward(_fenced("print(1)"), reference, CodeRewardOptions())
    assert result.status is RewardStatus.UNGRADABLE and result.score == 0.0


def test_setup_that_fails_is_ungradable() -> None:
    reference = json.dumps({"kind": "assert", "setup": "import no_such_module_r1lab", "tests": ["assert f() == 1"]})
    result = code_reward(_fenced("def f():\n    return 1"), reference, CodeRewardOptions())
    assert result.status is RewardStatus.UNGRADABLE, result


# ------------------------------------------------------------------ upstream harness cases


def _harness_case(case: dict) -> tuple[str, dict]:
    """(response, reference) for one code_reward_cases.jsonl row, in our schema."""
    kind, language = case["kind"], case["language"]
    if kind == "humaneval_completion":
        problem = case["problem"]
        program = problem["prompt"] + case["completion"]  # a completion, not a fenced answer
        return _fenced(program), {"kind": "check", "test": problem["test"], "entry_point": problem["entry_point"]}
    if kind in ("stdin_stdout", "livecodebench_stdin"):
        if "raw_in_outs" in case:  # verl's own format: its malformed variants must stay malformed
            raw = case["raw_in_outs"]
            reference = {"kind": "stdio", **{k: raw[k] for k in ("inputs", "outputs") if k in raw}}
        elif "tests" in case:
            reference = {"kind": "stdio", "cases": [{"stdin": t["input"], "stdout": t["output"]} for t in case["tests"]]}
        else:
            reference = {"kind": "stdio"}
        if language != "python":
            reference["language"] = language
        return case.get("response") or _fenced(case["solution"], language), reference
    if kind == "functional_fn_name":
        raw = case["raw_in_outs"]
        cases = [{"input": i, "output": o} for i, o in zip(raw["inputs"], raw["outputs"], strict=True)]
        reference = {"kind": "functional", "setup": LEETCODE_IMPORTS, "fn_name": raw["fn_name"], "cases": cases}
        return _fenced(case["solution"]), reference
    if kind == "assert_case":
        return _fenced(case["solution"]), {"kind": "assert", "tests": case["raw_in_outs"]["assert_case"]}
    if kind == "livecodebench_functional":
        fn_name = case["raw_metadata"][0]["metadata"]["func_name"]
        cases = [{"input": t["input"], "output": t["output"]} for t in case["tests"]]
        return case["response"], {"kind": "functional", "setup": LEETCODE_IMPORTS, "fn_name": fn_name, "cases": cases}
    if kind == "functional_check":
        return case["response"], {"kind": "check", "setup": LEETCODE_IMPORTS, "test": case["test"], "entry_point": None}
    if kind == "pytest_file":
        return case["response"], {"kind": "test_functions", "test": case["test"]}
    raise AssertionError(f"unmapped harness case kind {kind!r}")


# verl's result codes: True pass, False wrong answer, -1 bad input, -2 runtime error,
# -3 timeout, -4 compile error. A failed assert is verl's runtime error, our wrong answer.
_VERL = {True: {"passed"}, False: {"wrong_answer"}, -2: {"runtime_error", "wrong_answer"},
         -3: {"timeout"}, -4: {"compile_error"}}


def _harness_cases() -> list[dict]:
    path = DATA / "code_reward_cases.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.skipif(not (DATA / "code_reward_cases.jsonl").exists(), reason=f"{DATA} is absent")
@pytest.mark.parametrize("case", _harness_cases(), ids=lambda c: f"{c['id']}-{c['kind']}")
def test_upstream_harness_case(case: dict) -> None:
    if case["language"] == "cpp" and shutil.which("g++") is None:
        pytest.skip("g++ is not installed")
    response, reference = _harness_case(case)
    expected = case["expected"]
    # Upstream time limits are 3-5 s; 2 s keeps the sleeping cases short and still
    # far above what the passing ones need.
    options = CodeRewardOptions(pass_fraction=True, time_budget_s=2.0)
    result = code_reward(response, json.dumps(reference), options)
    per_test = expected.get("per_test_result")
    if per_test is not None and -1 in per_test:
        assert result.status is RewardStatus.UNGRADABLE, result
        return
    passed = expected.get("all_passed", expected.get("passed"))
    if per_test is not None:
        passed = all(r is True for r in per_test)
        spec = parse_tests(json.dumps(reference))
        language = spec.language if isinstance(spec, StdioSpec) else "python"
        outcomes = grade(extract_code(response, language), spec, time_budget_s=2.0, keep_going=True).outcomes
        assert [o.status in _VERL[r] for r, o in zip(per_test, outcomes, strict=True)] == [True] * len(per_test), outcomes
    if "per_test" in expected:  # verl's prime_code cases: which tests pass
        assert result.score == pytest.approx(sum(expected["per_test"]) / len(expected["per_test"]))
    assert (result.status is RewardStatus.CORRECT) is passed, result
    if passed:
        assert result.score == 1.0
    else:
        assert result.score < 1.0


# ------------------------------------------------------------------ reference solutions


def _humaneval_jobs(rows: list[dict], body: str | None = None) -> list[tuple[str, str, dict]]:
    return [(r["task_id"], r["prompt"] + (r["canonical_solution"] if body is None else body),
             {"kind": "check", "test": r["test"], "entry_point": r["entry_point"]}) for r in rows]


def _mbpp_reference(row: dict) -> dict:
    return {"kind": "assert", "setup": "\n".join(row["test_imports"]), "tests": row["test_list"]}


def _leetcode_reference(row: dict) -> dict:
    return {"kind": "check", "setup": LEETCODE_IMPORTS, "test": row["test"], "entry_point": None}


def _assert_all_pass(grades: dict[str, code.Grade], expected_total: int) -> None:
    failed = {k: code._summary(g) for k, g in grades.items() if not g.all_passed}
    assert len(grades) == expected_total
    assert failed == {}, f"{len(failed)} reference solutions failed: {dict(list(failed.items())[:5])}"


def test_humaneval_canonical_solutions_pass() -> None:
    rows = _rows("humaneval.jsonl")
    _assert_all_pass(_grade_all(_humaneval_jobs(rows)), 164)


def test_mbpp_reference_code_passes() -> None:
    rows = _rows("mbpp_sanitized.jsonl")
    _assert_all_pass(_grade_all([(str(r["task_id"]), r["code"], _mbpp_reference(r)) for r in rows]), 427)


def test_leetcode_references_pass_with_the_usual_imports() -> None:
    rows = _rows("leetcode_test_rllm.jsonl")
    _assert_all_pass(_grade_all([(str(r["index"]), r["solution"], _leetcode_reference(r)) for r in rows]), 200)


# ------------------------------------------------------------------ broken solutions

_OFF_BY_ONE = """
def _off_by_one(f):
    def wrapped(*args, **kwargs):
        result = f(*args, **kwargs)
        return result + 1 if type(result) in (int, float) else result
    return wrapped
"""
_NUMBER_ASSERT = re.compile(r"==\s*-?\d+(\.\d+)?\s*$")


def _sample(rows: list[dict]) -> list[dict]:
    return rows if FULL else rows[::3]


def _assert_all_fail(grades: dict[str, code.Grade]) -> None:
    assert grades, "no broken solutions were built"
    passed = sorted(k for k, g in grades.items() if g.all_passed)
    assert passed == [], f"broken solutions that passed: {passed}"


def test_humaneval_wrong_return_fails() -> None:
    rows = _sample(_rows("humaneval.jsonl"))
    _assert_all_fail(_grade_all(_humaneval_jobs(rows, body="    return None\n")))


def test_mbpp_wrong_return_and_off_by_one_fail() -> None:
    jobs = []
    for row in _sample(_rows("mbpp_sanitized.jsonl")):
        names = [n for n in re.findall(r"^def (\w+)", row["code"], re.MULTILINE)
                 if any(n + "(" in t for t in row["test_list"])]
        none = "".join(f"\ndef {n}(*args, **kwargs):\n    return None\n" for n in names)
        jobs.append((f"{row['task_id']}-none", row["code"] + "\n" + none, _mbpp_reference(row)))
        if all(_NUMBER_ASSERT.search(t.strip()) for t in row["test_list"]):
            shifted = row["code"] + "\n" + _OFF_BY_ONE + "".join(f"\n{n} = _off_by_one({n})\n" for n in names)
            jobs.append((f"{row['task_id']}-off-by-one", shifted, _mbpp_reference(row)))
    _assert_all_fail(_grade_all(jobs))


def test_leetcode_off_by_one_fails() -> None:
    jobs = []
    for row in _sample(_rows("leetcode_test_rllm.jsonl")):
        asserts = [line.strip() for line in row["test"].splitlines() if line.strip().startswith("assert")]
        method = re.search(r"check\(Solution\(\)\.(\w+)\)", row["test"])
        if method and asserts and all(_NUMBER_ASSERT.search(a) for a in asserts):
            name = method.group(1)
            shifted = row["solution"] + "\n" + _OFF_BY_ONE + f"\nSolution.{name} = _off_by_one(Solution.{name})\n"
            jobs.append((str(row["index"]), shifted, _leetcode_reference(row)))
    _assert_all_fail(_grade_all(jobs))


# A stdio problem with multi-line output: print the squares of 1..n, one per line.
_SQUARES_CASES = [{"stdin": f"{n}\n", "stdout": "".join(f"{i * i}\n" for i in range(1, n + 1))} for n in (3, 5, 8)]
_SQUARES = json.dumps({"kind": "stdio", "cases": _SQUARES_CASES})
_SQUARES_PROGRAMS = [
    ("correct", "n = int(input())\nfor i in range(1, n + 1):\n    print(i * i)\n", True),
    ("trailing_spaces", "n = int(input())\nfor i in range(1, n + 1):\n    print(i * i, '  ')\nprint()\n", True),
    ("off_by_one", "n = int(input())\nfor i in range(1, n + 1):\n    print(i * i + 1)\n", False),
    ("one_line_short", "n = int(input())\nfor i in range(1, n):\n    print(i * i)\n", False),
    ("first_line_only", "n = int(input())\nprint(1)\n", False),
    ("truncated_by_exit", "import os\nn = int(input())\nprint(1, flush=True)\nos._exit(0)\n", False),
    ("one_line", "n = int(input())\nprint(*[i * i for i in range(1, n + 1)])\n", False),
    ("extra_line", "n = int(input())\nfor i in range(1, n + 2):\n    print(i * i)\n", False),
    ("crash_after_output", "n = int(input())\nfor i in range(1, n + 1):\n    print(i * i)\nraise SystemExit(1)\n", False),
]


@pytest.mark.parametrize("program,passes", [p[1:] for p in _SQUARES_PROGRAMS], ids=[p[0] for p in _SQUARES_PROGRAMS])
def test_stdio_is_strict(program: str, passes: bool) -> None:
    result = code_reward(_fenced(program), _SQUARES, CodeRewardOptions())
    assert (result.status is RewardStatus.CORRECT) is passes, result


_CPP_SQUARES = """#include <cstdio>
int main() { int n; std::scanf("%d", &n); for (int i = 1; i <= n; ++i) std::printf("%d\\n", i * i SHIFT); }
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
@pytest.mark.parametrize("shift,passes", [("", True), (" + 1", False)], ids=["correct", "off_by_one"])
def test_cpp_stdio(shift: str, passes: bool) -> None:
    reference = json.dumps({"kind": "stdio", "language": "cpp", "cases": _SQUARES_CASES})
    result = code_reward(_fenced(_CPP_SQUARES.replace("SHIFT", shift), "cpp"), reference, CodeRewardOptions(time_budget_s=30))
    assert (result.status is RewardStatus.CORRECT) is passes, result


# ------------------------------------------------------------------ programs that cheat

_ADD = json.dumps({"kind": "assert", "tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]})
# Prints passing reports under a token, if it can find one, then leaves before the tests.
_FORGER = """import json, os, re, sys
def forge(token):
    for event in [{"event": "loaded"}, {"event": "test", "index": 0, "status": "passed"},
                  {"event": "test", "index": 1, "status": "passed"}, {"event": "done"}]:
        os.write(1, ("\\n" + token + " " + json.dumps(event) + "\\n").encode())
    os._exit(0)
def add(a, b):
    return None
"""
_CHEATS = [
    ("exit_0_on_import", "import sys\nsys.exit(0)\n"),
    ("os_exit_on_import", "import os\nos._exit(0)\n"),
    ("os_exit_in_call", "import os\ndef add(a, b):\n    os._exit(0)\n"),
    ("system_exit_in_call", "def add(a, b):\n    raise SystemExit(0)\n"),
    ("forged_reports", (
        "import json, sys\nfor i in range(2):\n"
        "    print(json.dumps({'event': 'test', 'index': i, 'status': 'passed'}))\n"
        "print(json.dumps({'event': 'done'}))\nsys.stdout.flush()\nimport os\nos._exit(0)\n")),
    ("token_from_stdin", _FORGER + (
        "try:\n    data = open('/proc/self/fd/0').read() + os.pread(0, 1 << 20, 0).decode()\n"
        "except OSError:\n    data = ''\nfor t in re.findall(r'[0-9a-f]{32}', data):\n    forge(t)\n")),
    ("token_from_main_module", _FORGER + (
        "import __main__\nfor v in vars(__main__).values():\n"
        "    if isinstance(v, str) and re.fullmatch(r'[0-9a-f]{32}', v):\n        forge(v)\n")),
    ("close_stdout", "import os\nos.close(1)\ndef add(a, b):\n    return a - b\n"),
    ("kill_process_group", "import os, signal\ndef add(a, b):\n    os.killpg(0, signal.SIGKILL)\n"),
    ("loop_forever", "def add(a, b):\n    while True:\n        pass\n"),
]


@pytest.mark.parametrize("program", [c[1] for c in _CHEATS], ids=[c[0] for c in _CHEATS])
def test_cheating_programs_fail(program: str) -> None:
    result = code_reward(_fenced(program), _ADD, CodeRewardOptions(time_budget_s=2.0))
    assert result.status is RewardStatus.WRONG and result.score == 0.0, result


@pytest.mark.xfail(strict=True, reason=(
    "known limitation (module docstring): harness tests share the program's interpreter, "
    "so an object whose __eq__ is always true passes an assert"))
def test_always_equal_object_is_caught() -> None:
    program = "class Anything:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Anything()\n"
    result = code_reward(_fenced(program), _ADD, CodeRewardOptions())
    assert result.status is RewardStatus.WRONG


@pytest.mark.xfail(strict=True, reason=(
    "known limitation (module docstring): the harness's frames are visible to the program "
    "it runs, so a program that walks them finds the report token"))
def test_token_from_harness_frames_is_not_found() -> None:
    program = _FORGER + (
        "frame = sys._getframe()\nwhile frame:\n    for v in list(frame.f_locals.values()):\n"
        "        if isinstance(v, str) and re.fullmatch(r'[0-9a-f]{32}', v):\n            forge(v)\n"
        "    frame = frame.f_back\n")
    result = code_reward(_fenced(program), _ADD, CodeRewardOptions())
    assert result.status is RewardStatus.WRONG


# ------------------------------------------------------------------ the reward


def test_registered_reward_scores_all_or_nothing_and_fraction() -> None:
    half = "def add(a, b):\n    return 3\n"  # passes the first assert only
    paper = build_reward("code_tests")
    assert paper(_fenced("def add(a, b):\n    return a + b\n"), _ADD).score == 1.0
    result = paper(_fenced(half), _ADD)
    assert result.score == 0.0 and "test 2 wrong_answer" in result.reason and "add(2, 2) == 4" in result.reason
    assert build_reward("code_tests", pass_fraction=True)(_fenced(half), _ADD).score == 0.5


def test_reward_options_are_checked() -> None:
    with pytest.raises(ValueError, match="time_budget"):
        build_reward("code_tests", time_budget=3)


def test_missing_block_is_no_answer() -> None:
    result = code_reward("def add(a, b): return a + b", _ADD, CodeRewardOptions())
    assert result.status is RewardStatus.NO_ANSWER


def test_time_budget_covers_the_whole_problem() -> None:
    reference = json.dumps({"kind": "stdio", "cases": [{"stdin": "", "stdout": "x\n"}] * 6})
    program = "import time\ntime.sleep(0.7)\nprint('x')\n"
    options = CodeRewardOptions(time_budget_s=2.0, pass_fraction=True)
    result = code_reward(_fenced(program), reference, options)
    assert 0 < result.score < 1 and "timeout" in result.reason, result


def test_grade_records_how_each_run_ended() -> None:
    harness = grade("def add(a, b):\n    return a + b\n", parse_tests(_ADD))
    assert harness.runs == (RunStatus.OK,)  # one run for all the asserts
    stdio = json.dumps({"kind": "stdio", "cases": [{"stdin": "", "stdout": ""}] * 2})
    assert grade("print(", parse_tests(stdio)).runs == (RunStatus.COMPILE_ERROR,)  # the same for every case
    assert grade("print()", parse_tests(stdio)).runs == (RunStatus.OK, RunStatus.OK)  # one run per case
    assert {s.value for s in RunStatus} == {"ok", "runtime_error", "compile_error", "timeout", "memory",
                                           "output_limit", "sandbox_error"}
