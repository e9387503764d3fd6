"""``r1lab plan``: where every actor of a GRPO stage goes and what it holds in GPU memory.

Nothing runs and nothing is downloaded: the bundles, and which actor sits in which bundle
with what share of it, come from ``orchestrator.placement.grpo_plan`` (what the ``grpo``
stage starts); the parameter count from the model's ``config.json`` (a local ``model.path``) or, for the
hub ids the shipped GPU recipes use, from the built-in ``KNOWN_MODELS`` table.

Placement: the placement groups of ``placement.grpo_plan`` (the stage's group under the
config's strategy, then one STRICT_PACK group per rollout engine, its tensor-parallel
bundles) are packed in that order onto ``NODES`` nodes of ``GPUS`` GPUs each, the way Ray
would (PACK and SPREAD first-fit or round-robin; STRICT_PACK the first node with room for
the whole group; STRICT_SPREAD one node per bundle). A bundle of ≥ 1 GPU takes whole free
GPUs on one node; a fractional bundle shares a GPU with room left. Only GPUs are packed:
nodes are assumed to have the CPUs and the custom resources (``cluster.roles``) the
bundles ask for; the plan lists the latter.

Memory per GPU (bytes; P parameters; L learner ranks; b = bytes of the learner dtype,
2 for bf16 and 4 for fp32) — estimates, not measurements:

- learner rank (mixed-precision Adam, ZeRO paper, Rajbhandari et al. 2020, §3):
  weights P·b, gradients P·b, optimizer P·(8 + 4 if bf16) (Adam m and v in fp32, plus the
  fp32 master weights under bf16). ZeRO-1 divides the optimizer by L, ZeRO-2 also the
  gradients, ZeRO-3 also the weights.
- learner activations for one micro-batch of ``S`` tokens: ``learner.max_tokens_per_micro_batch``
  when micro-batches are packed, else ``micro_batch_groups · G · max_model_len``
  (``max_model_len`` bounds prompt + response, so this is the padded worst case):
  per token per layer ``b · (8·h + 4·I)`` (h hidden, I intermediate: the attention block's
  inputs, q/k/v and output, the SwiGLU gate, up, activation and product; flash attention
  keeps no T×T scores); with gradient checkpointing only each layer's input ``b·h`` plus one
  layer's full set. Plus the logits: ``S · V · (b + 8)`` — the model's logits, the fp32 copy
  the log-prob keeps for backward, and one fp32 temporary of the same size (logsumexp's
  exponentials in forward, the logits' gradient in backward). At long lengths the logits
  dominate — unless ``learner.logprob_chunk_tokens`` C is set: then only one chunk's
  logits live at a time, in forward and in its recomputation in backward, and the term is
  ``min(C, S) · V · (b + 8)``.
- reference model: weights P·b_ref plus logits for ``reference.micro_batch_sequences ·
  max_model_len`` tokens (``reference.logprob_chunk_tokens`` when that is set and fewer) at
  ``(b_ref + 8)`` bytes each (no gradients, no kept activations).
- rollout engine: vLLM claims ``gpu_memory_utilization`` of each of its GPUs; within it the
  weights (P·2 for bf16/auto, /tensor_parallel_size) and the KV cache take the rest
  (minus a 10% allowance for its activations). The KV cache must hold at least one full
  sequence: ``2 · layers · kv_heads · head_dim · 2 bytes · max_model_len / tp``.
- every process on a GPU: ``CONTEXT_BYTES`` for the CUDA context and NCCL buffers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from orchestrator import placement

GiB = 2**30
CONTEXT_BYTES = 1 * GiB  # CUDA context + NCCL/allocator slack per process per GPU
VLLM_ACTIVATION_SHARE = 0.10  # of vLLM's claim, kept back for its activations and CUDA graphs


@dataclass(frozen=True)
class ModelShape:
    """The parts of a Hugging Face ``config.json`` that set the parameter count."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    qkv_bias: bool
    max_position_embeddings: int | None = None
    source: str = ""

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str) -> ModelShape:
        h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        return cls(
            hidden_size=h,
            num_layers=cfg["num_hidden_layers"],
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or h // heads,
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama-style configs say so in attention_bias.
            qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
            max_position_embeddings=cfg.get("max_position_embeddings"),
            source=source,
        )

    @property
    def params(self) -> int:
        """Decoder-only transformer with GQA attention and a SwiGLU MLP, RMSNorm (weights only)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        mlp = 3 * h * i
        per_layer = attn + mlp + 2 * h  # two norms
        embed = v * h
        head = 0 if self.tied_embeddings else v * h
        return embed + self.num_layers * per_layer + h + head

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


def _qwen25(hidden: int, layers: int, inter: int, heads: int, max_pos: int, source: str) -> ModelShape:
    return ModelShape(hidden, layers, inter, 151936, heads, 2, hidden // heads, True, True, max_pos, source)


# Copied from each model's config.json on the Hugging Face hub (2025); a local model.path
# with a config.json always wins over this table.
KNOWN_MODELS: dict[str, ModelShape] = {
    "Qwen/Qwen2.5-Math-1.5B": _qwen25(1536, 28, 8960, 12, 4096, "built-in table (Qwen/Qwen2.5-Math-1.5B)"),
    "Qwen/Qwen2.5-0.5B-Instruct": _qwen25(896, 24, 4864, 14, 32768, "built-in table (Qwen/Qwen2.5-0.5B-Instruct)"),
    "Qwen/Qwen2.5-1.5B-Instruct": _qwen25(1536, 28, 8960, 12, 32768, "built-in table (Qwen/Qwen2.5-1.5B-Instruct)"),
    "Qwen/Qwen2.5-7B": ModelShape(3584, 28, 18944, 152064, 28, 4, 128, False, True, 131072,
                                  "built-in table (Qwen/Qwen2.5-7B)"),
}


class PlanError(ValueError):
    """The plan cannot be made (unknown model, bad cluster string)."""


def model_shape(path: str) -> ModelShape:
    local = Path(path) / "config.json"
    if local.is_file():
        return ModelShape.from_hf_config(json.loads(local.read_text()), str(local))
    if path in KNOWN_MODELS:
        return KNOWN_MODELS[path]
    raise PlanError(
        f"no config.json at {local} and {path!r} is not in the built-in table "
        f"({', '.join(KNOWN_MODELS)}); point model.path at a local model directory"
    )


def parse_cluster(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1:
        raise PlanError(f"--cluster must be NODESxGPUS, e.g. 1x8 or 2x8, got {text!r}")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class Placed:
    """One actor: its bundle, node, GPUs (indices on the node) and memory per GPU."""

    role: str
    name: str
    bundle: int
    node: int | None
    gpus: tuple[int, ...]
    memory: dict[str, int]  # item -> bytes on each of its GPUs

    @property
    def bytes_per_gpu(self) -> int:
        return sum(self.memory.values())


@dataclass(frozen=True)
class Plan:
    nodes: int
    gpus_per_node: int
    gpu_memory_bytes: int
    model: ModelShape
    actors: tuple[Placed, ...]
    problems: tuple[str, ...]
    notes: tuple[str, ...] = ()
    placement: placement.PlacementPlan | None = None  # the bundles and groups the runtime asks Ray for

    @property
    def ok(self) -> bool:
        return not self.problems

    def gpu_usage(self) -> dict[tuple[int, int], list[Placed]]:
        use: dict[tuple[int, int], list[Placed]] = {}
        for a in self.actors:
            for g in a.gpus:
                use.setdefault((a.node, g), []).append(a)
        return dict(sorted(use.items()))

    def gpu_bytes(self, node: int, gpu: int) -> int:
        return sum(a.bytes_per_gpu for a in self.gpu_usage().get((node, gpu), []))

    def lines(self) -> list[str]:
        """A human-readable plan (the CLI prints it)."""
        gib = lambda n: f"{n / GiB:.1f}"  # noqa: E731
        out = [f"model: {self.model.params / 1e9:.3f}B parameters ({self.model.source})",
               f"cluster: {self.nodes} node(s) x {self.gpus_per_node} GPU(s), "
               f"{gib(self.gpu_memory_bytes)} GiB each", ""]
        for a in self.actors:
            where = "no GPU" if not a.gpus else f"node {a.node} GPU {','.join(map(str, a.gpus))}"
            if a.node is None:
                where = "UNPLACED"
            parts = ", ".join(f"{k} {gib(v)}" for k, v in a.memory.items() if v)
            out.append(f"  {a.name:<14} bundle {a.bundle:<3} {where:<18} {gib(a.bytes_per_gpu):>6} GiB/GPU"
                       + (f"  ({parts})" if parts else ""))
        out.append("")
        for (node, gpu), occ in self.gpu_usage().items():
            total = sum(a.bytes_per_gpu for a in occ)
            flag = "  OVER" if total > self.gpu_memory_bytes else ""
            out.append(f"  node {node} GPU {gpu}: {gib(total):>6} / {gib(self.gpu_memory_bytes)} GiB  "
                       f"[{', '.join(a.name for a in occ)}]{flag}")
        out += [f"note: {n}" for n in self.notes]
        out += [f"cannot run: {p}" for p in self.problems]
        return out


# -- memory ------------------------------------------------------------------------------

def learner_memory(cfg, m: ModelShape) -> dict[str, int]:
    lc = cfg.learner
    P, L, b = m.params, cfg.cluster.learner_workers, (2 if lc.dtype == "bf16" else 4)
    z = lc.zero_stage
    weights = P * b // (L if z >= 3 else 1)
    grads = P * b // (L if z >= 2 else 1)
    optim = P * (8 + (4 if lc.dtype == "bf16" else 0)) // (L if z >= 1 else 1)
    tokens = micro_batch_tokens(cfg)
    h, layers = m.hidden_size, m.num_layers
    full_layer = b * (8 * h + 4 * m.intermediate_size)  # per token
    if lc.gradient_checkpointing:
        acts = tokens * (layers * b * h + full_layer)
    else:
        acts = tokens * layers * full_layer
    logits = min(lc.logprob_chunk_tokens or tokens, tokens) * m.vocab_size * (b + 8)
    return {"weights": weights, "grads": grads, "optimizer": optim, "activations": acts,
            "logits": logits, "context": CONTEXT_BYTES}


def micro_batch_tokens(cfg) -> int:
    """The most tokens one learner forward takes: a packed row's budget, or padded groups."""
    lc = cfg.learner
    if lc.max_tokens_per_micro_batch:
        return lc.max_tokens_per_micro_batch
    return lc.micro_batch_groups * cfg.grpo.samples_per_prompt * cfg.rollout.max_model_len


