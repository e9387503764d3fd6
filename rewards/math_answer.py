"""Math answers: finding them, comparing them, and the ``math_accuracy`` reward
(DeepSeek-R1 §2.2.2, "accuracy rewards"). ``rewards.math`` is the public front: it
re-exports these and adds ``equivalent``, bounded in time for callers' own code.

Two steps, kept apart so each can be tested on its own:

1. ``extract_answer``: find the final answer in a response — the ``<answer>`` block of
   the R1-Zero template (Table 1), else the last ``\\boxed{…}``/``\\fbox{…}`` after the
   reasoning, else the sentence after "the answer is". With ``strict=False`` it also
   falls back to Math-Verify's own search (last LaTeX expression, last number), which is
   what Math-Verify's and most frameworks' tests assume.
2. ``compare``: parse both answers with Math-Verify (latex2sympy + sympy) and compare
   them: numbers with separators, fractions, decimals, percentages, LaTeX, intervals,
   sets and tuples, matrices, equations, symbolic expressions, several answers.

Nothing here has a time limit: sympy can be made to run for ever (``9!!!!``) and holds
the GIL while it does. Score through ``rewards.isolation.pool.ScoringPool``, which runs
rewards in worker processes under a wall-clock deadline. Math-Verify's own
``signal.alarm`` timeouts are switched off (``parsing_timeout=None``,
``timeout_seconds=None``): they raise off the main thread, which is how every score
inside Ray workers once became 0 in other systems.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from rewards.basic import summary_of
from rewards.types import RewardFn, RewardResult, RewardStatus

# Math-Verify warns once per process that its timeout is off; the pool is our timeout.
# Quieted only where the user has not set a level of their own.
for _name in ("math_verify.parser", "math_verify.grader"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.ERROR)

Extraction = Literal["strict", "loose"]

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "The answer is", "Final Answer:", "answer: " — the last one in the text wins.
_ANSWER_IS = re.compile(r"\b(?:final\s+)?answer\s*(?:is\b\s*:?|:)", re.IGNORECASE)
# $$…$$, \[…\], \(…\), $…$; an inline $…$ stays on one line; \$ is a dollar sign.
_MATH_ENV = re.compile(
    r"(?<!\\)\$\$(?P<dd>.+?)\$\$|\\\[(?P<sq>.+?)\\\]|\\\((?P<rd>.+?)\\\)"
    r"|(?<!\\)\$(?P<d>(?:\\\$|[^$\n])+?)(?<!\\)\$",
    re.DOTALL,
)
_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[")
# Thousands separated by a thin space or a space (LaTeX prints $1\,000$ and $1 000$
# as 1000); Math-Verify would read them as products.
_SPACED_THOUSANDS = re.compile(r"(?<=\d)(?:\\[,;: ]|~| )(?=\d{3}(?!\d))")
# 1.5e3 (programming notation) as a whole answer; in LaTeX ``e`` is Euler's number.
_E_NOTATION = re.compile(r"([-+]?\d+(?:\.\d+)?)[eE]([-+]?\d+)")
# A line break typed as ``\\`` right before a command name is an escaping slip
# (``\\frac``) in JSON-dumped data, never meant as a break.
_DOUBLED_BACKSLASH = re.compile(r"(?<!\\)\\\\(?=[a-zA-Z])")
_TEXT_ARG = re.compile(r"\\(?:text|textbf|textit|textnormal|mathrm|mbox|operatorname)\s*\{[^{}]*\}")
_ENV_NAME = re.compile(r"\\(?:begin|end)\s*\{[^{}]*\}")
_COMMAND = re.compile(r"\\[a-zA-Z]+")
_FUNCTION_NAMES = re.compile(r"\b(?:sqrt|sin|cos|tan|cot|sec|csc|log|ln|exp|pi|oo|inf|mod)\b")
_WORD = re.compile(r"[A-Za-z]{2,}")
_DECIMAL = re.compile(r"(?<![\d.])(\d*)\.(\d+)")
# Separators allowed between several boxed answers read as one: commas, "and", \quad …
_BOX_SEPARATOR_MAX_CHARS = 40
_BOX_SEPARATOR_MAX_WORDS = 3
# Loose extraction hands at most this tail of a response to Math-Verify's regexes:
# the final answer sits at the end, and its search is slow on megabyte inputs.
_LOOSE_TAIL_CHARS = 4000


@dataclass(frozen=True)
class Answer:
    """An answer found in a text and where it came from (for the reward's reason)."""

    text: str
    source: str  # "answer_tag" | "boxed" | "answer_is" | "whole" | "search"


# --- extraction ------------------------------------------------------------------


def _match_brace(text: str, open_at: int) -> int | None:
    """Index just past the ``}`` closing the ``{`` at ``open_at``; None if unclosed."""
    depth = 0
    for i in range(open_at, len(text)):
        c = text[i]
        if c == "\\":  # \{ and \} are literal braces, not grouping
            continue
        if c == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif c == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _boxes(text: str) -> list[tuple[int, int]] | None:
    """(start, end) of every ``\\boxed{…}``/``\\fbox{…}`` outside another box; None
    when the last one never closes (a truncated response states no final answer)."""
    spans = []
    pos = 0
    while (m := _BOX_OPEN.search(text, pos)) is not None:
        end = _match_brace(text, m.end() - 1)
        if end is None:  # and no later box can close inside it
            return None
        spans.append((m.start(), end))
        pos = end
    return spans


def last_boxed(text: str) -> str | None:
    """The last ``\\boxed{…}`` or ``\\fbox{…}`` in ``text``, wrapper included; None if
    there is none or it is not closed."""
    spans = _boxes(text)
    if not spans:
        return None
    start, end = spans[-1]
    return text[start:end]


def unbox(boxed: str | None) -> str | None:
    """The content of a ``\\boxed{…}``/``\\fbox{…}`` string; None if it is not one."""
    if boxed is None:
        return None
    m = _BOX_OPEN.match(boxed)
    if m is None or _match_brace(boxed, m.end() - 1) != len(boxed):
        return None
    return boxed[m.end() : -1]


def _is_separator(gap: str) -> bool:
    """True when ``gap`` only joins two boxed answers: ``, `` ``and`` ``\\quad``."""
    if len(gap) > _BOX_SEPARATOR_MAX_CHARS or "\n\n" in gap or re.search(r"\.\s", gap):
        return False
    words = _WORD.findall(_COMMAND.sub(" ", gap))
    return len(words) <= _BOX_SEPARATOR_MAX_WORDS


def _boxed_run(text: str, spans: list[tuple[int, int]] | None) -> tuple[int, str] | None:
    """Start and text of the last boxed answer with the boxes it is listed with.

    ``\\boxed{1} and \\boxed{2}`` is one answer, {1, 2} (Math-Verify joins them the same
    way); a box three sentences back is not part of it. ``spans``: ``_boxes(text)``.
    """
    if not spans:
        return None
    first = len(spans) - 1
    while first > 0 and _is_separator(text[spans[first - 1][1] : spans[first][0]]):
        first -= 1
    return spans[first][0], text[spans[first][0] : spans[-1][1]]


def _after_marker(text: str) -> tuple[int, str] | None:
    """Start and text of the answer stated after the last "the answer is" / "Answer:"."""
    marker = None
    for marker in _ANSWER_IS.finditer(text):
        pass
    if marker is None:
        return None
    tail = text[marker.end() :].lstrip(" \t*:")
    env = _MATH_ENV.match(tail)
    if env is not None:
        return marker.start(), env.group(0)
    # Up to the end of the sentence; a period inside a number is not one.
    sentence = re.split(r"\n|\.(?!\d)|<\|", tail, maxsplit=1)[0].strip()
    return (marker.start(), sentence) if sentence else None


def _is_bare(text: str) -> bool:
    """True when ``text`` is an answer alone (``x=3``, ``\\frac{1}{2}\\text{ cm}``), not prose."""
    s = _ENV_NAME.sub(" ", _TEXT_ARG.sub(" ", text))
    s = _FUNCTION_NAMES.sub(" ", _COMMAND.sub(" ", s))
    return _WORD.search(s) is None


def extract_answer(response: str, *, strict: bool = True) -> Answer | None:
    """The final answer of a response, or None when it states none.

    Order: the last ``<answer>…</answer>`` block (R1-Zero template); otherwise, in the
    text after the last ``</think>`` (an opened but unclosed ``<think>`` means the
    reasoning never finished: no answer), the last boxed answer, then the sentence after
    the last "the answer is"/"Answer:", then the whole text if it is an answer alone.
    ``strict=False`` adds Math-Verify's search of the text's last 4,000 characters (last
    LaTeX expression, last number) — lenient, so the reward defaults to strict: the
    paper requires the final answer "in a specified format (e.g., within a box)".
    """
    close = response.rfind("</answer>")
    if close >= 0:
        open_ = response.rfind("<answer>", 0, close)
        if open_ >= 0:
            inner = response[open_ + len("<answer>") : close].strip()
            boxed = _boxed_run(inner, _boxes(inner))
            return Answer(boxed[1] if boxed is not None else inner, "answer_tag") if inner else None
    if "<think>" in response and "</think>" not in response:
        return None  # the reasoning never closed: no summary, no answer
    region = summary_of(response)
    spans = _boxes(region)
    if spans is None:
        return None  # cut off inside its final box
    # The final answer is the last one stated: "… \\boxed{255} … The final answer is
    # $10,455$." answers 10,455.
    boxed = _boxed_run(region, spans)
    stated = _after_marker(region)
    if boxed is not None and (stated is None or boxed[0] > stated[0]):
        return Answer(boxed[1], "boxed")
    if stated is not None:
        return Answer(stated[1], "answer_is")
    whole = region.strip()
    if whole and len(whole) <= 1000 and (_is_bare(whole) or _single_env(whole) is not None):
        return Answer(whole, "whole")
    if not strict and whole:
        return Answer(whole[-_LOOSE_TAIL_CHARS:], "search")
    return None


# --- parsing and comparison ------------------------------------------------------


def _single_env(text: str) -> str | None:
    """The inside of ``text`` when all of it is one ``$…$``/``\\(…\\)``/``\\[…\\]``."""
    m = _MATH_ENV.fullmatch(text.strip())
    if m is None:
        return None
    return next(g for g in m.groups() if g is not None)


_LATEX = [LatexExtractionConfig(boxed_match_priority=0)]
_EXPR = [ExprExtractionConfig()]
_SEARCH = [LatexExtractionConfig(), ExprExtractionConfig()]


def _parse(answer: str) -> list[Any]:
    """Math-Verify candidates (sympy objects, then the matched string) for an answer."""
    answer = _DOUBLED_BACKSLASH.sub(r"\\", answer.strip())
    answer = _SPACED_THOUSANDS.sub("", answer)
    inner = _single_env(answer)
    body = inner.strip() if inner is not None and "$" not in inner else answer
    if (e_notation := _E_NOTATION.fullmatch(body)) is not None:
        body = f"{e_notation.group(1)} \\times 10^{{{e_notation.group(2)}}}"
    if not _DELIMITED.search(body) and _is_bare(body):
        # A bare answer is LaTeX without its $…$: add them so Math-Verify reads it.
        boxed = "\\boxed" in body or "\\fbox" in body
        found = parse(body if boxed else f"${body}$", _LATEX, parsing_timeout=None)
    else:
        # Prose around the answer: Math-Verify's own search, which weighs the last
        # LaTeX expression against the last number ("the largest $n$ is 34").
        found = parse(answer, _SEARCH, parsing_timeout=None)
    if all(isinstance(x, str) for x in found):
        # LaTeX gave no expression (``17 \\bmod 5``, "90 degrees"): try plain numbers.
        found = parse(body, _EXPR, parsing_timeout=None) + found
    return found


def _decimal_places(answer: str, min_significant_digits: int) -> int | None:
    """Places shown by the prediction's most precise decimal, if it has enough digits."""
    decimals = _DECIMAL.findall(answer)
    if not decimals:
        return None
    whole, frac = max(decimals, key=lambda d: len(d[1]))
    if len((whole + frac).lstrip("0")) < min_significant_digits:
        return None
    return len(frac)


def compare(
    pred: str,
    gold: str,
    *,
    float_rounding: int | None,
    min_significant_digits: int,
    strict_variables: bool,
    set_relation: bool,
) -> tuple[bool | None, str]:
    """(verdict, why): None when the gold answer cannot be parsed."""
    gold_parsed = _parse(gold)
    if not gold_parsed:
        return None, f"gold answer {gold[:60]!r} could not be parsed"
    pred_parsed = _parse(pred)
    if not pred_parsed:
        return False, f"answer {pred[:60]!r} could not be parsed"
    if float_rounding is None:
        # A decimal counts as an exact value when it matches to every place it shows
        # and has enough significant digits: 2.6667 = 8/3, 0.067 ≠ 0.066793.
        float_rounding = _decimal_places(pred, min_significant_digits) or 6
    # raise_on_error: Math-Verify would otherwise turn a failing comparison into False,
    # a verifier bug disguised as a wrong answer; raised, the pool reports ERROR.
    same = verify(
        gold_parsed,
        pred_parsed,
        float_rounding=float_rounding,
        strict=strict_variables,
        allow_set_relation_comp=set_relation,
        timeout_seconds=None,
        raise_on_error=True,
    )
    shown = f"{_shown(pred_parsed)} {'=' if same else '≠'} {_shown(gold_parsed)}"
    return same, shown


def _shown(parsed: list[Any]) -> str:
    return str(parsed[-1])[:60]  # the matched string: cheap, unlike str() of sympy


# --- what is cheap to compare, and answers as strings ---------------------------

# What Math-Verify parses quickly in this process. Anything else may run for ever in
# sympy (``9!!!!``, ``2^{2^{2^{2^{2^{2}}}}}``, ``\\binom{10^9}{10^8}``, ``1e99999``):
# ``rewards.math.equivalent`` compares it in a worker process with a deadline.
_CHEAP_MAX_CHARS = 100
_CHEAP_MAX_POWERS = 2
_POWER = re.compile(r"\^|\*\*")
# One digit, one letter or a degree sign: ``x^2``, ``10^{4}``, ``e^{x}``, ``90^\circ``.
_SMALL_EXPONENT = re.compile(
    r"(?:\^|\*\*)\s*(?:-?\d(?!\d)|[a-zA-Z](?![a-zA-Z])|\\circ|\\prime"
    r"|\{\s*(?:-?\d|[a-zA-Z]|\\circ|\\prime)\s*\})(?!\s*(?:\^|\*\*|!))"
)
_LONG_E_EXPONENT = re.compile(r"\d[eE][-+]?\d{3}")
_SAFE_COMMANDS = frozenset(
    "frac dfrac tfrac cfrac sqrt pi cdot times div left right circ prime infty le leq ge geq"
    " lt gt ne neq pm mp in notin cup cap setminus emptyset varnothing mathbb boxed fbox"
    " dots ldots cdots quad qquad approx angle degree sin cos tan cot sec csc log ln exp"
    " alpha beta gamma delta epsilon varepsilon theta lambda mu sigma phi varphi omega"
    " text textbf textit textnormal mathrm mbox begin end pmatrix bmatrix matrix".split()
)
_SAFE_WORDS = frozenset("sqrt sin cos tan cot sec csc log ln exp pi oo inf mod and or".split())
_SPACING = re.compile(r"\\[,;:! ]|\\(?:left|right)\b|\s+")


def cheap_to_compare(answer: str) -> bool:
    """True when Math-Verify reads ``answer`` in well under a second: short, no
    factorial, at most two powers, each of one digit or letter, none stacked."""
    if len(answer) > _CHEAP_MAX_CHARS or "!" in answer.replace("\\!", ""):
        return False
    powers = len(_POWER.findall(answer))
    if powers > _CHEAP_MAX_POWERS or len(_SMALL_EXPONENT.findall(answer)) != powers:
        return False
    if _LONG_E_EXPONENT.search(answer):
        return False
    if any(c[1:] not in _SAFE_COMMANDS for c in _COMMAND.findall(answer)):
        return False
    words = _WORD.findall(_COMMAND.sub(" ", _ENV_NAME.sub(" ", _TEXT_ARG.sub(" ", answer))))
    return all(w.lower() in _SAFE_WORDS for w in words)


def as_written(answer: str) -> str:
    """``answer`` as a string to compare when it is no mathematics Math-Verify reads
    (``12:00``): Unicode-normalised, without ``$``, a box, spacing or a final period."""
    text = unicodedata.normalize("NFKC", answer).strip().strip("$").strip()
    text = unbox(text) or text
    return _SPACING.sub("", text).rstrip(".").casefold()


def math_accuracy(
    response: str,
    reference: str,
    *,
    extraction: Extraction = "strict",
    float_rounding: int | None = None,
    min_significant_digits: int = 3,
    strict_variables: bool = True,
    set_relation: bool = False,
    max_answer_chars: int = 1000,
) -> RewardResult:
    """1 when the response's final answer is equivalent to the reference answer.

    ``extraction``: "strict" (default) reads only an ``<answer>`` block, a box or "the
    answer is"; "loose" also searches the text (see ``extract_answer``).
    ``max_answer_chars``: a longer final answer is wrong without parsing — degenerate
    outputs (``\\boxed{1+1+1+…}``) would otherwise each cost a timeout and a worker.
    The other arguments are the conventions of ``rewards.math.equivalent``.
    """
    gold = extract_answer(reference, strict=False)
    if gold is None:
        return RewardResult(0.0, RewardStatus.UNGRADABLE, "empty reference answer")
    answer = extract_answer(response, strict=extraction == "strict")
    if answer is None:
        how = "box, <answer> or 'the answer is'" if extraction == "strict" else "answer"
        return RewardResult(0.0, RewardStatus.NO_ANSWER, f"no final answer ({how}) found")
    if answer.source != "search" and len(answer.text) > max_answer_chars:
        reason = f"{answer.source}: answer of {len(answer.text)} chars, over {max_answer_chars}"
        return RewardResult(0.0, RewardStatus.WRONG, reason)
    verdict, why = compare(
        answer.text,
        gold.text,
        float_rounding=float_rounding,
        min_significant_digits=min_significant_digits,
        strict_variables=strict_variables,
        set_relation=set_relation,
    )
    if verdict is None:
        return RewardResult(0.0, RewardStatus.UNGRADABLE, why)
    if verdict:
        return RewardResult(1.0, RewardStatus.CORRECT, f"{answer.source}: {why}")
    return RewardResult(0.0, RewardStatus.WRONG, f"{answer.source}: {why}")


def answer_vote(response: str, options: Mapping[str, Any]) -> str | None:
    """What a response votes for in cons@k under ``math_accuracy``: its final answer as
    the reward extracts it (``options["extraction"]``), without ``$…$`` or a box around
    it (``$\\boxed{3}$`` and ``3`` are one vote, and samples.jsonl stays readable); None
    (no vote) without one. Equivalent answers vote together: see ``vote_response``."""
    found = extract_answer(response, strict=options.get("extraction", "strict") == "strict")
    if found is None:
        return None
    shown = found.text.strip().strip("$").strip()
    return unbox(shown) or shown


def vote_response(answer: str) -> str:
    """A response that states ``answer``. Two votes are one when ``math_accuracy`` grades
    one, stated so, correct against the other as reference (``\\frac12`` and ``0.5``)."""
    return f"<answer>{answer}</answer>"


def build_math_accuracy(
    extraction: Extraction = "strict",
    float_rounding: int | None = None,
    min_significant_digits: int = 3,
    strict_variables: bool = True,
    set_relation: bool = False,
    max_answer_chars: int = 1000,
) -> RewardFn:
    if extraction not in ("strict", "loose"):
        raise ValueError(f"math_accuracy extraction must be 'strict' or 'loose', got {extraction!r}")
    if float_rounding is not None and not 0 <= float_rounding <= 15:
        raise ValueError(f"float_rounding must be in 0..15 or null, got {float_rounding}")

    def reward(response: str, reference: str) -> RewardResult:
        return math_accuracy(
            response,
            reference,
            extraction=extraction,
            float_rounding=float_rounding,
            min_significant_digits=min_significant_digits,
            strict_variables=strict_variables,
            set_relation=set_relation,
            max_answer_chars=max_answer_chars,
        )

    return reward
