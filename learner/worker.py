"""The learner: one DeepSpeed data-parallel rank per ``LearnerWorker`` actor.

A step consumes this rank's share of the step's groups *as they arrive* (the driver
``feed``s ObjectRefs while ``train_step`` runs; the actor is threaded for that), turns
them into micro-batches, and runs forward/backward on each at once; DeepSpeed reduces
gradients across ranks and applies the optimizer at the accumulation boundary.

Loss scaling: ``learner.grpo.aggregate`` divides by the *global* number of sequences (or
tokens), so summing the micro-batch losses of all ranks gives the full-batch loss.
DeepSpeed averages gradients over ranks, hence ``backward(loss * world_size,
scale_wrt_gas=False)``: the sum of gradients is then exactly the full-batch gradient.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from learner import grpo
from learner.batch import ScoredGroup, TrainBatch, collate
from learner.config import GRPOLossConfig, LearnerConfig
from learner.weight_sync import WeightSpec, create_group, free_port, node_ip, send_weights

log = logging.getLogger(__name__)


@dataclass
class StepStats:
    """Sums and counts from one rank's step; ``merge`` adds ranks, ``finalize`` divides."""

    sequences: float = 0.0
    response_tokens: float = 0.0
    reward_sum: float = 0.0
    accuracy_sum: float = 0.0
    accuracy_count: float = 0.0
    format_sum: float = 0.0
    format_count: float = 0.0
    truncated: float = 0.0
    staleness_sum: float = 0.0
    gap_sum: float = 0.0
    gap_tokens: float = 0.0
    kl_sum: float = 0.0
    clip_count: float = 0.0
    loss_tokens: float = 0.0
    surrogate_sum: float = 0.0
    zero_std_groups: float = 0.0
    groups: float = 0.0
    learner_seconds: float = 0.0
    wait_seconds: float = 0.0
    grad_norm: float = 0.0
    # component name -> [sum, count] (reward-model scores, reported as reward/<name>)
    components: dict[str, list[float]] = field(default_factory=dict)

    def merge(self, other: StepStats) -> StepStats:
        out = StepStats()
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "components":
                combined = {k: [x + y for x, y in zip(a.get(k, [0.0, 0.0]), b.get(k, [0.0, 0.0]), strict=True)]
                            for k in a.keys() | b.keys()}
            elif f.name.endswith("seconds") or f.name == "grad_norm":
                combined = max(a, b)  # ranks run in parallel, the step takes the slowest
            else:
                combined = a + b
            setattr(out, f.name, combined)
        return out

    def finalize(self) -> dict[str, float]:
        def div(a: float, b: float) -> float:
            return a / b if b else float("nan")

        return {
            "reward_mean": div(self.reward_sum, self.sequences),
            "accuracy": div(self.accuracy_sum, self.accuracy_count),
            "format_ok": div(self.format_sum, self.format_count),
            "response_tokens_mean": div(self.response_tokens, self.sequences),
            "truncated_frac": div(self.truncated, self.sequences),
            "staleness_mean": div(self.staleness_sum, self.sequences),
            "logprob_gap": div(self.gap_sum, self.gap_tokens),
            "kl": div(self.kl_sum, self.loss_tokens),
            "clip_frac": div(self.clip_count, self.loss_tokens),
            "surrogate_loss": div(self.surrogate_sum, self.loss_tokens),
            "zero_std_group_frac": div(self.zero_std_groups, self.groups),
            "learner_tokens_per_s": div(self.response_tokens, self.learner_seconds),
            "grad_norm": self.grad_norm,
            **{f"reward/{k}": div(total, n) for k, (total, n) in sorted(self.components.items())},
        }