def reference_memory(cfg, m: ModelShape) -> dict[str, int]:
    b = 2 if cfg.reference.dtype == "bf16" else 4
    tokens = cfg.reference.micro_batch_sequences * cfg.rollout.max_model_len
    tokens = min(cfg.reference.logprob_chunk_tokens or tokens, tokens)
    return {"weights": m.params * b, "logits": tokens * m.vocab_size * (b + 8), "context": CONTEXT_BYTES}


def reward_model_memory(cfg) -> dict[str, int]:
    """bf16 weights of each distinct reward model (no LM head: a classifier's head is tiny)
    and its activations for one batch, without gradients: one layer's set at a time."""
    weights = acts = 0
    for path in dict.fromkeys(s.path for s in cfg.rewards.reward_models):
        rm = model_shape(path)
        weights += (rm.params - (0 if rm.tied_embeddings else rm.vocab_size * rm.hidden_size)) * 2
        spec = next(s for s in cfg.rewards.reward_models if s.path == path)
        acts = max(acts, spec.batch_size * spec.max_input_tokens * 2 * (8 * rm.hidden_size + 4 * rm.intermediate_size))
    return {"weights": weights, "activations": acts, "context": CONTEXT_BYTES}


def rollout_memory(cfg, m: ModelShape, gpu_memory_bytes: int, gpus: int) -> dict[str, int]:
    r = cfg.rollout
    tp = r.tensor_parallel_size
    b = 4 if r.dtype == "float32" else 2
    weights = m.params * b // tp
    if gpus == 0:  # CPU engine: the KV cache is the configured cap, in host memory
        return {}
    # vLLM's fractional claim is of the whole device, whatever share Ray gave the actor.
    claim = int(r.gpu_memory_utilization * gpu_memory_bytes)
    kv = max(0, int(claim * (1 - VLLM_ACTIVATION_SHARE)) - weights)
    return {"weights": weights, "kv_cache": kv, "activations": claim - weights - kv, "context": CONTEXT_BYTES}


