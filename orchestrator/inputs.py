"""What the driver checks and prepares before any actor starts: that the model and data
exist, prompts templated and tokenised, lengths that fit, the reward set that grades a
benchmark."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from actors.rollout import PromptItem
from orchestrator.stages import StageError
from rewards.config import RewardsConfig, RewardSpec
from tasks.templates import render_prompt


def check_model(model_path: str, setting: str = "model.path") -> None:
    """A model directory, or a hub id the hub serves here (``preflight.check_model``)."""
    from orchestrator.preflight import check_model as check

    check(model_path, setting)


def check_files(paths: Iterable[Path], what: str) -> None:
    for p in paths:
        if not Path(p).exists():
            raise StageError(f"{what} {p} does not exist; make the synthetic one with "
                             f"`r1lab data make addition --out {Path(p).parent}`")


def tokenize(questions: Sequence[str], references: Sequence[str], tokenizer, template: str) -> list[PromptItem]:
    items = []
    for i, (q, ref) in enumerate(zip(questions, references, strict=True)):
        ids = tokenizer(render_prompt(q, template, tokenizer), add_special_tokens=False)["input_ids"]
        items.append(PromptItem(i, tuple(ids), ref))
    return items


def check_lengths(items: Sequence[PromptItem], max_new_tokens: int, max_model_len: int, what: str) -> None:
    from orchestrator.preflight import PreflightError

    longest = max(len(p.prompt_ids) for p in items)
    if longest + max_new_tokens > max_model_len:
        raise PreflightError(f"{what}: the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) "
                         f"exceeds rollout.max_model_len ({max_model_len}); raise rollout.max_model_len "
                         "or lower max_new_tokens")


def rewards_for(reward: str, rewards: RewardsConfig) -> RewardsConfig:
    """The reward set that grades a benchmark: its accuracy reward (with the options
    ``rewards`` gives it, if it names it) plus ``rewards``' format reward."""
    specs = {s.name: s for s in rewards.rewards}
    # A benchmark is graded by its reward whatever prompt types a training config gave it.
    chosen = [specs.get(reward, RewardSpec(name=reward)).model_copy(update={"kinds": None})]
    fmt = rewards.format_reward if rewards.format_reward != reward else None
    if fmt is not None:
        chosen.append(specs[fmt].model_copy(update={"kinds": None}))
    return RewardsConfig(rewards=tuple(chosen), accuracy_reward=reward, format_reward=fmt,
                         workers=rewards.workers, timeout_s=rewards.timeout_s)