class LearnerWorker:
    """One data-parallel rank. Rank 0 also sends weight pushes."""

    def __init__(self, model_path: str, config: LearnerConfig, *, rank: int, world_size: int,
                 temperature: float, groups_per_rank: int, samples_per_prompt: int,
                 loss: GRPOLossConfig | None = None, seed: int = 0,
                 sft_micro_batch_sequences: int | None = None,
                 sft_micro_batches_per_step: int | None = None) -> None:
        """GRPO: a step is ``groups_per_rank`` groups of ``samples_per_prompt``, in
        micro-batches of ``config.micro_batch_groups`` groups, under ``loss``. SFT
        (``sft_step``, no ``loss``): a step is ``sft_micro_batches_per_step`` micro-batches
        of ``sft_micro_batch_sequences``."""
        self.model_path = model_path
        self.config = config
        self.loss = loss
        self.rank = rank
        self.world_size = world_size
        self.temperature = temperature
        self.groups_per_rank = groups_per_rank
        self.samples_per_prompt = samples_per_prompt
        self.sft_shape = (sft_micro_batch_sequences, sft_micro_batches_per_step)
        self.seed = seed
        self.version = 0
        self._inbox: queue.Queue = queue.Queue()
        self._weight_group = None
        self._weight_spec: WeightSpec | None = None

    def address(self) -> tuple[str, int]:
        """An address for the rank-0 rendezvous (call on rank 0 before ``setup``)."""
        return node_ip(), free_port()

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the DeepSpeed group and build the engine (all ranks at once)."""
        config, rank, world_size = self.config, self.rank, self.world_size
        model_path, seed = self.model_path, self.seed
        groups_per_rank, samples_per_prompt = self.groups_per_rank, self.samples_per_prompt
        cuda = torch.cuda.is_available()
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
            WORLD_SIZE=str(world_size), LOCAL_RANK="0",
        )
        if not cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        backend = config.backend if config.backend != "auto" else ("nccl" if cuda else "gloo")
        self.backend = backend
        torch.manual_seed(seed)

        importlib.import_module("torch._dynamo")  # zero.Init needs it imported first
        import deepspeed
        from transformers import AutoModelForCausalLM

        deepspeed.init_distributed(dist_backend=backend)
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        dtype = torch.bfloat16 if config.dtype == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.config.use_cache = False
        self.tokenizer_pad_id = int(model.config.pad_token_id or model.config.eos_token_id or 0)

        if self.sft_shape[0] is not None:
            micro_sequences, gas = self.sft_shape
        else:
            micro_sequences = config.micro_batch_groups * samples_per_prompt
            gas = groups_per_rank // config.micro_batch_groups
        ds_config = {
            "train_micro_batch_size_per_gpu": micro_sequences,
            "gradient_accumulation_steps": gas,
            "train_batch_size": micro_sequences * gas * world_size,
            "gradient_clipping": config.max_grad_norm,
            "zero_optimization": {"stage": config.zero_stage},
            "bf16": {"enabled": config.dtype == "bf16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
            betas=(config.adam_beta1, config.adam_beta2),
        )
        warmup = max(config.warmup_steps, 0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.gas = gas
        return sum(p.numel() for p in model.parameters())

    def collective_backend(self) -> str:
        return self.backend

    # -- streaming input ----------------------------------------------------------------
    def feed(self, refs: Sequence) -> int:
        """Queue ScoredGroup ObjectRefs (nested in a list, so Ray does not resolve them)."""
        for r in refs:
            self._inbox.put(r)
        return self._inbox.qsize()

    def _next_group(self) -> tuple[ScoredGroup, float]:
        import ray

        start = time.monotonic()
        item = self._inbox.get()
        group = ray.get(item) if isinstance(item, ray.ObjectRef) else item
        return group, time.monotonic() - start

    # -- one optimizer step ---------------------------------------------------------------
    def train_step(self, step: int) -> StepStats:
        """Consume ``groups_per_rank`` groups (as they arrive), update, return stats."""
        if self.loss is None:
            raise RuntimeError("this learner was built without a GRPO loss section (loss=...); it can only run sft_step")
        cfg, loss = self.config, self.loss
        stats = StepStats()
        num_sequences = self.groups_per_rank * self.samples_per_prompt * self.world_size
        batches: list[TrainBatch] = []
        pending: list[ScoredGroup] = []
        compute = 0.0
        for _ in range(self.groups_per_rank):
            group, waited = self._next_group()
            stats.wait_seconds += waited
            self._count_group(group, stats)
            pending.append(group)
            if len(pending) == cfg.micro_batch_groups:
                batch = self._collate(pending)
                pending = []
                batches.append(batch)
                if loss.loss_aggregation != "token_mean":
                    # Streaming: backward on each micro-batch as soon as it is complete.
                    t0 = time.monotonic()
                    self._backward(batch, stats, num_sequences, None, first_pass=True)
                    compute += time.monotonic() - t0
        t0 = time.monotonic()
        num_tokens = self._global_tokens(batches)
        passes = range(loss.updates_per_batch)
        for p in passes:
            streamed = p == 0 and loss.loss_aggregation != "token_mean"
            if not streamed:
                for batch in batches:
                    self._backward(batch, stats, num_sequences, num_tokens, first_pass=(p == 0))
            norm = self.engine.get_global_grad_norm()
            stats.grad_norm = float(norm) if norm is not None else float("nan")
        compute += time.monotonic() - t0
        stats.learner_seconds = compute
        self.version += 1
        return stats

    def _backward(self, batch: TrainBatch, stats: StepStats, num_sequences: int,
                  num_tokens: int | None, *, first_pass: bool) -> None:
        loss_cfg = self.loss
        b = batch.to(self.device)
        logp = self._logprobs(b)  # [N, T]
        if first_pass:
            gap = grpo.logprob_gap(logp.detach(), b.old_logprobs, b.loss_mask)
            n_tok = float(b.loss_mask.sum())
            stats.gap_sum += float(gap) * n_tok
            stats.gap_tokens += n_tok
        loss, m = grpo.grpo_loss(
            logp, b.old_logprobs, b.ref_logprobs, b.advantages, b.loss_mask,
            beta=loss_cfg.kl_coef, clip_eps_low=loss_cfg.clip_eps_low, clip_eps_high=loss_cfg.clip_eps_high,
            agg_mode=loss_cfg.loss_aggregation, num_sequences=num_sequences, num_tokens=num_tokens,
            max_tokens=int(b.loss_mask.shape[1]) if loss_cfg.loss_aggregation == "seq_mean_token_sum_norm" else None,
            kl_log_ratio_clip=loss_cfg.kl_log_ratio_clip,
        )
        if first_pass:
            stats.loss_tokens += float(m.token_count)
            stats.surrogate_sum += float(m.surrogate_sum)
            stats.clip_count += float(m.clip_low_count + m.clip_high_count)
            if not math.isnan(float(m.kl_sum)):
                stats.kl_sum += float(m.kl_sum)
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        self.engine.step()

    def _logprobs(self, b: TrainBatch) -> torch.Tensor:
        out = self.engine(input_ids=b.input_ids, attention_mask=b.attention_mask)
        logits = out.logits[:, :-1].float()  # [N, T-1, V]
        lp = grpo.token_logprobs(logits, b.input_ids[:, 1:], temperature=self.temperature)  # [N, T-1]
        return torch.nn.functional.pad(lp, (1, 0))  # [N, T], column 0 predicts nothing

    def _collate(self, groups: list[ScoredGroup]) -> TrainBatch:
        cfg = self.loss
        advantages = [
            grpo.group_advantages(
                torch.tensor(g.rewards, dtype=torch.float32)[None], std_ddof=cfg.advantage_std_ddof,
                eps=cfg.advantage_eps, scale_by_std=cfg.scale_advantages_by_std,
            )[0]
            for g in groups
        ]  # each [G]
        return collate(groups, advantages, self.tokenizer_pad_id)

    def _count_group(self, g: ScoredGroup, stats: StepStats) -> None:
        n = g.group.size
        stats.groups += 1
        stats.sequences += n
        stats.reward_sum += sum(g.rewards)
        graded = [x for x in g.accuracy if not math.isnan(x)]
        stats.accuracy_sum += sum(graded)
        stats.accuracy_count += len(graded)
        for name, values in g.components:
            total = stats.components.setdefault(name, [0.0, 0.0])
            total[0] += sum(values)
            total[1] += len(values)
        fmt = [x for x in g.format_ok if not math.isnan(x)]
        stats.format_sum += sum(fmt)
        stats.format_count += len(fmt)
        stats.response_tokens += sum(len(c.token_ids) for c in g.group.completions)
        stats.truncated += sum(c.finish_reason == "length" for c in g.group.completions)
        stats.staleness_sum += n * (self.version - g.group.policy_version)
        stats.zero_std_groups += float(max(g.rewards) == min(g.rewards))

    def _global_tokens(self, batches: list[TrainBatch]) -> int:
        import torch.distributed as dist

        local = torch.tensor([sum(b.num_response_tokens for b in batches)], dtype=torch.float64,
                             device=self.device)
        dist.all_reduce(local)
        return int(local.item())

    # -- supervised fine-tuning ------------------------------------------------------------
    def sft_step(self, micro_batches: Sequence[Sequence[tuple[Sequence[int], Sequence[int]]]],
                 global_tokens: int) -> dict[str, float]:
        """One optimizer step on this rank's micro-batches of (prompt_ids, response_ids):
        next-token loss on response tokens only, token mean over ``global_tokens`` (the
        response tokens of the whole step, all ranks), so any split gives the same update."""
        from learner.sft import sft_loss

        if len(micro_batches) != self.gas:
            raise ValueError(f"sft_step got {len(micro_batches)} micro-batches, the engine expects {self.gas}")
        totals = {"nll_sum": 0.0, "tokens": 0.0, "correct": 0.0}
        t0 = time.monotonic()
        for rows in micro_batches:
            ids, attn, mask = _pad_sft(rows, self.tokenizer_pad_id, self.device)  # [n, T] each
            logits = self.engine(input_ids=ids, attention_mask=attn).logits[:, :-1]  # [n, T-1, V]
            loss, m = sft_loss(logits, ids[:, 1:], mask[:, 1:], agg_mode="token_mean",
                               num_sequences=None, num_tokens=global_tokens)
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            self.engine.step()
            totals["nll_sum"] += float(m.nll_sum)
            totals["tokens"] += float(m.token_count)
            totals["correct"] += float(m.correct_count)
        self.version += 1
        totals["seconds"] = time.monotonic() - t0
        return totals

    # -- weights ----------------------------------------------------------------------------
    def _named_full_params(self):
        """Full (gathered) parameters in HF names; under ZeRO-3 gathered on every rank."""
        module = self.engine.module
        params = list(module.named_parameters())
        if self.config.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                return [(n, p.detach().clone()) for n, p in params]
        return [(n, p.detach()) for n, p in params]

    def weight_spec(self) -> WeightSpec:
        if self._weight_spec is None:
            self._weight_spec = WeightSpec.of(self._named_full_params(), self.config.weight_push_bucket_bytes)
        return self._weight_spec

    def init_weight_group(self, host: str, port: int, world_size: int, backend: str) -> int:
        if self.rank == 0:
            self._weight_group = create_group(host, port, 0, world_size, backend=backend)
        return self.rank

    def push_weights(self, version: int) -> float:
        """Broadcast the current weights (rank 0; other ranks join a ZeRO-3 gather)."""
        start = time.monotonic()
        named = self._named_full_params()
        if self.rank == 0:
            if self._weight_group is None:
                raise RuntimeError("init_weight_group must run before push_weights")
            spec = self.weight_spec()
            if getattr(self, "_push_buffers", None) is None:
                self._push_buffers = spec.allocate(named[0][1].device)
            send_weights(self._weight_group, spec, [t for _, t in named], self._push_buffers)
        return time.monotonic() - start

    # -- inspection and saving ------------------------------------------------------------
    def sequence_logprobs(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> list[float]:
        """Log-probs of ``response_ids`` after ``prompt_ids`` under the current weights."""
        ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=self.device)
        with torch.no_grad():
            logits = self.engine(input_ids=ids).logits[:, :-1].float()  # [1, T-1, V]
            lp = grpo.token_logprobs(logits, ids[:, 1:], temperature=self.temperature)[0]  # [T-1]
        return lp[len(prompt_ids) - 1 :].tolist()

    def parameter_vector(self) -> torch.Tensor:
        """All parameters flattened into one CPU tensor (gathered under ZeRO-3)."""
        return torch.cat([t.detach().float().reshape(-1).cpu() for _, t in self._named_full_params()])

    def save_hf(self, out_dir: str) -> str:
        """Write an HF-format checkpoint (safetensors) that vLLM and transformers load."""
        named = self._named_full_params()
        if self.rank == 0:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            module = self.engine.module
            state = {n: t.detach().cpu().contiguous() for n, t in named}
            module.save_pretrained(out, state_dict=state, safe_serialization=True)
        return out_dir

    def save_checkpoint(self, ckpt_dir: str, tag: str) -> str:
        """DeepSpeed checkpoint (weights, optimizer, scheduler), for resuming."""
        self.engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"version": self.version})
        return tag

    def load_checkpoint(self, ckpt_dir: str, tag: str | None = None) -> int:
        _, client = self.engine.load_checkpoint(ckpt_dir, tag=tag)
        self.version = int((client or {}).get("version", 0))
        return self.version


def _pad_sft(rows, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and a response mask (1 where the token is part of
    the response, i.e. what the loss is taken on)."""
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [n, T]
    attn = torch.zeros((len(rows), width), dtype=torch.long)  # [n, T]
    mask = torch.zeros((len(rows), width), dtype=torch.float32)  # [n, T]
    for i, (p, r) in enumerate(rows):
        seq = list(p) + list(r)
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        mask[i, len(p) : len(seq)] = 1.0
    return ids.to(device), attn.to(device), mask.to(device)