# -- packing -----------------------------------------------------------------------------

Spot = tuple[int | None, tuple[int, ...]]  # a bundle's node (None: unplaced) and GPUs on it


def _fit(g: float, free: list[float]) -> tuple[int, ...] | None:
    """GPUs of one node (``free``: the unclaimed share of each) that take a bundle of ``g``
    GPUs: whole free GPUs for ``g >= 1``, room on one GPU for a fraction; claims them."""
    if g >= 1:
        whole = [k for k, f in enumerate(free) if f >= 1.0][: int(g)]
        if len(whole) < int(g):
            return None
        for k in whole:
            free[k] = 0.0
        return tuple(whole)
    part = next((k for k, f in enumerate(free) if f + 1e-9 >= g), None)
    if part is None:
        return None
    free[part] -= g
    return (part,)


def _pack_bundle(g: float, order: list[int], free: list[list[float]]) -> Spot:
    if g == 0:
        return (order[0], ()) if order else (None, ())
    for n in order:
        gpus = _fit(g, free[n])
        if gpus is not None:
            return n, gpus
    return None, ()


def _pack_group(gp, bundles, free: list[list[float]], nodes: int) -> dict[int, Spot]:
    """One placement group's bundles, the way Ray would under its strategy: PACK first-fit,
    SPREAD round-robin, STRICT_SPREAD one node per bundle, STRICT_PACK all on the first node
    with room for every bundle (else none placed)."""
    gpus = [bundles[b].resources.get("GPU", 0.0) for b in gp.bundles]
    if gp.strategy == "STRICT_PACK":
        for n in range(nodes):
            trial = list(free[n])
            spots = [_pack_bundle(g, [0], [trial]) for g in gpus]
            if all(node is not None for node, _ in spots):
                free[n][:] = trial
                return {b: (n, s[1]) for b, s in zip(gp.bundles, spots, strict=True)}
        return {b: (None, ()) for b in gp.bundles}
    out: dict[int, Spot] = {}
    used: set[int] = set()
    for k, (b, g) in enumerate(zip(gp.bundles, gpus, strict=True)):
        if gp.strategy == "STRICT_SPREAD":
            order = [n for n in range(nodes) if n not in used]
        elif gp.strategy == "SPREAD":
            order = [(k + j) % nodes for j in range(nodes)]
        else:
            order = list(range(nodes))
        out[b] = _pack_bundle(g, order, free)
        if out[b][0] is not None:
            used.add(out[b][0])
    return out


