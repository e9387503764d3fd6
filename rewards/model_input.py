"""What a reward model (§2.3.4) reads, shared by the reward-model actor and the tiny
reward-model builder so that both format inputs identically."""

from __future__ import annotations


def model_input(tokenizer, question: str, segment: str, input_format: str = "auto") -> str:
    """What a reward model reads: the user's question and the judged part of the answer."""
    if input_format == "chat" or (input_format == "auto" and getattr(tokenizer, "chat_template", None)):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": segment}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return f"User: {question}\nAssistant: {segment}"
