"""Format rewards for the paper's two output shapes (DeepSeek-R1 §2.2.2, §2.3.1).

- R1-Zero (Table 1): ``<think> reasoning </think> <answer> answer </answer>``.
- R1 (cold-start format, §2.3.1): ``<think> reasoning </think>`` then a summary, the
  paper's ``|special_token|<reasoning_process>|special_token|<summary>``.

Both are strict, because a lenient format check is a reward to game: every ``<think>``,
``</think>``, ``<answer>`` and ``</answer>`` in the response must be exactly the ones
of the shape, in order; nothing but whitespace may sit outside them; no block may be
empty. Tags are matched exactly (lower case, no spaces), as the template writes them.

Chat templates that end the prompt with ``<think>\\n`` (DeepSeek-R1's own, Qwen3's)
make the response start inside the reasoning: pass ``think_opened_in_prompt=True``.
"""

from __future__ import annotations

import re

from rewards.types import RewardFn, RewardResult, RewardStatus

_TAG = re.compile(r"</?(?:think|answer)>")


def _check_shape(
    response: str,
    shape: tuple[str, ...],
    *,
    think_opened_in_prompt: bool,
    allow_trailing: bool = False,
) -> str | None:
    """Why ``response`` is not exactly ``shape`` (a tag sequence); None if it is.

    ``allow_trailing``: text may follow the last tag (the R1 summary)."""
    text = ("<think>" + response) if think_opened_in_prompt else response
    tags = list(_TAG.finditer(text))
    found = tuple(m.group(0) for m in tags)
    if found != shape:
        return _describe_mismatch(found, shape, think_opened_in_prompt)
    # Text before the first tag, between blocks, and after the last must be blank;
    # the content of every block must not be.
    # Block k lies between tags 2k and 2k+1; gap k before tag 2k (and one after all).
    bounds = [0] + [i for k in range(0, len(tags), 2) for i in (tags[k].start(), tags[k + 1].end())]
    bounds.append(len(text))
    gaps = [text[bounds[i] : bounds[i + 1]] for i in range(0, len(bounds), 2)]
    blocks = [text[tags[k].end() : tags[k + 1].start()] for k in range(0, len(tags), 2)]
    if allow_trailing:
        gaps.pop()
    for i, gap in enumerate(gaps):
        if gap.strip():
            where = "before " + shape[0] if i == 0 else "after " + shape[2 * i - 1]
            return f"text {where}: {gap.strip()[:30]!r}"
    for i, block in enumerate(blocks):
        if not block.strip():
            return f"empty {shape[2 * i]}{shape[2 * i + 1]} block"
    return None


def _describe_mismatch(
    found: tuple[str, ...], shape: tuple[str, ...], think_opened_in_prompt: bool
) -> str:
    for tag in dict.fromkeys(shape):  # each distinct tag once, in order
        n = found.count(tag)
        if n == 0:
            return f"missing {tag}"
        if n > shape.count(tag):
            extra = " (the prompt already opened it)" if think_opened_in_prompt and tag == "<think>" else ""
            return f"{n} {tag} tags, expected {shape.count(tag)}{extra}"
    stray = [t for t in found if t not in shape]
    if stray:
        return f"unexpected {stray[0]}"
    return f"tags out of order: {''.join(found)}"


def r1zero_format(
    response: str, reference: str = "", *, think_opened_in_prompt: bool = False
) -> RewardResult:
    """1 when the response is one think block then one answer block, nothing else."""
    del reference  # the format reward looks at the response alone
    why = _check_shape(
        response,
        ("<think>", "</think>", "<answer>", "</answer>"),
        think_opened_in_prompt=think_opened_in_prompt,
    )
    if why is None:
        return RewardResult(1.0, RewardStatus.CORRECT, "format ok")
    return RewardResult(0.0, RewardStatus.WRONG, why)


def r1_format(
    response: str, reference: str = "", *, think_opened_in_prompt: bool = False
) -> RewardResult:
    """1 when the response is one think block then a non-empty summary.

    The summary may hold any text (markdown, a boxed answer) but no think or answer tag.
    """
    del reference
    why = _check_shape(
        response,
        ("<think>", "</think>"),
        think_opened_in_prompt=think_opened_in_prompt,
        allow_trailing=True,
    )
    if why is None and not response.partition("</think>")[2].strip():
        why = "no summary after </think>"
    if why is None:
        return RewardResult(1.0, RewardStatus.CORRECT, "format ok")
    return RewardResult(0.0, RewardStatus.WRONG, why)


def build_format_r1zero(think_opened_in_prompt: bool = False) -> RewardFn:
    def reward(response: str, reference: str) -> RewardResult:
        return r1zero_format(response, reference, think_opened_in_prompt=think_opened_in_prompt)

    return reward


def build_format_r1(think_opened_in_prompt: bool = False) -> RewardFn:
    def reward(response: str, reference: str) -> RewardResult:
        return r1_format(response, reference, think_opened_in_prompt=think_opened_in_prompt)

    return reward