def _pack(pp, nodes: int, gpus_per_node: int) -> tuple[list[Spot], list[str]]:
    """Every bundle of ``pp`` (a ``placement.PlacementPlan``) on ``nodes`` × ``gpus_per_node``,
    group after group in the order the runtime creates them."""
    bad = {b.index for b in pp.bundles if b.resources.get("GPU", 0.0) > 1
           and b.resources["GPU"] != int(b.resources["GPU"])}
    problems = [f"bundle {i} ({pp.bundles[i].role}) asks for {pp.bundles[i].resources['GPU']} GPUs: Ray needs "
                "a whole number above 1; set cluster.gpus_per_* to a whole number or a fraction below 1"
                for i in sorted(bad)]
    free = [[1.0] * gpus_per_node for _ in range(nodes)]
    spots: dict[int, Spot] = {}
    for gp in pp.groups:
        if bad & set(gp.bundles):
            spots.update({b: (None, ()) for b in gp.bundles})
            continue
        spots.update(_pack_group(gp, pp.bundles, free, nodes))
    return [spots[b.index] for b in pp.bundles], problems


# -- the plan ----------------------------------------------------------------------------

def make_plan(cfg, nodes: int, gpus_per_node: int, gpu_memory_bytes: int, model: ModelShape | None = None) -> Plan:
    """Place ``cfg``'s bundles on ``nodes`` × ``gpus_per_node`` GPUs and estimate memory.

    Pure: reads the model's config.json (or the built-in table) and nothing else."""
    m = model or model_shape(cfg.model.path)
    pp = placement.grpo_plan(cfg)
    spots, problems = _pack(pp, nodes, gpus_per_node)
    notes: list[str] = []
    actors = [_placed(cfg, m, a, spots, gpu_memory_bytes) for a in pp.actors]
    unplaced = [a for a in actors if a.node is None]
    if unplaced:
        need = sum(b.resources.get("GPU", 0) for b in pp.bundles)
        problems.append(
            f"{len(unplaced)} actor(s) ({', '.join(a.name for a in unplaced)}) find no room: the bundles need "
            f"{need:g} GPUs ({pp.strategy} for the stage's group, {placement.ENGINE_STRATEGY} for each "
            f"engine's), the cluster has {nodes * gpus_per_node} on {nodes} node(s); "
            "add nodes, or lower cluster.learner_workers / cluster.rollout_engines / rollout.tensor_parallel_size"
        )
    if gpus_per_node and not any(a.gpus for a in actors):
        notes.append("no actor asks for a GPU (cluster.gpus_per_* are 0): this config runs on CPUs")

    notes += [f"{g.name}: bundles {', '.join(map(str, g.bundles))} in one placement group, {g.strategy}"
              for g in pp.groups]
    notes += [f"cluster.roles.{role}: every {role} bundle also asks for {resources}"
              for role in placement.ROLES if (resources := placement.role_resources(cfg.cluster, role))]
    plan = Plan(nodes, gpus_per_node, gpu_memory_bytes, m, tuple(actors), (), tuple(notes), pp)
    problems += _memory_problems(cfg, plan)
    return Plan(nodes, gpus_per_node, gpu_memory_bytes, m, tuple(actors), tuple(problems), tuple(notes), pp)


