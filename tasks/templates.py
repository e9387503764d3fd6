"""Prompt templates.

``R1_ZERO`` is Table 1 of the DeepSeek-R1 paper, word for word; ``{prompt}`` is replaced
by the question. ``chat`` uses the tokenizer's own chat template (instruct models).
"""

from __future__ import annotations

from typing import Literal

R1_ZERO = (
    "A conversation between User and Assistant. The user asks a question, and the "
    "Assistant solves it. The assistant first thinks about the reasoning process in the "
    "mind and then provides the user with the answer. The reasoning process and answer "
    "are enclosed within <think> </think> and <answer> </answer> tags, respectively, "
    "i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
    "User: {prompt}. Assistant:"
)

TemplateName = Literal["r1zero", "plain", "chat"]


def render_prompt(question: str, template: TemplateName, tokenizer=None) -> str:
    """The text the policy is conditioned on for ``question``."""
    if template == "r1zero":
        return R1_ZERO.format(prompt=question)
    if template == "plain":
        return question
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "template 'chat' needs a tokenizer with a chat_template; "
                "use template: r1zero for base models"
            )
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"unknown template {template!r}; choose r1zero, plain or chat")
