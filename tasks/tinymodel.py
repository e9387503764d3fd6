"""Tiny Qwen2-architecture models and byte-level BPE tokenizers, built offline.

``build_tiny_model`` trains a tokenizer on a task corpus, creates a small Qwen2 causal LM
(head size 32, the least vLLM's CPU attention accepts) and, optionally, pretrains it on
the task's noisy corpus (see ``tasks.synthetic``) so it becomes a base policy that
answers right only part of the time. Everything is saved in Hugging Face format
(``config.json``, ``model.safetensors``, ``tokenizer.json``) so transformers, vLLM and
DeepSpeed load it from the path. Nothing is downloaded.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tasks.synthetic import AdditionTask, GeneralTask, get_task
from tasks.templates import render_prompt

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
# Qwen2's pre-tokenizer split (digits one by one). transformers rebuilds a Qwen2
# tokenizer's pre-tokenizer with this regex on load, so training with it keeps ids stable.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a tiny Qwen2 model. Defaults: ~0.5 M parameters."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 512
    max_positions: int = 512

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.hidden_size // self.num_heads < 32:
            raise ValueError(
                f"head size {self.hidden_size // self.num_heads} < 32: vLLM's CPU attention "
                "kernel needs head_size >= 32; raise hidden_size or lower num_heads"
            )


def train_tokenizer(corpus: list[str], vocab_size: int, out_dir: Path):
    """Train a byte-level BPE with Qwen2's split and save it as a Qwen2 tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.model_max_length = 4096
    fast.save_pretrained(out_dir)
    return fast


def _pretrain_corpus(task: AdditionTask, n: int, rng: random.Random, *, answer_noise: float,
                     format_noise: float, test_share: float, seed: int,
                     general_share: float = 0.0) -> list[tuple[str, str]]:
    rows = task.rows("train", test_share=test_share, seed=seed)
    general = GeneralTask()
    numbers = [n for n in general.numbers if general.split_of(n, test_share=0.2, seed=seed) == "train"]
    out = []
    for _ in range(n):
        if rng.random() < general_share:
            k = rng.choice(numbers)
            out.append((render_prompt(general.question(k), "r1zero"),
                        general.noisy_response(k, rng, remark_noise=0.4, unhelpful_noise=0.4)))
            continue
        row = rng.choice(rows)
        a, b = (int(x) for x in row.prompt.removeprefix("What is ").split("+"))
        prompt = render_prompt(row.prompt, "r1zero")
        out.append((prompt, task.noisy_response(a, b, rng, answer_noise=answer_noise,
                                                 format_noise=format_noise)))
    return out


def build_tiny_model(
    out_dir: Path,
    *,
    task: str = "addition",
    spec: TinyModelSpec = TinyModelSpec(),
    pretrain_steps: int = 600,
    sequences_per_step: int = 64,
    learning_rate: float = 3e-3,
    answer_noise: float = 0.6,
    format_noise: float = 0.15,
    general_share: float = 0.2,
    test_share: float = 0.1,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> Path:
    """Build (and pretrain) a tiny base model for ``task``; returns ``out_dir``.

    ``general_share`` of the corpus are general prompts (``GeneralTask``), 40% of them with
    a rude remark and 40% with an unhelpful summary: faults for §2.3.4's reward models."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    t = get_task(task)
    corpus = _pretrain_corpus(t, 20000, rng, answer_noise=answer_noise, format_noise=format_noise,
                              test_share=test_share, seed=seed, general_share=general_share)
    tokenizer = train_tokenizer([p + r + EOS for p, r in corpus[:4000]], spec.vocab_size, out_dir)

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = Qwen2ForCausalLM(config)
    if pretrain_steps > 0:
        _pretrain(model, tokenizer, corpus, steps=pretrain_steps, batch=sequences_per_step,
                  lr=learning_rate, rng=rng, progress=progress)
    model.config.dtype = "float32"
    model.save_pretrained(out_dir, safe_serialization=True)
    model.generation_config.save_pretrained(out_dir)
    return out_dir


def _optimize(model, loss_of_batch: Callable[[], torch.Tensor], *, steps: int, lr: float,
              progress: Callable[[int, int, float], None] | None) -> None:
    """``steps`` AdamW steps on ``loss_of_batch()`` (a fresh batch each call), cosine-decayed
    learning rate, gradients clipped to norm 1; leaves the model in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = loss_of_batch()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress is not None:
            progress(step + 1, steps, float(loss.detach()))
    model.eval()


def _pretrain(model, tokenizer, corpus, *, steps, batch, lr, rng, progress) -> None:
    """Next-token loss on the response (the prompt is the fixed template), AdamW, cosine."""
    # Tokenise once: prompt ids and response ids (+ EOS) per example.
    encoded = []
    for prompt, response in corpus:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response + EOS, add_special_tokens=False)["input_ids"]
        encoded.append((p, r))
    start = time.monotonic()

    def loss_of_batch():
        chosen = [encoded[rng.randrange(len(encoded))] for _ in range(batch)]
        width = max(len(p) + len(r) for p, r in chosen)
        ids = torch.full((batch, width), tokenizer.pad_token_id, dtype=torch.long)  # [N, T]
        labels = torch.full((batch, width), -100, dtype=torch.long)  # [N, T]
        attn = torch.zeros((batch, width), dtype=torch.long)  # [N, T]
        for i, (p, r) in enumerate(chosen):
            seq = p + r
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p) : len(seq)] = torch.tensor(r)
            attn[i, : len(seq)] = 1
        return model(input_ids=ids, attention_mask=attn, labels=labels).loss

    _optimize(model, loss_of_batch, steps=steps, lr=lr, progress=progress)
    log.info("pretrained %d steps in %.1fs", steps, time.monotonic() - start)


def build_tiny_reward_model(
    out_dir: Path,
    tokenizer_path: Path,
    examples: list[tuple[str, str, float]],
    *,
    spec: TinyModelSpec = TinyModelSpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                                        num_kv_heads=1),
    steps: int = 200,
    batch: int = 32,
    learning_rate: float = 2e-3,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> Path:
    """A tiny Qwen2 sequence classifier (one logit) trained on labelled
    ``(question, judged text, label)`` examples, in the input format the reward-model
    actor feeds it; saved with ``tokenizer_path``'s tokenizer. Returns ``out_dir``."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

    from rewards.model_input import model_input

    if not examples:
        raise ValueError("build_tiny_reward_model needs labelled examples")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_positions,
        num_labels=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = Qwen2ForSequenceClassification(config)
    encoded = [(tokenizer(model_input(tokenizer, q, t), add_special_tokens=False)["input_ids"][-spec.max_positions:],
                label) for q, t, label in examples]
    def loss_of_batch():
        chosen = [encoded[rng.randrange(len(encoded))] for _ in range(batch)]
        width = max(len(ids) for ids, _ in chosen)
        ids = torch.full((batch, width), tokenizer.pad_token_id, dtype=torch.long)  # [N, T]
        attn = torch.zeros((batch, width), dtype=torch.long)  # [N, T]
        for i, (seq, _) in enumerate(chosen):
            ids[i, : len(seq)] = torch.tensor(seq)
            attn[i, : len(seq)] = 1
        labels = torch.tensor([label for _, label in chosen], dtype=torch.float32)  # [N]
        logits = model(input_ids=ids, attention_mask=attn).logits[:, 0]  # [N]
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)

    _optimize(model, loss_of_batch, steps=steps, lr=learning_rate, progress=progress)
    model.config.dtype = "float32"
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