def _placed(cfg, m: ModelShape, a: placement.ActorPlan, spots, gpu_memory_bytes: int) -> Placed:
    """One actor of the placement plan on the GPUs its bundle was packed onto."""
    if a.bundle is None:  # no bundle: floats free, no GPU
        return Placed(a.role, a.name, -1, 0, (), {})
    node, gpus = spots[a.bundle]
    if a.worker_bundles:  # a tensor-parallel engine: one GPU per worker bundle, all on one node
        placed = [spots[b] for b in a.worker_bundles]
        node = placed[0][0] if all(n == placed[0][0] for n, _ in placed) else None
        gpus = tuple(g for _, gs in placed for g in gs) if node is not None else ()
    if a.role == "rollout":
        return Placed(a.role, a.name, a.bundle, node, gpus, rollout_memory(cfg, m, gpu_memory_bytes, len(gpus)))
    if a.role == "learner":
        mem = learner_memory(cfg, m) if gpus else {}
    elif a.role == "reward_model":
        mem = reward_model_memory(cfg) if gpus else {}
    else:
        mem = reference_memory(cfg, m) if gpus else {}
    # Learner and reference processes each use one GPU of their bundle (they share it when co-located).
    return Placed(a.role, a.name, a.bundle, node, gpus[:1] if a.role in ("learner", "reference") else gpus, mem)


