"""Learner memory and throughput: chunked log-probs and packed micro-batches (#15).

Prints three figures, each measured side by side in one run:

memory ratio      peak memory of one learner forward + backward (log-probs, GRPO loss,
                  backward) with ``learner.logprob_chunk_tokens`` ÷ the full-logits path,
                  on a tiny model (2 layers, hidden 64, built here, random weights) with
                  Qwen2.5's 151,936-token vocabulary, 8 sequences of 64 prompt + 2,048
                  response tokens, fp32, on CPU, chunks of 1,024 positions (the GPU
                  recipes' setting). Each variant runs in a fresh process and
                  reports its peak RSS above what it held before the forward. The full
                  path at 8 x 2,048 needs ~40 GB (extrapolated; its logits alone are 10 GB), more than a
                  small machine has: it is measured at 1 and 2 sequences and extrapolated
                  linearly (its memory is a constant plus a term per token); the chunked
                  path is measured at 2 and 8. Goal <= 0.25.
throughput ratio  response tokens per second of ``GRPOLearner.train_step`` (DeepSpeed
                  ZeRO-2 on CPU over gloo, world size 1, packed micro-batches) ÷ a plain
                  torch loop (AdamW, the same model, the same packed rows, a masked
                  policy-gradient loss, no DeepSpeed, no Ray) on the demo's tiny model and
                  a demo-sized step (8 groups of 8). Both count compute only (the learner's
                  ``learner_seconds``: collation, packing, GRPO loss and DeepSpeed included).
                  Goal >= 0.9.
padding share     padded ÷ real tokens of a demo-like step in the demo's micro-batches
                  (``micro_batch_groups: 2``, padded to the longest) and packed (none).

Demo-like lengths: the demo's r1zero prompts tokenised by the tiny tokenizer; responses
uniform over 4-48 tokens with a fifth cut at ``max_new_tokens`` = 48 (an early policy's
spread: an assumption, not lengths measured from a run).

    python benchmarks/learner.py [--quick] [--steps 5] [--parts memory,padding,throughput]

About 4 minutes on 2 CPU cores (--quick: about 1.5). The throughput runs use one torch
thread: with two, on 2 cores that other processes also use, OpenMP's waits slowed the
DeepSpeed step far more than the plain loop (ratios of 0.19-0.61 under a concurrent demo
run, 0.94 with one thread under the same load).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN25_VOCAB = 151_936
PROMPT_TOKENS = 64
MAX_NEW_TOKENS = 48  # configs/demo/grpo.yaml
GROUPS, SAMPLES = 8, 8  # the demo's prompts_per_step and samples_per_prompt
PACK_TOKENS = 2048  # max_tokens_per_micro_batch of the throughput runs


# -- memory ---------------------------------------------------------------------------------
def memory_probe(sequences: int, response_tokens: int, chunk: int) -> dict:
    """In this (fresh) process: one forward + backward; RSS in MiB before and at peak."""
    import resource

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from learner import grpo
    from learner.logprobs import model_logprobs

    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = Qwen2Config(vocab_size=QWEN25_VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         tie_word_embeddings=False, use_cache=False)
    model = Qwen2ForCausalLM(config)
    t = PROMPT_TOKENS + response_tokens
    ids = torch.randint(0, QWEN25_VOCAB, (sequences, t))  # [N, T]
    mask = torch.zeros(sequences, t)  # [N, T]
    mask[:, PROMPT_TOKENS:] = 1.0
    old = -torch.rand(sequences, t) * mask  # [N, T]
    adv = torch.randn(sequences)  # [N]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.monotonic()
    logp = model_logprobs(model, ids, torch.ones_like(ids), temperature=1.0, chunk_tokens=chunk)  # [N, T]
    loss, _ = grpo.grpo_loss(logp, old, None, adv, mask, beta=0.0, clip_eps_low=0.2, clip_eps_high=0.2,
                             agg_mode="seq_mean_token_mean", num_sequences=sequences, num_tokens=None)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"before_mib": before, "peak_mib": peak, "seconds": time.monotonic() - start}


def _probe_in_subprocess(sequences: int, response_tokens: int, chunk: int) -> float:
    """Peak RSS above the start of the forward, MiB, measured in a fresh interpreter."""
    out = subprocess.run([sys.executable, __file__, "--memory-probe", str(sequences), str(response_tokens),
                          str(chunk)], capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    return probe["peak_mib"] - probe["before_mib"]


def memory_ratio(response_tokens: int, chunk: int) -> None:
    full = {n: _probe_in_subprocess(n, response_tokens, 0) for n in (1, 2)}
    chunked = {n: _probe_in_subprocess(n, response_tokens, chunk) for n in (2, 8)}
    slope = full[2] - full[1]
    full[8] = full[1] + 7 * slope  # linear in the sequences, through the two measured points
    print(f"memory, one forward + backward, vocabulary {QWEN25_VOCAB:,}, {PROMPT_TOKENS} + {response_tokens} "
          f"tokens per sequence, fp32, peak RSS above the start (MiB):")
    print(f"  sequences   full logits   chunked ({chunk} positions)   ratio")
    print(f"  {1:>9}   {full[1]:>11.0f} (measured)")
    for n in (2, 8):
        note = " (extrapolated)" if n == 8 else " (measured)    "
        print(f"  {n:>9}   {full[n]:>11.0f}{note}  {chunked[n]:>10.0f} (measured)   {chunked[n] / full[n]:.3f}")
    print(f"memory ratio: {chunked[8] / full[8]:.3f} at 8 sequences (full path extrapolated), "
          f"{chunked[2] / full[2]:.3f} at 2 (both measured)  (goal <= 0.25)")


# -- a demo-like step ---------------------------------------------------------------------------
def demo_like_groups(tokenizer, seed: int = 0) -> list:
    """A step of ``GROUPS`` groups of ``SAMPLES``: the demo's r1zero prompts, responses of
    4-48 tokens, a fifth cut at the budget (finish_reason "length")."""
    from learner.batch import Completion, Group, ScoredGroup
    from tasks.synthetic import AdditionTask
    from tasks.templates import render_prompt

    rng = random.Random(seed)
    task = AdditionTask()
    vocab = len(tokenizer)
    out = []
    for k in range(GROUPS):
        a, b = rng.choice(task.operand_range), rng.choice(task.operand_range)
        prompt = tuple(tokenizer(render_prompt(task.question(a, b), "r1zero"))["input_ids"])
        comps = []
        for _ in range(SAMPLES):
            n = MAX_NEW_TOKENS if rng.random() < 0.2 else rng.randint(4, MAX_NEW_TOKENS)
            ids = tuple(rng.randrange(3, vocab) for _ in range(n))
            comps.append(Completion(ids, tuple(-rng.uniform(0.5, 4) for _ in ids), "x",
                                    "length" if n == MAX_NEW_TOKENS else "stop"))
        rewards = tuple(float(rng.random() < 0.5) for _ in range(SAMPLES))
        out.append(ScoredGroup(Group(k, prompt, "a", tuple(comps), 0), rewards, rewards, (1.0,) * SAMPLES))
    return out


def sequence_lengths(groups) -> list[list[int]]:
    return [[len(g.group.prompt_ids) + len(c.token_ids) for c in g.group.completions] for g in groups]


def padding_share(groups, micro_batch_groups: int = 2) -> tuple[float, float]:
    """(padded ÷ real tokens in padded micro-batches of ``micro_batch_groups`` groups, the
    same packed: 0, as a packed row has no padding)."""
    lengths = sequence_lengths(groups)
    real = sum(map(sum, lengths))
    padded = 0
    for start in range(0, len(lengths), micro_batch_groups):
        rows = [n for group in lengths[start:start + micro_batch_groups] for n in group]
        padded += len(rows) * max(rows) - sum(rows)
    return padded / real, 0.0


# -- throughput ---------------------------------------------------------------------------------
def _learner(model_path: str):
    from learner.config import GRPOLossConfig, LearnerConfig
    from learner.grpo_role import GRPOLearner

    cfg = LearnerConfig(zero_stage=2, learning_rate=1e-5, max_tokens_per_micro_batch=PACK_TOKENS)
    learner = GRPOLearner(model_path, cfg, loss=GRPOLossConfig(kl_coef=0.0), rank=0, world_size=1,
                          temperature=1.0, groups_per_rank=GROUPS, samples_per_prompt=SAMPLES,
                          max_new_tokens=MAX_NEW_TOKENS)
    learner.setup(*learner.address())
    return learner


def _plain_loop(model_path: str):
    """The baseline: the model, AdamW and the same packed rows, nothing of DeepSpeed or Ray."""
    import torch
    from transformers import AutoModelForCausalLM

    from learner.logprobs import model_logprobs

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(rows) -> float:
        t0 = time.monotonic()
        for ids, positions, mask, adv in rows:
            logp = model_logprobs(model, ids, None, temperature=1.0, position_ids=positions)  # [1, L]
            (-(logp * mask * adv).sum() / mask.sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.monotonic() - t0

    return step


def _packed_rows(groups):
    """The learner's own packing of ``groups`` (``learner.batch``), as plain tensors."""
    import torch

    from learner.batch import collate, pack_rows, select_rows, token_budget_micro_batches

    whole = collate(groups, [torch.randn(g.group.size) for g in groups], 0)
    rows = []
    for part in token_budget_micro_batches(whole.attention_mask.sum(1).tolist(), PACK_TOKENS):
        b = select_rows(whole, part)
        ids, positions = pack_rows(b.attention_mask, b.input_ids)  # [1, L] each
        mask = b.loss_mask[b.attention_mask.bool()][None]  # [1, L]
        adv = b.advantages[:, None].expand_as(b.loss_mask)[b.attention_mask.bool()][None]  # [1, L]
        rows.append((ids, positions, mask, adv))
    return rows