def _memory_problems(cfg, plan: Plan) -> list[str]:
    m, cap, out = plan.model, plan.gpu_memory_bytes, []
    r = cfg.rollout
    if m.max_position_embeddings and r.max_model_len > m.max_position_embeddings:
        out.append(f"rollout.max_model_len ({r.max_model_len}) exceeds the model's "
                   f"max_position_embeddings ({m.max_position_embeddings}); lower rollout.max_model_len")
    for a in plan.actors:
        if a.role == "rollout" and a.gpus:
            one_seq = m.kv_bytes_per_token() * r.max_model_len // r.tensor_parallel_size
            if a.memory["kv_cache"] < one_seq:
                out.append(f"{a.name}: a KV cache of {a.memory['kv_cache'] / GiB:.2f} GiB cannot hold one "
                           f"sequence of {r.max_model_len} tokens ({one_seq / GiB:.2f} GiB); raise "
                           "rollout.gpu_memory_utilization or rollout.tensor_parallel_size, or lower "
                           "rollout.max_model_len")
    for (node, gpu), occ in plan.gpu_usage().items():
        total = sum(a.bytes_per_gpu for a in occ)
        if total <= cap:
            continue
        names = {a.role for a in occ}
        fixes = []
        if "rollout" in names and len(occ) > 1:
            fixes.append("lower rollout.gpu_memory_utilization (vLLM claims that share of the whole GPU)")
        if "learner" in names:
            lm = next(a for a in occ if a.role == "learner").memory
            if cfg.learner.zero_stage < 3 and lm["weights"] + lm["grads"] + lm["optimizer"] > cap / 4:
                fixes.append("raise learner.zero_stage to 3 or add learner ranks (cluster.learner_workers)")
            if not cfg.learner.gradient_checkpointing and lm["activations"] > cap / 4:
                fixes.append("set learner.gradient_checkpointing=true")
            if lm["logits"] > cap / 4:
                chunk = "set learner.logprob_chunk_tokens (e.g. 1024), or " if cfg.learner.zero_stage < 3 else ""
                fixes.append(f"{chunk}lower rollout.max_model_len or learner.micro_batch_groups "
                             "(the learner's logits are micro_batch_groups·G·max_model_len·vocab)")
        if "reference" in names and "learner" in names:
            fixes.append("lower reference.micro_batch_sequences or set "
                         "cluster.colocate_reference_with_learner=false")
        if not fixes:
            fixes.append("use GPUs with more memory (--gpu-memory-gib) or a smaller rollout.max_model_len")
        out.append(f"node {node} GPU {gpu} needs {total / GiB:.1f} GiB "
                   f"({', '.join(a.name for a in occ)}), over its {cap / GiB:.1f} GiB; " + "; ".join(fixes))
    return out


def command(
    config: Annotated[Path, typer.Option("-c", "--config", help="GRPO stage YAML config")],
    cluster: Annotated[str, typer.Option(help="NODESxGPUS, e.g. 1x8 or 2x8")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key.sub=value overrides")] = None,
    gpu_memory_gib: Annotated[float, typer.Option("--gpu-memory-gib", help="memory per GPU")] = 80.0,
) -> None:
    """Show where every actor goes and its GPU memory, without running anything."""
    from rich.console import Console

    from orchestrator.config import ConfigError, load_config

    console = Console()
    try:
        cfg = load_config(config, overrides or [])
        nodes, gpus = parse_cluster(cluster)
        if gpu_memory_gib <= 0:
            raise PlanError(f"--gpu-memory-gib must be positive, got {gpu_memory_gib}")
        plan = make_plan(cfg, nodes, gpus, int(gpu_memory_gib * GiB))
    except (ConfigError, PlanError) as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(2) from None
    for line in plan.lines():
        console.print(line, markup=False, highlight=False)
    if not plan.ok:
        raise typer.Exit(2)
    console.print(f"[green]fits[/]: {len([a for a in plan.actors if a.gpus])} GPU actor(s) on "
                  f"{len(plan.gpu_usage())} of {nodes * gpus} GPU(s)")