def throughput_ratio(model_path: str, groups, steps: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    learner = _learner(model_path)
    plain = _plain_loop(model_path)
    rows = _packed_rows(groups)
    tokens = sum(len(c.token_ids) for g in groups for c in g.group.completions)
    ours, theirs = [], []
    for k in range(steps + 1):  # alternating; the first of each is a warm-up
        learner.feed(groups)
        stats = learner.train_step(k)
        seconds = plain(rows)
        if k:
            ours.append(tokens / stats.learner_seconds)
            theirs.append(tokens / seconds)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"throughput, demo model, {GROUPS} groups x {SAMPLES} = {GROUPS * SAMPLES} sequences, {tokens} response "
          f"tokens per step, {len(rows)} packed rows of <= {PACK_TOKENS} tokens, {threads} torch threads, median of "
          f"{steps} steps:")
    print(f"  GRPOLearner.train_step (DeepSpeed ZeRO-2, CPU, gloo, 1 rank): {a:>9.0f} response tokens/s")
    print(f"  plain torch loop (AdamW, same rows)                        : {b:>9.0f} response tokens/s")
    print(f"throughput ratio: {a / b:.3f}  (goal >= 0.9)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="512 response tokens per sequence, 2 steps: a smoke run, "
                    "not the figures")
    ap.add_argument("--steps", type=int, default=5, help="timed throughput steps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the throughput runs")
    ap.add_argument("--chunk", type=int, default=1024, help="logprob_chunk_tokens of the chunked path")
    ap.add_argument("--parts", default="memory,padding,throughput", help="which figures, comma-separated")
    ap.add_argument("--memory-probe", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(*args.memory_probe)))
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers import AutoTokenizer

    from benchmarks._common import tiny_model

    parts = set(args.parts.split(","))
    start = time.monotonic()
    if "memory" in parts:
        memory_ratio(512 if args.quick else 2048, args.chunk)
    model = str(tiny_model(128, 2))  # the demo's shape (tasks.tinymodel.TinyModelSpec)
    groups = demo_like_groups(AutoTokenizer.from_pretrained(model))
    if "padding" in parts:
        before, after = padding_share(groups)
        print(f"padding share (padded / real tokens), a demo-like step: micro_batch_groups=2 padded {before:.3f}, "
              f"packed {after:.3f}")
    if "throughput" in parts:
        throughput_ratio(model, groups, 2 if args.quick else args.steps, args.threads)
    print(f"({time.monotonic() - start:.0f} s)")


if __name__ == "__main__":
    main()
